"""Before a run scores anything, rank 0 decides: resume the sidecar, report a finished output, refuse, or start.

A run is identified by its request (the options that decide the scores) and its inputs' fingerprint. The
manifest in the sidecar and the metadata of a finished output record both; a run whose request differs is
compared by what the loaded model says (a local checkpoint re-saved with the same scores is not a difference),
and a difference is refused in one line unless `--overwrite`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from iqa_cli import __version__, distributed
from iqa_cli.errors import UserError
from iqa_cli.scoring.config import ScoreConfig
from iqa_cli.scoring.output import DIRECTORY_METADATA, read_output_metadata
from iqa_cli.scoring.store import MANIFEST_VERSION, Sidecar
from iqa_cli.sources import Source


def request(config: ScoreConfig, videos: bool = False) -> dict[str, Any]:
    """The options that decide the scores (compared before loading a model to spot a finished output): with
    `videos` (the inputs may hold videos) also how they are sampled and whether frames get rows of their own;
    a task other than quality."""
    return {
        **config.model.request(),
        "decode": "fast" if config.fast_decode else "exact",
        **({"image_col": config.image_col, "keep": config.keep} if config.image_col or config.keep else {}),
        **({"keep_reasoning": True} if config.keep_reasoning else {}),  # another column
        **({"task": config.task} if config.task is not None else {}),
        **({"video": {**config.sampling().describe(), "per_frame": config.per_frame}} if videos else {}),
    }


@dataclass
class Plan:
    status: str  # "run" | "complete" | "error"
    message: str = ""
    metadata: dict[str, str] = field(default_factory=dict)  # the scorer's metadata of the run
    level_names: list[str] = field(default_factory=list)
    has_regressor: bool = False
    reasoning: bool = False  # a reasoning model: its own columns (`output.output_schema`)
    video_metadata: dict[str, str] = field(default_factory=dict)  # the video prompt and its ids


class LazyScorer:
    """Loads the model only when a decision or the work needs it."""

    def __init__(self, factory: Callable[[], Any]):
        self.factory = factory
        self.scorer: Any = None

    def get(self) -> Any:
        if self.scorer is None:
            self.scorer = self.factory()
        return self.scorer


@dataclass(frozen=True)
class Difference:
    """What differs from a recorded run, in the user's words, and the option that would match it again."""

    what: str  # "another model (a, now b)"
    match: str | None = None  # "--model a": the option to resume with; None when no option brings it back


# The scorer's metadata keys in the order a user would look for a cause: what they chose first (model, base, dtype,
# prompt), then what follows from the model (its levels, how it reads a score, its tokenizer).
_KEY_ORDER = ("model", "base_model", "model_revision", "base_revision", "model_files", "base_files", "model_layout",
              "dtype", "quantize", "prompt", "level_names", "method", "regressor_readout", "level_centers",
              "input_ids", "level_token_ids")  # fmt: skip


def _short(value: Any, limit: int = 60) -> str:
    text = str(value) if value not in (None, "") else "none"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _names(text: str | None) -> str:
    try:
        return ", ".join(json.loads(text or "[]"))
    except (ValueError, TypeError):
        return _short(text)


def _metadata_difference(key: str, before: Any, now: Any, model: str) -> Difference:
    """One differing metadata value of the scorer, as the user would name it."""
    if key == "model":
        return Difference(f"another model ({before}, now {now})", f"--model {before}")
    if key == "base_model":
        return Difference(f"another base model ({_short(before)}, now {_short(now)})", before and f"--base {before}")
    if key in ("model_revision", "base_revision"):
        which = "the model" if key == "model_revision" else "the base model"
        return Difference(f"another revision of {which} ({_short(before, 12)}, now {_short(now, 12)})",
                          before and f"--revision {before}" if key == "model_revision" else None)  # fmt: skip
    if key in ("model_files", "base_files"):
        which = f"model folder {model}" if key == "model_files" else "the base model's folder"
        return Difference(f"other files in {which} (retrained or saved again since)")
    if key == "model_layout":
        return Difference(f"another kind of checkpoint ({before}, now {now})")
    if key == "dtype":
        return Difference(f"another dtype ({before}, now {now})", f"--dtype {before}")
    if key == "quantize":
        return Difference(f"another quantization ({_short(before)}, now {_short(now)})",
                          f"--quantize {before}" if before else "no --quantize")  # fmt: skip
    if key == "prompt":
        return Difference(f"another prompt ({_short(before)!r}, now {_short(now)!r})", "its --prompt")
    if key == "level_names":
        return Difference(f"other level names ({_names(before)}, now {_names(now)}): the model was trained on others")
    if key == "method":
        return Difference(f"another way of reading the score ({before}, now {now}): the model is another kind")
    if key in ("input_ids", "level_token_ids"):
        return Difference("the same prompt and levels tokenized differently: the model's tokenizer changed")
    if key == "level_centers":
        return Difference(f"other level centers ({_short(before)}, now {_short(now)})")
    if key == "regressor_readout":
        return Difference(f"another score head ({_short(before)}, now {_short(now)})")
    return Difference(f"a different {key} ({_short(before)!r}, now {_short(now)!r})")


