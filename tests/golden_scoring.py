"""Golden `iqa score` outputs: the same images as a folder, a `--from` list, WebDataset shards and a Parquet column,
hostile files among them, scored by the tiny checkpoint stored in `tests/fixtures/golden_scoring/`.

The expected outputs in `tests/fixtures/golden_scoring/expected/` were written by `iqa score` itself before the
scoring loop was rewritten (issue 17: one loop for every source), so `tests/test_golden_scoring.py` proves that
the rewrite gives the old rows, columns, order, sizes and errors. To write them again (only when an output is
meant to change, and say why in the commit):

    OMP_NUM_THREADS=1 .venv/bin/python -m tests.golden_scoring

The inputs are built here from the committed files in `images/` (packing into tar and Parquet is deterministic),
so every machine scores the same bytes.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

GOLDEN = Path(__file__).resolve().parent / "fixtures" / "golden_scoring"
IMAGES = GOLDEN / "images"  # the committed inputs, hostile files included
MODEL = GOLDEN / "tiny-mplug-owl2"  # a random-init tiny mPLUG-Owl2 in the released layout
EXPECTED = GOLDEN / "expected"

# case -> arguments after `iqa score` (paths relative to the folder `build_inputs` fills)
CASES: dict[str, list[str]] = {
    "folder": ["photos"],
    "files_and_folder": ["photos/sub", "photos/a.jpg", "photos/empty.jpg"],
    "from_list": ["--from", "list.csv", "--root", "photos"],
    "shards": ["shards/{0..1}.tar"],
    "shards_keep": ["shards/0.tar", "shards/1.tar", "--keep", "caption,txt,n"],
    "parquet": ["tables/images.parquet", "--keep", "label"],
}


def _names() -> list[str]:
    return sorted(str(p.relative_to(IMAGES)) for p in IMAGES.rglob("*") if p.is_file())


def build_inputs(root: Path) -> Path:
    """`root/photos` (the images), `root/list.csv`, `root/shards/{0,1}.tar`, `root/tables/images.parquet`."""
    photos = root / "photos"
    shutil.copytree(IMAGES, photos)
    names = _names()
    with open(root / "list.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "mos"])
        for i, name in enumerate(reversed(names)):  # another order than the folder walk's
            writer.writerow([name, i])
    (root / "shards").mkdir()
    halves = [names[: len(names) // 2], names[len(names) // 2 :]]
    for s, part in enumerate(halves):
        with tarfile.open(root / "shards" / f"{s}.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
            for i, name in enumerate(part):
                key = f"{s}{i:04d}"
                suffix = name.rsplit(".", 1)[-1].lower() if "." in name else "bin"
                suffix = {"jpeg": "jpg"}.get(suffix, suffix)
                _add(tar, f"{key}.{suffix}", (IMAGES / name).read_bytes())
                _add(tar, f"{key}.txt", f"caption of {name}".encode())
                _add(tar, f"{key}.json", json.dumps({"caption": name, "n": i}).encode())
    (root / "tables").mkdir()
    data = [(IMAGES / n).read_bytes() for n in names]
    table = pa.table(
        {
            "image": pa.array([{"bytes": d, "path": n} for d, n in zip(data, names, strict=True)]),
            "label": pa.array(range(len(names)), pa.int64()),
        }
    )
    pq.write_table(table, root / "tables" / "images.parquet", row_group_size=5)
    return root


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), 0
    tar.addfile(info, io.BytesIO(data))


def score_case(case: str, root: Path, out: Path, extra: list[str] = ()) -> subprocess.CompletedProcess:
    """Runs the real `iqa score` for one case from `root`, with one thread (the expected files were made so)."""
    args = [*CASES[case], "--out", str(out), "--model", str(MODEL), "--batch-size", "3", "--workers", "1", "-q"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "iqa_cli", "score", *args, *extra],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def main() -> None:
    import tempfile

    EXPECTED.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        root = build_inputs(Path(tmp))
        for case in CASES:
            out = EXPECTED / f"{case}.parquet"
            result = score_case(case, root, out)
            if result.returncode not in (0, 1):
                raise SystemExit(f"{case}: exit {result.returncode}\n{result.stderr}")
            print(f"{case}: {pq.read_metadata(out).num_rows} rows -> {out}")
    (EXPECTED / "MADE_BY.json").write_text(
        json.dumps({"commit": commit, "command": "OMP_NUM_THREADS=1 python -m tests.golden_scoring"}, indent=1) + "\n"
    )


if __name__ == "__main__":
    main()
