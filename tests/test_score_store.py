"""Parts and the merged output are built from numpy buffers, without pyarrow's numpy path (which imports pandas):
the tables are the ones `pa.array` gives, and a Parquet run never imports pandas."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from iqa_cli.inputs import InputList, PackedStrings
from iqa_cli.scoring.store import BatchResult, PartWriter, Sidecar, merge_parts
from tests.conftest import REPO_ROOT

LEVELS = ["bad", "poor", "fair", "good", "excellent"]
NAMES = ["a.jpg", "dir/b.png", "caf\u00e9.jpg", "bad-\udcff-byte.jpg", "", "\u65e5\u672c.webp", "g.jpg", "h.jpg"]


def _batch(index: list[int], width: list[int], error: list[str | None]) -> dict:
    return {  # two padded rows (index -1), which the writer drops
        "index": torch.tensor([*index, -1, -1]),
        "width": torch.tensor([*width, 0, 0], dtype=torch.int32),
        "height": torch.tensor([*(w // 2 if w > 0 else -1 for w in width), 0, 0], dtype=torch.int32),
        "error": [*error, None, None],
    }


def _result(n: int, seed: int, regressor: bool) -> BatchResult:
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.ones(5), n + 2).astype(np.float32)
    score = rng.normal(3, 1, n + 2)  # float64, as a scorer may give; the part holds float32
    return BatchResult(probs, score, rng.random(n + 2).astype(np.float32), score.copy() if regressor else None)


def _reference_table(writer: PartWriter) -> pa.Table:
    """What the writer built before: pa.array over numpy (pandas imported) and lists."""
    pending = writer.pending
    cat = {key: np.concatenate([p[key] for p in pending]) for key in ("index", "width", "height", "score")}
    errors = [e for p in pending for e in p["error"]]
    failed = np.array([e is not None for e in errors], dtype=bool)
    probs = np.concatenate([p["probs"] for p in pending]).astype(np.float32)
    n, k = probs.shape
    names = writer.inputs.names.take(cat["index"])
    names = [v.encode("utf-8", "surrogateescape").decode("utf-8", "replace") for v in names]
    columns = {
        "index": pa.array(cat["index"], pa.int64()),
        "image": pa.array(names, pa.string()),
        "score": pa.array(cat["score"].astype(np.float32), pa.float32(), mask=failed),
        "std": pa.array(np.concatenate([p["std"] for p in pending]).astype(np.float32), pa.float32(), mask=failed),
        "probs": pa.ListArray.from_arrays(
            pa.array(np.arange(0, (n + 1) * k, k, dtype=np.int32)),
            pa.array(probs.reshape(-1), pa.float32()),
            mask=pa.array(failed),
        ),
        "level": pa.array(np.array(LEVELS, dtype=object)[probs.argmax(axis=1)], pa.string(), mask=failed),
        "width": pa.array(cat["width"], pa.int32(), mask=cat["width"] < 0),
        "height": pa.array(cat["height"], pa.int32(), mask=cat["height"] < 0),
        "error": pa.array(errors, pa.string()),
    }
    if writer.has_regressor:
        reg = np.concatenate([p["score_reg"] for p in pending]).astype(np.float32)
        columns["score_reg"] = pa.array(reg, pa.float32(), mask=failed)
    return pa.table(columns, schema=writer.schema)


def _writer(tmp_path, regressor: bool) -> PartWriter:
    sidecar = Sidecar(tmp_path / "out.parquet")
    sidecar.create({})
    inputs = InputList(names=PackedStrings(NAMES), base_ids=np.zeros(len(NAMES), np.int32), bases=[""])
    return PartWriter(sidecar, inputs, LEVELS, regressor, rank=0, flush_rows=10**6, flush_seconds=10**6)


def test_part_table_and_parquet_bytes_equal_the_pandas_built_ones(tmp_path):
    for regressor in (False, True):
        writer = _writer(tmp_path / str(regressor), regressor)
        writer.add(_batch([0, 1, 2], [400, -1, 30], [None, "cannot read: truncated", None]), _result(3, 0, regressor))
        writer.add(_batch([3, 4], [5, 6], [None, None]), _result(2, 1, regressor))
        writer.add(_batch([5, 6, 7], [1, 2, 3], ["x", "y", None]), _result(3, 2, regressor))
        ours, reference = writer._table(), _reference_table(writer)
        assert ours.equals(reference)
        assert ours.column("image")[3].as_py() == "bad-\ufffd-byte.jpg"
        assert ours.column("level").null_count == 3 and ours.column("width").null_count == 1
        for name, table in (("ours", ours), ("reference", reference)):
            pq.write_table(table, tmp_path / f"{name}.parquet", compression="zstd")
        assert (tmp_path / "ours.parquet").read_bytes() == (tmp_path / "reference.parquet").read_bytes()


def test_a_batch_of_only_failures_and_one_without_any(tmp_path):
    writer = _writer(tmp_path, False)
    writer.add(_batch([0, 1], [-1, -1], ["a", "b"]), _result(2, 3, False))
    assert writer._table().equals(_reference_table(writer))
    writer.pending = []
    writer.add(_batch([2], [7], [None]), _result(1, 4, False))
    assert writer._table().equals(_reference_table(writer))


def test_writing_and_merging_parts_imports_no_pandas(tmp_path):
    code = f"""
        import sys
        sys.path.insert(0, {str(REPO_ROOT)!r})
        from pathlib import Path
        from tests.test_score_store import _batch, _result, _writer
        from iqa_cli.scoring.store import merge_parts, part_schema, write_output
        writer = _writer(Path({str(tmp_path)!r}), True)
        writer.add(_batch([0, 1, 2, 3], [4, 5, 6, 7], [None, "x", None, None]), _result(4, 0, True))
        writer.flush()
        writer.add(_batch([4, 5, 6, 7], [4, 5, 6, 7], [None] * 4), _result(4, 1, True))
        writer.flush()
        out = Path({str(tmp_path)!r}) / "out.parquet"
        schema = part_schema(5, True, with_index=False)
        rows, failed, _ = write_output(out, "parquet", merge_parts(writer.sidecar, 8), schema, {{"k": "v"}})
        print(rows, failed, "pandas" in sys.modules)
    """
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["8", "1", "False"]


def test_merge_drops_a_part_row_written_twice(tmp_path):
    writer = _writer(tmp_path, False)
    writer.add(_batch([0, 1], [4, 5], [None, None]), _result(2, 0, False))
    writer.flush()
    writer.add(_batch([1, 2, 3, 4, 5, 6, 7], [5, 6, 7, 8, 9, 1, 2], [None] * 7), _result(7, 1, False))
    writer.flush()
    merged = pa.concat_tables(list(merge_parts(writer.sidecar, 8)))
    assert merged.column("index").to_pylist() == list(range(8))
    assert merged.column("width").to_pylist()[:3] == [4, 5, 6]  # index 1 from the first part
