"""Checkpoints of a transformers vision-language model: the remote-code and processor checks done before any
weights are read, saving (full weights, or a peft adapter with the trained tensors outside it) and Q-Scorer's
MLP file, and loading a LoRA run by merging it onto its base.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from iqa_cli.constants import RUN_FILE
from iqa_cli.errors import UserError
from iqa_cli.models.backbone import ADAPTER_CONFIG, CONFIG_FILE

REGRESSOR_FILE = "regressor.safetensors"  # Q-Scorer's MLP next to a trained model's weights
REGRESSOR_ATTR = "iqa_regressor"  # its attribute on the model
# What `processor.save_pretrained` writes (processor, image processor, chat template, tokenizer)
PROCESSOR_FILES = (
    "processor_config.json",
    "preprocessor_config.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
)
NON_LORA = "non_lora_trainables.safetensors"  # a LoRA run's trained tensors outside the adapter (vision, lm_head)


class CheckpointMixin:
    """Saving and the regressor file (a mixin of `HFVisionLanguageBackbone`)."""

    def save(self, out: Any, *, state: dict | None = None, dtype: Any = None, processing: bool = True) -> None:
        """A standard transformers checkpoint (`save_pretrained`, so `AutoModelForImageTextToText` loads it
        anywhere), the processor, and Q-Scorer's MLP as its own file."""

        out = Path(out)
        model = self.model
        regressor = self.regressor
        prefix = REGRESSOR_ATTR + "."
        # FSDP2's gathered full state holds the regressor's weights (its own module holds only shards)
        regressor_state = {k.removeprefix(prefix): v for k, v in (state or {}).items() if k.startswith(prefix)}
        if regressor is not None:  # written apart, in float32
            delattr(model, REGRESSOR_ATTR)
        try:
            if dtype is not None:
                model.to(dtype)  # the end of training: written in the dtype it was trained in (the config says it)
            if state is not None:  # float32 master weights: cast as the model is
                state = {
                    k: v.to(dtype) if dtype is not None and v.is_floating_point() else v
                    for k, v in state.items()
                    if not k.startswith(prefix)
                }
            with _quiet_transformers():
                model.save_pretrained(out, state_dict=state)
        finally:
            if regressor is not None:
                setattr(model, REGRESSOR_ATTR, regressor)
        if processing:
            self.processor.save_pretrained(out)
        if regressor is not None:
            _save_regressor(regressor, out, regressor_state or None)

    def save_adapter(self, peft_model: Any, out: Any, base: str | None) -> None:
        """peft's own adapter layout, the trained tensors outside it (vision, projector, resized embeddings), the
        processor and Q-Scorer's MLP."""
        from safetensors.torch import save_file

        out = Path(out)
        peft_model.save_pretrained(str(out))
        config = json.loads((out / ADAPTER_CONFIG).read_text())
        config["base_model_name_or_path"] = base
        (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
        resized = getattr(self.model.config, "score_token_ids", None)
        embeddings = {id(self.model.get_output_embeddings().weight), id(self.model.get_input_embeddings().weight)}
        prefix = "base_model.model."
        non_lora = {
            name.removeprefix(prefix): p.detach().cpu().contiguous()
            for name, p in peft_model.named_parameters()
            if "lora_" not in name
            and not name.removeprefix(prefix).startswith(REGRESSOR_ATTR + ".")
            and (p.requires_grad or (resized and id(p) in embeddings))
        }
        save_file(non_lora, str(out / NON_LORA), metadata={"format": "pt"})
        self.model.config.save_pretrained(out)
        self.processor.save_pretrained(out)
        regressor = self.regressor
        if regressor is not None:
            _save_regressor(regressor, out)

    def load_regressor(self, directory: Path) -> None:
        from safetensors import safe_open

        with safe_open(str(directory / REGRESSOR_FILE), framework="pt") as f:
            dims = [int(d) for d in (f.metadata() or {}).get("hidden_dims", "").split(",") if d]
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        self.add_regressor(dims)
        self.regressor.load_state_dict(tensors)

    processing_files = (*PROCESSOR_FILES, REGRESSOR_FILE)


def _check_config(model: str | Path, revision: str | None) -> None:
    """A checkpoint whose config or processor points at remote code is refused (iqa never runs it)."""
    import json

    from iqa_cli.models.hub import cached_file

    path = Path(model).expanduser()
    for name in (CONFIG_FILE, "processor_config.json", "preprocessor_config.json"):
        file = path / name if path.is_dir() else cached_file(str(model), name, revision)
        if file is None or not file.is_file():
            continue
        try:
            data = json.loads(file.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise UserError(f"{file}: not readable JSON ({exc})") from None
        if isinstance(data, dict) and "auto_map" in data:
            raise UserError(
                f"{file}: the checkpoint needs remote code (auto_map {sorted(data['auto_map'])});"
                " iqa loads only transformers' own classes"
            )


def _check_processor(processor: Any, source: str) -> None:
    if getattr(processor, "chat_template", None) is None:
        raise UserError(
            f"{source}: the processor has no chat template (chat_template.jinja or chat_template in"
            " processor_config.json); iqa renders its prompt with it"
        )
    if not hasattr(processor, "image_token") or not hasattr(processor, "image_processor"):
        raise UserError(f"{source}: {type(processor).__name__} is not an image-and-text processor")


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No progress bars or warnings from transformers while loading: stderr keeps iqa's one-line messages."""
    from transformers.utils import logging as hf_logging

    bars, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _trained_pixels(run_dir: Path) -> tuple[int | None, int | None]:
    """The --min-pixels / --max-pixels an `iqa train` run was trained with (its iqa.json), if any."""
    file = run_dir / RUN_FILE
    if not file.is_file():
        return None, None
    train = json.loads(file.read_text()).get("train") or {}
    return train.get("min_pixels"), train.get("max_pixels")


def _adapter_base(run_dir: Path) -> str:
    """The full model a LoRA run applies to: its iqa.json `base`, else the adapter config's."""
    for name, key in ((RUN_FILE, "base"), (ADAPTER_CONFIG, "base_model_name_or_path")):
        file = run_dir / name
        if file.is_file():
            value = json.loads(file.read_text()).get(key)
            if value:
                return str(value)
    raise UserError(f"{run_dir}: a LoRA adapter that names no base model; pass --base")


def _merge_adapter(model: Any, processor: Any, run_dir: Path) -> Any:
    """The base with the run's LoRA merged in and its trained non-LoRA tensors (vision, projector, resized
    embeddings) loaded: the same weights the run ended with."""
    from peft import PeftModel
    from safetensors.torch import load_file

    if len(processor.tokenizer) > model.get_output_embeddings().weight.shape[0]:  # Q-Scorer's added tokens
        model.resize_token_embeddings(len(processor.tokenizer))
    with _quiet_transformers():
        model = PeftModel.from_pretrained(model, str(run_dir)).merge_and_unload()
    if (run_dir / NON_LORA).is_file():
        missing = set(load_file(str(run_dir / NON_LORA))) - set(model.state_dict())
        if missing:
            raise UserError(f"{run_dir / NON_LORA}: tensors the model does not have: {sorted(missing)[:3]}")
        model.load_state_dict(load_file(str(run_dir / NON_LORA)), strict=False)
    return model


OUTPUT_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "model-*-of-*.safetensors",
    ADAPTER_CONFIG,
    "adapter_model.safetensors",
    "README.md",  # peft's model card of an adapter
    NON_LORA,
    REGRESSOR_FILE,
    *PROCESSOR_FILES,
)


def _save_regressor(regressor: Any, out: Path, state: dict | None = None) -> None:
    """Q-Scorer's MLP as `regressor.safetensors` (float32), its widths in the metadata for `load_regressor`;
    `state`: its gathered full weights (FSDP2) instead of the module's own."""
    from safetensors.torch import save_file

    state = state if state is not None else regressor.state_dict()
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in state.items()}
    save_file(tensors, str(out / REGRESSOR_FILE), metadata={"hidden_dims": ",".join(map(str, regressor.hidden_dims))})
