"""`iqa score` gives the golden outputs made before the scoring loop was rewritten, row for row, for a folder,
files beside a folder, a `--from` list, WebDataset shards (with --keep) and a Parquet image column, hostile files
among them (a decompression bomb, an empty file, text named .png, a truncated JPEG, CMYK, 16-bit, EXIF-rotated,
a non-ASCII name). How the golden files were made: `tests/golden_scoring.py`.

Three changes since the files were made are deliberate, and asserted here rather than hidden in new files: every
source gives the same error rows (an empty shard member is "empty file (0 bytes)" as an empty file is, and a
shard's `.gif` member is an image as a `.gif` file is); every output's metadata has `unit_errors`; and shard and
Parquet outputs, whose samples may be videos, have the video columns `duration`, `frames`, `fps` (null on image
rows) and the video sampling and prompt in their metadata, since their schema is fixed before a sample is read.
Outputs of files that name no video are as they were.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.golden_scoring import CASES, EXPECTED, IMAGES, build_inputs, score_case


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return build_inputs(tmp_path_factory.mktemp("golden"))


@pytest.mark.parametrize("case", list(CASES))
def test_score_gives_the_golden_output(inputs, case, tmp_path):
    out = tmp_path / "scores.parquet"
    result = score_case(case, inputs, out)
    assert result.returncode == 0, result.stderr
    expected = _as_now(pq.read_table(EXPECTED / f"{case}.parquet"), case)
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
    packed = case in PACKED
    video_keys = {b"video_sampling", b"video_prompt", b"video_input_ids"} if packed else set()
    assert metadata.keys() == recorded.keys() | {b"unit_errors"} | video_keys
    for key in (b"model_layout", b"method", b"dtype", b"prompt", b"input_ids", b"level_names", b"decode"):
        assert metadata[key] == recorded[key], key


PACKED = ("shards", "shards_keep", "parquet")
VIDEO_COLUMNS = (("duration", pa.float32()), ("frames", pa.int32()), ("fps", pa.float32()))


def _as_now(expected: pa.Table, case: str) -> pa.Table:
    """The golden rows with the deliberate changes: packed images as the same files give (from `folder`), and the
    (null) video columns of packed inputs after `height`."""
    if case not in PACKED:
        return expected
    at = expected.schema.get_field_index("height") + 1
    for offset, (name, kind) in enumerate(VIDEO_COLUMNS):
        expected = expected.add_column(at + offset, pa.field(name, kind), pa.nulls(expected.num_rows, kind))
    files = pq.read_table(EXPECTED / "folder.parquet").to_pylist()
    by_name = {row["image"]: row for row in files}
    rows = expected.to_pylist()
    for row in rows:
        source = by_name[_member_file(row, case)]
        if source["image"] in ("empty.jpg", "d.gif"):
            row.update({k: source[k] for k in ("score", "std", "probs", "level", "width", "height", "error")})
    return pa.Table.from_pylist(rows, schema=expected.schema)


def _member_file(row: dict, case: str) -> str:
    """The image file a row was packed from (`build_inputs` packs the sorted files in halves into the shards)."""
    if case == "parquet":
        return row["image"]
    names = sorted(str(p.relative_to(IMAGES)) for p in IMAGES.rglob("*") if p.is_file())
    half = len(names) // 2
    shard, index = int(row["image"][0]), int(row["image"][1:])
    return names[index] if shard == 0 else names[half + index]
