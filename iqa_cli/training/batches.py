"""The training loader's items and batches: a row's image (or a video's sampled frames, `iqa_cli.video`) through
the backbone's transform, its conversation ids, and micro batches padded for the model.

A video row is what `iqa score` makes of the video: its frames sampled the same way (`--fps`, `--frames`,
`--max-frames`) and turned into the family's video inputs (`Backbone.video_transform`). A micro batch that holds a
video is collated by the family's video collate (`Backbone.video_collate`), images in it as videos of one frame:
for mPLUG-Owl2 every row's frames sit in its one image slot, a row's missing frames masked out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from iqa_cli.errors import DecodeError

if TYPE_CHECKING:
    import torch

    from iqa_cli.models.backbone import VisualCollate

Rows = Any  # iqa_cli.training.data.Rows (which names this module's classes: not imported back)
Encoded = Any  # iqa_cli.training.data.Encoded


def decode_visual(path: str, video: bool, transform: Any, video_transform: Any, sampling: Any) -> dict:
    """A row's visual inputs: the image through `transform`, or the video's sampled frames through
    `video_transform`. Raises a DecodeError (or a UserError for a family without videos)."""
    if not video:
        from iqa_cli.images import load_image

        return transform(load_image(path))
    from iqa_cli.video import Sampling, load_video

    if video_transform is None:
        from iqa_cli.errors import UserError

        raise UserError(f"{path}: this model family does not take videos")
    return video_transform(load_video(path, sampling or Sampling()))


class TrainImages:
    """Map-style dataset over `(row, partner)` keys: decoded images (or videos) through the backbone's transform, and
    their prompt ids (`encodings[prompt set, question, level]`).

    Picklable (DataLoader workers). An image that cannot be decoded comes back with `visual=None`, and the
    collate function drops it (with its pair) and reports it.
    """

    def __init__(
        self,
        rows: Rows,
        encodings: dict[tuple[int, int, int], Encoded],
        transform: Any,
        level_of: np.ndarray,
        *,
        video_transform: Any = None,
        sampling: Any = None,
    ):
        self.rows, self.encodings, self.transform = rows, encodings, transform
        self.level_of = level_of  # N: which level's response each row is trained with
        self.video_transform, self.sampling = video_transform, sampling

    def __len__(self) -> int:
        return len(self.rows)

    def item(self, row: int) -> dict[str, Any]:
        path = self.rows.paths[row]
        video = bool(self.rows.video[row]) if self.rows.video is not None else False
        try:
            visual = decode_visual(path, video, self.transform, self.video_transform, self.sampling)
            error = None
        except DecodeError as exc:
            visual, error = None, str(exc)
        prompt = int(self.rows.prompt[row]) if self.rows.prompt is not None else 0
        enc = self.encodings[prompt, int(self.rows.question[row]), int(self.level_of[row])]
        return {"row": row, "path": path, "visual": visual, "error": error, "enc": enc, "video": video}

    def __getitem__(self, key: tuple[int, int]) -> tuple[dict, dict | None]:
        row, partner = key
        return self.item(row), (self.item(partner) if partner >= 0 else None)


@dataclass
class TrainBatch:
    """One micro batch, images A first and (for pairs) their partners B after them.

    Text tensors are right-padded: `input_ids` with the pad id, `labels` with IGNORE_INDEX.
    """

    visual: dict[str, torch.Tensor]  # the backbone's collated visual inputs, N rows
    input_ids: torch.Tensor  # N, T
    attention_mask: torch.Tensor  # N, T
    labels: torch.Tensor  # N, T
    level_pos: torch.Tensor  # N: index of the level token in labels
    soft_labels: torch.Tensor  # N, K
    mos: torch.Tensor  # N: normalized MOS
    std: torch.Tensor  # N: normalized std
    level: torch.Tensor  # N: one-hot level index
    group: torch.Tensor  # N: dataset index
    pairs: int  # number of (A, B) pairs: rows [0, pairs) are A, [pairs, 2 pairs) are B; 0 when unpaired
    skipped: list[str] = field(default_factory=list)  # images that could not be decoded (with the reason)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def pin_memory(self) -> TrainBatch:
        """Page-locked copies (DataLoader's `pin_memory=True` calls this), so `to(cuda, non_blocking=True)` overlaps
        the copy with compute; without it pinning silently did nothing for this batch type."""
        fields = vars(self).items()
        pinned = {name: value.pin_memory() if hasattr(value, "pin_memory") else value for name, value in fields}
        pinned["visual"] = {name: value.pin_memory() for name, value in self.visual.items()}
        return TrainBatch(**pinned)

    def to(self, device: torch.device) -> TrainBatch:
        moved = {
            name: value.to(device, non_blocking=True) if hasattr(value, "to") else value
            for name, value in self.__dict__.items()
        }
        moved["visual"] = {name: value.to(device, non_blocking=True) for name, value in self.visual.items()}
        return TrainBatch(**moved)


@dataclass(frozen=True)
class Collate:
    """Pads a list of items into a TrainBatch, the visual inputs batched by the backbone's collate (its video
    collate when a video is among them); picklable for workers."""

    pad_id: int
    rows: Rows
    paired: bool
    visual_collate: VisualCollate
    video_collate: VisualCollate | None = None

    def __call__(self, items: list[tuple[dict, dict | None]]) -> TrainBatch | None:
        import torch

        from iqa_cli.constants import IGNORE_INDEX

        skipped = [f"{side['error']}" for pair in items for side in pair if side is not None and side["visual"] is None]
        kept = [(a, b) for a, b in items if a["visual"] is not None and (b is None or b["visual"] is not None)]
        if not kept:
            return None
        sides = [a for a, _ in kept] + ([b for _, b in kept] if self.paired else [])
        length = max(len(s["enc"].input_ids) for s in sides)
        n = len(sides)
        input_ids = torch.full((n, length), self.pad_id, dtype=torch.long)
        labels = torch.full((n, length), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((n, length), dtype=torch.long)
        for i, side in enumerate(sides):
            t = len(side["enc"].input_ids)
            input_ids[i, :t] = torch.tensor(side["enc"].input_ids)
            labels[i, :t] = torch.tensor(side["enc"].labels)
            mask[i, :t] = 1
        rows = np.array([s["row"] for s in sides], dtype=np.int64)
        videos = any(s.get("video") for s in sides)
        visual_collate = self.video_collate if videos and self.video_collate is not None else self.visual_collate
        return TrainBatch(
            visual=visual_collate([s["visual"] for s in sides], n, torch.float32),
            input_ids=input_ids,
            attention_mask=mask,
            labels=labels,
            level_pos=torch.tensor([s["enc"].level_pos for s in sides], dtype=torch.long),
            soft_labels=torch.from_numpy(self.rows.soft[rows]),
            mos=torch.from_numpy(self.rows.mos[rows]).float(),
            std=torch.from_numpy(self.rows.std[rows]).float(),
            level=torch.from_numpy(self.rows.level[rows]),
            group=torch.from_numpy(self.rows.group[rows]),
            pairs=len(kept) if self.paired else 0,
            skipped=skipped,
        )


class EvalImages:
    """Test images (or videos) for evaluation during training: (visual inputs, position, decoded?).

    An image that cannot be decoded gives None and `False` (the collate makes it a padding row), so every
    rank runs the same number of full batches (FSDP needs all ranks in every forward pass); its result is
    discarded.
    """

    def __init__(
        self,
        paths: list[str],
        transform: Any,
        *,
        video: bool = False,
        video_transform: Any = None,
        sampling: Any = None,
    ):
        self.paths, self.transform = paths, transform
        self.video, self.video_transform, self.sampling = video, video_transform, sampling

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[dict | None, int, bool]:
        try:
            visual = decode_visual(self.paths[i], self.video, self.transform, self.video_transform, self.sampling)
            return visual, i, True
        except DecodeError:
            return None, i, False


@dataclass(frozen=True)
class EvalCollate:
    """(visual batch by the backbone's collate, positions, decoded flags); picklable for workers."""

    visual_collate: VisualCollate

    def __call__(self, items: list[tuple[dict | None, int, bool]]):
        import torch

        visual = self.visual_collate([v for v, _, _ in items], len(items), torch.float32)
        return visual, torch.tensor([i for _, i, _ in items]), torch.tensor([ok for _, _, ok in items])
