"""`iqa train --method grpo`: a reasoning quality model trained with TRL's `GRPOTrainer` (Q-Insight, VisualQuality-R1).

The same run as the other methods, from the outside: the prepared metas' train rows (`--data-weights` repeats), the
run directory (`train_config.json`, `train_log.jsonl`, resumable checkpoints under `checkpoints/`, then a standard
transformers checkpoint + `iqa.json` that records the reasoning preset, so `iqa score --model OUT` needs no flag),
evaluation on the test split (SRCC/PLCC of the greedy answers, as `iqa score` reads them), resume by running the same
command. Inside, TRL does the reinforcement learning: for every image it samples `--num-generations` answers to the
preset's conversation, scores them with the rewards (`training.rewards`), and optimizes the clipped GRPO objective
with a KL term against the initial model.

What this module sets for TRL (its defaults differ from the recipes'): the per-sequence token mean ("grpo" loss),
rewards scaled by each group's std, the plain KL estimator (no importance-sampling correction), one optimization pass
per generation, a linear learning-rate decay, float32 on the CPU and bf16 mixed precision on CUDA. The epoch order is
a pure function of (seed, epoch) and TRL's checkpoints keep the RNG, so a resumed run is the uninterrupted one.

`--batch-size` counts images per optimizer step over all ranks, each with its group of answers (TRL counts answers).
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PrinterCallback

from iqa_cli import distributed
from iqa_cli.errors import UserError
from iqa_cli.paths import resolve_data_dir
from iqa_cli.reasoning import DIGITS, ReasoningPreset, preset
from iqa_cli.training import data as train_data
from iqa_cli.training import rewards
from iqa_cli.training import state as train_state
from iqa_cli.training.config import TrainConfig
from iqa_cli.training.grpo_loop import IqaGRPOTrainer, RunCallback, evaluate_reasoning
from iqa_cli.training.loop import TrainResult


@dataclass
class ReasoningRunRecord(train_state.RunRecord):
    """`iqa.json` of a GRPO run: the scoring contract is the reasoning preset and its generation budget."""

    reasoning: dict = field(default_factory=dict)


@dataclass(frozen=True)
class BatchShape:
    """How `--batch-size` images per step become TRL's per-device batch of answers."""

    images_per_step: int
    generations: int
    world: int
    accumulation: int

    @property
    def per_device(self) -> int:
        """Answers per device per micro batch (TRL's `per_device_train_batch_size`)."""
        return self.images_per_step * self.generations // (self.world * self.accumulation)

    def check(self, reward: str) -> None:
        b, g, w, a = self.images_per_step, self.generations, self.world, self.accumulation
        if (b * g) % (w * a):
            raise UserError(
                f"--batch-size {b} images x --num-generations {g} answers do not split over {w} rank(s) x "
                f"--grad-accum {a}; choose a batch size whose answers divide evenly"
            )
        if b % w:
            raise UserError(f"--batch-size {b} is not a multiple of the {w} ranks: each rank scores whole groups")
        if reward == "fidelity" and b // w < 2:
            raise UserError(
                f"--reward fidelity compares each image with the others of a rank's batch: --batch-size {b} gives "
                f"{b // w} per rank; use at least {2 * w}"
            )


