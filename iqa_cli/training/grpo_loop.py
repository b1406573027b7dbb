"""What `iqa train --method grpo` adds to TRL's loop: the epoch order as a pure function of (seed, epoch), the run's
log lines, progress, in-loop evaluation and when checkpoints are written (`RunCallback`), and the evaluation of
reasoning answers on the test split (`evaluate_reasoning`)."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import TrainerCallback
from trl import GRPOTrainer
from trl.trainer.utils import RepeatSampler

from iqa_cli import distributed
from iqa_cli.progress import progress_bar
from iqa_cli.training import state as train_state

# TRL's per-step metrics that measure time, not training: left out of `train_log.jsonl`, which a resumed run must
# reproduce line for line.
_TIMING = ("step_time",)


class EpochRepeatSampler(RepeatSampler):
    """TRL's sampler (each image `num_generations` times in a row, batches of whole groups) whose shuffle is a pure
    function of (seed, epoch): TRL's own keeps one generator across epochs, so a run resumed in a later epoch would
    replay the first epoch's order."""

    epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            seed = int(np.random.default_rng([self.seed or 0, self.epoch]).integers(2**62))
            self.generator = torch.Generator().manual_seed(seed)
        return super().__iter__()


class LeaveStopsToMainProcess:
    """A DataLoader `worker_init_fn`: transformers' own (the worker's seed), then `interrupts.leave_to_main_process`,
    so a stop sent to the process group reaches only the main process, which says what it saved (a worker that died
    of it would make torch raise "DataLoader worker killed by signal" first)."""

    def __init__(self, init: Callable[[int], None] | None):
        self.init = init

    def __call__(self, worker_id: int) -> None:
        from iqa_cli.interrupts import leave_to_main_process

        leave_to_main_process()
        if self.init is not None:
            self.init(worker_id)


class IqaGRPOTrainer(GRPOTrainer):
    """TRL's `GRPOTrainer` with the resumable epoch order and decoding workers that leave stops to the main process;
    it sends no telemetry and writes no model card."""

    def get_train_dataloader(self) -> Any:
        loader = super().get_train_dataloader()
        base = getattr(loader, "base_dataloader", loader)  # accelerate's wrapper iterates the DataLoader it holds
        if base.num_workers:
            base.worker_init_fn = LeaveStopsToMainProcess(base.worker_init_fn)
        return loader

    def _get_train_sampler(self, dataset: Any = None) -> EpochRepeatSampler:
        return EpochRepeatSampler(
            data_source=dataset if dataset is not None else self.train_dataset,
            mini_repeat_count=self.num_generations,
            batch_size=self.args.generation_batch_size // self.num_generations,
            repeat_count=self.num_iterations * self.args.steps_per_generation,
            shuffle=self.shuffle_dataset,
            seed=self.args.seed,
        )

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """A resumable checkpoint keeps the model's own parameter names: transformers' `save_pretrained` renames
        Qwen-VL's to the released layout, which `Trainer`'s resume then loads nothing of (no error: it loads
        non-strictly). peft's adapters are saved as peft saves them."""
        model = self.accelerator.unwrap_model(self.model)
        if hasattr(model, "peft_config"):
            return super()._save(output_dir, state_dict)
        model.save_pretrained(output_dir, state_dict=state_dict, save_original_format=False)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        """Loads what `_save` wrote, strictly: every parameter (but those tied to another) or a one-line error."""
        model = model if model is not None else self.model
        if hasattr(model, "peft_config"):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        from safetensors.torch import load_file

        from iqa_cli.errors import UserError

        state: dict[str, torch.Tensor] = {}
        for path in sorted(Path(resume_from_checkpoint).glob("model*.safetensors")):
            state.update(load_file(str(path)))
        missing, unexpected = model.load_state_dict(state, strict=False)
        tied = set(getattr(model, "all_tied_weights_keys", None) or {})
        missing = [k for k in missing if k not in tied]
        if missing or unexpected or not state:
            names = (missing or unexpected or ["(no weights)"])[:3]
            raise UserError(f"{resume_from_checkpoint}: not a checkpoint of this model ({', '.join(names)})")

    def _send_telemetry(self) -> None:
        """`iqa` reaches no server while it trains."""

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        """The run directory's `iqa.json` says what the model is."""


