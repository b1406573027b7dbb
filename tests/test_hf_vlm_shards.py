"""`iqa score` over WebDataset shards and a Parquet image-bytes column with a transformers vision-language model (a
tiny random Qwen2-VL checkpoint), through the real CLI in a subprocess: the same scores as the same images as files
although batches mix images of different visual-token counts, error rows for a corrupt member, a sample without an
image and a row without bytes, and the --keep columns. The shards are tests/test_shards.py's (img2dataset's layout,
with a corrupt member and a final shard cut off); the family-independent checks are there."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import run_iqa
from tests.test_shards import make_dataset

TOL = 1e-5  # a Qwen-VL score with other batch-mates (right-padded rows) is the same within this


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> dict:
    return make_dataset(tmp_path_factory.mktemp("qwen-dataset"))


@pytest.fixture(scope="module")
def score(tmp_path_factory):
    """`score(name, *inputs_and_flags) -> output file`: the real `iqa score` on a tiny Qwen2-VL checkpoint."""
    from iqa_cli.models.hf_vlm.tiny import tiny_checkpoint

    root = tmp_path_factory.mktemp("qwen-shards")
    model = tiny_checkpoint("qwen2_vl", root / "qwen2_vl", seed=2)

    def run(name: str, *args: str) -> Path:
        out = root / f"{name}.parquet"
        common = ["--model", str(model), "--device", "cpu", "--dtype", "float32", "--batch-size", "3", "--quiet"]
        result = run_iqa("score", *args, "--out", str(out), *common)
        assert result.returncode == 0, result.stderr[-3000:]
        return out

    return run


@pytest.fixture(scope="module")
def file_scores(dataset, score) -> pd.DataFrame:
    """The same images as loose files, indexed by key: each of its own size (22x18 to 38x26; 4 Qwen grids)."""
    frame = pd.read_parquet(score("files", str(dataset["files"])))
    assert frame["error"].isna().all() and len(frame) == 9
    assert np.ptp(frame["score"]) > 100 * TOL  # distinct scores: rows matched to the wrong image would show
    frame.index = [name.split(".")[0] for name in frame["image"]]
    return frame


def assert_scores_of_the_files(rows: pd.DataFrame, file_scores: pd.DataFrame, keys: list[str]) -> None:
    assert rows["error"].isna().all(), rows["error"].tolist()
    expected = file_scores.loc[keys]
    assert rows["width"].tolist() == expected["width"].tolist()
    assert rows["height"].tolist() == expected["height"].tolist()
    for column in ("score", "std"):
        np.testing.assert_allclose(rows[column].to_numpy(float), expected[column].to_numpy(float), atol=TOL, rtol=0)
    np.testing.assert_allclose(np.stack(rows["probs"]), np.stack(expected["probs"]), atol=TOL, rtol=0)


def test_shards_give_the_scores_of_the_files_with_error_rows_and_kept_columns(dataset, score, file_scores):
    keep = ["url", "caption", "similarity", "txt"]
    out = score("shards", f"{dataset['shards']}/{{00000..00003}}.tar", "--keep", ",".join(keep))
    frame = pd.read_parquet(out)
    names = ["00000", "00001", "00002", "00003", "00004", "bad01", "text1", "00005", "00006", "00007", "00008"]
    assert frame["image"].tolist() == names
    good = frame[frame["error"].isna()]
    assert good["image"].tolist() == [f"{i:05d}" for i in range(8)]
    assert_scores_of_the_files(good, file_scores, good["image"].tolist())
    errors = dict(zip(frame["image"], frame["error"], strict=True))
    assert "not an image" in errors["bad01"] and np.isnan(frame.set_index("image").loc["bad01", "score"])
    assert "no image or video member" in errors["text1"]
    assert "broke off" in errors["00008"]

    kept = pq.read_table(out, columns=keep).to_pydict()  # the arrow values: pandas 3 reads a null string as nan
    rows = {column: dict(zip(names, values, strict=True)) for column, values in kept.items()}
    # shard 0 has img2dataset's metadata table (its columns, typed), the others json and txt members
    assert rows["url"]["00001"] == "https://meta/00001" and rows["caption"]["00001"] == "meta caption 00001"
    assert rows["similarity"]["00002"] == 0.75 and pq.read_schema(out).field("similarity").type == pa.float64()
    assert rows["url"]["00004"] == "https://x/00004" and rows["txt"]["00004"] == "caption 00004"
    assert rows["caption"]["00004"] is None and rows["similarity"]["00004"] is None
    assert rows["txt"]["bad01"] is None and rows["txt"]["text1"] == "a sample without an image"


def test_a_parquet_bytes_column_gives_the_scores_of_the_files(dataset, score, file_scores, tmp_path):
    """A column of plain image bytes named by --image-col, rows out of key order in row groups of 4, a corrupt
    row and a null row among them."""
    keys = ["00004", "00000", "00008", "00002", None, "00006", "00001", "00005", "bad", "00007", "00003"]
    data = [dataset["images"][k][0] if k in dataset["images"] else None for k in keys]
    data[keys.index("bad")] = b"\x89PNG\r\n\x1a\n not really a png"
    table = pa.table(
        {
            "key": keys,
            "pixels": pa.array(data, pa.binary()),
            "label": pa.array([float(i) / 4 for i in range(len(keys))], pa.float32()),
        }
    )
    path = tmp_path / "images.parquet"
    pq.write_table(table, path, row_group_size=4)

    out = score("parquet", str(path), "--image-col", "pixels", "--keep", "key,label")
    frame = pd.read_parquet(out)
    assert frame["image"].tolist() == [str(i) for i in range(len(keys))]  # plain bytes: named by row number
    kept = pq.read_table(out, columns=["key", "label"])
    assert kept.column("key").to_pylist() == keys and kept.schema.field("label").type == pa.float32()
    assert kept.column("label").to_pylist() == [i / 4 for i in range(len(keys))]
    good = [i for i, key in enumerate(keys) if key in dataset["images"]]
    assert_scores_of_the_files(frame.iloc[good], file_scores, [keys[i] for i in good])
    errors = frame["error"].tolist()
    assert "not an image" in errors[keys.index("bad")] and "null" in errors[keys.index(None)]
    assert frame["score"].isna().tolist() == [k not in dataset["images"] for k in keys]
