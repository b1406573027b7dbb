"""The workers' reusable shared-memory batches (`iqa_cli.batch_buffer.BatchPool`): a block is reused only after
the main process released the batch in it, so no batch the main process holds is ever overwritten."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from iqa_cli.batch_buffer import BatchPool, batch_buffer
from iqa_cli.scoring.loader import PREFETCH, PadCollate, UnitStream, batch_pool
from iqa_cli.sources import Sample

ROW = 4096  # floats per row: 16 kB, several pages per block


@dataclass
class Rows:
    """A source of 16 units of 4 samples; sample `i` is named by its number."""

    def samples(self, u: int, start: int = 0):
        for i in range(4 * u + start, 4 * u + 4):
            yield Sample(str(i))

    def rows(self, u: int) -> int:
        return 4


@dataclass(frozen=True)
class Decode:
    """A row of `ROW` copies of the sample's number."""

    def __call__(self, sample: Sample):
        return {"x": torch.full((ROW,), float(sample.name))}, 1, 1, None


@dataclass(frozen=True)
class RowCollate:
    """Writes every element it allocates, as a VisualCollate must; rows without an item are -1."""

    def __call__(self, items, batch_size, dtype):
        x = batch_buffer((batch_size, ROW), dtype)
        x.fill_(-1)
        for row, item in enumerate(items):
            x[row] = item["x"]
        return {"x": x}


def _loader(pool: BatchPool | None, workers: int = 2, context: str | None = None, visual=None):
    units = np.arange(16)
    collate = PadCollate(4, visual or RowCollate(), torch.float32, pool)
    return torch.utils.data.DataLoader(
        UnitStream(Rows(), units, np.zeros_like(units), Decode(), collate),
        batch_size=None,
        num_workers=workers,
        prefetch_factor=PREFETCH if workers else None,
        multiprocessing_context=context,
    )


def _expected(batch: dict) -> torch.Tensor:
    return (4 * batch["unit"] + batch["row"]).float()[:, None].expand(-1, ROW)


@pytest.mark.parametrize("context", [None, "spawn"])  # Linux's fork, and macOS's (and Python 3.14's) default
def test_released_batches_are_rebuilt_in_the_same_blocks_with_the_right_values(context):
    pool = batch_pool(2, PREFETCH)
    new_blocks = []
    for batch in _loader(pool, context=context):
        assert torch.equal(batch["visual"]["x"], _expected(batch))
        assert batch["visual"]["x"].is_shared()
        new_blocks.append(batch[BatchPool.STAMP][2])
        pool.release(batch)
    # each worker allocates its ring once (depth blocks) and then reuses it: 16 batches, 6 blocks
    assert sum(new_blocks) == 2 * pool.depth, new_blocks
    assert new_blocks[-8:] == [0] * 8


def test_held_batches_are_never_overwritten():
    """A consumer that keeps every batch (never releases) or releases late: each batch still holds its values
    at the end, and blocks are only reused for released batches."""
    for hold in (None, 3):  # never release; release the batch taken 3 steps earlier
        pool = batch_pool(2, PREFETCH)
        held = []
        for batch in _loader(pool):
            held.append(batch)
            if hold is not None and len(held) > hold:
                pool.release(held[-1 - hold])
        for batch in held[-hold:] if hold else held:  # those never released
            assert torch.equal(batch["visual"]["x"], _expected(batch))
        if hold is None:
            assert all(batch[BatchPool.STAMP][2] == 1 for batch in held)  # a new block for every batch


def test_without_workers_there_is_no_pool_and_no_stamp():
    assert batch_pool(0, PREFETCH) is None
    batch = next(iter(_loader(None, workers=0)))
    assert BatchPool.STAMP not in batch
    assert torch.equal(batch["visual"]["x"], _expected(batch))


def test_a_larger_batch_than_the_block_gets_a_new_block():
    """hf_vlm's padded shapes vary per batch: a block is reused only when it is large enough."""

    @dataclass(frozen=True)
    class Growing:
        def __call__(self, items, batch_size, dtype):
            width = 1 + int(items[0]["x"][0])  # wider with every batch
            x = batch_buffer((batch_size, width), dtype)
            x.fill_(float(width))
            return {"x": x}

    pool = batch_pool(1, PREFETCH)
    for batch in _loader(pool, workers=1, visual=Growing()):
        x = batch["visual"]["x"]
        assert torch.equal(x, torch.full_like(x, float(x.shape[1])))
        assert batch[BatchPool.STAMP][2] == 1  # every batch is wider than any block before it
        pool.release(batch)
