"""The run directory of `iqa train`: resumable checkpoints, the JSONL log, and the final model files.

Layout of `--out DIR`:

    train_config.json        the configuration the run was started with (resuming checks it)
    train_log.jsonl          one line per optimizer step (losses, lr, grad norm, speed) and per evaluation
    checkpoints/step-N/      the latest resumable state (removed when the run finishes, unless kept):
        state/               trainable weights + AdamW state, torch.distributed.checkpoint (any world size)
        trainer.pt           epoch/step position and the LR schedule
        rng-R.pt             each rank's torch RNG state (LoRA dropout)
    iqa.json                 how to score the model (written last: its presence means the run finished)
    the model in its family's own format (`Backbone.save`, or `save_adapter` for --lora), with its tokenizer
    and preprocessing files; for mPLUG-Owl2 the released layouts: config.json + model.safetensors, or
    config.json + adapter_config.json + adapter_model.safetensors + non_lora_trainables.bin
    merged/                  --merge: the LoRA run as a full checkpoint

A checkpoint is written into a hidden temporary folder and renamed into place, and older ones are deleted
only after that, so killing the process at any moment leaves the previous checkpoint usable: a run loses at
most the steps since its last save. Only trainable tensors are saved (frozen ones come from --model again).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from iqa_cli import __version__, distributed
from iqa_cli.constants import RUN_FILE
from iqa_cli.errors import UserError
from iqa_cli.files import atomic_write, publish
from iqa_cli.run_lock import LOCK_NAME  # this run's own lock, taken before the plan

CHECKPOINTS = "checkpoints"
LOG_FILE = "train_log.jsonl"
CONFIG_FILE = "train_config.json"
MERGED = "merged"
TRAINER_FILE = "trainer.pt"
HF_TRAINER_STATE = "trainer_state.json"  # a TRL checkpoint (`--method grpo`, `checkpoints/checkpoint-N/`) is complete
STATE_DIR = "state"
# Files of the run itself; --overwrite removes exactly these and the model files a family writes
# (`models.backbone.family_output_files`), nothing else of the folder.
RUN_FILES = (CONFIG_FILE, LOG_FILE, RUN_FILE)


@dataclass
class Progress:
    """Where the run is: `step` optimizer steps into epoch `epoch`, `global_step` in total."""

    epoch: int = 0
    step: int = 0
    global_step: int = 0

    def advance(self, steps_per_epoch: int) -> None:
        self.step += 1
        self.global_step += 1
        if self.step == steps_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0


def checkpoint_complete(folder: Path) -> bool:
    """A `step-N` folder is complete once renamed into place with its `trainer.pt` (temporary folders of an
    interrupted save are ignored). A TRL `checkpoint-N` (`--method grpo`) is complete when its trainer state, which
    transformers writes last and not atomically, parses: a kill during that write leaves it cut short."""
    if folder.name.startswith("step-"):
        return (folder / TRAINER_FILE).is_file()
    try:
        json.loads((folder / HF_TRAINER_STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return True


class RunDirectory:
    """Paths and small file operations of one `--out` directory."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.checkpoints = self.out / CHECKPOINTS
        self.log_path = self.out / LOG_FILE
        self.config_path = self.out / CONFIG_FILE
        self.info_path = self.out / RUN_FILE

    def read_config(self) -> dict | None:
        if not self.config_path.is_file():
            return None
        try:
            return json.loads(self.config_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise UserError(f"{self.config_path}: unreadable ({exc}); use --overwrite to start over") from None

    def latest_checkpoint(self) -> Path | None:
        """The newest complete checkpoint (`checkpoint_complete`), or None."""
        if not self.checkpoints.is_dir():
            return None
        done = [p for p in self.checkpoints.glob("step-*") if checkpoint_complete(p)]
        done += [p for p in self.checkpoints.glob("checkpoint-*") if checkpoint_complete(p)]
        return max(done, key=lambda p: int(p.name.split("-")[1])) if done else None

    def is_finished(self) -> bool:
        return self.info_path.is_file()

    def completed_steps(self) -> int:
        try:
            return int(json.loads(self.info_path.read_text(encoding="utf-8")).get("steps", 0))
        except (OSError, ValueError):
            return 0

    def clear(self) -> None:
        """Removes what a run writes (only those files and folders)."""
        from iqa_cli.models.backbone import family_output_files

        for name in RUN_FILES:
            (self.out / name).unlink(missing_ok=True)
        for folder in (self.checkpoints, self.out / MERGED):
            shutil.rmtree(folder, ignore_errors=True)
        for pattern in family_output_files():
            for path in self.out.glob(pattern):
                if path.is_file():
                    path.unlink()

    def start(self, config: dict) -> None:
        """A fresh run: what an earlier run wrote here is removed (--overwrite, or one stopped before its first
        save), then the configuration and an empty log."""
        self.clear()
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write(self.config_path, json.dumps(config, indent=2) + "\n")
        self.log_path.write_text("")

    def append_log(self, record: dict) -> None:
        with self.log_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record, allow_nan=True) + "\n")

    def truncate_log(self, step: int) -> None:
        """Keeps the log lines of steps <= `step`, so a resumed run's log reads as an uninterrupted one's."""
        if not self.log_path.is_file():
            return
        kept = []
        for line in self.log_path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except ValueError:
                break  # a line cut by the kill: everything after it is gone too
        atomic_write(self.log_path, "".join(line + "\n" for line in kept))


