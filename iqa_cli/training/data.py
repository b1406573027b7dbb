"""Training data for `iqa train`: prepared metas -> rows, an epoch order, pairs, prompts, batches.

What the reference does and what this module reproduces (DeQA-Score `src/datasets/pair_dataset.py`,
`single_dataset.py`, `build_soft_labels/gen_soft_label.py`):

- `--data-weights` repeat each dataset's rows an integer number of times before shuffling.
- DeQA-Score trains on pairs: every sample (image A) gets a partner B drawn uniformly from the *same
  dataset*, B != A, and both go through the model; the fidelity loss compares them. Q-Align and Q-Scorer
  train on single images.
- Each image has one question, drawn once from the ten phrasings (`constants.QUESTIONS`) when its meta is
  built, not redrawn per epoch. Here it is drawn from a generator seeded by (seed, dataset name), so adding
  a dataset does not change the questions of the others.
- The response is `"The quality of the image is {level}."`; augmentation is off (the reference has none).
- A dataset asks about its task (its meta's `task`: AVA's aesthetics) and a video row about "this video"
  (`iqa_cli.tasks`): the ten phrasings and the response with those words changed, OneAlign-style, so one run
  mixes image quality, aesthetics and video datasets. Each (task, image or video) is a prompt set of its own.

Everything random is a pure function of (seed, epoch): the order of an epoch and the partners are
recomputed from those two numbers, so a resumed run needs only the step it stopped at, and DataLoader
workers draw nothing.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from iqa_cli.errors import UserError
from iqa_cli.tasks import DEFAULT_TASK

META_SUFFIX = ".parquet"
REQUIRED_COLUMNS = ("image", "dataset", "split", "mos_norm", "std_norm", "level", "soft_label")


# --- metas -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MetaFile:
    """One prepared dataset: where it came from and how its levels are named."""

    name: str  # dataset name (the rows' `dataset` value)
    path: Path
    image_root: Path
    level_names: tuple[str, ...]


@dataclass
class Rows:
    """Images of one split of all requested datasets, as columns (row i of each array is one image)."""

    paths: list[str]  # absolute image paths
    group: np.ndarray  # N int64: index of the dataset in `TrainData.metas`
    mos: np.ndarray  # N float64: normalized MOS in [1, 5]
    std: np.ndarray  # N float64: normalized std (0 where the dataset has none)
    mos_raw: np.ndarray  # N float64: MOS as published (evaluation reports against it)
    level: np.ndarray  # N int64: one-hot level index (Q-Align / Q-Scorer targets)
    soft: np.ndarray  # N, K float32: soft label, ascending quality
    question: np.ndarray  # N int64: index into the question list
    prompt: np.ndarray | None = None  # N int64: index into `TrainData.prompt_sets` (None: all the first)
    video: np.ndarray | None = None  # N bool: the row is a video (None: none is)

    def __len__(self) -> int:
        return len(self.paths)

    def take(self, index: np.ndarray) -> Rows:
        return Rows(
            paths=[self.paths[i] for i in index],
            group=self.group[index],
            mos=self.mos[index],
            std=self.std[index],
            mos_raw=self.mos_raw[index],
            level=self.level[index],
            soft=self.soft[index],
            question=self.question[index],
            prompt=None if self.prompt is None else self.prompt[index],
            video=None if self.video is None else self.video[index],
        )


@dataclass
class TrainData:
    metas: list[MetaFile]
    level_names: tuple[str, ...]
    train: Rows
    test: Rows
    # sha256 of what the metas say (names relative to each image root, splits, targets): a resumed run checks it,
    # so re-preparing a dataset under a running job's feet is an error and not a silently different sampler.
    fingerprint: str = ""
    notes: list[str] = field(default_factory=list)  # warnings already printed (missing images skipped)
    prompt_sets: list[tuple[str, bool]] = field(default_factory=lambda: [(DEFAULT_TASK, False)])  # (task, video)
    tasks: dict[str, str] = field(default_factory=dict)  # dataset name -> its task

    @property
    def num_levels(self) -> int:
        return len(self.level_names)

    @property
    def dataset_names(self) -> list[str]:
        return [m.name for m in self.metas]

    def task(self) -> str:
        """The task every dataset rates, else quality (what a trained model's default prompt asks)."""
        found = set(self.tasks.values())
        return found.pop() if len(found) == 1 else DEFAULT_TASK


def resolve_meta(name: str, data_dir: Path) -> Path:
    """A dataset name -> `<data dir>/NAME.parquet`; a path to a .parquet file is taken as is."""
    path = Path(name).expanduser()
    if path.suffix == META_SUFFIX or path.is_file():
        if not path.is_file():
            raise UserError(f"meta file not found: {path}")
        return path
    candidate = data_dir / f"{name}{META_SUFFIX}"
    if candidate.is_file():
        return candidate
    prepared = sorted(p.stem for p in data_dir.glob(f"*{META_SUFFIX}")) if data_dir.is_dir() else []
    known = ", ".join(prepared) if prepared else "none (run `iqa prepare` first)"
    raise UserError(f"unknown dataset {name!r}: no {candidate}; prepared datasets in {data_dir}: {known}")


def _not_a_meta(path: Path, why: str) -> UserError:
    table = path.suffix.lower() in (".csv", ".tsv", ".txt")
    hint = f" (a table of scores? prepare it first: iqa prepare custom --csv {path} ...)" if table else ""
    return UserError(f"--datasets {path}: not a meta written by `iqa prepare`: {why}{hint}")


def check_meta(path: Path) -> None:
    """Reads only the schema: a file that is not a Parquet meta (a CSV, a truncated copy) is refused before
    the run directory is touched or the model loads."""
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError, ArrowIOError an OSError
        raise _not_a_meta(path, " ".join(str(exc).split())[:200]) from None
    missing = [c for c in REQUIRED_COLUMNS if c not in schema.names]
    if missing:
        raise _not_a_meta(path, f"no column {', '.join(missing)}")


def check_metas(datasets: Sequence[str], data_dir: Path) -> None:
    """`check_meta` for every name of --datasets (resolved as `load_train_data` does)."""
    if not datasets:
        raise UserError("--datasets names no dataset")
    for name in datasets:
        check_meta(resolve_meta(name, data_dir))


def _read_meta(path: Path):
    from iqa_cli.prepare import read_meta

    try:
        return read_meta(path)
    except (OSError, ValueError) as exc:  # a file cut short after `check_meta` read its footer
        raise _not_a_meta(path, " ".join(str(exc).split())[:200]) from None


def _image_root(meta: dict, path: Path, images: Path | None) -> Path:
    recorded = str(meta.get("image_root") or "")
    if images is not None:
        return images
    if not recorded:
        raise UserError(f"{path}: no image root recorded (prepared without --images); pass --images DIR")
    root = Path(recorded).expanduser()
    if root.is_absolute():
        return root
    # metas written before roots were stored absolute hold the path as typed: relative to the meta file's
    # folder if it exists there (the usual layout, e.g. iqa-data/ beside the images), else to the cwd
    beside = path.parent / root
    return beside if beside.is_dir() else root.resolve()


def draw_questions(n: int, dataset: str, seed: int, count: int) -> np.ndarray:
    """One question index per image, fixed for the whole run, seeded by (seed, dataset name)."""
    rng = np.random.default_rng([seed, zlib.crc32(dataset.encode())])
    return rng.integers(0, count, size=n, dtype=np.int64)


def load_train_data(
    datasets: Sequence[str],
    data_dir: Path,
    *,
    images: Path | None = None,
    seed: int = 0,
    num_questions: int = 1,
    check_files: bool = True,
) -> TrainData:
    """Reads the prepared metas, checks they agree on the levels, and splits rows into train and test.

    Rows whose split is not "test" train ("val" rows are kept out of both). Image paths are resolved
    against each meta's image root (or `images`); with `check_files`, rows whose image is missing are
    skipped with one warning, and a dataset none of whose images exist is a UserError.
    """
    if not datasets:
        raise UserError("--datasets names no dataset")
    from iqa_cli.video import is_video_name

    metas: list[MetaFile] = []
    keys = ("paths", "group", "mos", "std", "raw", "level", "soft", "q", "split", "prompt", "video")
    parts: dict[str, list] = {k: [] for k in keys}
    prompt_sets: list[tuple[str, bool]] = []
    tasks: dict[str, str] = {}
    level_names: tuple[str, ...] | None = None
    first_path: Path | None = None
    digest = hashlib.sha256()
    notes: list[str] = []
    for group, name in enumerate(datasets):
        path = resolve_meta(name, data_dir)
        check_meta(path)
        frame, meta = _read_meta(path)
        names = tuple(meta.get("level_names") or ())
        if not names:
            raise UserError(f"{path}: no level_names in the metadata (prepare it again with `iqa prepare`)")
        if level_names is None:
            level_names, first_path = names, path
        elif names != level_names:
            raise UserError(
                f"{path} has levels {list(names)} but {first_path} has {list(level_names)}; "
                "prepare every dataset with the same --levels/--level-names"
            )
        if frame.empty:
            raise UserError(f"{path}: the meta has no rows")
        dataset = str(meta.get("dataset") or frame["dataset"].iloc[0])
        if any(m.name == dataset for m in metas):
            raise UserError(f"dataset {dataset!r} is given twice")
        root = _image_root(meta, path, images)
        soft = np.stack(frame["soft_label"].to_numpy()).astype(np.float32)
        if soft.shape[1] != len(names):
            raise UserError(f"{path}: soft_label has {soft.shape[1]} values per row for {len(names)} levels")
        rel = frame["image"].astype(str).tolist()
        full = [p if Path(p).is_absolute() else str(root / p) for p in rel]
        metas.append(MetaFile(name=dataset, path=path, image_root=root, level_names=names))
        std = frame["std_norm"].to_numpy(dtype=np.float64, na_value=np.nan)
        mos = frame["mos_norm"].to_numpy(dtype=np.float64)
        level = frame["level"].to_numpy(dtype=np.int64)
        split = frame["split"].astype(str).str.lower().to_numpy()
        parts["paths"] += full
        parts["group"].append(np.full(len(frame), group, dtype=np.int64))
        parts["mos"].append(mos)
        parts["std"].append(np.nan_to_num(std, nan=0.0))  # no std: the fidelity target becomes a step
        raw = frame["mos"] if "mos" in frame.columns else frame["mos_norm"]
        parts["raw"].append(raw.to_numpy(dtype=np.float64))
        parts["level"].append(level)
        parts["soft"].append(soft)
        parts["q"].append(draw_questions(len(frame), dataset, seed, num_questions))
        parts["split"].append(split)
        task = tasks[dataset] = str(meta.get("task") or DEFAULT_TASK)
        video = np.fromiter((is_video_name(p) for p in rel), dtype=bool, count=len(rel))
        for kind in sorted({(task, bool(v)) for v in np.unique(video)} - set(prompt_sets)):
            prompt_sets.append(kind)
        parts["prompt"].append(np.array([prompt_sets.index((task, bool(v))) for v in video], dtype=np.int64))
        parts["video"].append(video)
        # Image names as the meta records them, so moving the image folder (--images) keeps the fingerprint.
        told = (task,) if task != DEFAULT_TASK else ()  # (metas of image quality digest as they always did)
        _digest(digest, texts=(dataset, names, rel, split, *told), arrays=(mos, std, level, soft))
    present = None
    if check_files:
        present = _check_images(parts["paths"], np.concatenate(parts["group"]), metas, notes)
        if not present.all():  # which rows were skipped is part of the data a resumed run must find again
            digest.update(b"skipped missing images:" + np.flatnonzero(~present).astype(np.int64).tobytes())
    rows = Rows(
        paths=parts["paths"],
        group=np.concatenate(parts["group"]),
        mos=np.concatenate(parts["mos"]),
        std=np.concatenate(parts["std"]),
        mos_raw=np.concatenate(parts["raw"]),
        level=np.concatenate(parts["level"]),
        soft=np.concatenate(parts["soft"]),
        question=np.concatenate(parts["q"]),
        prompt=np.concatenate(parts["prompt"]),
        video=np.concatenate(parts["video"]),
    )
    split = np.concatenate(parts["split"])
    if present is not None and not present.all():
        rows, split = rows.take(np.flatnonzero(present)), split[present]
    train = rows.take(np.flatnonzero(split == "train"))
    test = rows.take(np.flatnonzero(split == "test"))
    for group, meta in enumerate(metas):
        if not np.any(train.group == group):
            raise UserError(f"{meta.path}: no train rows (split column)")
    assert level_names is not None
    return TrainData(
        metas=metas,
        level_names=level_names,
        train=train,
        test=test,
        fingerprint=digest.hexdigest(),
        notes=notes,
        prompt_sets=prompt_sets,
        tasks=tasks,
    )


def _check_images(paths: list[str], groups: np.ndarray, metas: list[MetaFile], notes: list[str]) -> np.ndarray:
    """Which images exist. Missing ones are skipped with one warning (counted per dataset, a few named);
    a dataset with none of its images is a UserError (a wrong image root, not a few lost files)."""
    import sys

    from iqa_cli import distributed

    present = np.fromiter((Path(p).is_file() for p in paths), dtype=bool, count=len(paths))
    parts = []
    for group, meta in enumerate(metas):
        mine = groups == group
        absent = np.flatnonzero(mine & ~present)
        if absent.size == mine.sum():
            raise UserError(
                f"none of the {absent.size} images of {meta.name} found under {meta.image_root} "
                f"(e.g. {paths[absent[0]]}); pass --images DIR"
            )
        if absent.size:
            named = ", ".join(paths[i] for i in absent[:3]) + (", ..." if absent.size > 3 else "")
            parts.append(f"{absent.size} of {int(mine.sum())} of {meta.name} ({named})")
    if parts:
        notes.append(f"skipped {int((~present).sum())} image(s) not found: {'; '.join(parts)}")
        if distributed.env().is_main:  # every rank reads the metas; one warning
            print(f"warning: {notes[-1]}", file=sys.stderr, flush=True)
    return present


def _digest(digest: Any, texts: Sequence[str | Sequence[str]], arrays: Sequence[np.ndarray]) -> None:
    """Adds strings (a sequence is joined with a unit separator) and the bytes of arrays to `digest`."""
    for text in texts:
        joined = text if isinstance(text, str) else "\x1f".join(text)
        digest.update(joined.encode("utf-8", "surrogatepass") + b"\x1e")
    for array in arrays:
        digest.update(np.ascontiguousarray(array).tobytes())


# --- prompts -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Encoded:
    """Token ids of one (question, level) conversation."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]
    level_pos: int  # index of the level token in input_ids/labels


def encode_conversations(
    backbone: Any,
    questions: Sequence[str],
    level_tokens: Sequence[str],
    level_token_ids: Sequence[int],
    *,
    image_first: bool,
    response_prefix: str | None = None,
) -> dict[tuple[int, int], Encoded]:
    """Ids, labels and the level position of every (question, level) pair, as the backbone encodes a training
    conversation (`image_first`: the image before the question, the reference's training layout); the answer
    starts with `response_prefix` (None: the papers' "The quality of the image is")."""
    other = {"response_prefix": response_prefix} if response_prefix is not None else {}
    table: dict[tuple[int, int], Encoded] = {}
    for q, question in enumerate(questions):
        for k, (token, token_id) in enumerate(zip(level_tokens, level_token_ids, strict=True)):
            ids, labels, level_pos = backbone.encode_training(
                question, token, token_id, image_first=image_first, **other
            )
            table[q, k] = Encoded(tuple(ids), tuple(labels), level_pos)
    return table


def encode_prompt_sets(
    backbone: Any,
    prompt_sets: Sequence[tuple[str, bool]],
    level_tokens: Sequence[str],
    level_token_ids: Sequence[int],
    *,
    image_first: bool,
    fixed_question: bool,
) -> dict[tuple[int, int, int], Encoded]:
    """`encode_conversations` of every prompt set (task, video): keys (set, question, level)."""
    from iqa_cli.tasks import question, response_prefix, training_questions

    table: dict[tuple[int, int, int], Encoded] = {}
    for s, (task, video) in enumerate(prompt_sets):
        questions = (question(task, video),) if fixed_question else training_questions(task, video)
        default = (task, video) == (DEFAULT_TASK, False)
        prefix = None if default else response_prefix(task, video)
        encoded = encode_conversations(
            backbone, questions, level_tokens, level_token_ids, image_first=image_first, response_prefix=prefix
        )
        table.update({(s, q, k): enc for (q, k), enc in encoded.items()})
    return table


def scoring_ids(
    backbone: Any, task: str, video: bool, level_tokens: Sequence[str], level_token_ids: Sequence[int]
) -> tuple[str, tuple[int, ...]]:
    """(prompt, ids) a trained model is scored with for a task on an image or a video: the family's prompt
    (`Backbone.task_prompt`) as its training conversation tokenizes up to the level (as `level_setup` does for
    the default)."""
    from iqa_cli.tasks import question, response_prefix

    encoded = encode_conversations(
        backbone,
        [question(task, video)],
        level_tokens,
        level_token_ids,
        image_first=False,
        response_prefix=response_prefix(task, video),
    )
    heads = {enc.input_ids[: enc.level_pos] for enc in encoded.values()}
    if len(heads) != 1:
        raise UserError(f"the level tokens {list(level_tokens)} are preceded by different response pieces")
    return backbone.task_prompt(task, video=video), heads.pop()


# --- the order of an epoch -------------------------------------------------------------------------------


def weighted_rows(group: np.ndarray, weights: Sequence[int]) -> np.ndarray:
    """Row indices with each dataset's rows repeated `weights[g]` times (the reference's `data * weight`)."""
    reps = np.asarray(weights, dtype=np.int64)[group]
    return np.repeat(np.arange(len(group), dtype=np.int64), reps)


def epoch_order(pool: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """The samples of one epoch: a permutation of `pool`, a pure function of (seed, epoch)."""
    return pool[np.random.default_rng([seed, epoch, 0]).permutation(len(pool))]


def draw_partners(order: np.ndarray, group: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """For each sample of `order`, a partner drawn uniformly from the other rows of its dataset.

    Vectorized version of the reference's `randint` loop until B != A: draw j from n_d - 1 values and skip
    A's own place. Every dataset needs at least two rows.
    """
    rng = np.random.default_rng([seed, epoch, 1])
    partners = np.empty_like(order)
    for g in np.unique(group[order]):
        members = np.flatnonzero(group == g)  # sorted row indices of this dataset
        at = np.flatnonzero(group[order] == g)
        if len(members) < 2:
            raise UserError("the fidelity loss pairs images of one dataset; every dataset needs 2+ train images")
        own = np.searchsorted(members, order[at])
        j = rng.integers(0, len(members) - 1, size=len(at))
        partners[at] = members[j + (j >= own)]
    return partners


@dataclass(frozen=True)
class BatchPlan:
    """How a global batch of samples is split over ranks and accumulation steps.

    `batch_size` counts samples per optimizer step over all ranks (a DeQA-Score sample is a pair, so
    2 x batch_size images go through the model, as with the reference's per-device batch of pairs).
    """

    batch_size: int
    world_size: int = 1
    accumulation: int = 1

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.accumulation < 1:
            raise UserError(f"--batch-size and --grad-accum must be >= 1, got {self.batch_size}, {self.accumulation}")
        per = self.world_size * self.accumulation
        if self.batch_size % per:
            raise UserError(
                f"--batch-size {self.batch_size} is not divisible by {self.world_size} rank(s) x "
                f"{self.accumulation} accumulation step(s); use a multiple of {per}"
            )

    @property
    def micro_batch(self) -> int:
        """Samples per rank per forward pass."""
        return self.batch_size // (self.world_size * self.accumulation)

    def steps_per_epoch(self, samples: int) -> int:
        """Optimizer steps per epoch; the last incomplete batch is dropped (it is reshuffled next epoch)."""
        return samples // self.batch_size

    def micro_batches(self, order: np.ndarray, step: int, rank: int) -> list[np.ndarray]:
        """Positions in `order` that rank `rank` runs at optimizer step `step`, one array per micro batch.

        Ranks take contiguous slices of the global batch; each slice is cut into `accumulation` parts.
        """
        start = step * self.batch_size + rank * (self.batch_size // self.world_size)
        return [
            np.arange(start + a * self.micro_batch, start + (a + 1) * self.micro_batch)
            for a in range(self.accumulation)
        ]


class EpochSampler:
    """Batch sampler for DataLoader: yields this rank's micro batches of one epoch from a given step.

    Each yielded item is a list of `(row, partner)` keys (partner -1 when unpaired).
    """

    def __init__(self, order: np.ndarray, partners: np.ndarray | None, plan: BatchPlan, rank: int, start_step: int):
        self.order, self.partners, self.plan, self.rank, self.start_step = order, partners, plan, rank, start_step

    def __len__(self) -> int:
        return (self.plan.steps_per_epoch(len(self.order)) - self.start_step) * self.plan.accumulation

    def __iter__(self):
        for step in range(self.start_step, self.plan.steps_per_epoch(len(self.order))):
            for positions in self.plan.micro_batches(self.order, step, self.rank):
                rows = self.order[positions]
                partners = self.partners[positions] if self.partners is not None else np.full_like(rows, -1)
                yield [(int(r), int(p)) for r, p in zip(rows, partners, strict=True)]


# The items and batches of the loader live in `training.batches` (named here too: `train_data.Collate`).
from iqa_cli.training.batches import Collate, EvalCollate, EvalImages, TrainBatch, TrainImages  # noqa: E402, F401
