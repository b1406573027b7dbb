"""`iqa score`'s values in a Daft pipeline: a class UDF (`@daft.cls`) whose batch method scores a column of images.

    from iqa_cli.engines.daft import scorer_class
    Scorer = scorer_class(gpus=1)  # one model per GPU; DaftScorer is the CPU one
    scorer = Scorer("zhiyuanyou/DeQA-Score-Mix3")
    df = daft.read_parquet("s3://bucket/images/*.parquet")
    df = df.select("*", scorer(df["image"]))  # + score, std, probs, level, width, height, error

The method returns one struct per row that Daft unnests into those columns (and score_reg for a Q-Scorer model:
`scorer_class(score_reg=True)`; score_soft for a reasoning model: `scorer_class(reasoning=True)`), computed by
`iqa_cli.engines.columns.ColumnScorer`, so the values are the ones `iqa score` writes; an undecodable image, or a
reasoning model's answer without a number, is a row with `error` set and null scores. Needs the `daft` extra.
"""

from __future__ import annotations

from typing import Any

import daft
import pyarrow as pa

from iqa_cli.errors import UserError


def scorer_class(
    *,
    gpus: float = 0,
    cpus: float | None = None,
    max_concurrency: int | None = None,
    score_reg: bool = False,
    reasoning: bool = False,
) -> type:
    """A Daft class UDF with these resources per instance (Daft fixes them when the class is declared).

    Args:
        gpus, cpus, max_concurrency: `daft.cls`'s (max_concurrency: how many instances, each with its model).
        score_reg: the models it loads have a regression head (Q-Scorer); its `score_reg` column is returned.
        reasoning: the models are reasoning models (`reasoning=PRESET`); their `score_soft` column is returned.
    """
    from iqa_cli.scoring.output import output_schema

    fields = [f for f in output_schema(5, score_reg, {}, reasoning=reasoning) if f.name != "image"]
    dtype = daft.DataType.from_arrow_type(pa.struct(fields))

    class DaftScorer:
        """One model; `__call__` scores a column of images (bytes, paths or `{bytes, path}` structs).

        Args:
            model: a Hub repo id, a checkpoint folder or an `iqa train` run.
            device, batch_size, fast_decode, options: `iqa_cli.engines.columns.ColumnScorer`'s.
        """

        def __init__(self, model: str, **options: Any):
            from iqa_cli.engines.columns import ColumnScorer

            self.scorer = ColumnScorer(model, **options)
            has = "score_reg" in self.scorer.columns
            if has != score_reg:
                raise UserError(
                    f"{model}: the model has {'a' if has else 'no'} regression head; use "
                    f"iqa_cli.engines.daft.scorer_class(score_reg={has})"
                )
            if self.scorer.reasoning != reasoning:
                raise UserError(
                    f"{model}: {'a' if self.scorer.reasoning else 'not a'} reasoning model; use "
                    f"iqa_cli.engines.daft.scorer_class(reasoning={self.scorer.reasoning})"
                )

        @daft.method.batch(return_dtype=dtype, unnest=True)
        def __call__(self, images: daft.Series) -> pa.Array:
            table = self.scorer.score(images.to_pylist())
            return pa.StructArray.from_arrays([c.combine_chunks() for c in table.columns], fields=fields)

    return daft.cls(DaftScorer, gpus=gpus, cpus=cpus, max_concurrency=max_concurrency)


DaftScorer = scorer_class()
