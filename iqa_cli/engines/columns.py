"""A column of images in someone else's pipeline (a Ray Data batch, a Daft series) -> the columns `iqa score` writes.

The values are `iqa score`'s, computed the same way: each image decoded by `scoring.loader.Decoder` (an
undecodable one is a row with `error`), the decoded rows collated by the model's collate and scored by
`scoring.runner.BatchRunner` in calls of one shape (so a score does not depend on the batch a pipeline happens to
hand over), the rows built by `scoring.output.rows_table` under `output_schema`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from iqa_cli.errors import UserError
from iqa_cli.sources import Sample
from iqa_cli.sources.parquet import NULL_IMAGE


class ColumnScorer:
    """One model on one device scoring columns of images (bytes, paths, or `{bytes, path}` structs).

    Args:
        model: a Hub repo id, a checkpoint folder or an `iqa train` run (`Scorer.from_pretrained`).
        device: "auto" takes the GPU an engine gave this process (Ray sets CUDA_VISIBLE_DEVICES), else the CPU.
        batch_size: rows of every model call; None: `iqa score`'s default (64 on CUDA, settled to fit; 16 on
            the CPU). Pass the `--batch-size` of an `iqa score` run to get its scores bit for bit on a GPU.
        fast_decode: `iqa score --fast-decode`.
        options: `Scorer.from_pretrained`'s (dtype, base, prompt, revision, quantize, a family's own).
    """

    def __init__(
        self,
        model: str,
        *,
        device: str = "auto",
        batch_size: int | None = None,
        fast_decode: bool = False,
        **options: Any,
    ):
        from iqa_cli.scoring.config import AUTO_BATCH
        from iqa_cli.scoring.loader import Decoder, decoding, fast_loader, transfer_dtype
        from iqa_cli.scoring.output import output_schema
        from iqa_cli.scoring.runner import BatchRunner, settle_size
        from iqa_cli.scoring.scorer import Scorer

        if batch_size is not None and batch_size < 1:
            raise UserError(f"batch_size {batch_size}: use a positive integer, or None for iqa score's default")
        self.scorer = Scorer.from_pretrained(model, device=device, **options)
        if fast_decode:
            fast_loader(self.scorer)  # a family without a draft size is refused here, as by iqa score
        self.decode = Decoder(*decoding(self.scorer, fast_decode, None))
        self.dtype = transfer_dtype(self.scorer)
        cuda = torch.device(self.scorer.device).type == "cuda"
        size = batch_size or AUTO_BATCH["cuda" if cuda else "cpu"]
        auto = batch_size is None and cuda
        if auto:
            with torch.inference_mode():
                size = settle_size(self.scorer, size, self.dtype)
        self.runner = BatchRunner(self.scorer, size, auto=auto)
        self.level_names = list(self.scorer.level_names)
        self.reasoning = bool(getattr(self.scorer, "reasoning", False))  # rows gain score_soft; no reasoning text
        self.schema = output_schema(
            len(self.level_names), bool(self.scorer.has_regressor), {}, reasoning=self.reasoning
        )
        self.columns = [name for name in self.schema.names if name != "image"]

    def score(self, images: Sequence[Any]) -> pa.Table:
        """The output columns (all but `image`) of `images`, one row each, in order."""
        from iqa_cli.scoring.output import rows_table

        decoded = [self.decode(sample(value)) for value in images]
        ok = [i for i, (visual, *_) in enumerate(decoded) if visual is not None]
        n = len(decoded)
        chunk: dict[str, Any] = {
            "image": [""] * n,
            "width": np.asarray([d[1] for d in decoded], dtype=np.int32),
            "height": np.asarray([d[2] for d in decoded], dtype=np.int32),
            "error": [d[3] for d in decoded],
            "kept": [{}] * n,
            "probs": None,
            "score": np.zeros(n, np.float32),
            "std": np.zeros(n, np.float32),
            "score_reg": None,
            "score_soft": None,
        }
        if ok:
            visual = self.scorer.collate([decoded[i][0] for i in ok], len(ok), self.dtype)
            with torch.inference_mode():
                result = self.runner(visual)
            probs = np.zeros((n, len(self.level_names)), np.float32)
            probs[ok] = result.probs
            chunk["probs"] = probs
            chunk["score"][ok], chunk["std"][ok] = result.score, result.std
            if result.score_reg is not None:
                chunk["score_reg"] = np.zeros(n, np.float32)
                chunk["score_reg"][ok] = result.score_reg
            if result.score_soft is not None:
                chunk["score_soft"] = np.zeros(n, np.float32)
                chunk["score_soft"][ok] = result.score_soft
            if result.errors is not None:  # a reasoning model's answer without a number: an error row, as in iqa score
                for i, error in zip(ok, result.errors, strict=True):
                    chunk["error"][i] = chunk["error"][i] or error
        return rows_table([chunk], self.level_names, self.schema, {}).drop_columns(["image"])

    def check_columns(self, names: Sequence[str]) -> None:
        """An input column the output would overwrite is refused, naming it."""
        taken = [name for name in names if name in self.columns]
        if taken:
            raise UserError(f"input column {taken[0]!r} has the name of an output column; rename it")


def sample(value: Any) -> Sample:
    """A column's value as the `Sample` a source would make: bytes, a path, or a `{bytes, path}` struct (Hugging
    Face's Image feature: its bytes, as `iqa score --image-col` reads it)."""
    if isinstance(value, dict):
        value = value.get("bytes")
    if value is None:
        return Sample("", error=NULL_IMAGE)
    if isinstance(value, np.ndarray) and value.dtype == np.uint8:
        value = value.tobytes()
    if isinstance(value, bytes | bytearray | memoryview):
        return Sample("", data=bytes(value))
    return Sample("", path=str(value))
