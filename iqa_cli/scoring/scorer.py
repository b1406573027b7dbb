"""`Scorer`: a checkpoint on a device with its readout, scoring images or collated batches into per-image level
probabilities, score, std (and a regression score).

`Scorer` is the Python API that `iqa score` streams batches through; it is usable on its own:

    scorer = Scorer.from_pretrained("zhiyuanyou/DeQA-Score-Mix3")
    results = scorer.score(["a.jpg", "b.png"])

`from_pretrained` decides the checkpoint's `Readout` (`iqa_cli.scoring.readout`): released checkpoints are
scored the way their authors score them, models that `iqa train` writes the way they were trained.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from iqa_cli import __version__
from iqa_cli.constants import DEFAULT_MODEL
from iqa_cli.distributed import resolve_device
from iqa_cli.errors import UserError, api_errors
from iqa_cli.model_options import DTYPE_ALIASES, DTYPES
from iqa_cli.scoring.readout import (
    Readout,
    RunInfo,
    ScoreBatch,
    build_readout,
    level_readout,
    read_levels,
    readout_method,
    task_readout,
)

if TYPE_CHECKING:
    from PIL import Image

    from iqa_cli.models.backbone import Backbone, VisualInputs


class VisualBatch(dict):
    """A collated batch (name -> tensor, rows first) that knows how many of its rows are images: the backbone's
    collate pads the rest to the batch size."""

    rows: int


@dataclass(frozen=True)
class CountingCollate:
    """`Scorer.collate`: the backbone's collate, whose batch records its number of images; picklable."""

    collate: Any

    def __call__(
        self, items: list[Any], batch_size: int | None = None, dtype: torch.dtype = torch.float32
    ) -> VisualBatch:
        batch = VisualBatch(self.collate(items, len(items) if batch_size is None else batch_size, dtype))
        batch.rows = len(items)
        return batch


@dataclass
class ImageScore:
    """One image's (or video's) result from `Scorer.score`."""

    score: float
    std: float
    probs: list[float]
    level: str | None  # None: a reasoning model's answer had no digit readout
    score_reg: float | None = None
    width: int | None = None
    height: int | None = None
    # reasoning models (`iqa_cli.scoring.reasoning`): the expected digit, the generated text, why there is no score
    score_soft: float | None = None
    reasoning: str | None = None
    error: str | None = None
    frames: int | None = None  # videos: how many frames were scored
    duration: float | None = None  # videos: seconds
    fps: float | None = None  # videos: average frame rate


