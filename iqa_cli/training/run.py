"""`train(config)`: validate -> lock --out -> plan (fresh, resume, complete) -> setup -> loop -> finish ->
cleanup. `finish` writes the checkpoint directory that `iqa score --model DIR` loads with no other flag."""

from __future__ import annotations

import gc
import signal
from pathlib import Path
from typing import Any

from iqa_cli import distributed, interrupts, run_lock
from iqa_cli.errors import UserError
from iqa_cli.models import hub
from iqa_cli.paths import resolve_data_dir
from iqa_cli.training import data as train_data
from iqa_cli.training import state as train_state
from iqa_cli.training.config import GRPO, RUN_CONTROL_FIELDS, TrainConfig, validate
from iqa_cli.training.loop import TrainResult, run_training
from iqa_cli.training.session import Session, setup


class TrainInterrupted(interrupts.Interrupted):
    """SIGINT/SIGTERM/SIGHUP stopped the run; its last checkpoint stays, and the same command resumes from it."""

    def __init__(self, signum: int, run: train_state.RunDirectory, is_main: bool = True):
        super().__init__(signum)
        self.is_main = is_main
        name = signal.Signals(signum).name
        checkpoint = run.latest_checkpoint()
        if checkpoint is None:
            self.message = (
                f"interrupted by {name} before the first checkpoint of {run.out}; run the same command to start "
                "again (--save-every N saves every N steps)"
            )
        else:
            step = int(checkpoint.name.split("-")[1])
            self.message = (
                f"interrupted by {name}; the last checkpoint is {checkpoint} (step {step}); run the same command "
                "to resume from it"
            )

    def __str__(self) -> str:
        return self.message


def finish(session: Session, result: TrainResult) -> TrainResult:
    """Writes the model, tokenizer, preprocessor and iqa.json into --out (and --merge's full copy)."""
    config = session.config
    info = train_state.RunRecord(
        method=config.method,
        level_names=list(session.levels.names),
        level_tokens=list(session.levels.tokens),
        prompt=session.levels.prompt,
        input_ids=list(session.levels.input_ids),
        regressor=session.levels.regressor,
        base=session.base,
        layout=config.data.layout,
        steps=session.progress.global_step,
        train=config.to_json(),
        final_eval=result.final_eval,
        base_revision=session.base_revision,
        family=session.backbone.name,
        task=session.data.task(),
        tasks=dict(session.data.tasks),
    )
    merged = train_state.save_final(
        session.run,
        info,
        backbone=session.backbone,
        peft_model=session.peft_model,
        strategy=session.strategy,
        merge=config.checkpoint.merge,
        keep_checkpoints=config.checkpoint.keep,
        dtype=session.autocast_dtype,  # full models trained with bf16 compute are written in bf16
    )
    result.merged = merged
    return result


def cleanup() -> None:
    """Leaves the process group after the model that used it is gone.

    FSDP2's state keeps the group in reference cycles with the module, so the run's objects are freed by a
    collection here, while the interpreter is whole: left to exit, gloo's worker threads were still alive
    during shutdown and a rank could abort ("terminate called without an active exception").
    """
    if distributed.is_initialized():
        gc.collect()
    distributed.destroy()


def train(config: TrainConfig, console: Any = None) -> TrainResult:
    """Runs `iqa train`: setup -> train -> write the checkpoint directory -> cleanup.

    Raises:
        UserError: a bad flag, --out or --datasets, before anything is loaded.
        TrainInterrupted: SIGINT/SIGTERM/SIGHUP (also when started in the background, where SIGINT starts ignored).
    """
    validate(config)
    hub.check_name(config.model.name)  # a missing folder or a file: one line before anything is read
    if config.model.base is not None:
        hub.check_name(config.model.base, what="base model")
    # before --overwrite clears --out
    train_data.check_metas(config.data.datasets, resolve_data_dir(config.data.data_dir))
    if config.method == GRPO:
        from iqa_cli.training.grpo import check

        check(config)
    env = distributed.env()
    session = lock = None
    restore_signals = interrupts.install()
    try:
        distributed.init(distributed.resolve_device(config.control.device, env))
        run = train_state.RunDirectory(Path(config.out))
        quiet = config.control.quiet
        say = None if quiet or console is None else lambda line: console.print(line, markup=False)
        lock = run_lock.acquire(  # one run per --out; under torchrun, one lock for all ranks
            run.out / run_lock.LOCK_NAME,
            command="iqa train",
            target=f"--out {run.out}",
            wait=config.control.wait,
            say=say,
        )
        # Rank 0 decides (fresh, resume, complete, or an error message) before anything heavy is loaded.
        decision = distributed.broadcast_object(
            train_state.plan_run(run, config.to_json(), RUN_CONTROL_FIELDS) if env.is_main else None
        )
        if decision not in ("fresh", "resume", "complete"):
            raise UserError(decision)
        if decision == "complete":
            data = train_data.load_train_data(  # the rows it was trained on are still the prepared ones
                config.data.datasets, resolve_data_dir(config.data.data_dir), images=config.data.images
            )
            train_state.check_same_data(run, data.fingerprint, [m.path for m in data.metas], finished=True)
            return TrainResult(
                out=Path(config.out),
                method=config.method,
                steps=run.completed_steps(),
                steps_this_run=0,
                seconds=0.0,
                samples_per_second=0.0,
                images_per_second=0.0,
                resumed_from=None,
                already_complete=True,
                is_main=env.is_main,
            )
        if config.method == GRPO:  # a reasoning model, through TRL's loop
            from iqa_cli.training.grpo import train_grpo

            return train_grpo(config, decision, console)
        session = setup(config, decision, console)
        result = run_training(session)
        return finish(session, result)
    except interrupts.Interrupted as exc:
        raise TrainInterrupted(exc.signum, train_state.RunDirectory(Path(config.out)), env.is_main) from None
    finally:
        restore_signals()
        if lock is not None:
            lock.release()
        session = None  # the last reference outside cycles: `cleanup` collects the rest
        cleanup()