class RunCallback(TrainerCallback):
    """The run's side of TRL's loop: a `train_log.jsonl` line per step, the progress bar, evaluation every
    `--eval-every` steps and at the end, and checkpoints every `--save-every` steps, at each epoch's end and at the
    run's, and after `--save-minutes`."""

    def __init__(
        self,
        config: Any,
        run: train_state.RunDirectory,
        *,
        steps_per_epoch: int,
        evaluate: Callable[[Any], dict],
        say: Callable[[str], None],
        console: Any = None,
    ):
        self.config, self.run, self.steps_per_epoch = config, run, steps_per_epoch
        self._evaluate, self.say, self.console = evaluate, say, console
        self.trainer: Any = None
        self.resumed_from: int | None = None
        self.history: list[dict] = []
        self.last_save = time.perf_counter()
        self.bar: Any = None
        self.is_main = distributed.env().is_main

    @contextlib.contextmanager
    def progress(self) -> Iterator[None]:
        """Closes the progress bar (made in `on_train_begin`, when TRL knows the number of steps) however `train`
        ends."""
        try:
            yield
        finally:
            if self.bar is not None:
                self.bar.__exit__(None, None, None)
                self.bar = None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step:
            self.resumed_from = state.global_step
        show = self.is_main and not self.config.control.quiet
        self.bar = progress_bar(
            self.console, state.max_steps, "train", show=show, completed=state.global_step, say=self.say
        )
        self.bar.__enter__()
        self.last_save = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self._checkpoint_due(state):
            control.should_save = True
        return control

    def on_save(self, args, state, control, **kwargs):
        self.last_save = time.perf_counter()

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = dict(logs or {})
        if "train_runtime" in logs:  # the summary at the end of `train()`: times only
            return
        record = {"step": state.global_step, "epoch": state.epoch}
        record["lr"] = logs.pop("learning_rate", None)
        record.update({k: v for k, v in logs.items() if k not in _TIMING and k != "epoch"})
        if self.is_main:
            self.run.append_log(record)
        if self.bar is not None:
            loss, reward = record.get("loss", math.nan), record.get("reward", math.nan)
            self.bar.update(state.global_step, f"loss {loss:.4f} reward {reward:.3f} lr {record['lr']:.2e}")
        every = self.config.eval.every
        if every and state.global_step % every == 0:
            self._evaluate_and_log(state.global_step)

    def final_eval(self) -> dict | None:
        """The last step's evaluation (run now unless `--eval-every` already ran it there)."""
        step = self.trainer.state.global_step
        if self.history and self.history[-1]["step"] == step:
            return self.history[-1]["report"]
        if self.config.eval.enabled:
            return self._evaluate_and_log(step)
        return None

    def _evaluate_and_log(self, step: int) -> dict:
        model = self.trainer.accelerator.unwrap_model(self.trainer.model)
        model = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft: adapters active
        report = self._evaluate(model)
        self.history.append({"step": step, "report": report})
        if self.is_main and report:
            self.run.append_log({"step": step, "eval": report})
            for name, entry in report.items():
                self.say(
                    f"eval step {step}: {name} PLCC {entry['plcc']:.4f} SRCC {entry['srcc']:.4f} "
                    f"({entry['unparsed']} of {entry['n']} answers without a number)"
                )
        return report

    def _checkpoint_due(self, state) -> bool:
        every, minutes = self.config.checkpoint.every, self.config.checkpoint.minutes
        step = state.global_step
        due = bool(every and step % every == 0) or step % self.steps_per_epoch == 0 or step == state.max_steps
        if minutes and not due:
            late = time.perf_counter() - self.last_save >= 60.0 * minutes if self.is_main else None
            due = bool(distributed.broadcast_object(late))
        return due


def evaluate_reasoning(backbone: Any, readout: Any, data: Any, batch_size: int) -> dict[str, Any]:
    """The test split answered greedily (`scoring.reasoning.read_reasoning`, as `iqa score` reads): per dataset the
    number of images, of answers without a number, and PLCC/SRCC of the answers' numbers against the published
    MOS. Every rank answers a strided share; rank 0 gets the report."""
    from iqa_cli.images import ImageDecodeError, load_image
    from iqa_cli.metrics import plcc, srcc
    from iqa_cli.scoring.reasoning import read_reasoning

    test = data.test
    env = distributed.env()
    mine = np.arange(env.rank, len(test), env.world_size)
    model = backbone.model
    was_training = model.training
    model.eval()
    found: dict[int, float] = {}
    try:
        for start in range(0, len(mine), batch_size):
            rows, images = [], []
            for i in mine[start : start + batch_size].tolist():
                with contextlib.suppress(ImageDecodeError):  # an unreadable test image is left out
                    images.append(load_image(test.paths[i]))
                    rows.append(i)
            if not images:
                continue
            visual = backbone.collate([backbone.transform(img) for img in images], len(images), torch.float32)
            with torch.no_grad():
                answers = read_reasoning(backbone, visual, readout)
            found.update({i: float(answers.score[j]) for j, i in enumerate(rows)})
    finally:
        model.train(was_training)
    gathered: dict[int, float] = {}
    for part in distributed.all_gather_object(found):
        gathered.update(part)
    if not env.is_main or not gathered:
        return {}
    rows = np.array(sorted(gathered), dtype=np.int64)
    score = np.array([gathered[i] for i in rows])
    report: dict[str, Any] = {}
    for g, meta in enumerate(data.metas):
        pick = test.group[rows] == g
        parsed = pick & np.isfinite(score)
        entry = {"n": int(pick.sum()), "unparsed": int(pick.sum() - parsed.sum()), "plcc": math.nan, "srcc": math.nan}
        if parsed.sum() >= 2:
            mos = test.mos_raw[rows[parsed]]
            entry["plcc"], entry["srcc"] = plcc(score[parsed], mos), srcc(score[parsed], mos)
        if entry["n"]:
            report[meta.name] = entry
    return report