def train_grpo(config: TrainConfig, decision: str, console: Any = None) -> TrainResult:
    """Runs a GRPO training into `config.out` ("fresh" or "resume") and writes the final model."""
    env = distributed.env()
    device = distributed.resolve_device(config.control.device, env)
    run = train_state.RunDirectory(Path(config.out))
    grpo = config.grpo
    recipe = preset(grpo.preset)
    shape = check(config)
    data = train_data.load_train_data(
        config.data.datasets, resolve_data_dir(config.data.data_dir), images=config.data.images, seed=config.optim.seed
    )
    if decision == "resume":  # the sampler continues where it stopped, which only means something on the same rows
        train_state.check_same_data(run, data.fingerprint, [m.path for m in data.metas], finished=False)
    pool = train_data.weighted_rows(data.train.group, config.data.repeats or [1] * len(data.metas))
    if len(pool) < config.optim.batch_size:
        raise UserError(f"--batch-size {config.optim.batch_size} is larger than the {len(pool)} training images")
    say = _logger(config, console, env)
    backbone = _load(config, device)
    readout = _readout(backbone, recipe, grpo.max_completion_length)
    if env.is_main and decision == "fresh":
        run.start({**config.to_json(), "data_fingerprint": data.fingerprint})
    callback = RunCallback(
        config,
        run,
        steps_per_epoch=len(pool) // config.optim.batch_size,  # TRL's sampler drops the last partial batch
        evaluate=lambda model: _evaluate(config, data, backbone, readout, model),
        say=say,
        console=console,
    )
    with _quiet():
        trainer = IqaGRPOTrainer(
            model=backbone.model,
            reward_funcs=reward_functions(recipe, grpo.reward, grpo.threshold, grpo.num_generations, config.optim.seed),
            args=trl_arguments(config, run, device, shape),
            train_dataset=train_dataset(data.train, pool, recipe, config.optim.seed, say),
            processing_class=backbone.processor,
            peft_config=_lora(config, backbone),
            callbacks=[callback],
        )
    trainer.remove_callback(PrinterCallback)  # the run's log and progress bar are `RunCallback`'s
    callback.trainer = trainer
    resume_from = None
    if decision == "resume":
        resume_from = str(_usable_checkpoint(run))
        if env.is_main:
            step = int(Path(resume_from).name.split("-")[1])
            run.truncate_log(step)
            say(f"resuming {run.out} from step {step}")
    started = time.perf_counter()
    with callback.progress(), _quiet():
        trainer.train(resume_from_checkpoint=resume_from)
    seconds = time.perf_counter() - started
    steps = trainer.state.global_step
    steps_this_run = steps - (callback.resumed_from or 0)
    final_eval = callback.final_eval()
    result = TrainResult(
        out=Path(config.out),
        method=config.method,
        steps=steps,
        steps_this_run=steps_this_run,
        seconds=seconds,
        samples_per_second=steps_this_run * config.optim.batch_size / seconds if seconds > 0 else 0.0,
        images_per_second=steps_this_run * config.optim.batch_size / seconds if seconds > 0 else 0.0,
        resumed_from=callback.resumed_from,
        final_eval=final_eval,
        is_main=env.is_main,
    )
    with _quiet():
        result.merged = _finish(config, trainer, backbone, readout, steps, final_eval, device)
    return result


def check(config: TrainConfig) -> BatchShape:
    """What can be told before the run folder or the model are touched: the batch's shape and the model's family."""
    shape = BatchShape(
        config.optim.batch_size, config.grpo.num_generations, distributed.env().world_size, config.optim.grad_accum
    )
    shape.check(config.grpo.reward)
    _check_images_of_quality(config)
    _check_family(config)
    return shape


def _check_images_of_quality(config: TrainConfig) -> None:
    """The presets ask about the quality of a picture, and `iqa score` asks a reasoning model nothing else: a meta of
    another task (AVA's aesthetics) or with videos is refused from its metadata and image names, before the model
    loads, rather than trained with the wrong question or failing at its first batch."""
    import pyarrow.parquet as pq

    from iqa_cli.tasks import DEFAULT_TASK
    from iqa_cli.training.objectives import OBJECTIVES
    from iqa_cli.video import is_video_name

    for name in config.data.datasets:
        path = train_data.resolve_meta(name, resolve_data_dir(config.data.data_dir))
        metadata = pq.read_schema(path).metadata or {}
        task = (metadata.get(b"task") or DEFAULT_TASK.encode()).decode()
        if task != DEFAULT_TASK:
            raise UserError(
                f"{path}: task {task}; --method grpo asks its presets' question about image quality (train {task} "
                f"with --method {', '.join(OBJECTIVES)})"
            )
        videos = [v for v in pq.read_table(path, columns=["image"]).column("image").to_pylist() if is_video_name(v)]
        if videos:
            raise UserError(f"{path}: {videos[0]} is a video; --method grpo trains on images")


def _check_family(config: TrainConfig) -> None:
    """GRPO needs text generation: the transformers families (`models/hf_vlm`), checked before the weights load."""
    from iqa_cli.models.backbone import family_of
    from iqa_cli.models.hf_vlm import IMAGE_TOKENS

    model_type, _ = family_of(config.model.name, base=config.model.base)
    if model_type not in IMAGE_TOKENS:
        raise UserError(
            f"--method grpo trains the transformers families ({', '.join(IMAGE_TOKENS)}); {config.model.name} is "
            f"{model_type}"
        )


def _load(config: TrainConfig, device: torch.device) -> Any:
    """The family's backbone, its processor set up as TRL needs it (left padding, the run's pixel budget as the image
    processor's default, so TRL's own processor calls make the images `iqa score` makes). Float32 weights (bf16
    autocast on CUDA), but a LoRA run's frozen weights are bf16 on CUDA (peft keeps the adapters in float32)."""
    from iqa_cli.models.backbone import load_backbone

    dtype = torch.bfloat16 if device.type == "cuda" and config.lora.enabled else torch.float32
    backbone = load_backbone(
        config.model.name, base=config.model.base, dtype=dtype, device=device, **config.model.options
    )
    if backbone.provenance.layout != "full":
        raise UserError(f"--model {config.model.name} is a LoRA adapter; train GRPO on a full model (merge it first)")
    backbone.tokenizer.padding_side = "left"
    size = backbone.images_kwargs.get("size")
    if size:
        backbone.processor.image_processor.size = dict(size)
    if not config.lora.enabled:
        groups = backbone.trainable_groups()
        frozen = (groups["vision"] if config.model.freeze_vision else []) + (
            groups["projector"] if config.model.freeze_abstractor else []
        )
        for p in frozen + groups["unused"]:
            p.requires_grad_(False)
    return backbone