def _is_probe(name: str) -> bool:
    """The short-lived file `paths.check_output_dir` writes to test a folder (another run starting up)."""
    return name.startswith(".") and ".probe-" in name


def plan_run(run: RunDirectory, config: dict, control_fields: frozenset[str]) -> str:
    """'fresh', 'resume' or 'complete' for this configuration in this directory; anything else is an
    error message (returned, not raised, so rank 0 can hand it to every rank)."""
    if config.get("overwrite"):  # cleared by `start`, once the data and model passed their checks
        return "fresh"
    saved = run.read_config()
    if saved is None:
        others = (
            [p.name for p in run.out.iterdir() if p.name != LOCK_NAME and not _is_probe(p.name)]
            if run.out.is_dir()
            else []
        )
        if others:
            return f"--out {run.out} is not empty and holds no iqa training run; choose an empty or new folder"
        if config.get("resume"):
            return f"--resume: nothing to resume in {run.out}"
        return "fresh"
    changed = [
        _changed_option(key, saved.get(key), config.get(key))
        for key in sorted(set(saved) | set(config))
        if key not in control_fields and saved.get(key) != config.get(key)
    ]
    if changed:
        return (
            f"{run.out} holds a run with other options ({'; '.join(changed)}); give its options to resume or keep "
            "it, another --out for a new run, or --overwrite to start over"
        )
    if run.is_finished():
        return "complete"
    if run.latest_checkpoint() is not None:
        return "resume"
    if config.get("resume"):
        return f"--resume: {run.out} has no checkpoint yet (the run stopped before its first save)"
    return "fresh"


def _changed_option(key: str, then: Any, now: Any) -> str:
    """`--lr 0.001 then, 0.0002 now`: a recorded option as its flag, with the values as they are typed."""

    def typed(value: Any) -> str:
        if isinstance(value, bool):
            return "on" if value else "off"
        if value is None:
            return "unset"
        if isinstance(value, list):
            return ",".join(map(str, value))
        return str(value)

    return f"--{key.replace('_', '-')} {typed(then)} then, {typed(now)} now"


def check_same_data(run: RunDirectory, fingerprint: str, metas: list[Path], *, finished: bool) -> None:
    """A resumed run continues the sampler where it stopped, and a finished run was trained on certain rows: both
    only hold for the data they were started on.

    Raises:
        UserError: the prepared metas changed since the run started (prepared again, other images missing).
    """
    saved = (run.read_config() or {}).get("data_fingerprint")
    if not saved or saved == fingerprint:
        return
    names = ", ".join(str(m) for m in metas)
    what = "a finished run" if finished else "a run"
    again = "train again" if finished else "start over"
    raise UserError(
        f"{run.out} holds {what} trained on other data: {names} changed since it started (prepared again, or images "
        f"went missing); use another --out for the new data, or --overwrite to {again}"
    )


# --- resumable checkpoints ------------------------------------------------------------------------------


def _state_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=True)


@contextlib.contextmanager
def _quiet_dcp():
    """torch.distributed.checkpoint warns that it runs in one process; that is intended here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    run: RunDirectory,
    progress: Progress,
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> Path:
    """Writes `checkpoints/step-N` atomically (all ranks call this) and deletes older checkpoints."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_state_dict

    name = f"step-{progress.global_step:08d}"
    final, tmp = run.checkpoints / name, run.checkpoints / f".{name}.tmp"
    if distributed.rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    distributed.barrier()
    model_state, optim_state = get_state_dict(module, optimizer, options=_state_options())
    try:
        with _quiet_dcp():
            dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp / STATE_DIR))
        _torch_save(_rng_state(), tmp / f"rng-{distributed.rank()}.pt")
        distributed.barrier()
        if distributed.rank() == 0:
            trainer = {"progress": asdict(progress), "scheduler": scheduler.state_dict()}
            _torch_save(trainer, tmp / TRAINER_FILE)
            shutil.rmtree(final, ignore_errors=True)
            publish(tmp, final)
    except CheckpointException as exc:  # each rank's error, wrapped: a full disk is the OSError inside
        shutil.rmtree(tmp, ignore_errors=True)
        failed = [error for error, _ in exc.failures.values() if isinstance(error, OSError)]
        if failed:
            raise failed[0] from None
        raise
    except OSError:  # the half-written checkpoint would only hold the space the next one needs
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if distributed.rank() == 0:  # the new one is in place: the older ones go
        for old in run.checkpoints.glob("step-*"):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    distributed.barrier()
    return final


