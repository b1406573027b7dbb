"""Adding an input kind is one module: a toy source of `.zip` archives (one unit per archive, one sample per image
member), registered from this file and defined in it, is scored by the one loop like any other: the rows, order,
errors, resume and `--out DIR/` of the same images as files, without touching any other file of iqa."""

from __future__ import annotations

import hashlib
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pytest

from iqa_cli import sources
from iqa_cli.scoring.config import ScoreConfig
from iqa_cli.scoring.driver import score_images
from iqa_cli.sources import Sample, SourceOptions, unique_files
from tests.test_score_pipeline import Crash, CrashingScorer, FakeScorer, assert_same_rows, make_image_folder


@dataclass
class ZipSource:
    """Each archive is a unit; its members in archive order are its samples."""

    paths: list[str]
    stems: list[str]
    warnings: list[str] = field(default_factory=list)
    kind: str = "zip"
    noun: str = "archives"
    columns: dict = field(default_factory=lambda: {"archive": None})

    def __len__(self) -> int:
        return len(self.paths)

    def label(self, u: int) -> str:
        return self.paths[u]

    def rows(self, u: int) -> int:
        with zipfile.ZipFile(self.paths[u]) as archive:
            return sum(not info.is_dir() for info in archive.infolist())

    count_rows = rows

    def output_stem(self, u: int) -> str:
        return self.stems[u]

    def num_inputs(self) -> int:
        return len(self.paths)

    def fingerprint(self) -> str:
        return hashlib.sha256("\0".join(self.paths).encode()).hexdigest()

    def samples(self, u: int, start: int = 0) -> Iterator[Sample]:
        with zipfile.ZipFile(self.paths[u]) as archive:
            members = [info for info in archive.infolist() if not info.is_dir()]
            for info in members[start:]:
                yield Sample(info.filename, data=archive.read(info), kept={"archive": Path(self.paths[u]).name})


def open_source(names: list[str], options: SourceOptions) -> ZipSource:
    files = unique_files(names, warnings := [])
    return ZipSource([p for p, _ in files], [s for _, s in files], warnings)


@pytest.fixture
def zips(tmp_path, monkeypatch):
    """The registration line a real source adds to `SOURCES`, and two archives of the fake scorer's test images."""
    monkeypatch.setitem(sources.SOURCES, ".zip", __name__)
    folder = tmp_path / "photos"
    make_image_folder(folder)
    names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    names = [n for n in names if not n.startswith(".") and not n.endswith(".txt")]
    for i, part in enumerate((names[:12], names[12:])):
        with zipfile.ZipFile(tmp_path / f"part{i}.zip", "w") as archive:
            for name in part:
                archive.write(folder / name, name)
    return tmp_path, names


def _run(inputs, out, **options):
    config = ScoreConfig(out=out, inputs=[str(i) for i in inputs], batch_size=3, workers=1, quiet=True, **options)
    return score_images(config, scorer_factory=lambda device: FakeScorer(device))


def test_a_registered_source_is_scored_as_the_same_images_as_files(zips, tmp_path):
    root, names = zips
    _run([root / "photos"], tmp_path / "files.parquet")
    files = pd.read_parquet(tmp_path / "files.parquet").set_index("image")
    summary = _run([root / "part0.zip", root / "part1.zip"], tmp_path / "zips.parquet")
    frame = pd.read_parquet(tmp_path / "zips.parquet")
    assert frame["image"].tolist() == names and summary.total == len(names)
    assert frame["archive"].tolist() == ["part0.zip"] * 12 + ["part1.zip"] * (len(names) - 12)
    expected = files.loc[names].reset_index()
    assert_same_rows(frame.drop(columns=["archive"]), expected)  # errors of the broken files too


def test_it_resumes_and_writes_a_folder_output_as_every_source_does(zips, tmp_path):
    root, names = zips
    inputs = [root / "part0.zip", root / "part1.zip"]
    out = tmp_path / "scores"
    with pytest.raises(Crash):
        config = ScoreConfig(out=out, inputs=[str(i) for i in inputs], out_dir=True, batch_size=3, workers=0,
                             quiet=True, flush_rows=1)  # fmt: skip
        score_images(config, scorer_factory=lambda device: CrashingScorer(device, crash_after=2))
    summary = _run(inputs, out, out_dir=True)
    assert 0 < summary.resumed < len(names) and summary.processed == len(names) - summary.resumed
    assert sorted(p.name for p in out.iterdir()) == ["_iqa.json", "part0.parquet", "part1.parquet"]
    _run(inputs, tmp_path / "once.parquet")
    assert_same_rows(pd.read_parquet(out), pd.read_parquet(tmp_path / "once.parquet"))
