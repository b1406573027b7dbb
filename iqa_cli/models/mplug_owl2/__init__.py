"""mPLUG-Owl2, the backbone of the released DeQA-Score, Q-Align and Q-Scorer checkpoints: its config,
vision encoder, visual abstractor, multiway LLaMA, assembled model, checkpoint layouts and LLaMA tokenizer.

One file per sub-network or concern: `config.py` (the released config.json), `vision.py`, `abstractor.py`,
`language_model.py`, `model.py` (the assembly and its forward), `regressor.py` (Q-Scorer's MLP),
`checkpoints.py` (released layouts, LoRA, saving), `tokenizer.py` (sentencepiece, chat template).
"""