def _torch_save(value: Any, path: Path) -> None:
    """`torch.save` through a Python file, so a failed write is an OSError with its errno (given a path, torch
    raises a RuntimeError that does not say the disk is full)."""
    with open(path, "wb") as file:
        torch.save(value, file)


def load_checkpoint(
    run: RunDirectory,
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> Progress:
    """Restores trainable weights, AdamW state, the LR schedule, the position and this rank's RNG."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    path = distributed.broadcast_object(str(run.latest_checkpoint()) if distributed.rank() == 0 else None)
    path = Path(path)
    options = _state_options()
    model_state, optim_state = get_state_dict(module, optimizer, options=options)
    state = {"model": model_state, "optim": optim_state}
    try:
        with _quiet_dcp():
            dcp.load(state, checkpoint_id=str(path / STATE_DIR))
    except Exception as exc:  # a checkpoint of other trainable parameters than this configuration's
        raise UserError(f"{path}: cannot restore the checkpoint ({type(exc).__name__}: {exc})") from None
    # dcp.load has checked that every trainable tensor was in the checkpoint; the frozen ones are not in the
    # state on purpose, hence strict=False here.
    loading = StateDictOptions(ignore_frozen_params=True, strict=False)
    set_state_dict(module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"], options=loading)
    trainer = torch.load(path / TRAINER_FILE, map_location="cpu", weights_only=True)
    scheduler.load_state_dict(trainer["scheduler"])
    rng_file = path / f"rng-{distributed.rank()}.pt"
    if not rng_file.is_file():  # resumed with more ranks than it was saved with
        rng_file = path / "rng-0.pt"
    _set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=True))
    return Progress(**trainer["progress"])


# --- the final model -------------------------------------------------------------------------------------------


@dataclass
class RunRecord:
    """The `iqa.json` of a finished run: the scoring contract (`iqa_cli.scoring.readout.RunInfo`) plus provenance."""

    method: str
    level_names: list[str]
    level_tokens: list[str]
    prompt: str
    input_ids: list[int]
    regressor: str | None
    base: str | None  # LoRA runs: the full model the adapter applies to (repo id or absolute path)
    layout: str  # "reference" (trained image-first) or "scoring" (trained on the scoring prompt's layout)
    steps: int
    train: dict = field(default_factory=dict)
    final_eval: dict | None = None
    base_revision: str | None = None  # the Hub commit of `base`, for provenance
    family: str = ""  # the model family (`models.backbone.RUN_FAMILY_KEY`): the registry loads the run through it
    task: str = "quality"  # what `prompt` asks (aesthetics when every dataset rated aesthetics)
    tasks: dict = field(default_factory=dict)  # dataset name -> the task it was trained with

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("base", "base_revision"):
            if data[key] is None:
                data.pop(key)
        data["iqa_version"] = __version__
        data["complete"] = True
        return data


def save_final(
    run: RunDirectory,
    record: RunRecord,
    *,
    backbone: Any,
    peft_model: torch.nn.Module | None,
    strategy: str,
    merge: bool,
    keep_checkpoints: bool,
    dtype: torch.dtype | None = None,
) -> Path | None:
    """Writes the final checkpoint directory (every rank calls this; rank 0 writes). Returns `merged/`."""
    full_state = distributed.full_state_dict(backbone.model) if strategy == "fsdp" else None
    merged = None
    if distributed.rank() == 0:
        out = run.out
        if peft_model is not None:
            backbone.save_adapter(peft_model, out, record.base)
        else:
            backbone.save(out, state=full_state, dtype=dtype)
        atomic_write(out / RUN_FILE, json.dumps(record.to_json(), indent=2) + "\n")
        if merge:
            merged = merge_lora(out, out / MERGED, record)
        if not keep_checkpoints:
            shutil.rmtree(run.checkpoints, ignore_errors=True)
    distributed.barrier()
    return merged


def merge_lora(run_dir: Path, merged: Path, record: RunRecord) -> Path:
    """The adapter merged onto its base by the same loader `iqa score` uses, written as a full checkpoint."""
    from iqa_cli.models.backbone import load_backbone

    backbone = load_backbone(run_dir, base=record.base)
    backbone.save(merged, processing=False)
    for name in backbone.processing_files:  # copied as written, not re-encoded
        if (run_dir / name).is_file():
            shutil.copy(run_dir / name, merged / name)
    info = record.to_json()
    info.pop("base", None)
    info.pop("base_revision", None)
    info["merged_from"] = str(run_dir.resolve())
    atomic_write(merged / RUN_FILE, json.dumps(info, indent=2) + "\n")
    return merged
