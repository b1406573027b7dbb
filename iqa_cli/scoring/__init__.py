"""Scoring: `readout.py` says what goes into the model and where the answer is read; `scorer.py` is the
model-facing API (`Scorer`: images and videos -> level probabilities, score, std); `config.py`, `plan.py`,
`driver.py`, `local.py`, `loader.py` and `runner.py` are the run behind `iqa score` (sources -> units ->
DataLoader workers -> batches -> pieces); `store.py` and `output.py` the on-disk side (sidecar, pieces, merge,
output writers). docs/ARCHITECTURE.md draws the flow."""
