"""`iqa score` gives the golden outputs made before the scoring loop was rewritten, row for row, for a folder,
files beside a folder, a `--from` list, WebDataset shards (with --keep) and a Parquet image column, hostile files
among them (a decompression bomb, an empty file, text named .png, a truncated JPEG, CMYK, 16-bit, EXIF-rotated,
a non-ASCII name). How the golden files were made: `tests/golden_scoring.py`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from tests.golden_scoring import CASES, EXPECTED, build_inputs, score_case


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return build_inputs(tmp_path_factory.mktemp("golden"))


@pytest.mark.parametrize("case", list(CASES))
def test_score_gives_the_golden_output(inputs, case, tmp_path):
    out = tmp_path / "scores.parquet"
    result = score_case(case, inputs, out)
    assert result.returncode == 0, result.stderr
    expected = pq.read_table(EXPECTED / f"{case}.parquet")
    got = pq.read_table(out)
    assert got.schema.remove_metadata() == expected.schema.remove_metadata()
    a, b = got.to_pandas(), expected.to_pandas()
    exact = [c for c in a.columns if c not in ("score", "std", "probs", "score_reg")]
    pd.testing.assert_frame_equal(a[exact], b[exact])
    for column in ("score", "std"):
        np.testing.assert_allclose(a[column].to_numpy(float), b[column].to_numpy(float), rtol=0, atol=1e-5)
    for row, (p, q) in enumerate(zip(a["probs"], b["probs"], strict=True)):
        assert (p is None) == (q is None), row
        if p is not None:
            np.testing.assert_allclose(p, q, rtol=0, atol=1e-6)
    metadata = {k: v for k, v in (got.schema.metadata or {}).items() if not k.startswith(b"ARROW:")}
    recorded = {k: v for k, v in (expected.schema.metadata or {}).items() if not k.startswith(b"ARROW:")}
    assert metadata.keys() == recorded.keys()
    for key in (b"model_layout", b"method", b"dtype", b"prompt", b"input_ids", b"level_names", b"decode"):
        assert metadata[key] == recorded[key], key
