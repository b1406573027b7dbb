"""The benchmark scripts still run (their full figures live in BENCHMARKS.md); tiny sizes, real code paths."""

import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT


def _run(script: str, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / script), *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO_ROOT,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_bench_prepare_runs_and_reports_the_ratio():
    out = _run("bench_prepare.py", "--rows", "20000", "--loop-rows", "200", "--scipy-rows", "20", "--repeat", "1")
    assert "speed-up over the per-row loop" in out
    assert "max |label difference| vs vectorized" in out


def test_bench_model_runs_on_the_tiny_model():
    out = _run("bench_model.py", "--batch-sizes", "1,2", "--repeat", "2", "--warmup", "1", "--json")
    rows = [line for line in out.splitlines() if line.startswith("{")]
    assert len(rows) == 2 and '"batch": 2' in rows[1]


def test_bench_preprocess_resize_checks_identical_squares():
    out = _run("bench_preprocess.py", "resize", "--images", "2", "--repeats", "1")
    assert "squares identical: yes" in out and "split vs plain" in out


def test_bench_preprocess_collate_checks_identical_batches():
    out = _run("bench_preprocess.py", "collate", "--batches", "1", "--repeats", "1")
    assert "batches identical bit for bit: yes" in out and "torch.bfloat16" in out


@pytest.mark.slow
def test_bench_score_cpu_reports_phases_and_both_ratios():
    out = _run("bench_score.py", "cpu", "--counts", "17", "--repeats", "1", "--image-size", "28")
    assert "iqa score phases (s): start-up" in out and "exit" in out
    assert "vs the reference loop alone" in out and "vs the loop plus its start-up" in out
    difference = float(out.rsplit("largest |score difference|: ", 1)[1].split()[0])
    assert difference < 1e-4  # the same model and pixels both ways


def test_bench_preprocess_pool_reuses_blocks():
    out = _run("bench_preprocess.py", "pool", "--images", "160", "--repeats", "1")
    blocks = {line.split()[0]: int(line.rsplit(" ", 1)[1]) for line in out.splitlines() if "blocks allocated" in line}
    fresh, pooled = blocks["fresh"], blocks["pooled"]
    assert fresh == 10 and pooled == 6  # a block per batch before; now a ring of 3 per worker


def test_bench_score_stages_reports_the_ceiling():
    out = _run("bench_score.py", "stages", "--images", "4", "--repeats", "1", "--image-size", "28")
    assert "reference loop, one image after another" in out
    assert out.count("images/s on") == 2 and "fast pad + resize + crop (torch)" in out


def test_bench_startup_runs_and_reports_old_and_new():
    out = _run("bench_startup.py", "build", "--repeats", "1", "--size", "mplug-owl2-tiny")
    assert "build mplug-owl2-tiny new:" in out and "torch._dynamo imported: False" in out
    out = _run("bench_startup.py", "parts", "--repeats", "1")
    assert "first part table new:" in out and "pandas imported: False" in out


def test_bench_video_reports_both_samplings_and_the_seek_ratio():
    out = _run("bench_video.py", "--clips", "1", "--seconds", "2", "--size", "160x96", "--repeat", "1")
    lines = {line.split()[0] + line.split()[1]: line for line in out.splitlines() if line.startswith("--")}
    assert set(lines) == {"--fps1", "--frames8"} and all(line.rstrip().endswith("x") for line in lines.values())
    assert lines["--fps1"].split()[2] == "2" and lines["--frames8"].split()[2] == "8"  # frames scored per video
