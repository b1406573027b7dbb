"""Values that scoring, training and the model families must agree on, kept in one place.

Level centers, widths and default names live with the labels (`iqa_cli.labels`); model-family facts live in
the family's folder (`iqa_cli.models.<family>`).
"""

DEFAULT_MODEL = "zhiyuanyou/DeQA-Score-Mix3"  # what `iqa score` and `Scorer.from_pretrained()` load by default
RUN_FILE = "iqa.json"  # written by `iqa train` next to the weights: how the model is to be scored
IGNORE_INDEX = -100  # label value the token losses skip (the convention of torch's cross_entropy)
