"""The sidecar of a scoring run and the writer of its units: rows become the tables `pa.array` gives (built from
numpy buffers, never importing pandas), a slow unit is written in pieces that a rerun resumes after, and files a
power loss left unreadable, or pieces after a gap, are dropped and scored again."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from iqa_cli.scoring.output import output_schema, write_table_atomic
from iqa_cli.scoring.runner import BatchResult
from iqa_cli.scoring.store import Sidecar, UnitWriter
from tests.conftest import REPO_ROOT

LEVELS = ["bad", "poor", "fair", "good", "excellent"]
NAMES = ["a.jpg", "dir/b.png", "caf\u00e9.jpg", "bad-\udcff-byte.jpg", "", "\u65e5\u672c.webp", "g.jpg", "h.jpg"]
EXTRA = {"shard": None, "label": pa.int64(), "meta": None}  # a json --keep column (no type known): a string


class Source:
    """The two things the writer asks a source: its extra columns and a unit's output stem."""

    def __init__(self, columns: dict = EXTRA):
        self.columns = columns

    def output_stem(self, u: int) -> str:
        return f"s{u}"


def _batch(unit: list[int], row: list[int], width: list[int], error: list[str | None], done=()) -> dict:
    n = len(unit)
    return {  # two padded rows (unit -1), which the writer drops
        "unit": torch.tensor([*unit, -1, -1]),
        "row": torch.tensor([*row, -1, -1]),
        "width": torch.tensor([*width, 0, 0], dtype=torch.int32),
        "height": torch.tensor([*(w // 2 if w > 0 else -1 for w in width), 0, 0], dtype=torch.int32),
        "error": [*error, None, None],
        "name": [NAMES[(u * 3 + r) % len(NAMES)] for u, r in zip(unit, row, strict=True)],
        "kept": [
            {"shard": f"s{u}.tar", "label": r, "meta": {"r": r} if r % 2 else None}
            for u, r in zip(unit, row, strict=True)
        ],
        "done": list(done),
        "n": n,
    }


def _result(n: int, seed: int, regressor: bool) -> BatchResult:
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.ones(len(LEVELS)), n + 2).astype(np.float32)
    centers = np.arange(1, 6, dtype=np.float32)
    score = (probs @ centers).astype(np.float32)
    return BatchResult(
        probs=probs,
        score=score,
        std=rng.random(n + 2).astype(np.float32),
        score_reg=rng.random(n + 2).astype(np.float32) if regressor else None,
    )


def _reference_table(batches: list[tuple[dict, BatchResult | None]], schema: pa.Schema) -> pa.Table:
    """The same rows built the plain way: Python lists through `pa.array`."""
    rows: dict[str, list] = {name: [] for name in schema.names}
    for batch, result in batches:
        for i in range(batch["n"]):
            failed = batch["error"][i] is not None
            rows["image"].append(batch["name"][i])
            for key in ("score", "std"):
                rows[key].append(None if failed else float(getattr(result, key)[i]))
            probs = None if failed else result.probs[i]
            rows["probs"].append(None if failed else probs.tolist())
            rows["level"].append(None if failed else LEVELS[int(np.argmax(probs))])
            for key in ("width", "height"):
                value = int(batch[key][i])
                rows[key].append(None if value < 0 else value)
            rows["error"].append(batch["error"][i])
            if "score_reg" in rows:
                rows["score_reg"].append(None if failed else float(result.score_reg[i]))
            kept = batch["kept"][i]
            rows["shard"].append(kept["shard"])
            rows["meta"].append(None if kept["meta"] is None else '{"r": ' + str(kept["meta"]["r"]) + "}")
            if "label" in rows:
                rows["label"].append(kept["label"])
    rows["image"] = [n.encode("utf-8", "surrogateescape").decode("utf-8", "replace") for n in rows["image"]]
    return pa.table({name: pa.array(values, schema.field(name).type) for name, values in rows.items()}, schema=schema)


def _writer(tmp_path, regressor: bool = False, extra: dict = EXTRA, **options) -> UnitWriter:
    sidecar = Sidecar(tmp_path / "out.parquet")
    sidecar.create({})
    schema = output_schema(len(LEVELS), regressor, extra)
    return UnitWriter(Source(extra), sidecar, schema, LEVELS, **{"flush_rows": 65536, "flush_seconds": 1e9, **options})


@pytest.mark.parametrize("regressor", [False, True])
def test_a_units_table_and_parquet_bytes_equal_the_plainly_built_ones(tmp_path, regressor):
    writer = _writer(tmp_path, regressor)
    batches = [
        (_batch([0, 0, 0], [0, 1, 2], [400, -1, 30], [None, "cannot read: truncated", None]), _result(3, 0, regressor)),
        (_batch([0, 0], [3, 4], [5, 6], [None, None]), _result(2, 1, regressor)),
        (_batch([0, 0, 0], [5, 6, 7], [1, 2, 3], ["x", "y", None], done=[(0, None)]), _result(3, 2, regressor)),
    ]
    for batch, result in batches:
        writer.add(batch, result)
    ours = pq.read_table(writer.sidecar.unit(0))
    reference = _reference_table(batches, writer.schema)
    assert ours.equals(reference)
    assert ours.column("image")[3].as_py() == "bad-\ufffd-byte.jpg"
    assert ours.column("level").null_count == 3 and ours.column("width").null_count == 1
    write_table_atomic(reference, tmp_path / "reference.parquet")  # as the writer writes a unit
    assert writer.sidecar.unit(0).read_bytes() == (tmp_path / "reference.parquet").read_bytes()


def test_a_batch_of_only_failures_needs_no_scores(tmp_path):
    writer = _writer(tmp_path)
    batch = _batch([3, 3], [0, 1], [-1, 7], ["a", "b"], done=[(3, None)])
    writer.add(batch, None)
    table = pq.read_table(writer.sidecar.unit(3))
    assert table.equals(_reference_table([(batch, None)], writer.schema))


def test_a_slow_unit_is_written_in_pieces_that_a_rerun_goes_on_after(tmp_path):
    writer = _writer(tmp_path, flush_rows=3)
    writer.add(_batch([5, 5], [0, 1], [1, 2], [None, None]), _result(2, 0, False))
    assert not writer.sidecar.pieces(5)  # 2 rows held
    writer.add(_batch([5, 5], [2, 3], [3, 4], [None, None]), _result(2, 1, False))
    assert [p.name for p in writer.sidecar.pieces(5)] == ["unit-00000005.from-0000000000.parquet"]
    writer.add(_batch([5], [4], [5], [None]), _result(1, 2, False))
    writer.flush()  # what a stopped run does on its way out
    state = writer.sidecar.scan(10, clean=False)
    assert state.finished.tolist() == [] and state.starts == {5: 5} and state.rows == 5

    again = UnitWriter(
        Source(), writer.sidecar, writer.schema, LEVELS, starts=state.starts, flush_rows=3, flush_seconds=1e9
    )
    with pytest.raises(RuntimeError, match="unit 5: row 4 arrived, 5 expected"):
        again.add(_batch([5], [4], [5], [None]), _result(1, 3, False))
    again.pending.clear()
    again.add(_batch([5, 5], [5, 6], [6, 7], [None, None], done=[(5, None)]), _result(2, 4, False))
    assert writer.sidecar.pieces(5) == []  # the unit's one file replaces its pieces
    table = pq.read_table(writer.sidecar.unit(5))
    assert table.column("width").to_pylist() == [1, 2, 3, 4, 5, 6, 7] and table.num_rows == 7
    state = writer.sidecar.scan(10, clean=False)
    assert state.finished.tolist() == [5] and state.starts == {} and state.rows == 7


def test_unreadable_files_and_pieces_after_a_gap_are_dropped(tmp_path):
    writer = _writer(tmp_path, flush_rows=1)
    for r in range(3):  # three pieces of one row
        writer.add(_batch([1], [r], [r + 1], [None]), _result(1, r, False))
    writer.add(_batch([2], [0], [9], [None], done=[(2, "ShardError: truncated")]), _result(1, 9, False))
    sidecar = writer.sidecar
    pieces = sidecar.pieces(1)
    assert len(pieces) == 3 and sidecar.scan(4, clean=False).starts == {1: 3}
    pieces[1].write_bytes(b"half a parquet file")  # what a power loss before the data reached the disk leaves
    (sidecar.dir / ".unit-00000002.parquet.123.tmp").write_bytes(b"partial")
    state = sidecar.scan(4, clean=True)
    assert state.starts == {1: 1} and state.finished.tolist() == [2]
    assert [p.name for p in sidecar.pieces(1)] == [pieces[0].name]  # the unreadable piece and the one after it
    assert not list(sidecar.dir.glob("*.tmp"))
    assert sidecar.errors(lambda u: f"shard {u}", 4) == [("shard 2", "ShardError: truncated")]
    sidecar.unit(2).write_bytes(b"garbage")
    assert sidecar.scan(4, clean=True).finished.tolist() == [] and not sidecar.unit(2).exists()


def test_a_unit_that_reads_to_its_end_now_drops_an_earlier_error(tmp_path):
    writer = _writer(tmp_path)
    writer.add(_batch([0], [0], [1], [None], done=[(0, "ShardError: truncated")]), _result(1, 0, False))
    assert writer.sidecar.unit(0, "error").exists()
    writer.add(_batch([0], [0], [1], [None], done=[(0, None)]), _result(1, 0, False))
    assert not writer.sidecar.unit(0, "error").exists()


def test_writing_units_and_the_output_imports_no_pandas(tmp_path):
    code = f"""
        import sys
        sys.path.insert(0, {str(REPO_ROOT)!r})
        from pathlib import Path
        from tests.test_score_store import _batch, _result, _writer
        from iqa_cli.scoring.output import assemble_file
        writer = _writer(Path({str(tmp_path)!r}), True, {{"shard": None, "meta": None}}, flush_rows=2)
        writer.add(_batch([0, 0, 1], [0, 1, 0], [4, 5, 6], [None, "x", None], done=[(0, None)]), _result(3, 0, True))
        writer.add(_batch([1, 1], [1, 2], [4, 5], [None] * 2, done=[(1, None)]), _result(2, 1, True))
        out = Path({str(tmp_path)!r}) / "out.parquet"
        units = [writer.sidecar.unit(u) for u in (0, 1)]
        count = assemble_file(out, "parquet", units, writer.schema, {{"k": "v"}})
        print(count.rows, count.failed, "pandas" in sys.modules)
    """
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["5", "1", "False"]


def test_a_reasoning_units_failed_batch_and_scored_ones_flush_together(tmp_path):
    """A batch of only corrupt images has no model call, so no texts; flushed with batches that have texts (a
    reasoning model's), its rows still join them, and the piece and the unit hold every row."""
    extra = {"shard": None, "meta": None}
    schema = output_schema(len(LEVELS), False, extra, reasoning=True, keep_text=True)
    sidecar = Sidecar(tmp_path / "out.parquet")
    sidecar.create({})
    writer = UnitWriter(Source(extra), sidecar, schema, LEVELS, flush_rows=1 << 20, flush_seconds=1e9)

    def reasoned(n: int, seed: int) -> BatchResult:
        result = _result(n, seed, False)
        result.score_soft = result.score + 0.5
        result.texts = [f"text {seed}.{i}" for i in range(n + 2)]
        result.errors = [None] * (n + 2)
        return result

    for order in ([None, "t"], ["t", None]):  # the failed batch first, and after one with texts
        writer.pending.clear()
        u = 0 if order[0] is None else 1
        for r, kind in enumerate(order):
            batch = _batch([u], [r], [5], ["corrupt" if kind is None else None])
            writer.add(batch, None if kind is None else reasoned(1, r))
        writer.flush()
        writer.add(_batch([u], [2], [6], [None], done=[(u, None)]), reasoned(1, 2))
        table = pq.read_table(sidecar.unit(u))
        texts = [None if kind is None else f"text {r}.0" for r, kind in enumerate(order)] + ["text 2.0"]
        assert table.column("reasoning").to_pylist() == texts
        assert table.column("error").to_pylist() == [("corrupt" if kind is None else None) for kind in order] + [None]
        assert table.column("score_soft").null_count == 1


def test_a_writer_sent_to_another_process_restarts_its_flush_clock(tmp_path):
    """A Ray actor on another machine unpickles the driver's writer: the driver's monotonic time is no time there
    (another boot), so a piece would be written at the first batch, or never; the clock starts at arrival."""
    import pickle
    import time

    writer = _writer(tmp_path, flush_seconds=30.0)
    for driver_clock in (-1e6, time.monotonic() + 1e6):  # a machine booted long after, or long before
        writer.last_flush = driver_clock
        arrived = pickle.loads(pickle.dumps(writer))
        assert abs(arrived.last_flush - time.monotonic()) < 5
        arrived.add(_batch([0], [0], [1], [None]), _result(1, 0, False))
        assert arrived.sidecar.pieces(0) == [] and arrived.pending[0].rows == 1  # held: 30 s have not passed