def describe_difference(
    recorded: dict[str, Any], *, fingerprint: str, inputs: int, noun: str, request: dict, scorer: LazyScorer
) -> Difference | None:
    """None when a recorded run (manifest or output metadata) matches this one, else what differs (the first thing
    a user would check: the options they gave before what follows from the model)."""
    asked = recorded.get("request") or {}
    then, now = asked.get("decode", "exact"), request.get("decode", "exact")
    if then != now:  # not in the scorer's metadata: the same model, other pixels
        return Difference(
            f"another decode mode ({then}, now {now}; --fast-decode decodes JPEGs at a smaller scale)",
            "--fast-decode" if then == "fast" else "no --fast-decode",
        )
    then, now = asked.get("task"), request.get("task")
    if then != now:
        said = [repr(v) if v is not None else "the model's own" for v in (then, now)]
        return Difference(f"another task ({said[0]}, now {said[1]})", _flags({"task": then}))
    then, now = asked.get("video"), request.get("video")  # the video prompt is not in it either
    if None in (then, now):  # a run from before videos (or of images only): the defaults
        then, now = then or _DEFAULT_VIDEO, now or _DEFAULT_VIDEO
    if then != now:
        said = [_flags(a, b) for a, b in ((then, now), (now, then))]
        return Difference(f"another video sampling ({said[0]}, now {said[1]})", said[0])
    then, now = asked.get("keep_reasoning", False), request.get("keep_reasoning", False)
    if then != now:  # not in the scorer's metadata either: the same answers, another column
        flags = ["--keep-reasoning" if keep else "no --keep-reasoning" for keep in (then, now)]
        return Difference(f"{flags[0]} (the column `reasoning`), now {flags[1]}", flags[0])
    if recorded.get("inputs_fingerprint") != fingerprint:
        return Difference(
            f"another list of inputs ({recorded.get('num_inputs', '?')} {noun} then, {inputs} now)", "its inputs"
        )
    if recorded.get("request") == request:
        return None
    current = scorer.get().metadata
    previous = recorded.get("metadata", {})
    keys = [k for k in _KEY_ORDER if k in current or k in previous]
    keys += sorted((set(current) | set(previous)) - set(keys) - {"iqa_version"})
    for key in keys:
        if current.get(key) != previous.get(key):
            return _metadata_difference(key, previous.get(key), current.get(key), str(current.get("model", "")))
    return None


def decide(
    config: ScoreConfig, fmt: str, directory: bool, source: Source, fingerprint: str, scorer: LazyScorer
) -> Plan:
    """Rank 0's decision: resume, complete, or a new run (its manifest written); a conflict is a UserError."""
    out = Path(config.out)
    wanted = request(config, may_hold_videos(source))
    sidecar = Sidecar(out)
    compare = {
        "fingerprint": fingerprint,
        "inputs": source.num_inputs(),
        "noun": source.noun,
        "request": wanted,
        "scorer": scorer,
    }
    if directory and config.overwrite:  # the folder's footer goes; its files are handled below
        (out / DIRECTORY_METADATA).unlink(missing_ok=True)
    if sidecar.exists():
        manifest = sidecar.read_manifest()
        version = (manifest or {}).get("manifest_version")
        if manifest is not None and version != MANIFEST_VERSION and not config.overwrite:
            raise UserError(
                f"{sidecar.dir} holds an interrupted run of another iqa version (format {version}); finish it with "
                "that version, or pass --overwrite to discard it"
            )
        if manifest is not None and version == MANIFEST_VERSION:
            difference = describe_difference(manifest, **compare)
            if difference is None and not config.overwrite:  # --overwrite: a fresh run, even of the same request
                return Plan(
                    "run",
                    metadata=manifest["metadata"],
                    level_names=manifest["level_names"],
                    has_regressor=manifest["has_regressor"],
                    reasoning=manifest.get("reasoning", False),
                    video_metadata=manifest.get("video_metadata", {}),
                )
            if difference is not None and not config.overwrite:
                resume = f"resume it with {difference.match}, or " if difference.match else ""
                raise UserError(
                    f"{sidecar.dir} holds an interrupted run of {difference.what}; {resume}pass --overwrite to "
                    "discard it (or --out another file)"
                )
        sidecar.remove()  # no manifest = a crash while creating it; nothing in it is usable
    finished = (out / DIRECTORY_METADATA).exists() if directory else out.exists()
    if finished and not config.overwrite:
        recorded = read_output_metadata(out, fmt)
        if recorded is None:
            raise UserError(f"{out} exists and was not written by `iqa score`; pass --overwrite to replace it")
        recorded = {**recorded, "request": _json_or_none(recorded.get("request"))}
        recorded["metadata"] = _json_or_none(recorded.get("scorer_metadata")) or {}
        difference = describe_difference(recorded, **compare)
        if difference is None:
            return Plan("complete")
        raise UserError(
            f"{out} exists and was written with {difference.what}; pass --overwrite to replace it (or --out another "
            "file)"
        )
    if directory:
        _clear_directory(out, source, config.overwrite)
    return start_run(sidecar, wanted, fingerprint, source, scorer)


