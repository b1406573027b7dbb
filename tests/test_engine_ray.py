"""`iqa score --engine ray` on a local Ray of 2 CPUs that this module starts once: the output equals the local
engine's on a folder, shards and a Parquet column; an actor killed with -9 mid-run and a driver killed with -9
then rerun give each image once with the same scores; bad options are one-line errors; the real CLI with
`--engine ray` writes what it writes without. `RayScorer` in Ray Data pipelines gives `iqa score`'s values (the
tiny checkpoint).

Scoring uses the fake, row-wise scorer of `tests/test_score_pipeline.py` (real decoding and preprocessing), built
in the actors from the factory the test passes. Run as a module (`python -m tests.test_engine_ray run ...`),
this file scores a folder with the ray engine and the fake scorer: the driver kill test launches it that way.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from iqa_cli.cli import app
from iqa_cli.errors import UserError
from iqa_cli.scoring.config import ScoreConfig
from iqa_cli.scoring.driver import score_images
from iqa_cli.scoring.output import output_schema
from iqa_cli.scoring.store import sidecar_path
from tests.conftest import REPO_ROOT, fixed_unit_size, kill_when, run_iqa
from tests.test_score_pipeline import FakeBatch, FakeScorer, assert_same_rows, make_image_folder
from tests.test_shards import make_dataset

ray = pytest.importorskip("ray")
OUTPUT_TYPES = {f.name: f.type for f in output_schema(5, False, {})}  # the columns iqa score writes


@pytest.fixture(scope="module")
def ray_address():
    """One local Ray for the module (2 CPUs, no dashboard); actors import `tests` through PYTHONPATH.
    Ray Data's progress bars replace builtins.print in this process: put it back for the tests after."""
    import builtins

    original_print = builtins.print
    context = ray.init(
        num_cpus=2,
        num_gpus=0,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": str(REPO_ROOT)}},
    )
    yield context.address_info["address"]
    ray.shutdown()
    builtins.print = original_print


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images") / "photos"
    make_image_folder(root)
    return root


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> dict:
    return make_dataset(tmp_path_factory.mktemp("dataset"))


def small_units(monkeypatch, per_unit: int = 4) -> None:
    fixed_unit_size(monkeypatch, per_unit)


def score(inputs, out: Path, factory=None, **options):
    kwargs = {"batch_size": 3, "workers": 2, "quiet": True, **options}
    config = ScoreConfig(out=out, inputs=[str(i) for i in inputs], **kwargs)
    return score_images(config, scorer_factory=factory or (lambda device: FakeScorer(device)))


def footer(path: Path) -> dict[str, str]:
    """An output's metadata: the Parquet footer's, or `DIR/_iqa.json` of a folder output."""
    if path.is_dir():
        return json.loads((path / "_iqa.json").read_text())
    return {k.decode(): v.decode() for k, v in pq.read_schema(path).metadata.items() if not k.startswith(b"ARROW")}


def read(out: Path) -> pd.DataFrame:
    if out.is_dir():
        return pd.concat([pd.read_parquet(p) for p in sorted(out.glob("*.parquet"))], ignore_index=True)
    return pd.read_parquet(out)


@pytest.mark.parametrize("kind", ["folder", "shards", "parquet"])
def test_ray_engine_output_equals_the_local_engine(ray_address, folder, dataset, tmp_path, monkeypatch, kind):
    small_units(monkeypatch)  # 7 units of the folder, so actors take several
    inputs, options, out_name = {
        "folder": ([folder], {}, "scores.parquet"),
        "shards": ([f"{dataset['shards']}/*.tar"], {"keep": ["url"]}, "scores/"),  # a broken shard, a bad member
        "parquet": ([f"{dataset['tables']}/*.parquet"], {"image_col": "image", "keep": ["url", "label"]}, "s.jsonl"),
    }[kind]
    local, remote = tmp_path / "local" / out_name, tmp_path / "ray" / out_name
    for out in (local, remote):
        out.parent.mkdir()
    expected = score(inputs, local, out_dir=out_name.endswith("/"), **options)
    summary = score(inputs, remote, engine="ray", out_dir=out_name.endswith("/"), **options)

    assert (summary.total, summary.failed, summary.processed) == (expected.total, expected.failed, expected.total)
    assert summary.unit_errors == expected.unit_errors
    if kind == "parquet":  # JSON Lines: the same text, the same metadata file
        assert remote.read_text() == local.read_text()
        assert Path(f"{remote}.meta.json").read_text() == Path(f"{local}.meta.json").read_text()
    else:
        assert_same_rows(read(remote), read(local))
        assert footer(remote) == footer(local)
        assert sorted(p.name for p in remote.parent.rglob("*")) == sorted(p.name for p in local.parent.rglob("*"))
    assert not sidecar_path(remote).exists()
    # The engine does not decide the scores: each engine's output is complete for the other.
    assert score(inputs, remote, out_dir=out_name.endswith("/"), **options).already_complete
    assert score(inputs, local, engine="ray", out_dir=out_name.endswith("/"), **options).already_complete


