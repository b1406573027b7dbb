"""Shard and Parquet inputs: the same scores as the same images as files, --keep, directory output, resume by
units after kill -9, two ranks, and one-line errors for bad input.

The shards are written here with `tarfile` the way img2dataset lays them out (`00000.tar` of
`<key>.jpg/.json/.txt` members plus `00000.parquet` of metadata), with a corrupt image member, a sample
without an image, and a final shard cut off in the middle of a member. Scoring uses the fake, row-wise
scorer of `tests/test_score_pipeline.py` (real decoding and preprocessing), except one test that runs the real
CLI on the tiny checkpoint. Run as a module (`python -m tests.test_shards run ...`), this file scores shards
with the fake scorer: the kill -9 and the torchrun tests launch it that way.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from iqa_cli.errors import UserError
from iqa_cli.scoring.config import ScoreConfig
from iqa_cli.scoring.driver import score_images
from iqa_cli.scoring.store import sidecar_path
from iqa_cli.sources import SourceOptions, expand_braces, open_inputs
from tests.conftest import REPO_ROOT, fixed_unit_size, kill_when
from tests.test_score_pipeline import FakeScorer, assert_same_rows

FORMATS = ["JPEG", "PNG", "WEBP", "BMP"]
SUFFIX = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp"}


def _image(i: int, fmt: str) -> bytes:
    rng = np.random.default_rng(i)
    pixels = np.clip(rng.normal(25 * i, 40, (18 + i, 22 + 2 * i, 3)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt)
    return buffer.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_dataset(root: Path) -> dict:
    """Images as files (`files/<key>.<ext>`), as shards and as Parquet; returns what each should give."""
    files, shards, tables = root / "files", root / "shards", root / "tables"
    for folder in (files, shards, tables):
        folder.mkdir(parents=True)
    images = {f"{i:05d}": (_image(i, FORMATS[i % 4]), SUFFIX[FORMATS[i % 4]]) for i in range(9)}
    for key, (data, suffix) in images.items():
        (files / f"{key}.{suffix}").write_bytes(data)
    layout = [["00000", "00001", "00002"], ["00003", "00004"], ["00005", "00006"]]
    for s, keys in enumerate(layout):
        with tarfile.open(shards / f"{s:05d}.tar", "w") as tar:
            for key in keys:
                data, suffix = images[key]
                _add(tar, f"{key}.{suffix}", data)
                _add(tar, f"{key}.txt", f"caption {key}".encode())
                _add(tar, f"{key}.json", json.dumps({"url": f"https://x/{key}", "width": int(key) + 1}).encode())
            if s == 1:
                _add(tar, "bad01.jpg", b"\xff\xd8 not really a jpeg")  # a corrupt member
                _add(tar, "text1.txt", b"a sample without an image")  # a non-image member
    # img2dataset's metadata table for shard 0 (key, url, caption, status, and a typed column)
    meta = pa.table(
        {
            "key": layout[0],
            "url": [f"https://meta/{k}" for k in layout[0]],
            "caption": [f"meta caption {k}" for k in layout[0]],
            "status": ["success"] * 3,
            "similarity": [0.25, 0.5, 0.75],
        }
    )
    pq.write_table(meta, shards / "00000.parquet")
    # A final shard cut off inside its second image member: 00007 is read, 00008 breaks off.
    whole = io.BytesIO()
    with tarfile.open(fileobj=whole, mode="w") as tar:
        for key in ("00007", "00008"):
            _add(tar, f"{key}.{images[key][1]}", images[key][0])
    cut = whole.getvalue()
    cut = cut[: cut.index(images["00008"][0]) + len(images["00008"][0]) // 2]
    (shards / "00003.tar").write_bytes(cut)

    # Parquet: {bytes, path} structs in row groups of 2 (Hugging Face layout), and a plain binary column.
    keys = list(images)
    struct = pa.array(
        [{"bytes": images[k][0], "path": f"{k}.{images[k][1]}"} for k in keys[:5]],
        type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]),
    )
    table = pa.table({"image": struct, "url": [f"https://hf/{k}" for k in keys[:5]], "label": list(range(5))})
    pq.write_table(table, tables / "train-0.parquet", row_group_size=2)
    plain = pa.table(
        {"image": pa.array([images[k][0] for k in keys[5:]] + [None], pa.binary()), "url": ["a", "b", "c", "d", None]}
    )
    plain = plain.append_column("label", pa.array([5, 6, 7, 8, 9]))
    pq.write_table(plain, tables / "train-1.parquet", row_group_size=3)
    return {"images": images, "files": files, "shards": shards, "tables": tables, "layout": layout}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> dict:
    return make_dataset(tmp_path_factory.mktemp("dataset"))


def run(inputs, out: Path, **options):
    kwargs = {"batch_size": 2, "workers": 1, "quiet": True, **options}
    config = ScoreConfig(out=out, inputs=[str(i) for i in inputs], **kwargs)
    return score_images(config, scorer_factory=lambda device: FakeScorer(device))


@pytest.fixture(scope="module")
def file_scores(dataset, tmp_path_factory) -> pd.DataFrame:
    """The same images as loose files, by key."""
    out = tmp_path_factory.mktemp("files") / "scores.parquet"
    run([dataset["files"]], out, batch_size=3)
    frame = pd.read_parquet(out)
    frame.index = [name.split(".")[0] for name in frame["image"]]
    return frame


def _assert_scores_equal_files(frame: pd.DataFrame, file_scores: pd.DataFrame, keys: list[str]) -> None:
    for key, row in zip(keys, frame.itertuples(), strict=True):
        expected = file_scores.loc[key]
        assert pd.isna(row.error), (key, row.error)
        assert (row.score, row.std, row.width, row.height) == (
            expected.score,
            expected["std"],
            expected.width,
            expected.height,
        ), key
        assert np.array_equal(row.probs, expected.probs)


@pytest.fixture(scope="module")
def shard_run(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards") / "scores.parquet"
    summary = run([f"{dataset['shards']}/{{00000..00003}}.tar"], out, keep=["url", "caption", "similarity", "txt"])
    return summary, pd.read_parquet(out), out


def test_shards_give_the_scores_of_the_same_images_as_files(dataset, file_scores, shard_run):
    summary, frame, _ = shard_run
    names = ["00000", "00001", "00002", "00003", "00004", "bad01", "text1", "00005", "00006", "00007", "00008"]
    assert frame["image"].tolist() == names  # every sample once, in shard order, named by __key__
    good = frame[frame["error"].isna()]
    _assert_scores_equal_files(good, file_scores, good["image"].tolist())
    assert good["image"].tolist() == ["00000", "00001", "00002", "00003", "00004", "00005", "00006", "00007"]
    errors = dict(zip(frame["image"], frame["error"], strict=True))
    assert "not an image" in errors["bad01"]
    assert "no image or video member" in errors["text1"] and "txt" in errors["text1"]
    assert "broke off" in errors["00008"]  # the sample cut off by the truncated final shard
    assert frame["shard"].str.endswith(".tar").all()
    assert summary.total == 11 and summary.failed == 3
    assert [label.rsplit("/", 1)[-1] for label, _ in summary.unit_errors] == ["00003.tar"]


def test_keep_copies_metadata_parquet_and_json_members(shard_run):
    _, frame, out = shard_run
    rows = frame.set_index("image")
    # shard 0 has img2dataset's metadata table: its columns win, with their own types
    assert rows.loc["00001", "url"] == "https://meta/00001" and rows.loc["00001", "caption"] == "meta caption 00001"
    assert rows.loc["00002", "similarity"] == 0.75 and pq.read_schema(out).field("similarity").type == pa.float64()
    # other shards: the json member, and the txt member by its suffix
    assert rows.loc["00004", "url"] == "https://x/00004" and rows.loc["00004", "txt"] == "caption 00004"
    assert pd.isna(rows.loc["00004", "caption"]) and pd.isna(rows.loc["00004", "similarity"])
    assert rows.loc["text1", "txt"] == "a sample without an image"


def test_parquet_image_columns_give_the_scores_of_the_files(dataset, file_scores, tmp_path):
    out = tmp_path / "scores.parquet"
    summary = run([f"{dataset['tables']}/*.parquet"], out, image_col="image", keep=["url", "label"])
    frame = pd.read_parquet(out)
    # structs are named by their path, plain bytes by their row number in the file
    assert frame["image"].tolist() == [f"{k}.{dataset['images'][k][1]}" for k in list(dataset["images"])[:5]] + [
        "0",
        "1",
        "2",
        "3",
        "4",
    ]
    kept = pq.read_table(out, columns=["url", "label"]).to_pydict()
    assert kept["label"] == list(range(10)) and kept["url"][-5:] == ["a", "b", "c", "d", None]
    good = frame.iloc[:9]
    _assert_scores_equal_files(good, file_scores, list(dataset["images"]))
    assert "null" in frame["error"].iloc[9]
    assert summary.total == 10 and summary.failed == 1


def test_directory_output_reads_as_the_single_file(dataset, shard_run, tmp_path):
    _, single, _ = shard_run
    out = tmp_path / "scores"
    keep = ["url", "caption", "similarity", "txt"]
    run([f"{dataset['shards']}/*.tar"], out, out_dir=True, keep=keep, workers=2)
    assert sorted(p.name for p in out.iterdir()) == [f"{s:05d}.parquet" for s in range(4)] + ["_iqa.json"]
    assert not sidecar_path(out).exists()
    assert_same_rows(pd.read_parquet(out), single)
    # Parquet inputs of several row groups are assembled into one file per input file
    tables = tmp_path / "tables"
    run([f"{dataset['tables']}/*.parquet"], tables, out_dir=True, image_col="image")
    assert sorted(p.name for p in tables.glob("*.parquet")) == ["train-0.parquet", "train-1.parquet"]
    assert len(pd.read_parquet(tables)) == 10
    # the same command again: complete, nothing scored
    summary = run([f"{dataset['shards']}/*.tar"], out, out_dir=True, keep=keep)
    assert summary.already_complete and summary.total == 11


def test_brace_patterns_globs_and_list_files(dataset, tmp_path):
    assert expand_braces("s/{008..010}.tar") == ["s/008.tar", "s/009.tar", "s/010.tar"]
    assert expand_braces("{a,b}-{0..1}") == ["a-0", "a-1", "b-0", "b-1"]
    shards = dataset["shards"]
    listing = tmp_path / "shards.txt"
    listing.write_text(f"{shards}/00002.tar\n{shards}/00000.tar\n")
    units = open_inputs([], SourceOptions(from_file=listing))
    assert [Path(p).name for p in units.paths] == ["00002.tar", "00000.tar"]
    globbed = open_inputs([f"{shards}/*.tar"], SourceOptions())
    assert [Path(p).name for p in globbed.paths] == [f"{s:05d}.tar" for s in range(4)]
    assert [globbed.count_rows(u) for u in range(4)] == [3, 4, 2, 2]  # from the headers: samples, not members
    parquet = open_inputs([f"{dataset['tables']}/train-*.parquet"], SourceOptions(image_col="image"))
    assert [parquet.rows(u) for u in range(len(parquet))] == [2, 2, 1, 3, 2]  # units = row groups


def test_the_cli_on_the_tiny_checkpoint_scores_shards_and_parquet_as_files(dataset, tmp_path_factory, tmp_path):
    """The real model end to end: `iqa score` on shards, on Parquet and on the same images as files."""
    from typer.testing import CliRunner

    from iqa_cli.cli import app
    from iqa_cli.models.mplug_owl2.tiny import build_tiny_tokenizer
    from tests.factories import tiny_model, write_checkpoint

    root = tmp_path_factory.mktemp("ckpt")
    model = write_checkpoint(tiny_model(seed=3), root / "m", tokenizer_dir=build_tiny_tokenizer(root / "tok")).path
    common = ["--model", str(model), "--device", "cpu", "--dtype", "float32", "--batch-size", "3", "--quiet"]
    outputs = {}
    for name, inputs in {
        "files": [str(dataset["files"])],
        "shards": [f"{dataset['shards']}/0000[0-2].tar"],
        "tables": [f"{dataset['tables']}/train-0.parquet"],
    }.items():
        out = tmp_path / f"{name}.parquet"
        result = CliRunner().invoke(app, ["score", *inputs, "--out", str(out), *common])
        assert result.exit_code == 0, result.output
        outputs[name] = pd.read_parquet(out)
    files = outputs["files"]
    files.index = [name.split(".")[0] for name in files["image"]]
    shards = outputs["shards"][outputs["shards"]["error"].isna()]
    _assert_scores_equal_files(shards, files, shards["image"].tolist())
    tables = outputs["tables"]
    _assert_scores_equal_files(tables, files, [name.split(".")[0] for name in tables["image"]])
    assert len(shards) == 7 and len(tables) == 5


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, dataset) -> Path:
    root = tmp_path_factory.mktemp("bad")
    (root / "fake.tar").write_bytes(b"this is not a tar file" * 40)
    pq.write_table(pa.table({"picture": [b"x"], "id": [1]}), root / "nocol.parquet")
    pq.write_table(pa.table({"image": [1, 2]}), root / "ints.parquet")
    return root


BAD = [
    (["{bad}/missing-{{0..3}}.tar"], [], ["input not found", "missing-0.tar"]),
    (["{bad}/nothing-*.tar"], [], ["no files match", "nothing-*.tar"]),
    (["{bad}/fake.tar"], [], ["fake.tar", "not a tar file"]),
    (["{bad}/nocol.parquet"], [], ["nocol.parquet", "no image column 'image'", "columns: picture, id"]),
    (["{bad}/ints.parquet"], [], ["ints.parquet", "column 'image' is int64"]),
    (["{tables}/train-0.parquet"], ["--keep", "url,nope"], ["--keep nope", "columns: image, url, label"]),
    (
        ["{shards}/00001.tar"],
        ["--keep", "nope"],
        ["--keep nope", "first sample of", "00001.tar", "columns: txt, url, width"],
    ),
    (["{shards}/00000.tar", "{files}"], [], ["is a folder"]),
    (["{shards}/00000.tar", "{tables}/train-0.parquet"], [], ["inputs mix .tar files", "and .parquet files"]),
    (["{files}"], ["--keep", "url"], ["--keep url", "not of files"]),
    (["{tables}/train-0.parquet"], ["--keep", "image"], ["--keep image", "has a column 'image' of its own"]),
]


@pytest.mark.parametrize(("inputs", "extra", "fragments"), BAD)
def test_bad_input_is_a_one_line_error(iqa, dataset, bad_files, tmp_path, inputs, extra, fragments):
    where = {"bad": bad_files, "tables": dataset["tables"], "shards": dataset["shards"], "files": dataset["files"]}
    args = [i.format(**where) for i in inputs]
    code, _, err = iqa("score", *args, "--out", tmp_path / "s.parquet", *extra, "--model", "someone/no-model")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert all(f in lines[0] for f in fragments), lines[0]
    assert not (tmp_path / "s.parquet").exists()


def test_a_shard_that_breaks_off_is_reported_and_the_run_goes_on(iqa, dataset, tmp_path, monkeypatch):
    # the real CLI in this process, with the fake scorer in place of the model it would load
    monkeypatch.setattr("iqa_cli.scoring.driver.build_scorer", lambda config, device, factory: FakeScorer(device))
    code, _, err = iqa("score", f"{dataset['shards']}/*.tar", "--out", tmp_path / "s.parquet", "--workers", "0")
    assert code == 0, err
    assert "1 shard(s) could not be read to the end" in err and "00003.tar" in err


def test_user_errors_are_checked_before_the_model_loads(dataset, tmp_path):
    calls = []
    config = ScoreConfig(out=tmp_path / "s.parquet", inputs=[f"{dataset['shards']}/0000[0-1].tar"], keep=["nope"])
    with pytest.raises(UserError, match="--keep nope"):
        score_images(config, scorer_factory=lambda device: calls.append(device) or FakeScorer(device))
    assert calls == []


def test_a_folder_output_for_fewer_shards_holds_only_their_files(dataset, tmp_path):
    """Files of an earlier run over other shards would be read as rows of the new output: refused, removed with
    --overwrite; a Parquet file iqa did not write is never deleted."""
    out = tmp_path / "scores"
    run([f"{dataset['shards']}/*.tar"], out, out_dir=True)
    assert len(pd.read_parquet(out)) == 11
    fewer = [f"{dataset['shards']}/{{00000..00001}}.tar"]
    with pytest.raises(UserError, match=r"scores exists and was written with another list of inputs"):
        run(fewer, out, out_dir=True)
    summary = run(fewer, out, out_dir=True, overwrite=True)
    assert sorted(p.name for p in out.glob("*.parquet")) == ["00000.parquet", "00001.parquet"]
    assert len(pd.read_parquet(out)) == summary.total
    # a folder without a finished run (no _iqa.json) holding another run's file: refused without --overwrite
    other = tmp_path / "other"
    run([f"{dataset['shards']}/00002.tar"], other, out_dir=True)
    (other / "_iqa.json").unlink()
    with pytest.raises(UserError, match=r"holds 00002.parquet \(of 1 Parquet file\(s\) for other inputs\)"):
        run(fewer, other, out_dir=True)
    run(fewer, other, out_dir=True, overwrite=True)
    assert sorted(p.name for p in other.glob("*.parquet")) == ["00000.parquet", "00001.parquet"]
    # a Parquet file of the user's: refused, even with --overwrite, and kept
    pd.DataFrame({"a": [1]}).to_parquet(out / "mine.parquet")
    with pytest.raises(UserError, match=r"holds mine.parquet, which `iqa score` did not write"):
        run(fewer, out, out_dir=True, overwrite=True)
    assert (out / "mine.parquet").exists()


def test_directory_output_of_a_folder_reads_as_the_single_file(iqa, dataset, file_scores, tmp_path, monkeypatch):
    """`--out DIR/` for image files: one Parquet file per unit (a run of consecutive images), read back equal."""
    fixed_unit_size(monkeypatch, 4)  # 9 images: units of 4, 4 and 1
    monkeypatch.setattr("iqa_cli.scoring.driver.build_scorer", lambda config, device, factory: FakeScorer(device))
    code, _, err = iqa("score", dataset["files"], "--out", f"{tmp_path}/scores/", "--batch-size", "3")
    assert code == 0, err
    out = tmp_path / "scores"
    assert sorted(p.name for p in out.iterdir()) == ["_iqa.json", "part-00000.parquet", "part-00001.parquet",
                                                    "part-00002.parquet"]  # fmt: skip
    frame = pd.read_parquet(out)
    frame.index = [name.split(".")[0] for name in frame["image"]]
    assert frame["image"].tolist() == sorted(p.name for p in dataset["files"].iterdir())
    _assert_scores_equal_files(frame, file_scores, frame.index.tolist())


# --- kill -9 and two ranks ---------------------------------------------------------------------------


def _many_shards(root: Path, dataset: dict, n: int) -> Path:
    """n shards of two good images each (the same bytes as `files/`)."""
    root.mkdir(parents=True, exist_ok=True)
    keys = list(dataset["images"])
    for s in range(n):
        with tarfile.open(root / f"{s:05d}.tar", "w") as tar:
            for key in keys[(2 * s) % 8 : (2 * s) % 8 + 2]:
                data, suffix = dataset["images"][key]
                _add(tar, f"{s:03d}{key}.{suffix}", data)
    return root


def _launch(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, *args], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )


@pytest.fixture(scope="module")
def many(dataset, tmp_path_factory) -> tuple[Path, pd.DataFrame]:
    shards = _many_shards(tmp_path_factory.mktemp("many") / "shards", dataset, 8)
    out = tmp_path_factory.mktemp("many-ref") / "scores.parquet"
    run([f"{shards}/*.tar"], out)
    return shards, pd.read_parquet(out)


def test_sigkill_midway_then_rerun_scores_each_image_once(many, tmp_path):
    shards, reference = many
    out = tmp_path / "scores"
    process = _launch(["-m", "tests.test_shards", "run", f"{shards}/*.tar", f"{out}/", "--delay", "0.25"])
    kill_when(process, lambda: len(list(sidecar_path(out).glob("unit-*.done"))) >= 2, "no unit was finished")
    done = len(list(sidecar_path(out).glob("unit-*.done")))
    assert process.returncode == -signal.SIGKILL and 2 <= done < 8
    summary = run([f"{shards}/*.tar"], out, out_dir=True)
    assert summary.resumed == 2 * done and summary.processed == 2 * (8 - done)  # finished units were not redone
    assert_same_rows(pd.read_parquet(out), reference)  # every image once, the same scores


def test_two_process_gloo_run_equals_single_process(many, tmp_path):
    shards, reference = many
    out = tmp_path / "scores.parquet"
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "--max-restarts", "0"]
    process = _launch([*launcher, "-m", "tests.test_shards", "run", f"{shards}/*.tar", str(out)])
    try:
        output = process.communicate(timeout=240)[0].decode()
    finally:
        process.kill()
    assert process.returncode == 0, output
    assert_same_rows(pd.read_parquet(out), reference)
    assert "ranks=2 processed=[8, 8] total=16" in output  # units 0,2,4,6 and 1,3,5,7
    assert not sidecar_path(out).exists()


def _main(argv: list[str]) -> None:
    """`run PATTERN OUT`: scores shards with the fake scorer (subprocess tests); OUT ending in / is a directory."""
    from iqa_cli.scoring.config import ScoreInterrupted

    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["run"])
    parser.add_argument("pattern")
    parser.add_argument("out")
    parser.add_argument("--delay", type=float, default=0.0)
    args = parser.parse_args(argv)
    config = ScoreConfig(
        out=Path(args.out), out_dir=args.out.endswith("/"), inputs=[args.pattern], batch_size=2, workers=1, quiet=True
    )
    try:
        summary = score_images(config, scorer_factory=lambda device: FakeScorer(device, delay=args.delay))
    except ScoreInterrupted as exc:
        sys.exit(128 + exc.signum)
    if summary.is_main:
        print(f"ranks={os.environ.get('WORLD_SIZE', '1')} processed={summary.processed_by_rank} total={summary.total}")


if __name__ == "__main__":
    _main(sys.argv[1:])


def _tar_bytes(mode: str, format: int = tarfile.PAX_FORMAT, keys: int = 3) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode, format=format) as tar:
        for i in range(keys):
            _add(tar, f"{i:05d}.jpg", bytes([i + 1]) * (700 + i))
            _add(tar, f"{i:05d}.json", json.dumps({"i": i}).encode())
    return buffer.getvalue()


def _read_shard(path: Path) -> tuple[list[tuple[str, bytes | None]], str | None]:
    from iqa_cli.sources.webdataset import ShardError, samples

    got = []
    try:
        for key, data, _, _, _ in samples(str(path), []):
            got.append((key, data))
    except ShardError as exc:
        return got, str(exc)
    return got, None


def test_a_shard_cut_between_or_inside_headers_or_with_a_bad_header_is_reported(tmp_path):
    """tarfile reads an unreadable header after the first as the end of the archive; each way of losing the later
    samples is a ShardError after the samples before it, while the tars writers make (tarfile's formats and
    streams, GNU tar) read whole. count_samples counts the samples before the break."""
    import subprocess

    from iqa_cli.sources.webdataset import count_samples

    whole = [(f"{i:05d}", bytes([i + 1]) * (700 + i)) for i in range(3)]
    valid = {
        "pax": _tar_bytes("w"),
        "gnu": _tar_bytes("w", tarfile.GNU_FORMAT),
        "ustar stream (webdataset's writer)": _tar_bytes("w|", tarfile.USTAR_FORMAT),
        "one zero block": _tar_bytes("w", tarfile.USTAR_FORMAT)[: 3 * 2560 + 512],  # a sample: 1536 + 1024 bytes
    }
    members = tmp_path / "members"
    members.mkdir()
    for key, data in whole:
        (members / f"{key}.jpg").write_bytes(data)
        (members / f"{key}.json").write_text("{}")
    gnu = tmp_path / "gnu-tar.tar"
    subprocess.run(["tar", "-cf", str(gnu), "-C", str(members), *sorted(os.listdir(members))], check=True)
    valid["GNU tar"] = gnu.read_bytes()
    for name, data in valid.items():
        path = tmp_path / "valid.tar"
        path.write_bytes(data)
        assert _read_shard(path) == (whole, None), name
        assert count_samples(str(path)) == 3, name

    plain = _tar_bytes("w", tarfile.USTAR_FORMAT)
    with tarfile.open(fileobj=io.BytesIO(plain)) as tar:
        second = tar.getmember("00001.jpg").offset  # the first header of the second sample
    flipped = bytearray(plain)
    flipped[second + 5] ^= 0x20
    zeroed = bytearray(plain)
    zeroed[second : second + 512] = bytes(512)
    broken = {
        "cut at a member boundary": (plain[:second], f"breaks off at byte {second}"),
        "cut inside a header": (plain[: second + 100], f"breaks off at byte {second}"),
        "a flipped byte in a header": (bytes(flipped), f"breaks off at byte {second}"),
        "a zeroed header": (bytes(zeroed), "data follows it"),
    }
    for name, (data, fragment) in broken.items():
        path = tmp_path / "broken.tar"
        path.write_bytes(data)
        got, error = _read_shard(path)
        assert got == whole[:1] and error is not None and fragment in error, name
        assert count_samples(str(path)) == 1, name


def test_a_broken_metadata_table_loses_its_kept_columns_not_the_scores(dataset, tmp_path, capfd):
    """An unreadable `00001.parquet` beside its shard: every sample is read, --keep falls back to the .json members
    (as for a shard without a table), and a warning names the table."""
    from iqa_cli.sources.webdataset import samples

    shard = tmp_path / "00001.tar"
    shard.write_bytes((dataset["shards"] / "00001.tar").read_bytes())
    (tmp_path / "00001.parquet").write_bytes(b"PAR1 not really a table")
    got = [(key, kept["url"], data is not None) for key, data, _, kept, _ in samples(str(shard), ["url"])]
    keys = dataset["layout"][1]
    assert got[: len(keys)] == [(k, f"https://x/{k}", True) for k in keys]
    assert [key for key, *_ in got[len(keys) :]] == ["bad01", "text1"]
    assert f"cannot read the metadata table {tmp_path / '00001.parquet'}" in capfd.readouterr().err


def test_a_run_that_fails_stops_counting_the_shards_headers(dataset, tmp_path, monkeypatch):
    """The progress bar's total comes from a thread reading every shard's headers; a run that fails (or is stopped)
    stops it too, rather than leaving it reading headers of shards nobody scores."""
    import iqa_cli.scoring.driver as driver
    from tests.test_score_pipeline import Crash, CrashingScorer

    started = []
    original = driver._count_in_background
    monkeypatch.setattr(driver, "_count_in_background", lambda *a: started.append(original(*a)) or started[-1])
    config = ScoreConfig(out=tmp_path / "s.parquet", inputs=[f"{dataset['shards']}/*.tar"], batch_size=2, workers=0)
    with pytest.raises(Crash):
        score_images(config, scorer_factory=lambda device: CrashingScorer(device, crash_after=0))
    assert len(started) == 1 and started[0] is not None and started[0].stop.is_set()


def test_the_progress_bar_has_a_total_for_parquet_at_once_and_for_shards_from_their_headers(
    dataset, tmp_path, monkeypatch
):
    """Parquet footers give the total before scoring; a tar's headers are counted beside the run, from each unit's
    resume point on, and the bar gets the total when they are read."""
    from rich.console import Console

    import iqa_cli.scoring.driver as driver
    from iqa_cli.progress import ProgressBar

    bars = []
    monkeypatch.setattr(driver, "progress_bar", lambda *a, **k: bars.append(ProgressBar(a[0], a[1], a[2])) or bars[-1])
    config = ScoreConfig(out=tmp_path / "t.parquet", inputs=[f"{dataset['tables']}/*.parquet"], image_col="image",
                         batch_size=2, workers=0)  # fmt: skip
    summary = score_images(
        config, scorer_factory=lambda device: FakeScorer(device), console=Console(file=io.StringIO())
    )
    assert bars[0].progress.tasks[0].total == summary.total == 10

    shards = open_inputs([f"{dataset['shards']}/*.tar"], SourceOptions())
    units, starts = np.arange(len(shards)), np.array([0, 2, 0, 0])  # unit 1 resumes at its third sample
    assert driver._known_total(shards, units, starts) is None  # unknown until the headers are read
    bar = ProgressBar(Console(file=io.StringIO()), None, "scoring")
    counter = driver._count_in_background(shards, units, starts, bar)
    counter.join(timeout=60)
    assert bar.progress.tasks[0].total == 3 + 4 + 2 + 2 - 2
