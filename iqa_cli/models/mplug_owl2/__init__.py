"""mPLUG-Owl2, the backbone of the released DeQA-Score, Q-Align and Q-Scorer checkpoints: its config,
vision encoder, visual abstractor, multiway LLaMA, assembled model, checkpoint layouts and LLaMA tokenizer.

One file per sub-network or concern: `config.py` (the released config.json), `vision.py`, `abstractor.py`,
`language_model.py`, `model.py` (the assembly and its forward), `regressor.py` (Q-Scorer's MLP),
`checkpoints.py` (released layouts, LoRA, saving), `tokenizer.py` (sentencepiece, chat template).
"""

# What `iqa train` fine-tunes by default (the base of the released DeQA-Score / Q-Align checkpoints).
DEFAULT_TRAIN_MODEL = "MAGAer13/mplug-owl2-llama2-7b"
# The released checkpoints of this family on the Hugging Face Hub (a typo of one is answered with it).
RELEASED = (
    "zhiyuanyou/DeQA-Score-Mix3",
    "zhiyuanyou/DeQA-Score-LoRA-Mix3",
    "q-future/one-align",
    "2kxx/Qscorer_lora_5_1",
)
# The reference's `find_all_lora_names`: every q_proj and the visual copy of v_proj in the LLM.
LORA_TARGETS = ("self_attn.q_proj", "self_attn.v_proj.multiway.1")