def _clear_directory(out: Path, source: Source, overwrite: bool) -> None:
    """A new `--out DIR/` run: the folder must hold no Parquet file a reader would take as rows of this output.
    Files of an earlier `iqa score` run go with --overwrite; a file `iqa score` did not write is refused in one
    line, even with --overwrite (it may be data of the user's: not ours to delete)."""
    if not out.is_dir():
        return
    ours = {out / f"{source.output_stem(u)}.parquet" for u in range(len(source))}
    found = sorted(out.glob("*.parquet"))
    for path in found:
        try:
            written_by_us = b"inputs_fingerprint" in (pq.read_schema(path).metadata or {})
        except Exception:
            written_by_us = False
        if not written_by_us:
            raise UserError(
                f"{out} holds {path.name}, which `iqa score` did not write: a folder output holds only the files "
                "of its inputs; choose another folder or move it"
            )
    clash = [p for p in found if p in ours]
    others = [p for p in found if p not in ours]
    if clash and not overwrite:
        raise UserError(f"{out} already holds {clash[0].name} and was not finished by `iqa score`; pass --overwrite")
    if others and not overwrite:
        raise UserError(
            f"{out} holds {others[0].name} (of {len(others)} Parquet file(s) for other inputs), which a reader of "
            "the folder would take as rows of this output; pass --overwrite to remove them, or choose another folder"
        )
    for path in found:
        path.unlink()


def start_run(sidecar: Sidecar, wanted: dict, fingerprint: str, source: Source, scorer: LazyScorer) -> Plan:
    """A new run: its manifest (what a resume must match) written before any unit, and its plan."""
    model = scorer.get()
    reasoning = bool(getattr(model, "reasoning", False))
    if wanted.get("keep_reasoning") and not reasoning:
        raise UserError("--keep-reasoning applies to reasoning models (--reasoning PRESET, or a --method grpo run)")
    sidecar.create(
        {
            "manifest_version": MANIFEST_VERSION,
            "iqa_version": __version__,
            "request": wanted,
            "metadata": dict(model.metadata),
            "level_names": list(model.level_names),
            "has_regressor": bool(model.has_regressor),
            "reasoning": reasoning,
            "video_metadata": dict(getattr(model, "video_metadata", {})),
            "source": source.kind,
            "inputs_fingerprint": fingerprint,
            "num_inputs": source.num_inputs(),
            "num_units": len(source),
        }
    )
    return Plan(
        "run",
        metadata=dict(model.metadata),
        level_names=list(model.level_names),
        has_regressor=model.has_regressor,
        reasoning=reasoning,
        video_metadata=dict(getattr(model, "video_metadata", {})),
    )


_DEFAULT_VIDEO = {**ScoreConfig(out=Path("-")).sampling().describe(), "per_frame": False}


def _flags(options: dict[str, Any], other: dict[str, Any] | None = None) -> str:
    """`options` as the flags that give them (`--fps 2.0 --per-frame`, `no --per-frame`), only those whose value
    differs from `other`'s (all when none differs)."""
    differ = {k: v for k, v in options.items() if other is None or other.get(k) != v} or options
    said = []
    for key, value in differ.items():
        flag = f"--{key.replace('_', '-')}"
        if value is None or value is False:
            said.append(f"no {flag}")
        else:
            said.append(flag if value is True else f"{flag} {value}")
    return " ".join(said)


def _json_or_none(text: str | None) -> Any:
    try:
        return json.loads(text) if text else None
    except ValueError:
        return None


def may_hold_videos(source: Source) -> bool:
    """Whether the source's samples may be videos (a source that does not say holds images only)."""
    return bool(getattr(source, "may_hold_videos", False))


def output_metadata(plan: Plan, wanted: dict, fingerprint: str, num_inputs: int) -> dict[str, str]:
    """The scorer's metadata plus what identifies this output (version, input list, request); with videos, how
    they were sampled and the video prompt (`plan.metadata`'s video keys)."""
    return {
        **plan.metadata,
        "iqa_version": __version__,
        "inputs_fingerprint": fingerprint,
        "num_inputs": str(num_inputs),
        "request": json.dumps(wanted, sort_keys=True),
        "scorer_metadata": json.dumps(plan.metadata, sort_keys=True),
        "decode": wanted.get("decode", "exact"),  # "fast": JPEGs decoded at a smaller DCT scale (--fast-decode)
        **({"video_sampling": json.dumps(wanted["video"], sort_keys=True)} if "video" in wanted else {}),
        **(plan.video_metadata if "video" in wanted else {}),
    }


def decide_on_main(fn: Callable[[], Plan], environment: distributed.DistEnv) -> Plan:
    """Runs `fn` on rank 0 and hands its plan (or its user error) to every rank."""
    plan: Plan | None = None
    if environment.is_main:
        try:
            plan = fn()
        except UserError as exc:
            plan = Plan("error", message=str(exc))
        except BaseException as exc:
            distributed.broadcast_object(Plan("error", message=f"rank 0 failed: {exc!r}"))
            raise
    plan = distributed.broadcast_object(plan)
    if plan.status == "error":
        raise UserError(plan.message)
    return plan
