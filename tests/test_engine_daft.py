"""The Daft class UDF (`iqa_cli.engines.daft`) gives `iqa score`'s values: on image files Daft downloads, and on a
Parquet column of {bytes, path} structs with null images (the tiny checkpoint, Daft's local runner); with a
Q-Scorer checkpoint its score_reg too."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from iqa_cli.errors import UserError
from tests.test_engine_ray import (  # noqa: F401 (one_thread: a fixture)
    CALL,
    assert_same_regression,
    assert_same_values,
    iqa_score,
    one_thread,
    qscorer_case,
)
from tests.test_shards import make_dataset

daft = pytest.importorskip("daft")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    from iqa_cli.models.mplug_owl2.tiny import build_tiny_tokenizer
    from tests.factories import tiny_model, write_checkpoint

    root = tmp_path_factory.mktemp("tiny")
    return write_checkpoint(tiny_model(seed=3), root / "deqa", tokenizer_dir=build_tiny_tokenizer(root / "tok")).path


@pytest.mark.usefixtures("one_thread")
def test_the_daft_udf_gives_the_values_of_iqa_score(tiny, tmp_path):
    from iqa_cli.engines.daft import DaftScorer, scorer_class

    dataset = make_dataset(tmp_path / "dataset")
    folder = tmp_path / "images"
    shutil.copytree(dataset["files"], folder)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    expected = iqa_score([folder], tmp_path / "files.parquet", tiny).set_index("image")
    scorer = DaftScorer(str(tiny), device="cpu", dtype="float32", batch_size=CALL)
    files = daft.from_glob_path(f"{folder}/*").select("path")
    files = files.with_column("bytes", daft.functions.download(files["path"]))
    got = files.select("path", scorer(files["bytes"])).to_arrow().to_pandas()
    got.index = [Path(p).name for p in got["path"]]
    assert sorted(got.index) == sorted(expected.index)
    assert_same_values(got.loc[expected.index], expected)

    table = pq.read_table(dataset["tables"] / "train-0.parquet")  # {bytes, path} structs, as Hugging Face's
    image = [*table.column("image").to_pylist(), {"bytes": None, "path": "gone.jpg"}, None]
    table = pa.table({"image": pa.array(image, table.schema.field("image").type), "label": list(range(7))})
    pq.write_table(table, tmp_path / "rows.parquet", row_group_size=3)
    expected = iqa_score([tmp_path / "rows.parquet"], tmp_path / "t.parquet", tiny, image_col="image", keep=["label"])
    rows = daft.read_parquet(str(tmp_path / "rows.parquet"))
    got = rows.select("label", scorer(rows["image"])).sort("label")
    output = {f.name: daft.DataType.from_arrow_type(f.type) for f in pq.read_schema(tmp_path / "t.parquet")}
    assert {f.name: f.dtype for f in got.schema() if f.name != "label"} == {k: output[k] for k in got.column_names[1:]}
    assert_same_values(got.to_arrow().to_pandas(), expected)

    regression = scorer_class(score_reg=True)(str(tiny), device="cpu")
    with pytest.raises(UserError, match=r"has no regression head; use .*scorer_class\(score_reg=False\)"):
        regression(daft.Series.from_pylist([None]))  # a Series, not an expression: runs here, at once
    reasoning = scorer_class(reasoning=True)(str(tiny), device="cpu")
    with pytest.raises(UserError, match=r"not a reasoning model; use .*scorer_class\(reasoning=False\)"):
        reasoning(daft.Series.from_pylist([None]))


@pytest.mark.usefixtures("one_thread")
def test_the_daft_udf_of_a_qscorer_model_gives_the_score_reg_of_iqa_score(tmp_path):
    from iqa_cli.engines.daft import scorer_class

    model, folder, expected = qscorer_case(tmp_path)
    scorer = scorer_class(score_reg=True)(**model, device="cpu", dtype="float32", batch_size=CALL)
    names = list(expected.index)
    files = daft.from_pydict({"name": names, "bytes": [(folder / n).read_bytes() for n in names]})
    got = files.select("name", scorer(files["bytes"])).to_pandas().set_index("name")
    assert "score_reg" in got.columns
    assert_same_regression(got.loc[names], expected)
