"""Scoring, in three files: `scorer.py` is the model-facing API (`Scorer`: images -> level probabilities,
score, std), `pipeline.py` the streaming run behind `iqa score` (inputs -> DataLoader workers -> batches ->
parts), and `store.py` the on-disk side (parts, sidecar, merge, output writers)."""
