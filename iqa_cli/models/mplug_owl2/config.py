"""Configuration of the mPLUG-Owl2 backbone, read and written in the released `config.json` key names.

The released file is a flat LLaMA config (`hidden_size`, `num_hidden_layers`, ...) with
`model_type: "mplug_owl2"` and a nested `visual_config` holding `visual_model` (the ViT) and
`visual_abstractor`. Field names below are those key names, so the mapping is one to one; every key we
do not model (generation defaults, training flags such as `level_ids`, `id2label`, ...) is kept in
`extra` and written back unchanged.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from iqa_cli.errors import UserError
from iqa_cli.models.backbone import CONFIG_FILE

MODEL_TYPE = "mplug_owl2"


@dataclass
class VisionConfig:
    """CLIP-style ViT (`visual_config.visual_model`)."""

    hidden_size: int = 1024  # width of the patch tokens
    intermediate_size: int = 4096  # width of the QuickGELU MLP
    num_hidden_layers: int = 24  # encoder layers
    num_attention_heads: int = 16  # heads of the fused query_key_value attention
    num_channels: int = 3  # input image channels
    image_size: int = 448  # square input side in pixels
    patch_size: int = 14  # side of a patch (and stride of the patch conv)
    layer_norm_eps: float = 1e-6  # eps of every LayerNorm in the ViT
    hidden_act: str = "quick_gelu"  # MLP activation; only quick_gelu exists in the released models
    extra: dict[str, Any] = field(default_factory=dict)  # unknown keys, kept for the round trip

    @property
    def grid_size(self) -> int:
        """Patches per image side."""
        return self.image_size // self.patch_size

    @property
    def num_positions(self) -> int:
        """Patch tokens plus the cls token."""
        return self.grid_size**2 + 1


@dataclass
class AbstractorConfig:
    """Visual abstractor (`visual_config.visual_abstractor`): learnable queries cross-attending to the ViT."""

    num_learnable_queries: int = 64  # query tokens; the LLM sees these plus one `vit_eos` token
    hidden_size: int = 1024  # width of the queries (must equal the ViT width: keys are [queries; patches])
    num_hidden_layers: int = 6  # cross-attention layers
    num_attention_heads: int = 16  # heads of the cross-attention
    intermediate_size: int = 2816  # width of the SwiGLU MLP (w1/w3 -> ffn_ln -> w2)
    layer_norm_eps: float = 1e-6  # eps of `ffn_ln` only; norm1/normk/norm2 use torch's default 1e-5
    encoder_hidden_size: int = 1024  # width of the ViT tokens fed to key/value
    grid_size: int = 32  # side of the 2-D sin-cos key position table (patches per image side)
    extra: dict[str, Any] = field(default_factory=dict)  # unknown keys, kept for the round trip


@dataclass
class LanguageModelConfig:
    """Modality-adaptive LLaMA-2 decoder (the top-level keys of the released config)."""

    vocab_size: int = 32000  # rows of embed_tokens and lm_head (32005 for Q-Scorer)
    hidden_size: int = 4096  # model width
    intermediate_size: int = 11008  # width of the SwiGLU MLP
    num_hidden_layers: int = 32  # decoder layers
    num_attention_heads: int = 32  # query heads
    num_key_value_heads: int = 32  # key/value heads (== query heads in LLaMA-2-7B)
    max_position_embeddings: int = 2048  # context the model was trained for (informational)
    rms_norm_eps: float = 1e-6  # eps of every RMSNorm
    rope_theta: float = 10000.0  # RoPE base period
    rope_scaling: dict[str, Any] | None = None  # None, or {"type": "linear", "factor": f}
    attention_bias: bool = False  # bias on q/k/v/o projections
    hidden_act: str = "silu"  # MLP activation; only silu exists in LLaMA
    tie_word_embeddings: bool = False  # lm_head shares embed_tokens (False for LLaMA-2)

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.hidden_size // self.num_attention_heads


@dataclass
class MPLUGOwl2Config:
    """The whole model: ViT + abstractor + multiway LLaMA (+ the Q-Scorer regressor when configured)."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    abstractor: AbstractorConfig = field(default_factory=AbstractorConfig)
    language: LanguageModelConfig = field(default_factory=LanguageModelConfig)
    deepmlp_hidden_dims: list[int] | None = None  # Q-Scorer MLP hidden sizes; None means no regressor
    score_token_id: list[int] = field(default_factory=list)  # Q-Scorer score token ids as the config records them
    extra: dict[str, Any] = field(default_factory=dict)  # unknown top-level keys, kept for the round trip
    visual_extra: dict[str, Any] = field(default_factory=dict)  # unknown keys inside `visual_config`

    @property
    def num_visual_tokens(self) -> int:
        """Tokens one image occupies in the LLM sequence: the abstractor's queries plus `vit_eos`."""
        return self.abstractor.num_learnable_queries + 1

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> MPLUGOwl2Config:
        """A named size: "mplug-owl2-7b" (the released models) or "mplug-owl2-tiny" (tests)."""
        if name not in _NAMED:
            raise UserError(f"unknown model size {name!r}; known: {', '.join(sorted(_NAMED))}")
        config = _NAMED[name]()
        return config.replace(**overrides) if overrides else config

    def replace(self, **overrides: Any) -> MPLUGOwl2Config:
        """A copy with top-level or language-model fields changed (`vision=`/`abstractor=` take dicts)."""
        config = copy.deepcopy(self)
        top = {f.name for f in dataclasses.fields(self)}
        lang = {f.name for f in dataclasses.fields(LanguageModelConfig)}
        for key, value in overrides.items():
            if key in ("vision", "abstractor") and isinstance(value, dict):
                setattr(config, key, dataclasses.replace(getattr(config, key), **value))
            elif key in top:
                setattr(config, key, value)
            elif key in lang:
                setattr(config.language, key, value)
            else:
                raise TypeError(f"unknown config field {key!r}")
        config.validate()
        return config

    def validate(self, source: str = "config") -> None:
        """Raises UserError when the parts do not fit together (they are read from user files)."""
        v, a, lm = self.vision, self.abstractor, self.language
        problems = []
        if v.hidden_act != "quick_gelu":
            problems.append(f"visual_model.hidden_act {v.hidden_act!r} (only 'quick_gelu' is supported)")
        if lm.tie_word_embeddings:
            problems.append("tie_word_embeddings true (the released models have a separate lm_head)")
        if lm.hidden_act != "silu":
            problems.append(f"hidden_act {lm.hidden_act!r} (only 'silu' is supported)")
        if v.hidden_size % v.num_attention_heads:
            problems.append("visual_model.hidden_size is not a multiple of num_attention_heads")
        if a.hidden_size % a.num_attention_heads:
            problems.append("visual_abstractor.hidden_size is not a multiple of num_attention_heads")
        if lm.hidden_size % lm.num_attention_heads:
            problems.append("hidden_size is not a multiple of num_attention_heads")
        if lm.num_attention_heads % lm.num_key_value_heads:
            problems.append("num_attention_heads is not a multiple of num_key_value_heads")
        if a.encoder_hidden_size != v.hidden_size or a.hidden_size != v.hidden_size:
            problems.append(
                f"visual_abstractor hidden_size/encoder_hidden_size ({a.hidden_size}/{a.encoder_hidden_size})"
                f" must equal visual_model.hidden_size ({v.hidden_size})"
            )
        if a.grid_size != v.grid_size:
            problems.append(
                f"visual_abstractor.grid_size {a.grid_size} != image_size/patch_size {v.image_size}/{v.patch_size}"
            )
        if a.hidden_size % 4:
            problems.append("visual_abstractor.hidden_size must be a multiple of 4 (2-D sin-cos table)")
        if lm.rope_scaling is not None and lm.rope_scaling.get("type", lm.rope_scaling.get("rope_type")) != "linear":
            problems.append(f"rope_scaling {lm.rope_scaling!r} (only null or linear scaling is supported)")
        if self.deepmlp_hidden_dims is not None and not self.deepmlp_hidden_dims:
            problems.append("deepmlp_hidden_dims is empty")
        if problems:
            raise UserError(f"{source}: unsupported mPLUG-Owl2 config: {'; '.join(problems)}")

    # --- the released config.json ---------------------------------------------------------------

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any], source: str = "config.json") -> MPLUGOwl2Config:
        """Reads the released key layout; `source` names the file in errors."""
        if not isinstance(data, dict):
            raise UserError(f"{source}: expected a JSON object")
        model_type = data.get("model_type")
        if model_type != MODEL_TYPE:
            raise UserError(f"{source}: model_type is {model_type!r}, expected {MODEL_TYPE!r} (an mPLUG-Owl2 model)")
        data = copy.deepcopy(data)
        data.pop("model_type")
        visual = data.pop("visual_config", None) or {}
        if not isinstance(visual, dict):
            raise UserError(f"{source}: visual_config must be an object")
        try:
            vision = _dataclass_from_dict(VisionConfig, dict(visual.get("visual_model") or {}))
            abstractor_dict = dict(visual.get("visual_abstractor") or {})
            if abstractor_dict.get("grid_size") is None:  # the reference turns a null grid_size into 32
                abstractor_dict.pop("grid_size", None)
            abstractor = _dataclass_from_dict(AbstractorConfig, abstractor_dict)
            visual_extra = {k: v for k, v in visual.items() if k not in ("visual_model", "visual_abstractor")}
            lang_names = {f.name for f in dataclasses.fields(LanguageModelConfig)}
            lang_values = {k: data.pop(k) for k in list(data) if k in lang_names}
            if lang_values.get("num_key_value_heads") is None:  # LLaMA-1 configs have no GQA key
                lang_values["num_key_value_heads"] = lang_values.get("num_attention_heads", 32)
            language = LanguageModelConfig(**lang_values)
        except (TypeError, ValueError) as exc:
            raise UserError(f"{source}: malformed mPLUG-Owl2 config ({exc})") from exc
        dims = data.pop("deepmlp_hidden_dims", None)
        score_ids = data.pop("score_token_id", None) or []
        config = cls(
            vision=vision,
            abstractor=abstractor,
            language=language,
            deepmlp_hidden_dims=list(dims) if dims else None,
            score_token_id=[int(i) for i in score_ids],
            extra=data,
            visual_extra=visual_extra,
        )
        config.validate(source)
        return config

    def to_hf_dict(self) -> dict[str, Any]:
        """The released key layout (unknown keys read earlier come back unchanged)."""
        out: dict[str, Any] = copy.deepcopy(self.extra)
        out.update(_dataclass_to_dict(self.language))
        out["model_type"] = MODEL_TYPE
        out["visual_config"] = {
            **copy.deepcopy(self.visual_extra),
            "visual_model": _dataclass_to_dict(self.vision),
            "visual_abstractor": _dataclass_to_dict(self.abstractor),
        }
        if self.deepmlp_hidden_dims is not None:
            out["deepmlp_hidden_dims"] = list(self.deepmlp_hidden_dims)
        if self.score_token_id or "deepmlp_hidden_dims" in out:
            out["score_token_id"] = list(self.score_token_id)
        return dict(sorted(out.items()))

    @classmethod
    def load(cls, path: str | Path) -> MPLUGOwl2Config:
        """Reads `config.json` (a directory or the file itself)."""
        path = Path(path)
        if path.is_dir():
            path = path / CONFIG_FILE
        if not path.is_file():
            raise UserError(f"{path}: no config.json found (is this an mPLUG-Owl2 checkpoint directory?)")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UserError(f"{path}: not a readable JSON config ({exc})") from exc
        return cls.from_hf_dict(data, source=str(path))

    def save(self, directory: str | Path) -> Path:
        """Writes `config.json` into `directory`; returns its path."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / CONFIG_FILE
        path.write_text(json.dumps(self.to_hf_dict(), indent=2) + "\n", encoding="utf-8")
        return path


def _dataclass_from_dict(cls: type, data: dict[str, Any]) -> Any:
    names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
    known = {k: v for k, v in data.items() if k in names}
    extra = {k: v for k, v in data.items() if k not in names}
    return cls(**known, extra=extra)


def _dataclass_to_dict(obj: Any) -> dict[str, Any]:
    out = copy.deepcopy(getattr(obj, "extra", {}))
    for f in dataclasses.fields(obj):
        if f.name != "extra":
            out[f.name] = copy.deepcopy(getattr(obj, f.name))
    return dict(sorted(out.items()))


def _seven_b() -> MPLUGOwl2Config:
    config = MPLUGOwl2Config(
        extra={"architectures": ["MPLUGOwl2LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2},
    )
    config.vision.extra["model_type"] = "mplug_owl_vision_model"
    config.abstractor.extra["model_type"] = "mplug_owl_visual_abstract"
    return config


def _tiny() -> MPLUGOwl2Config:
    config = MPLUGOwl2Config(
        vision=VisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=28
        ),
        abstractor=AbstractorConfig(
            num_learnable_queries=6,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=48,
            encoder_hidden_size=32,
            grid_size=2,
        ),
        language=LanguageModelConfig(
            vocab_size=512,  # room for the tests' tiny sentencepiece tokenizer (a few hundred pieces)
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=256,
        ),
        extra={"architectures": ["MPLUGOwl2LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2},
    )
    config.validate()
    return config


_NAMED = {"mplug-owl2-7b": _seven_b, "mplug-owl2-tiny": _tiny}
