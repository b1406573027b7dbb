"""Tiny mPLUG-Owl2 models and checkpoints written in the released on-disk layouts, for tests of every team.

    config = tiny_config()                       # MPLUGOwl2Config "mplug-owl2-tiny" (+ overrides)
    model = tiny_model(seed=0)                   # random weights that exercise every code path
    ckpt = write_checkpoint(model, tmp_path / "m", fmt="bin", shards=2)
    ckpt = write_checkpoint(qscorer_model, tmp_path / "q", layout="qscorer_lora", tokenizer_dir=tok)
    load_mplug_owl2(ckpt.path, base=ckpt.base)

The files are written with safetensors/torch directly (not through iqa_cli's loader or saver), under the
key names and file names the released checkpoints use. `tiny_config` and `tiny_model` are
`iqa_cli.models.mplug_owl2.tiny`'s (what `iqa demo` trains).
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from iqa_cli.models.mplug_owl2.config import MPLUGOwl2Config
from iqa_cli.models.mplug_owl2.model import MPLUGOwl2ForCausalLM
from iqa_cli.models.mplug_owl2.tiny import released_preprocessor_config
from iqa_cli.models.mplug_owl2.tiny import tiny_config as tiny_config  # re-exported for the tests
from iqa_cli.models.mplug_owl2.tiny import tiny_model as tiny_model

PEFT_PREFIX = "base_model.model."
LORA_TARGETS = ("self_attn.q_proj", "self_attn.v_proj.multiway.1")  # the reference's find_all_lora_names
N_SCORE_TOKENS = 5


def random_pixels(batch: int, config: MPLUGOwl2Config, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    side = config.vision.image_size
    return torch.randn(batch, config.vision.num_channels, side, side, generator=gen)


@dataclass
class WrittenCheckpoint:
    path: Path  # what to pass as `model`
    base: Path | None = None  # what to pass as `base` (LoRA layouts)
    adapter: dict[str, torch.Tensor] = field(default_factory=dict)  # the LoRA tensors written
    scale: float = 1.0  # lora_alpha / r


def write_checkpoint(
    model: MPLUGOwl2ForCausalLM,
    directory: str | Path,
    *,
    fmt: str = "safetensors",
    shards: int = 1,
    layout: str = "full",
    tokenizer_dir: str | Path | None = None,
    pos_embeds: bool = True,
    adapter_fmt: str = "bin",
    lora_r: int = 4,
    lora_alpha: float = 8.0,
    deepmlp_in_config: bool = True,
    preprocessor: bool = True,
    seed: int = 1,
) -> WrittenCheckpoint:
    """Writes `model` in a released layout.

    - "full": config.json + weights (`fmt` "safetensors"/"bin", `shards` files with an index when > 1).
    - "lora" (DeQA-Score-LoRA-Mix3): `directory` gets config.json, adapter_config.json, adapter_model.bin
      (random lora_A and nonzero lora_B on q_proj and v_proj.multiway.1 of every layer) and
      non_lora_trainables.bin (vision model + abstractor = `model`'s); the base goes to `<directory>-base`
      with `model`'s LLM weights and *perturbed* vision/abstractor weights, so the override matters.
      Loading gives `model` plus the merged LoRA update.
    - "qscorer_lora" (Qscorer_lora_5_1): as "lora", but `model` must have 5 more vocab rows than its base
      and a regressor; the base drops the last 5 rows and `deepmlp`; non_lora_trainables.bin holds every
      non-LoRA parameter (peft `base_layer` names for the LoRA targets), embeddings and LM head resized.
    `pos_embeds=False` leaves the abstractor's sin-cos buffers out of the files; `tokenizer_dir`'s files
    are copied next to the weights (the base's, for LoRA layouts).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if not pos_embeds:
        state = {k: v for k, v in state.items() if not k.endswith(("q_pos_embed", "k_pos_embed"))}
    config = model.config.to_hf_dict()
    if layout == "full":
        _write_full(directory, config, state, fmt, shards)
        _copy_extras(directory, model.config, tokenizer_dir, preprocessor)
        return WrittenCheckpoint(path=directory)
    if layout not in ("lora", "qscorer_lora"):
        raise ValueError(f"unknown layout {layout!r}")

    qscorer = layout == "qscorer_lora"
    gen = torch.Generator().manual_seed(seed)
    base_dir = directory.with_name(directory.name + "-base")
    base_dir.mkdir(parents=True, exist_ok=True)
    visual = ("model.vision_model.", "model.visual_abstractor.")
    base_state = {}
    for key, value in state.items():
        if key.startswith(visual) and value.is_floating_point() and not key.endswith("pos_embed"):
            value = value + 0.3 * torch.randn(value.shape, generator=gen)
        base_state[key] = value
    base_config = json.loads(json.dumps(config))
    if qscorer:
        if model.deepmlp is None:
            raise ValueError("qscorer_lora needs a model with deepmlp_hidden_dims")
        vocab = model.config.language.vocab_size - N_SCORE_TOKENS
        base_state = {k: v for k, v in base_state.items() if not k.startswith("deepmlp.")}
        for key in ("model.embed_tokens.weight", "lm_head.weight"):
            base_state[key] = base_state[key][:vocab].clone()
        base_config["vocab_size"] = vocab
        base_config.pop("deepmlp_hidden_dims", None)
        base_config.pop("score_token_id", None)
    _write_full(base_dir, base_config, base_state, fmt, shards)
    _copy_extras(base_dir, model.config, tokenizer_dir, preprocessor)

    # The run's config.json (Q-Scorer's records vocab 32005 and an empty score_token_id).
    run_config = json.loads(json.dumps(config))
    if qscorer:
        run_config["score_token_id"] = []
        if not deepmlp_in_config:
            run_config.pop("deepmlp_hidden_dims", None)
    (directory / "config.json").write_text(json.dumps(run_config, indent=2), encoding="utf-8")

    lm = model.config.language
    targets = [f"model.layers.{i}.{t}" for i in range(lm.num_hidden_layers) for t in LORA_TARGETS]
    adapter = {}
    for module in targets:
        out_features, in_features = state[f"{module}.weight"].shape
        adapter[f"{PEFT_PREFIX}{module}.lora_A.weight"] = torch.randn(lora_r, in_features, generator=gen) / math.sqrt(
            in_features
        )
        adapter[f"{PEFT_PREFIX}{module}.lora_B.weight"] = 0.1 * torch.randn(out_features, lora_r, generator=gen)
    adapter_config = {
        "alpha_pattern": {},
        "auto_mapping": None,
        "base_model_name_or_path": "/xxx/mplug-owl2-llama2-7b",  # the authors' machine, as released
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "layers_pattern": None,
        "layers_to_transform": None,
        "lora_alpha": lora_alpha,
        "lora_dropout": 0.05,
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": lora_r,
        "rank_pattern": {},
        "revision": None,
        "target_modules": targets,
        "task_type": "CAUSAL_LM",
    }
    (directory / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2), encoding="utf-8")
    if adapter_fmt == "bin":
        torch.save(adapter, directory / "adapter_model.bin")
    else:
        from safetensors.torch import save_file

        save_file(adapter, str(directory / "adapter_model.safetensors"))

    params = dict(model.named_parameters())
    if qscorer:  # every non-LoRA parameter, LoRA-wrapped Linears under peft's `base_layer` name
        non_lora = {}
        for key, value in params.items():
            module = key.rsplit(".", 1)[0]
            if module in targets:
                key = f"{module}.base_layer.{key.rsplit('.', 1)[1]}"
            non_lora[PEFT_PREFIX + key] = value.detach().clone()
    else:  # what requires_grad selected in the DeQA-Score run: vision model and abstractor
        non_lora = {PEFT_PREFIX + k: v.detach().clone() for k, v in params.items() if k.startswith(visual)}
    torch.save(non_lora, directory / "non_lora_trainables.bin")
    return WrittenCheckpoint(path=directory, base=base_dir, adapter=adapter, scale=lora_alpha / lora_r)


def _write_full(directory: Path, config: dict, state: dict[str, torch.Tensor], fmt: str, shards: int) -> None:
    (directory / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    keys = list(state)
    groups = [keys[i::shards] for i in range(shards)]  # interleaved, so every shard mixes parts
    if fmt == "safetensors":
        from safetensors.torch import save_file

        def write(names: list[str], path: Path) -> None:
            save_file({k: state[k] for k in names}, str(path), metadata={"format": "pt"})

        single, pattern, index_name = (
            "model.safetensors",
            "model-{:05d}-of-{:05d}.safetensors",
            "model.safetensors.index.json",
        )
    elif fmt == "bin":

        def write(names: list[str], path: Path) -> None:
            torch.save({k: state[k] for k in names}, path)

        single, pattern, index_name = (
            "pytorch_model.bin",
            "pytorch_model-{:05d}-of-{:05d}.bin",
            "pytorch_model.bin.index.json",
        )
    else:
        raise ValueError(f"unknown format {fmt!r}")
    if shards == 1:
        write(keys, directory / single)
        return
    weight_map = {}
    for i, names in enumerate(groups, start=1):
        name = pattern.format(i, shards)
        write(names, directory / name)
        weight_map.update(dict.fromkeys(names, name))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / index_name).write_text(json.dumps(index, indent=2), encoding="utf-8")


def _copy_extras(
    directory: Path, config: MPLUGOwl2Config, tokenizer_dir: str | Path | None, preprocessor: bool
) -> None:
    if tokenizer_dir is not None:
        for f in Path(tokenizer_dir).iterdir():
            if f.is_file():
                shutil.copy(f, directory / f.name)
    if preprocessor and not (directory / "preprocessor_config.json").exists():
        clip = released_preprocessor_config(config.vision.image_size)
        (directory / "preprocessor_config.json").write_text(json.dumps(clip, indent=2), encoding="utf-8")
