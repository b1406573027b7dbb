"""`iqa score` refuses to resume, or to call finished, a run made with other scoring options (--quantize,
--prompt, --dtype, --fast-decode), as README says: the real command line on a tiny checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from tests.conftest import REPO_ROOT, run_iqa

pytest.importorskip("torchao", reason="--quantize needs torchao (pip install 'iqa-cli[quantize]')")

QUICK_START_PROMPT = (
    "USER: How would you rate the quality of this image?\n<|image|>\nASSISTANT: The quality of the image is"
)
CHANGED = {  # option -> (its arguments, what the refusal may say differs)
    "--quantize": (["--quantize", "int8"], ["another quantization (none, now int8)"]),
    "--prompt": (["--prompt", QUICK_START_PROMPT], ["another prompt ('USER: How would you rate the quality of this"]),
    "--dtype": (["--dtype", "bfloat16"], ["another dtype (float32, now bfloat16)"]),
    "--fast-decode": (["--fast-decode"], ["another decode mode (exact, now fast;"]),
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from iqa_cli.models.mplug_owl2.tiny import build_tiny_tokenizer
    from tests.factories import tiny_model, write_checkpoint

    root = tmp_path_factory.mktemp("resume-options")
    checkpoint = write_checkpoint(tiny_model(seed=3), root / "deqa", tokenizer_dir=build_tiny_tokenizer(root / "tok"))
    photos = root / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(120):  # one image per model call: the run is still scoring when it is stopped
        pixels = rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(photos / f"{i:03d}.{'jpg' if i % 2 else 'png'}")
    return checkpoint.path, photos, root


def _stop_after_the_manifest(args: list[str], manifest) -> subprocess.CompletedProcess:
    """The command in a subprocess, SIGTERM'd once its run has started (manifest written): an interrupted run."""
    proc = subprocess.Popen([sys.executable, "-m", "iqa_cli", *args], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while not manifest.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the run never wrote its manifest"
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGSTOP)  # held still at once, then told to stop
        os.kill(proc.pid, signal.SIGTERM)
        os.kill(proc.pid, signal.SIGCONT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def _refused(result, kind: str, differences: list[str]) -> None:
    """Exit 2 and one line saying what kind of run is there, what differs (one of `differences`) and --overwrite."""
    code, err = (result[0], result[2]) if isinstance(result, tuple) else (result.returncode, result.stderr)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, lines)
    assert kind in lines[0] and "--overwrite" in lines[0], lines[0]
    assert any(difference in lines[0] for difference in differences), lines[0]


def test_an_interrupted_or_finished_run_with_other_scoring_options_is_refused(setup, iqa):
    checkpoint, photos, root = setup
    out = root / "scores.parquet"
    base = ["score", str(photos), "--out", str(out), "--model", str(checkpoint), "--device", "cpu"]
    base += ["--dtype", "float32", "--batch-size", "1", "--workers", "0", "--quiet"]
    stopped = _stop_after_the_manifest(base, root / "scores.parquet.parts" / "manifest.json")
    # 143 with its message once scoring, or killed by the signal before the loop handles it: either way the
    # run's manifest stays, an interrupted run
    assert stopped.returncode in (143, -signal.SIGTERM), stopped.stderr
    assert (root / "scores.parquet.parts" / "manifest.json").exists() and not out.exists()

    # resuming with another option: refused, nothing changed (the command line's main() in this process)
    for option, (args, differences) in CHANGED.items():
        _refused(iqa(*base, *args), "holds an interrupted run of", differences)
        assert not out.exists(), option

    resumed = run_iqa(*base)  # the same options resume it (a subprocess, as the interrupted run)
    assert resumed.returncode == 0, resumed.stderr
    assert out.exists()

    for args, differences in CHANGED.values():  # a finished output: refused the same way
        _refused(iqa(*base, *args), "exists and was written with", differences)
    written = out.stat().st_mtime_ns
    code, _, err = iqa(*base)
    assert code == 0 and out.stat().st_mtime_ns == written, err  # with its own options it is complete
