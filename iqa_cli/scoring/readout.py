"""What goes into the model and where its answer is read: the `Readout` of a checkpoint, and one forward pass
read through it.

Released checkpoints are scored the way their authors score them and models that `iqa train` writes are scored
the way they were trained (the run directory's `iqa.json`, read as `RunInfo`, records it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from iqa_cli.constants import RUN_FILE
from iqa_cli.errors import UserError
from iqa_cli.labels import QUALITY_NAMES as DEFAULT_LEVEL_NAMES
from iqa_cli.scoring.moments import level_moments

if TYPE_CHECKING:
    from iqa_cli.models.backbone import Backbone, VisualInputs


# Where the Q-Scorer MLP reads its hidden state (docs/METHOD.md, "Q-Scorer"):
#   "appended": one greedy token over the whole vocabulary is appended and the MLP reads the final-norm
#               hidden state at that token (how the authors score the released checkpoint);
#   "last":     the MLP reads the hidden state at the last input position, the one that predicts the score
#               token (how `iqa train` trains it, so its models are scored the same way).
REGRESSOR_READOUTS = ("appended", "last")


@dataclass(frozen=True)
class Readout:
    """What goes into the model and where the levels (and the regression score) are read."""

    input_ids: tuple[int, ...]  # the backbone's prompt ids (its image slot once); the level is read after them
    level_token_ids: tuple[int, ...]  # ascending quality
    level_names: tuple[str, ...]  # ascending quality, same length
    prompt: str  # the text the ids came from (for provenance)
    regressor: str | None = None  # None | one of REGRESSOR_READOUTS

    @property
    def centers(self) -> torch.Tensor:
        """Level centers evenly spaced over [1, 5] (docs/METHOD.md, "Levels")."""
        return torch.linspace(1.0, 5.0, len(self.level_token_ids), dtype=torch.float32)


@dataclass
class ScoreBatch:
    """Per-image results of one batch, float32 on the CPU."""

    probs: torch.Tensor  # B, K (ascending quality)
    score: torch.Tensor  # B: sum p_i c_i
    std: torch.Tensor  # B: sqrt(sum p_i (c_i - score)^2)
    score_reg: torch.Tensor | None = None  # B: the Q-Scorer regressor's score


@torch.inference_mode()
def read_levels(backbone: Backbone, visual: VisualInputs, readout: Readout) -> ScoreBatch:
    """One forward pass over a collated batch of B images with the readout's prompt -> ScoreBatch.

    The LM head runs at the last position only. Every row has the same prompt, so no padding is involved
    and a row's result does not depend on the other rows of the batch.
    """
    batch = level_readout(backbone, visual, readout)
    return ScoreBatch(
        probs=batch.probs.cpu(),
        score=batch.score.cpu(),
        std=batch.std.cpu(),
        score_reg=batch.score_reg.float().cpu() if batch.score_reg is not None else None,
    )


def level_readout(backbone: Backbone, visual: VisualInputs, readout: Readout) -> ScoreBatch:
    """`read_levels` on the backbone's device and with autograd as the caller has it (`Scorer.score_tensors`)."""
    b = next(iter(visual.values())).shape[0]
    device = backbone.device
    ids = torch.tensor(readout.input_ids, dtype=torch.long, device=device).expand(b, -1)
    level_ids = torch.tensor(readout.level_token_ids, dtype=torch.long, device=device)
    centers = readout.centers
    appended = readout.regressor == "appended"
    out = backbone.forward(visual, ids, logits_at="last", use_cache=appended)
    first = out.logits[:, -1]  # B, V
    level_logits = first[:, level_ids]
    score_reg = None
    if readout.regressor == "last":
        score_reg = backbone.regress(out.hidden_states[:, -1])
    elif appended:
        # The authors' Q-Scorer scoring: greedy next token, then the regressor at that token. One cached
        # decoding step gives the numbers of their full recomputation.
        next_ids = first.argmax(-1, keepdim=True)  # B, 1
        step = backbone.decode_step(next_ids, out.past_key_values)
        score_reg = backbone.regress(step.hidden_states[:, -1])
        # The score token follows the appended one, unless the greedy token already was a score token.
        took_level = torch.isin(next_ids[:, 0], level_ids)
        level_logits = torch.where(took_level[:, None], level_logits, step.logits[:, -1][:, level_ids])
    probs, mean, std = level_moments(level_logits, centers)
    return ScoreBatch(probs=probs, score=mean, std=std, score_reg=score_reg)