def _readout(backbone: Any, recipe: ReasoningPreset, max_new_tokens: int) -> Any:
    from iqa_cli.scoring.reasoning import build_reasoning_readout

    return build_reasoning_readout(backbone, recipe, max_new_tokens)


def _lora(config: TrainConfig, backbone: Any) -> Any:
    """peft's LoRA on the language model's linear layers (TRL wraps the model; everything else stays frozen, and the
    reference model is the base with the adapters off)."""
    if not config.lora.enabled:
        return None
    from peft import LoraConfig

    targets = backbone.lora_target_modules(config.lora.targets or backbone.lora_targets)
    if not targets:
        raise UserError(f"--lora-targets {config.lora.targets}: no linear layer of the language model matches")
    return LoraConfig(
        r=config.lora.r, lora_alpha=config.lora.alpha, lora_dropout=config.lora.dropout, target_modules=targets
    )


def train_dataset(
    rows: train_data.Rows,
    pool: np.ndarray,
    recipe: ReasoningPreset,
    seed: int = 0,
    say: Callable[[str], None] | None = None,
) -> Any:
    """The train rows as a `datasets.Dataset` whose items are TRL's: the conversation (`prompt`), the image (decoded
    when the item is read) and the normalized MOS the rewards compare with.

    An image that does not decode is left out as the other methods leave it out, with one warning naming it: its
    place is taken by another row of the pool, drawn from (seed, row), so each of its group's answers sees the same
    image and a resumed run the same rows, and the batch keeps its shape (TRL's groups and the fidelity reward)."""
    from datasets import Dataset

    from iqa_cli.images import ImageDecodeError, load_image

    messages = recipe.messages()
    dataset = Dataset.from_dict({"row": pool.tolist()})
    warned: set[str] = set()

    def substitutes(row: int) -> Iterator[int]:
        yield row
        yield from np.random.default_rng([seed, row]).permutation(pool).tolist()  # drawn only when `row` fails

    def decoded(row: int) -> tuple[Any, int]:
        for candidate in substitutes(row):
            path = rows.paths[candidate]
            try:
                return load_image(path), candidate
            except ImageDecodeError as exc:
                if path not in warned and say is not None:
                    say(f"warning: skipped an image that cannot be decoded: {path} ({exc.reason})")
                warned.add(path)
        raise UserError(f"no training image decodes (the first tried: {rows.paths[row]}); check the image files")

    def read(batch: dict[str, list]) -> dict[str, list]:
        images, taken = zip(*(decoded(int(row)) for row in batch["row"]), strict=True)
        n = len(images)
        return {"prompt": [messages] * n, "image": list(images), "mos": rows.mos[list(taken)].astype(float).tolist(),
                "row": list(taken)}  # fmt: skip

    fingerprint = logging.getLogger("datasets.fingerprint")  # `read` holds the logger, which datasets cannot hash:
    level = fingerprint.level  # its random fingerprint is right (nothing is cached), and no warning's business
    fingerprint.setLevel(logging.ERROR)
    try:
        dataset.set_transform(read)
    finally:
        fingerprint.setLevel(level)
    return dataset


def reward_functions(recipe: ReasoningPreset, reward: str, threshold: float, group: int, seed: int) -> list:
    """TRL reward functions (their names are the log's `rewards/<name>/mean`): the score reward, then the format's."""

    def threshold_reward(completions, mos, **_):
        values = rewards.answer_values([c[0]["content"] for c in completions], recipe)
        return rewards.threshold_rewards(values, mos, threshold)

    def fidelity_reward(completions, mos, trainer_state, **_):
        values = rewards.answer_values([c[0]["content"] for c in completions], recipe)
        rng = np.random.default_rng([seed, trainer_state.global_step, distributed.env().rank])
        return rewards.fidelity_rewards(rewards.fill_unparsed(values, rng), mos, group)

    def format_reward(completions, **_):
        return rewards.format_rewards([c[0]["content"] for c in completions], recipe)

    threshold_reward.__name__, fidelity_reward.__name__, format_reward.__name__ = "threshold", "fidelity", "format"
    return [threshold_reward if reward == "threshold" else fidelity_reward, format_reward]


