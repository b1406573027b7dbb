"""`benchmarks/gpu_check.py --dry-run`: every section of the lent-GPU check runs on the CPU with the tiny models,
so the first GPU call does not fail on a typo (the GPU-only steps, int4 and the memory fraction, say so)."""

import os
import subprocess
import sys

import pytest

from tests.conftest import ONE_THREAD, REPO_ROOT


@pytest.mark.slow
def test_gpu_check_runs_every_section_on_the_cpu():
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "gpu_check.py"), "--dry-run"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=480, env={**os.environ, **ONE_THREAD},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [line.split(" | ") for line in proc.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    assert all(len(row) == 3 for row in rows), rows  # one table: no cell holds a '|'
    checks = {(row[0].strip("| "), row[1]) for row in rows[1:]}
    assert not [row for row in rows if "FAILED" in row[2] or "skipped: time" in row[2]]
    assert any(s == "gpu tests" and c.startswith("pytest -m gpu (") for s, c in checks)
    assert {c for s, c in checks if s == "float32 vs CPU"} == {
        "mplug_owl2", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava_onevision", "idefics3",
    }  # fmt: skip
    assert len([c for s, c in checks if s == "bf16 invariance"]) == 4
    for name in ("mplug-owl2 bf16", "mplug-owl2 int8", "qwen2.5-vl bf16", "qwen2.5-vl int8"):
        assert {("7B scoring", f"{name}, iqa score batch {b}") for b in (2, 4)} <= checks, name
    assert ("7B scoring", "mplug-owl2 bf16, --batch-size auto") in checks
    assert ("7B scoring", "mplug-owl2 bf16, iqa serve one image") in checks
    assert ("7B scoring", "qwen2.5-vl int4") in checks  # "skipped: int4 needs CUDA (dry run)"
    assert {c for s, c in checks if s == "training"} >= {"tiny mPLUG-Owl2 deqa full, FSDP2 one rank"}
    assert any(s == "serve" for s, _ in checks)
    assert proc.stdout.rstrip().endswith("0 failed")