@dataclass
class RunInfo:
    """The `iqa.json` that `iqa train` writes into a checkpoint directory (all fields optional on read)."""

    method: str | None = None  # "deqa" | "qalign" | "qscorer"
    level_names: list[str] | None = None  # ascending quality
    level_tokens: list[str] | None = None  # the token each level is read at ("good" or "<score4>")
    prompt: str | None = None  # the scoring prompt text
    input_ids: list[int] | None = None  # exact scoring ids (prompt + response prefix up to the level token)
    regressor: str | None = None  # one of REGRESSOR_READOUTS for regression models
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def read(cls, directory: Path) -> RunInfo | None:
        path = directory / RUN_FILE
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise UserError(f"{path}: not readable JSON ({exc})") from None
        if not isinstance(data, dict):
            raise UserError(f"{path}: expected a JSON object")
        known = {k: data.pop(k) for k in list(data) if k in cls.__dataclass_fields__ and k != "extra"}
        info = cls(**known, extra=data)
        if info.regressor is not None and info.regressor not in REGRESSOR_READOUTS:
            raise UserError(f"{path}: regressor {info.regressor!r} is not one of {', '.join(REGRESSOR_READOUTS)}")
        return info


def build_readout(backbone: Backbone, prompt: str | None, run: RunInfo | None) -> Readout:
    """Decides prompt ids, level tokens and regressor readout for a checkpoint (see module docstring)."""
    default_prompt, default_level_ids, default_regressor = backbone.default_scoring()
    if run is not None and run.level_tokens:
        names = run.level_names or list(run.level_tokens)
        if len(names) != len(run.level_tokens):
            raise UserError(f"{RUN_FILE}: {len(names)} level names for {len(run.level_tokens)} level tokens")
        tokens = list(run.level_tokens)
        level_ids = [backbone.level_token_id(t) for t in tokens]
        if len(set(level_ids)) != len(level_ids):
            raise UserError(f"{RUN_FILE}: level tokens {tokens} do not map to distinct ids")
        if prompt is None and run.input_ids:
            ids = tuple(int(i) for i in run.input_ids)
            return Readout(ids, tuple(level_ids), tuple(names), run.prompt or "", run.regressor)
        text = prompt or run.prompt or default_prompt
        return Readout(tuple(backbone.encode_prompt(text)), tuple(level_ids), tuple(names), text, run.regressor)
    text = prompt or default_prompt
    ids = tuple(backbone.encode_prompt(text))
    if default_level_ids:  # tokens the checkpoint was trained to answer with (Q-Scorer's <score1>..<score5>)
        k = len(default_level_ids)
        names = DEFAULT_LEVEL_NAMES if k == len(DEFAULT_LEVEL_NAMES) else tuple(f"score{i + 1}" for i in range(k))
        return Readout(ids, tuple(default_level_ids), tuple(names), text, default_regressor)
    names = tuple(DEFAULT_LEVEL_NAMES)
    level_ids = [backbone.level_token_id(name) for name in names]
    return Readout(ids, tuple(level_ids), names, text, default_regressor)


def readout_method(readout: Any) -> str:
    """The `method` the output metadata records for a readout (a reasoning preset, Q-Scorer or level tokens)."""
    if hasattr(readout, "preset"):
        return "reasoning"
    return "qscorer" if readout.regressor else "levels"


def task_readout(backbone: Backbone, task: str, video: bool, run: RunInfo | None) -> Readout | None:
    """The readout of the family's prompt for `task` on a video or an image (`Backbone.task_prompt`, optional for
    a family: None without it), with the checkpoint's level tokens and regressor."""
    task_prompt = getattr(backbone, "task_prompt", None)
    if task_prompt is None:
        return None
    return build_readout(backbone, task_prompt(task, video=video), run)