def trl_arguments(config: TrainConfig, run: train_state.RunDirectory, device: torch.device, shape: BatchShape) -> Any:
    """TRL's `GRPOConfig` for this run (checkpoints are written when `RunCallback` says)."""
    import trl

    grpo, optim = config.grpo, config.optim
    return trl.GRPOConfig(
        output_dir=str(run.checkpoints),
        per_device_train_batch_size=shape.per_device,
        gradient_accumulation_steps=optim.grad_accum,
        num_train_epochs=optim.epochs,
        max_steps=optim.max_steps or -1,
        learning_rate=optim.lr,
        lr_scheduler_type="linear",
        warmup_steps=optim.warmup_ratio,
        weight_decay=optim.weight_decay,
        max_grad_norm=optim.max_grad_norm,
        seed=optim.seed,
        bf16=device.type == "cuda",
        use_cpu=device.type == "cpu",
        gradient_checkpointing=config.model.gradient_checkpointing,
        dataloader_num_workers=config.control.workers or 0,
        remove_unused_columns=False,
        ddp_find_unused_parameters=False,  # `_load` froze what the forward leaves unused; no search, no warning
        logging_steps=1,
        report_to=[],
        disable_tqdm=True,
        save_strategy="no",
        save_total_limit=1,
        num_generations=grpo.num_generations,
        max_completion_length=grpo.max_completion_length,
        temperature=grpo.temperature,
        top_k=grpo.top_k,
        top_p=1.0,
        beta=grpo.beta,
        loss_type="grpo",
        scale_rewards="group",
        use_bias_correction_kl=False,
        reward_weights=[grpo.w_reward, grpo.w_format],
    )


def _usable_checkpoint(run: train_state.RunDirectory) -> Path:
    """The newest complete TRL checkpoint; folders a kill cut short (no trainer state that parses) are removed."""
    import shutil

    found = run.latest_checkpoint()
    for folder in run.checkpoints.glob("checkpoint-*"):
        if folder != found and not train_state.checkpoint_complete(folder):
            shutil.rmtree(folder, ignore_errors=True)
    return found


def _evaluate(config: TrainConfig, data: train_data.TrainData, backbone: Any, readout: Any, model: Any) -> dict:
    """The test split answered greedily by the model being trained (peft's adapters active), as `iqa score` reads."""
    view = type(backbone)(
        model, backbone.processor, provenance=backbone.provenance, images_kwargs=backbone.images_kwargs,
        source=backbone.source,
    )  # fmt: skip
    return evaluate_reasoning(view, readout, data, config.eval.batch_size)


def _finish(
    config: TrainConfig,
    trainer: Any,
    backbone: Any,
    readout: Any,
    steps: int,
    final_eval: dict | None,
    device: torch.device,
) -> Path | None:
    """The model as a standard transformers checkpoint (or the LoRA adapter) and `iqa.json`."""
    from peft import PeftModel

    model = trainer.accelerator.unwrap_model(trainer.model)
    peft_model = model if isinstance(model, PeftModel) else None
    provenance = backbone.provenance
    record = ReasoningRunRecord(
        method=config.method,
        level_names=list(DIGITS),
        level_tokens=[],
        prompt=readout.prompt,
        input_ids=list(readout.input_ids),
        regressor=None,
        base=provenance.model if peft_model is not None else None,
        layout="reference",
        steps=steps,
        train=config.to_json(),
        final_eval=final_eval,
        base_revision=(provenance.revision or None) if peft_model is not None else None,
        family=backbone.name,
        reasoning={"preset": readout.preset.name, "max_new_tokens": readout.max_new_tokens},
    )
    return train_state.save_final(
        train_state.RunDirectory(Path(config.out)),
        record,
        backbone=backbone,
        peft_model=peft_model,
        strategy="single",
        merge=config.checkpoint.merge,
        keep_checkpoints=config.checkpoint.keep,
        dtype=torch.bfloat16 if device.type == "cuda" and peft_model is None else None,
    )


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """transformers' progress bars and info lines (saving shards), and its FutureWarnings about the names TRL uses
    (`gradient_checkpointing`), kept off stderr: the run says what it does in its own lines."""
    from iqa_cli.models.hf_vlm.checkpoints import _quiet_transformers

    with _quiet_transformers(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        yield


def _logger(config: TrainConfig, console: Any, env: distributed.DistEnv):
    import sys

    def say(line: str) -> None:
        if env.is_main and not config.control.quiet:
            if console is not None:
                console.print(line, markup=False, soft_wrap=True)
            else:
                print(line, file=sys.stderr)

    return say