@dataclass
class ReasonedBatch(FakeBatch):
    score_soft: torch.Tensor | None = None
    errors: list[str | None] | None = None
    texts: list[str] | None = None


class ReasoningScorer(FakeScorer):
    """The fake scorer as a reasoning model that may score videos: an answer with its score as text (a score
    below 3: an answer without a number, an error row), score_soft beside score, a video prompt."""

    reasoning = True
    video_metadata: ClassVar[dict[str, str]] = {"video_prompt": "USER: <video> rate it", "video_input_ids": "[7, 8]"}

    def score_batch(self, visual: dict[str, torch.Tensor]) -> ReasonedBatch:
        plain = super().score_batch(visual)
        scores = plain.score.tolist()
        texts = [f"<answer> {s:.3f} </answer>" if s >= 3 else "I cannot tell" for s in scores]
        errors = [None if s >= 3 else f"the answer gives no number: {t!r}" for s, t in zip(scores, texts, strict=True)]
        return ReasonedBatch(**vars(plain), score_soft=plain.score + 0.25, errors=errors, texts=texts)


def test_a_reasoning_model_on_ray_keeps_its_answers_soft_scores_and_video_prompt(
    ray_address, dataset, tmp_path, monkeypatch
):
    """The actors' scorer says it reasons and holds a video prompt: the ray engine's output has score_soft, the
    answers of --keep-reasoning and the video prompt in its footer, as the local engine's."""
    inputs = [f"{dataset['shards']}/*.tar"]
    options = {"keep_reasoning": True, "factory": lambda device: ReasoningScorer(device)}
    local, remote = tmp_path / "local.parquet", tmp_path / "ray.parquet"
    score(inputs, local, **options)
    score(inputs, remote, engine="ray", **options)
    expected, got = read(local), read(remote)
    assert {"score_soft", "reasoning"} <= set(got.columns)
    answered = expected["reasoning"].str.startswith("<answer>", na=False)
    assert answered.any() and (~answered & expected["error"].isna()).sum() == 0
    assert expected["error"].str.startswith("the answer gives no number", na=False).any()
    assert_same_rows(got, expected)
    assert footer(remote) == footer(local) and footer(remote)["video_prompt"] == "USER: <video> rate it"


class KillOn:
    """The fake scorer's transform, except that an image of `size` kills the DataLoader worker decoding it."""

    def __init__(self, transform, size: tuple[int, int]):
        self.transform, self.size = transform, size

    def __call__(self, image):
        if image.size == self.size and torch.utils.data.get_worker_info() is not None:
            os.kill(os.getpid(), signal.SIGKILL)
        return self.transform(image)


class DecoderKiller(FakeScorer):
    def __init__(self, device):
        super().__init__(device)
        self.transform = KillOn(self.transform, (13, 11))


