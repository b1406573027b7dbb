"""KonIQ-10k: `koniq10k_scores_and_distributions.csv` as released by the KonIQ authors (MMSP Konstanz).

Format (verified against the loaders that read this file: HyperIQA-style `Koniq_10kFolder` reads
`image_name` and `MOS_zscore` with `csv.DictReader`; pyiqa's `scripts/process_koniq10k.py` reads the
sibling `koniq10k_distributions_sets.csv` with the same leading columns; other public loaders quote the
header `image_name,c1,c2,c3,c4,c5,c_total,MOS,SD,MOS_zscore`):
- comma-separated, one header row: image_name, c1..c5 (vote counts per ACR level), c_total, MOS, SD,
  MOS_zscore; image_name is a bare file name (`10004473376.jpg`) under `1024x768/` or `512x384/`.
- MOS is on the 1..5 ACR scale and SD is the std of the same ratings, so both are used together;
  MOS_zscore (0..100, what Q-Align's `gt_score` holds) is kept as an extra column.
Higher is better. Density default pdf (the released DeQA-Score config `build_soft_labels/config.json`).
"""

from __future__ import annotations

from iqa_cli.datasets._common import DatasetSpec, csv_reader

FILE_NAME = "koniq10k_scores_and_distributions.csv"


read = csv_reader(FILE_NAME, "KonIQ-10k score file", image="image_name", mos="MOS", std="SD")

SPEC = DatasetSpec(
    name="koniq",
    title="KonIQ-10k",
    source_help=f"{FILE_NAME} (or its directory)",
    reader=read,
    density="pdf",
)