_DTYPES = {name: getattr(torch, name) for name in DTYPES if name != "auto"}


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """'auto' -> bfloat16 on GPUs that compute in it (compute capability 8.0, Ampere, and newer), float16 on
    older ones (V100, T4: `torch.cuda.is_bf16_supported()` counts their emulated bf16, which runs far slower;
    float16 is what the reference scorer runs in), float32 on the CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float16
    name = DTYPE_ALIASES.get(dtype, dtype)
    if name not in _DTYPES:
        raise UserError(f"dtype {dtype!r}: choose {', '.join(DTYPES)}")
    return _DTYPES[name]


def exact_float32(dtype: torch.dtype) -> None:
    """float32 means float32 on a GPU too: TF32 off for matrix products and cuDNN (whose convolutions, the
    vision towers' patch embeddings, torch runs in TF32 by default: 10-bit mantissas). Other dtypes leave the
    process's settings alone."""
    if dtype == torch.float32:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False


class Scorer:
    """A loaded backbone plus everything needed to turn images and videos into quality (or aesthetics) scores."""

    def __init__(
        self,
        backbone: Backbone,
        readout: Readout,
        metadata: dict[str, str] | None = None,
        *,
        video_readout: Readout | None = None,
        task: str = "quality",
    ):
        self.backbone = backbone
        self.readout = readout
        self.metadata = dict(metadata or {})
        self.video_readout = video_readout  # None: the family scores no videos
        self.task = task

    @classmethod
    @api_errors
    def from_pretrained(
        cls,
        model: str | Path = DEFAULT_MODEL,
        *,
        base: str | Path | None = None,
        device: str | torch.device = "auto",
        dtype: str | torch.dtype = "auto",
        prompt: str | None = None,
        revision: str | None = None,
        quantize: str | None = None,
        reasoning: str | None = None,
        max_new_tokens: int | None = None,
        task: str | None = None,
        **options: Any,
    ) -> Scorer:
        """Loads a released checkpoint (repo id or directory) or an `iqa train` run directory.

        Args:
            model: Hugging Face repo id or local directory.
            base: the full model a LoRA adapter is merged onto (default: the family's released base).
            device: "auto", "cpu", "cuda", "cuda:1", ...
            dtype: "auto" (bf16 on Ampere and newer GPUs, float16 on older ones, float32 on the CPU), "float32"
                (TF32 off: `exact_float32`), "bfloat16", "float16".
            prompt: a full prompt holding the family's image token once; default: the one the checkpoint was
                evaluated with.
            revision: branch, tag or commit of a Hub repo.
            quantize: "int8" or "int4": weight-only through torchao (`iqa_cli.scoring.quantize`); None: as stored.
            reasoning: a reasoning preset (`iqa_cli.reasoning.PRESETS`): the model answers its conversation by greedy
                generation and the score is the number in the answer (`iqa_cli.scoring.reasoning`); default: the
                one an `iqa train --method grpo` run records, else none (the level readout).
            max_new_tokens: the generation budget of a reasoning model [default: the run's, else the preset's].
            task: "quality" or "aesthetics": the wording of the image and video prompts (`iqa_cli.tasks`); None: the
                model's own (an `iqa train` run on aesthetics only: aesthetics; else quality). A given `prompt`
                still replaces the image prompt.
            options: the model family's own options (`iqa_cli.model_options`), e.g. Qwen-VL's `min_pixels` and
                `max_pixels` (pixel-count bounds of resized images); one the family does not take is refused.
        """
        from iqa_cli.files import directory_fingerprint
        from iqa_cli.models.backbone import family_of, family_options, get_family
        from iqa_cli.tasks import DEFAULT_TASK, check_task

        if task is not None:
            check_task(task)
        if base is None and Path(model).is_dir():  # an `iqa train` LoRA run names its own base
            local_run = RunInfo.read(Path(model))
            base = local_run.extra.get("base") if local_run else None
        family = get_family(*family_of(model, base=base, revision=revision))
        if prompt is not None and prompt.count(family.image_token) != 1:
            raise UserError(f"--prompt must hold {family.image_token} exactly once: {prompt!r}")
        target = resolve_device(device)  # iqa_cli.distributed's: this rank's GPU under torchrun
        torch_dtype = resolve_dtype(dtype, target)
        exact_float32(torch_dtype)
        given = family_options(family, options)
        if quantize is not None:  # checked before loading; the float weights load on the CPU, then go over
            from iqa_cli.scoring import quantize as quantization

            quantization.check(quantize, target, torch_dtype)
            load_to = quantization.load_device(quantize, target)
            backbone = family.load(model, base=base, revision=revision, dtype=torch_dtype, device=load_to, **given)
            if getattr(backbone, "model", None) is None:
                raise UserError(f"--quantize: the {family.name} family does not expose its weights to quantize")
            quantization.quantize_model(backbone.model, quantize, target)
        else:
            backbone = family.load(model, base=base, revision=revision, dtype=torch_dtype, device=target, **given)
        origin = backbone.provenance
        run = RunInfo.read(origin.weights_dir) if origin.weights_dir is not None else None
        own_task = str((run.extra.get("task") if run is not None else None) or DEFAULT_TASK)
        task = task or own_task
        recorded = (run.extra.get("reasoning") or {}) if run is not None else {}
        if reasoning is not None or recorded:
            from iqa_cli.reasoning import preset
            from iqa_cli.scoring.reasoning import build_reasoning_readout

            if prompt is not None:
                raise UserError("--prompt does not apply to --reasoning: the preset renders its own conversation")
            chosen = preset(reasoning or recorded["preset"])
            budget = max_new_tokens if max_new_tokens is not None else recorded.get("max_new_tokens")
            readout = build_reasoning_readout(backbone, chosen, budget)
            video_readout = None  # a reasoning model answers its preset's image conversation only
        else:
            if max_new_tokens is not None:
                raise UserError("--max-new-tokens applies to reasoning models (--reasoning PRESET)")
            if prompt is None and task != own_task:
                if getattr(backbone, "task_prompt", None) is None:
                    raise UserError(f"--task {task}: the {family.name} family has no prompt for it; give --prompt")
                prompt = backbone.task_prompt(task, video=False)
            readout = build_readout(backbone, prompt, run)
            video_readout = task_readout(backbone, task, True, run)
        metadata = {
            "model": origin.model,
            "model_revision": origin.revision,
            "model_files": directory_fingerprint(model) or "",
            "model_layout": origin.layout,
            "base_model": origin.base_model,
            "base_revision": origin.base_revision,
            "base_files": (directory_fingerprint(base) or "") if base is not None else "",
            "method": run.method if run and run.method else readout_method(readout),
            "dtype": str(torch_dtype).removeprefix("torch."),
            "prompt": readout.prompt,
            "input_ids": json.dumps(list(readout.input_ids)),
            "level_names": json.dumps(list(readout.level_names)),
            "level_token_ids": json.dumps(list(readout.level_token_ids)),
            "level_centers": json.dumps([round(float(c), 6) for c in readout.centers]),
            "regressor_readout": readout.regressor or "",
            **(
                {"image_processing": json.dumps(options)} if (options := getattr(backbone, "images_kwargs", {})) else {}
            ),
            "iqa_version": __version__,
        }
        if hasattr(readout, "preset"):  # a reasoning model: how its answers were generated and read
            metadata["reasoning_preset"] = readout.preset.name
            metadata["max_new_tokens"] = str(readout.max_new_tokens)
        if quantize is not None:
            metadata["quantize"] = quantize
        return cls(backbone, readout, metadata, video_readout=video_readout, task=task)

    @property
    def model(self) -> Any:
        """The family's torch module (for callers that want its weights)."""
        return getattr(self.backbone, "model", None)

    @property
    def tokenizer(self) -> Any:
        return self.backbone.tokenizer

    @property
    def preprocessor(self) -> Any:
        """The family's image preprocessing settings (saved next to a trained model's weights)."""
        return self.backbone.preprocessor

    @property
    def transform(self) -> Any:
        """RGB PIL image -> the backbone's visual inputs (a dict of tensors); picklable."""
        return self.backbone.transform

    @property
    def collate(self) -> CountingCollate:
        """The backbone's batching of visual inputs (`iqa_cli.models.backbone.VisualCollate`): `collate(items,
        batch_size=len(items), dtype=torch.float32)`; its batch knows how many rows are images, so `score_batch`
        returns those only. Picklable."""
        return CountingCollate(self.backbone.collate)

    @property
    def video_transform(self) -> Any:
        """A video (`iqa_cli.video.Video`, or its sampled frames as RGB PIL images) -> the backbone's visual inputs;
        None: the family scores no videos."""
        return getattr(self.backbone, "video_transform", None) if self.video_readout is not None else None

    @property
    def video_collate(self) -> Any:
        """The backbone's batching of videos' visual inputs (every video of a call has the same frame count)."""
        return getattr(self.backbone, "video_collate", None)

    @property
    def video_metadata(self) -> dict[str, str]:
        """What an output that may hold videos records besides `metadata`: the video prompt and its ids."""
        if self.video_readout is None:
            return {}
        return {
            "video_prompt": self.video_readout.prompt,
            "video_input_ids": json.dumps(list(self.video_readout.input_ids)),
        }

    @property
    def device(self) -> torch.device:
        return self.backbone.device

    @property
    def dtype(self) -> torch.dtype:
        return self.backbone.dtype

    @property
    def level_names(self) -> list[str]:
        return list(self.readout.level_names)

    @property
    def has_regressor(self) -> bool:
        return self.readout.regressor is not None

    @property
    def reasoning(self) -> bool:
        """A reasoning model: it answers by generation (`iqa_cli.scoring.reasoning`)."""
        return hasattr(self.readout, "preset")

    def score_batch(self, visual: VisualInputs) -> ScoreBatch:
        """A collated batch of visual inputs -> ScoreBatch (CPU float32): a row per image of a batch from
        `Scorer.collate` (not its padding rows), else a row per row of the batch. A reasoning model's readout gives
        its answers' fields too (`iqa_cli.scoring.reasoning.ReasoningBatch`)."""
        if hasattr(self.readout, "read"):
            out = self.readout.read(self.backbone, visual)
        else:
            out = read_levels(self.backbone, visual, self.readout)
        rows = getattr(visual, "rows", None)
        if rows is None or rows == out.score.shape[0]:
            return out
        return dataclasses.replace(out, **{f.name: getattr(out, f.name)[:rows] for f in dataclasses.fields(out)
                                           if getattr(out, f.name) is not None})  # fmt: skip

    def score_video_batch(self, visual: VisualInputs) -> ScoreBatch:
        """A collated batch of videos (the backbone's `video_collate`) -> ScoreBatch, with the video prompt."""
        if self.video_readout is None:
            raise UserError(f"the {self.backbone.name} family does not score videos")
        return read_levels(self.backbone, visual, self.video_readout)

    def score_frames(self, videos: Sequence[Any]) -> ScoreBatch:
        """Videos given as their frames (lists of RGB PIL images, or `iqa_cli.video.Video`s; the same count in each)
        -> ScoreBatch: the model fed exactly these frames, one call."""
        if self.video_transform is None or self.video_collate is None:
            raise UserError(f"the {self.backbone.name} family does not score videos")
        items = [self.video_transform(frames) for frames in videos]
        return self.score_video_batch(self.video_collate(items, len(items), torch.float32))

    def score_pixels(self, pixel_values: torch.Tensor) -> ScoreBatch:
        """Preprocessed pixels [B, ...] of a family whose one visual input is `pixel_values` -> ScoreBatch."""
        return self.score_batch({"pixel_values": pixel_values})

    @api_errors
    def score(
        self,
        images: Image.Image | str | Path | Sequence[Image.Image | str | Path],
        batch_size: int = 16,
        *,
        sampling: Any = None,
    ) -> ImageScore | list[ImageScore]:
        """Scores a PIL image or an image or video path (one `ImageScore`), or a sequence of them (a list, in order;
        a video by its suffix). Unreadable files raise `ImageDecodeError` (`iqa_cli.video.VideoDecodeError` for
        videos). A video is scored on its frames sampled by `sampling` (`iqa_cli.video.Sampling`; default one per
        second), in a call of its own."""
        from PIL import Image as PILImage

        from iqa_cli.images import load_image, to_rgb
        from iqa_cli.video import Sampling, is_video_name, load_video

        if isinstance(images, str | Path | PILImage.Image):
            return self.score([images], batch_size, sampling=sampling)[0]
        if batch_size < 1:
            raise UserError(f"batch_size must be at least 1, got {batch_size}")
        results: list[ImageScore | None] = [None] * len(images)
        stills = [i for i, x in enumerate(images) if not (isinstance(x, str | Path) and is_video_name(str(x)))]
        for start in range(0, len(stills), batch_size):
            at = stills[start : start + batch_size]
            chunk = [load_image(images[i]) if isinstance(images[i], str | Path) else to_rgb(images[i]) for i in at]
            visual = self.collate([self.transform(img) for img in chunk], len(chunk), torch.float32)
            batch = self.score_batch(visual)
            for j, (i, img) in enumerate(zip(at, chunk, strict=True)):
                results[i] = self._result(batch, j, self.readout, width=img.width, height=img.height)
        still = set(stills)
        for i in (i for i in range(len(images)) if i not in still):
            video = load_video(images[i], sampling or Sampling())
            batch = self.score_frames([video])
            described = {"frames": len(video.frames), "duration": video.duration, "fps": video.fps}
            results[i] = self._result(batch, 0, self.video_readout, width=video.width, height=video.height, **described)
        return [r for r in results if r is not None]

    @staticmethod
    def _result(batch: ScoreBatch, i: int, readout: Readout, **described: Any) -> ImageScore:
        probs = batch.probs[i].tolist()
        best = max(range(len(probs)), key=probs.__getitem__)
        texts = getattr(batch, "texts", None)  # a reasoning model's (`iqa_cli.scoring.reasoning`)
        return ImageScore(
            score=float(batch.score[i]),
            std=float(batch.std[i]),
            probs=probs,
            level=readout.level_names[best] if probs[best] == probs[best] else None,  # NaN: no digit readout
            score_reg=float(batch.score_reg[i]) if batch.score_reg is not None else None,
            score_soft=float(batch.score_soft[i]) if texts is not None else None,
            reasoning=texts[i] if texts is not None else None,
            error=batch.errors[i] if texts is not None else None,
            **described,
        )

    @api_errors
    def score_tensors(
        self,
        images: torch.Tensor | Sequence[torch.Tensor],
        *,
        differentiable: bool = False,
        batch_size: int = 16,
    ) -> ScoreBatch:
        """Scores RGB float tensors in [0, 1] (a batch [B, 3, H, W] or a list of [3, H, W] of any sizes) without
        leaving torch: the family's preprocessing runs on the tensors' device (`TensorInputs`), no PIL round trip.

        Every model call has exactly `batch_size` rows (zero rows pad the last one), so an image's score does
        not depend on the other images it is scored with. With `differentiable=True` autograd is kept, so the
        gradient of a reward built on the scores reaches the pixels (and the model's weights that require it).

        Returns:
            ScoreBatch with float32 tensors on the model's device (probs [B, K], score [B], std [B]).
        """
        import contextlib

        if hasattr(self.readout, "read"):
            raise UserError("score_tensors reads level probabilities; a reasoning model answers by generation (score)")
        tensor_inputs = getattr(self.backbone, "tensor_inputs", None)
        if tensor_inputs is None:
            raise UserError(f"the {self.backbone.name} family has no torch preprocessing, so no score_tensors")
        if batch_size < 1:
            raise UserError(f"batch_size must be at least 1, got {batch_size}")
        if isinstance(images, torch.Tensor):
            if images.dim() != 4:
                raise ValueError(f"expected images [B, 3, H, W], got shape {tuple(images.shape)}")
            images = list(images.unbind(0))
        for i, image in enumerate(images):
            if image.dim() != 3 or image.shape[0] != 3 or not image.is_floating_point():
                raise ValueError(
                    f"images[{i}]: expected a float RGB tensor [3, H, W], got {image.dtype} {tuple(image.shape)}"
                )
        parts: list[ScoreBatch] = []
        with contextlib.nullcontext() if differentiable else torch.inference_mode():
            for start in range(0, len(images), batch_size):
                rows = [tensor_inputs(image.to(self.device)) for image in images[start : start + batch_size]]
                n = len(rows)
                tensor_collate = getattr(self.backbone, "tensor_collate", None)  # rows of different shapes
                visual = (
                    tensor_collate(rows, batch_size)
                    if tensor_collate is not None
                    else {
                        key: torch.cat(
                            [
                                torch.stack([r[key] for r in rows]),
                                rows[0][key].new_zeros(batch_size - n, *rows[0][key].shape),
                            ]
                        )
                        for key in rows[0]
                    }
                )
                out = level_readout(self.backbone, visual, self.readout)
                reg = out.score_reg[:n].float() if out.score_reg is not None else None
                parts.append(ScoreBatch(out.probs[:n], out.score[:n], out.std[:n], reg))
        if not parts:
            raise ValueError("no images to score")
        regs = [p.score_reg for p in parts]
        return ScoreBatch(
            probs=torch.cat([p.probs for p in parts]),
            score=torch.cat([p.score for p in parts]),
            std=torch.cat([p.std for p in parts]),
            score_reg=torch.cat(regs) if all(r is not None for r in regs) else None,
        )