@pytest.mark.slow
def test_an_image_that_kills_its_decoding_worker_loses_its_actor_and_stops_the_run_on_its_unit(tmp_path):
    """README: a unit whose actors die three times stops the run with its name (an image that kills its decoder).
    With decoding workers the death is a worker's, which the actor reports so that the driver takes it as lost.
    On a Ray of its own (a process that starts one): the module's Ray answers no more after such deaths."""
    from PIL import Image

    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(6):
        Image.new("RGB", (13, 11) if i == 3 else (20, 16), (40 * i, 90, 30)).save(folder / f"{i}.png")
    args = [
        "-m",
        "tests.test_engine_ray",
        "run",
        str(folder),
        str(tmp_path / "s.parquet"),
        "local",
        "-",
        "--kill-decoder",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(
        [sys.executable, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 2, result.stdout + result.stderr
    error = result.stdout.strip().splitlines()[-1]
    assert re.search(r"^error: .*: 3 Ray actors were lost while scoring (it|these \d units together)", error), error
    assert "images 3-4 (2.png, ...)" in error and "a decoding worker died" in error  # 3.png's unit among those named


class PidScorer(FakeScorer):
    """The fake scorer, slowed down, writing its actor's pid to a file when it loads."""

    def __init__(self, device, pids: str, delay: float):
        super().__init__(device, delay=delay)
        with open(pids, "a") as file:
            file.write(f"{os.getpid()}\n")


def _pids(path: Path) -> list[int]:
    return [int(line) for line in path.read_text().split()] if path.exists() else []


def _finished_units(out: Path) -> int:
    return len(list(sidecar_path(out).glob("unit-????????.parquet")))


@pytest.mark.slow
def test_an_actor_killed_mid_run_is_replaced_and_each_image_is_scored_once(ray_address, folder, tmp_path, monkeypatch):
    import threading

    small_units(monkeypatch, 2)
    reference = tmp_path / "reference.parquet"
    score([folder], reference)
    out, pids = tmp_path / "scores.parquet", tmp_path / "pids"
    killed: list[int] = []

    def kill_when_units_are_written() -> None:
        deadline = time.monotonic() + 120
        while _finished_units(out) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        killed.extend(_pids(pids))
        os.kill(killed[0], signal.SIGKILL)

    killer = threading.Thread(target=kill_when_units_are_written)
    killer.start()
    summary = score([folder], out, lambda d: PidScorer(d, str(pids), 0.15), engine="ray", batch_size=2, flush_rows=1)
    killer.join()

    assert len(killed) == 1 and len(_pids(pids)) == 2  # one actor killed, one started in its place
    assert summary.processed == summary.total == 25  # the dead actor's pieces were kept, the rest redone
    assert_same_rows(pd.read_parquet(out), pd.read_parquet(reference))


@pytest.mark.slow
def test_a_driver_killed_mid_run_takes_its_actors_and_the_rerun_scores_the_rest(ray_address, folder, tmp_path):
    reference = tmp_path / "reference.parquet"
    score([folder], reference)
    out, pids = tmp_path / "scores.parquet", tmp_path / "pids"
    args = ["-m", "tests.test_engine_ray", "run", str(folder), str(out), ray_address, str(pids), "--per-unit", "2"]
    process = subprocess.Popen(
        [sys.executable, *args], cwd=REPO_ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    kill_when(process, lambda: _finished_units(out) >= 3, "no unit was finished")
    actor = _pids(pids)[0]
    deadline = time.monotonic() + 30
    while Path(f"/proc/{actor}").exists() and time.monotonic() < deadline:  # Ray ends the dead driver's actors
        time.sleep(0.1)
    assert not Path(f"/proc/{actor}").exists(), "the actor outlived its driver"
    done = sum(pq.read_metadata(p).num_rows for p in sidecar_path(out).glob("unit-*.parquet"))
    assert 6 <= done < 25

    small_units_patch = pytest.MonkeyPatch()
    small_units(small_units_patch, 2)
    try:
        summary = score([folder], out, engine="ray")
    finally:
        small_units_patch.undo()
    assert summary.resumed == done and summary.processed == 25 - done
    assert_same_rows(pd.read_parquet(out), pd.read_parquet(reference))


def _error_line(result) -> str:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def test_without_ray_and_with_an_unreachable_address_the_cli_says_so_in_one_line(folder, tmp_path):
    fake = tmp_path / "no-ray" / "ray"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError(\"No module named 'ray'\")\n")
    out = str(tmp_path / "s.parquet")
    env = {"PYTHONPATH": f"{fake.parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    line = _error_line(run_iqa("score", str(folder), "--out", out, "--engine", "ray", env=env, timeout=120))
    assert "Ray is not installed (pip install 'iqa-cli[ray]')" in line

    import socket

    with socket.socket() as unused:  # a port nothing listens on
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    start = time.monotonic()
    result = run_iqa("score", str(folder), "--out", out, "--engine", "ray", "--ray-address", f"127.0.0.1:{port}")
    assert f"--ray-address 127.0.0.1:{port}: cannot reach 127.0.0.1:{port}" in _error_line(result)
    assert time.monotonic() - start < 60 and not Path(out).exists() and not sidecar_path(Path(out)).exists()


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--engine", "ray", "--ray-address", "10.0.0.1:6379", "--out", "r.pq"], "--out r.pq: a relative"),
        (["--engine", "ray", "--gpus-per-actor", "0"], "--gpus-per-actor 0: use a fraction"),
        (["--engine", "ray", "--gpus-per-actor", "1.5"], "--gpus-per-actor 1.5"),
        (["--gpus-per-actor", "2"], "--gpus-per-actor 2: applies to --engine ray"),
        (["--ray-address", "auto"], "--ray-address auto: applies to --engine ray"),
        (["--engine", "ray", "--device", "cuda:1"], "--device cuda:1: with --engine ray"),
        (["--engine", "spark"], "--engine spark: unknown engine (use local or ray)"),
        (["--engine", "ray", "--ray-address", "nowhere"], "--ray-address nowhere: use auto, HOST:PORT"),
    ],
)  # fmt: skip
def test_bad_engine_options_are_user_errors_before_any_work(folder, tmp_path, monkeypatch, args, fragment):
    monkeypatch.chdir(tmp_path)
    out = ["--out", str(tmp_path / "s.parquet")] if "--out" not in args else []
    result = CliRunner().invoke(app, ["score", str(folder), *out, *args])
    assert isinstance(result.exception, UserError), result.output
    assert fragment in str(result.exception)
    assert list(tmp_path.iterdir()) == []


def test_a_relative_local_model_is_refused_on_a_cluster_and_a_hub_id_is_not(folder, tmp_path, monkeypatch):
    from iqa_cli.engines.ray import check_shared_paths

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "mine").mkdir(parents=True)
    out, inputs = tmp_path / "s.parquet", [str(folder)]
    for given, flag in ((["--model", "runs/mine"], "--model"), (["--base", "runs/mine"], "--base")):
        result = CliRunner().invoke(app, ["score", *inputs, "--out", str(out), *given, "--ray-address",
                                          "10.0.0.1:6379", "--engine", "ray"])  # fmt: skip
        assert isinstance(result.exception, UserError), result.output
        assert str(result.exception).startswith(f"{flag} runs/mine: a relative path; with --engine ray")
    check_shared_paths(ScoreConfig(out=out, inputs=inputs, model="zhiyuanyou/DeQA-Score-Mix3"))  # a Hub id: no error


def _main(argv: list[str]) -> None:
    """`run FOLDER OUT ADDRESS PIDS`: scores FOLDER with --engine ray on the cluster at ADDRESS (local: a Ray of
    its own), the fake scorer slowed down and writing its actors' pids to PIDS (`--kill-decoder`: DecoderKiller)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["run"])
    parser.add_argument("folder")
    parser.add_argument("out")
    parser.add_argument("address")
    parser.add_argument("pids")
    parser.add_argument("--per-unit", type=int, default=2)
    parser.add_argument("--kill-decoder", action="store_true", help="DecoderKiller, not the slowed PidScorer")
    args = parser.parse_args(argv)
    small_units(pytest.MonkeyPatch(), args.per_unit)
    config = ScoreConfig(
        out=Path(args.out), inputs=[args.folder], batch_size=2, workers=1, quiet=True, flush_rows=1,
        engine="ray", ray_address=args.address,
    )  # fmt: skip
    factory = DecoderKiller if args.kill_decoder else lambda device: PidScorer(device, args.pids, 0.3)
    try:
        summary = score_images(config, scorer_factory=factory)
    except UserError as exc:
        print(f"error: {exc}")
        sys.exit(2)
    print(f"processed={summary.processed} total={summary.total}")


if __name__ == "__main__":
    _main(sys.argv[1:])


# --- RayScorer in Ray Data pipelines: iqa score's values (the tiny checkpoint) ----------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    from iqa_cli.models.mplug_owl2.tiny import build_tiny_tokenizer
    from tests.factories import tiny_model, write_checkpoint

    root = tmp_path_factory.mktemp("tiny")
    return write_checkpoint(tiny_model(seed=3), root / "deqa", tokenizer_dir=build_tiny_tokenizer(root / "tok")).path


def qscorer_case(root: Path) -> tuple[dict[str, str], Path, pd.DataFrame]:
    """A tiny Q-Scorer checkpoint (5 score tokens and the MLP regressor, released LoRA layout) as model options, a
    folder of images with broken ones, and what `iqa score` writes for it (indexed by image): score_reg on the
    scored rows, null on the error rows."""
    from iqa_cli.models.mplug_owl2.tiny import build_tiny_tokenizer
    from iqa_cli.models.mplug_owl2.tokenizer import LlamaTokenizer
    from tests.factories import tiny_model, write_checkpoint

    tokenizer = build_tiny_tokenizer(root / "model" / "tok")
    model = tiny_model(seed=6, vocab_size=len(LlamaTokenizer.from_dir(tokenizer)) + 5, deepmlp_hidden_dims=[48, 48])
    checkpoint = write_checkpoint(model, root / "model" / "q", layout="qscorer_lora", tokenizer_dir=tokenizer)
    folder = root / "images"
    make_image_folder(folder)
    options = {"model": str(checkpoint.path), "base": str(checkpoint.base)}
    expected = iqa_score([folder], root / "files.parquet", **options).set_index("image")
    assert expected["score_reg"].notna().sum() >= 5 and expected["error"].notna().any()
    return options, folder, expected


def assert_same_regression(got: pd.DataFrame, expected: pd.DataFrame) -> None:
    """score_reg of the same rows within 1e-6 (null where the image is an error row), besides assert_same_values."""
    import numpy as np

    assert_same_values(got, expected)
    np.testing.assert_allclose(got["score_reg"].to_numpy(float), expected["score_reg"].to_numpy(float), atol=1e-6)


CALL = 4  # rows of every model call, in iqa score and in the pipelines: the same shapes, the same numbers


@pytest.fixture
def one_thread(monkeypatch):
    """One intra-op thread for the model here and in the processes a pipeline starts (Ray's map actors have one
    already): float32 sums split over other thread counts differ in the last bits."""
    import torch

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def iqa_score(inputs, out: Path, model: Path, base: str | None = None, **options) -> pd.DataFrame:
    from iqa_cli.model_options import ModelSpec

    spec = ModelSpec(str(model), base=base, dtype="float32")
    config = ScoreConfig(
        out=out, inputs=[str(i) for i in inputs], model=spec, device="cpu", batch_size=CALL, quiet=True, **options
    )
    score_images(config)
    return pd.read_parquet(out)


def arrow(dataset) -> pd.DataFrame:
    """A Ray dataset as pandas through Arrow (the types its blocks hold, converted as `pd.read_parquet` does)."""
    table = pa.concat_tables(ray.get(dataset.to_arrow_refs()))
    for name in ("score", "std", "probs", "level", "width", "height", "error"):
        assert table.schema.field(name).type == OUTPUT_TYPES[name], name
    return table.to_pandas()


def assert_same_values(got: pd.DataFrame, expected: pd.DataFrame) -> None:
    """The output columns of two frames in the same row order: scores within 1e-6, the rest equal."""
    import numpy as np

    assert len(got) == len(expected)
    for column in ("score", "std"):
        np.testing.assert_allclose(got[column].to_numpy(float), expected[column].to_numpy(float), atol=1e-6, rtol=0)
    for a, b in zip(got["probs"], expected["probs"], strict=True):
        assert (a is None and b is None) or np.allclose(a, b, atol=1e-6, rtol=0)
    for column in ("level", "width", "height", "error"):
        pd.testing.assert_series_equal(
            got[column], expected[column], check_index=False, check_names=False, check_dtype=False
        )


@pytest.mark.slow
def test_ray_scorer_in_ray_data_pipelines_gives_the_values_of_iqa_score(
    ray_address, dataset, tiny, tmp_path, one_thread
):
    import shutil

    from iqa_cli.engines.ray import RayScorer

    folder = tmp_path / "images"
    shutil.copytree(dataset["files"], folder)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    expected = iqa_score([folder], tmp_path / "files.parquet", tiny).set_index("image")
    options = {"model": str(tiny), "device": "cpu", "dtype": "float32", "batch_size": CALL, "image_column": "bytes"}
    images = ray.data.read_binary_files(str(folder), include_paths=True).map_batches(
        RayScorer, fn_constructor_kwargs=options, batch_size=4, compute=ray.data.ActorPoolStrategy(size=1)
    )
    got = arrow(images)
    got.index = [Path(p).name for p in got["path"]]
    assert sorted(got.index) == sorted(expected.index) and list(got.columns[:2]) == ["bytes", "path"]
    assert_same_values(got.loc[expected.index], expected)
    assert "not an image" in got.loc["broken.jpg", "error"]

    table = pq.read_table(dataset["tables"] / "train-0.parquet")  # {bytes, path} structs, as Hugging Face's
    image = [*table.column("image").to_pylist(), {"bytes": None, "path": "gone.jpg"}, None]
    table = pa.table({"image": pa.array(image, table.schema.field("image").type), "label": list(range(7))})
    pq.write_table(table, tmp_path / "rows.parquet", row_group_size=3)
    expected = iqa_score([tmp_path / "rows.parquet"], tmp_path / "t.parquet", tiny, image_col="image", keep=["label"])
    options["image_column"] = "image"
    rows = ray.data.read_parquet(str(tmp_path / "rows.parquet")).map_batches(
        RayScorer, fn_constructor_kwargs=options, batch_size=3, compute=ray.data.ActorPoolStrategy(size=1)
    )
    got = arrow(rows).sort_values("label", ignore_index=True)
    assert got["label"].tolist() == list(range(7)) and got.columns[0] == "image"
    assert_same_values(got, expected)  # null bytes: the error rows iqa score writes
    assert got["error"].notna().tolist() == [False] * 5 + [True, True]


def test_ray_scorer_on_a_qscorer_model_adds_the_score_reg_of_iqa_score(tmp_path, one_thread):
    """A batch as Ray Data hands it to map_batches (a dict of numpy arrays): score_reg beside score, as written."""
    import numpy as np

    from iqa_cli.engines.ray import RayScorer

    model, folder, expected = qscorer_case(tmp_path)
    scorer = RayScorer(**model, device="cpu", dtype="float32", batch_size=CALL, image_column="bytes")
    names = list(expected.index)
    batch = {"bytes": np.array([(folder / n).read_bytes() for n in names], dtype=object), "name": np.array(names)}
    got = scorer(batch).to_pandas()
    assert got.columns.tolist() == ["bytes", "name", *(n for n in OUTPUT_TYPES if n != "image"), "score_reg"]
    assert_same_regression(got.set_index("name"), expected)


@pytest.mark.slow
def test_the_cli_with_engine_ray_writes_what_it_writes_without(ray_address, dataset, tiny, tmp_path):
    expected = iqa_score([dataset["files"]], tmp_path / "local.parquet", tiny)
    out = tmp_path / "ray.parquet"
    args = ["--model", str(tiny), "--dtype", "float32", "--device", "cpu", "--batch-size", str(CALL)]
    result = run_iqa("score", str(dataset["files"]), "--out", str(out), *args, "--engine", "ray", "--ray-address",
                     ray_address, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "scored 9 of 9 images (0 failed)" in result.stderr and "Traceback" not in result.stderr
    assert_same_values(pd.read_parquet(out), expected)
    assert pd.read_parquet(out)["image"].tolist() == expected["image"].tolist()
    assert footer(out) == footer(tmp_path / "local.parquet")
