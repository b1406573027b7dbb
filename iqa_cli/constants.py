"""Values that scoring, training and the model families must agree on, kept in one place.

Level centers, widths and default names live with the labels (`iqa_cli.labels`); model-family facts live in
the family's folder (`iqa_cli.models.<family>`).
"""

DEFAULT_MODEL = "zhiyuanyou/DeQA-Score-Mix3"  # what `iqa score` and `Scorer.from_pretrained()` load by default
RUN_FILE = "iqa.json"  # written by `iqa train` next to the weights: how the model is to be scored
DEFAULT_PORT = 18086  # `iqa serve`: Flow-GRPO's `deqa_score_remote` posts to http://127.0.0.1:18086
IGNORE_INDEX = -100  # label value the token losses skip (the convention of torch's cross_entropy)

# The question and response of the papers' scoring prompt (DeQA-Score `src/evaluate/iqa_eval.py`).
DEFAULT_QUESTION = "How would you rate the quality of this image?"
RESPONSE_PREFIX = "The quality of the image is"
RESPONSE_TEMPLATE = RESPONSE_PREFIX + " {}."  # training answer; `{}` is the level name
# Training questions: the reference draws one per image uniformly (`random.choice`, seed 131 per dataset) from
# these ten phrasings (DeQA-Score `build_soft_labels/gen_soft_label.py`, `questions`).
QUESTIONS: tuple[str, ...] = (
    "What do you think about the quality of this image?",
    "Can you rate the quality of this picture?",
    "Can you judge the quality of this image?",
    "How would you rate the quality of this image?",
    "How would you judge the quality of this image?",
    "What is your quality rating for this image?",
    "What's your opinion on the quality of this picture?",
    "Rate the quality of this image.",
    "Could you evaluate the quality of this image?",
    "How do you assess the quality of this image?",
)

# The decompression-bomb limit of an image and of a video frame (width x height): Pillow's default (89,478,485
# pixels, about 0.25 GB as 24-bit RGB). Over it, an image or a video is a row with `error` set.
DEFAULT_MAX_PIXELS = 89_478_485
