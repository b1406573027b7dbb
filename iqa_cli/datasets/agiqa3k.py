"""AGIQA-3K: `data.csv` as released by the AGIQA-3K authors (lcysyzxdxc/AGIQA-3k-Database).

Format (verified against public loaders and their notes on the official header
`name,prompt,adj1,adj2,style,mos_quality,std_quality,mos_align,std_align`; Q-Align's `agi.json` holds
the `mos_quality` values, 0..~4.5, for names like `AttnGAN_normal_000.jpg`):
- comma-separated, one header row; `name` is a bare file name under `AGIQA-3K/`.
- quality MOS `mos_quality` with its std `std_quality`, higher is better; the text-alignment scores
  (mos_align, std_align) and the prompt columns are kept as extras.
"""

from __future__ import annotations

from iqa_cli.datasets._common import DatasetSpec, csv_reader

FILE_NAME = "data.csv"


read = csv_reader(FILE_NAME, "AGIQA-3K data file", image="name", mos="mos_quality", std="std_quality")

SPEC = DatasetSpec(
    name="agiqa3k",
    title="AGIQA-3K",
    source_help="data.csv (or its directory)",
    reader=read,
)
