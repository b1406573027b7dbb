"""FLIVE (PaQ-2-PiQ): `labels_image.csv` from the FLIVE database release (niu-haoran/FLIVE_Database).

Format (verified against pyiqa `scripts/process_flive.py`, which reads `all_img_label['name']` and
`['mos']` from `database/labels_image.csv`, and public loaders using `csv.DictReader` rows `name`, `mos`):
- comma-separated, one header row with at least `name` and `mos`; `name` is a path relative to the
  database folder with a source-set prefix (e.g. `voc_emotic_ava/...jpg`), kept as the image path.
- MOS on 0..100, higher is better. No std is published: the rows get the two-point interpolation
  unless `--pseudo-std` is given. Other columns are kept as extras.
"""

from __future__ import annotations

from iqa_cli.datasets._common import DatasetSpec, csv_reader

FILE_NAME = "labels_image.csv"


read = csv_reader(FILE_NAME, "FLIVE label file", image="name", mos="mos", std=None)

SPEC = DatasetSpec(
    name="flive",
    title="FLIVE (PaQ-2-PiQ)",
    source_help="labels_image.csv (or its directory)",
    reader=read,
)
