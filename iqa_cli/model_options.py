"""The options that load a model and fix its scores, declared once: `iqa score`, `iqa serve` and `iqa train` get
their flags from here (`iqa_cli.cli_options`), and `Scorer.from_pretrained` takes the same names.

A model family declares its own options (Qwen-VL's pixel budget) as `OPTIONS` in its package's `__init__.py`, with
an optional `check_options(values)`; adding one touches that folder and nothing else. Importing this module
imports no torch, so `iqa --help` stays fast.
"""

from __future__ import annotations

import importlib
from dataclasses import asdict, dataclass, field
from typing import Any

from iqa_cli.constants import DEFAULT_MODEL
from iqa_cli.errors import UserError
from iqa_cli.reasoning import PRESET_NAMES, PRESETS

DTYPES = ("auto", "float32", "bfloat16", "float16")
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
QUANTIZE_MODES = ("int8", "int4")  # weight-only, through torchao (`iqa_cli.scoring.quantize`)


@dataclass(frozen=True)
class ModelOption:
    """One option: its keyword name (the flag is `--name-with-dashes`), help, default and how it is checked."""

    name: str
    help: str
    default: Any = None
    kind: type = str  # str | int | float
    metavar: str = "VALUE"
    minimum: int | None = None  # numbers: the smallest value allowed
    choices: tuple[str, ...] = ()  # strings: the values allowed (besides the default)
    completion: str | None = None  # `iqa_cli.completion`'s completer of its values

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def check(self, value: Any) -> None:
        if value is None or value == self.default:
            return
        if self.choices and value not in self.choices:
            raise UserError(f"{self.flag} {value}: use one of {', '.join(self.choices)}")
        if self.minimum is not None and value < self.minimum:
            raise UserError(f"{self.flag} {value}: must be at least {self.minimum}")


def _presets_budget() -> str:
    """The presets' generation budgets in help: "1024 (64 without thinking)"."""
    thinking = sorted({p.max_new_tokens for p in PRESETS.values() if p.thinking})
    direct = sorted({p.max_new_tokens for p in PRESETS.values() if not p.thinking})
    return "/".join(map(str, thinking)) + (f" ({'/'.join(map(str, direct))} without thinking)" if direct else "")


COMMON = (
    ModelOption("model", "Hugging Face repo id or directory.", DEFAULT_MODEL, metavar="MODEL"),
    ModelOption("base", "Base model of a LoRA adapter [default: the family's released base].", metavar="MODEL"),
    ModelOption("revision", "Model revision (branch, tag or commit) of a Hub repo.", metavar="REV"),
    ModelOption(
        "prompt",
        "Full scoring prompt holding the family's image token once (<|image|> for mPLUG-Owl2) [default: the one "
        "the checkpoint was evaluated with].",
        metavar="TEXT",
    ),
    ModelOption(
        "dtype",
        "auto (bfloat16 on Ampere and newer GPUs, float16 on older ones, float32 on the CPU), float32, bfloat16, "
        "float16.",
        "auto",
        metavar="DTYPE",
        choices=(*DTYPES, *DTYPE_ALIASES),
        completion="dtypes",
    ),
    ModelOption(
        "quantize",
        "Weight-only quantization of the linear layers through torchao: int8 or int4 (CUDA, bfloat16) [default: as "
        "stored].",
        metavar="BITS",
        choices=QUANTIZE_MODES,
        completion="quantize_modes",
    ),
    ModelOption(
        "reasoning",
        "Score a reasoning model: it answers PRESET's conversation by greedy generation and the score is the number "
        f"in its answer ({', '.join(PRESET_NAMES)}) [default: the one an `iqa train --method grpo` run records].",
        metavar="PRESET",
        choices=PRESET_NAMES,
        completion="reasoning_presets",
    ),
    ModelOption(
        "max_new_tokens",
        f"Reasoning models: most tokens generated per answer [default: the run's, else {_presets_budget()}].",
        kind=int,
        metavar="N",
        minimum=1,
    ),
)


def family_packages() -> list[Any]:
    """The built-in families' packages (their `__init__.py`: constants, no torch), in registry order."""
    from iqa_cli.models.backbone import BUILTIN_FAMILIES

    names = dict.fromkeys(module.rpartition(".")[0] for module in BUILTIN_FAMILIES.values())
    return [importlib.import_module(name) for name in names]


def family_options() -> tuple[ModelOption, ...]:
    """The options the built-in families declare, each name once."""
    found: dict[str, ModelOption] = {}
    for package in family_packages():
        for option in getattr(package, "OPTIONS", ()):
            found.setdefault(option.name, option)
    return tuple(found.values())


def options(names: tuple[str, ...] | None = None) -> tuple[ModelOption, ...]:
    """The common options (those in `names`, or all) followed by every family option."""
    common = COMMON if names is None else tuple(o for o in COMMON if o.name in names)
    return common + family_options()


@dataclass(frozen=True)
class ModelSpec:
    """Which model to load and how: what `iqa score`, `iqa serve` and `Scorer.from_pretrained` share."""

    model: str = DEFAULT_MODEL
    base: str | None = None
    revision: str | None = None
    prompt: str | None = None
    dtype: str = "auto"
    quantize: str | None = None
    family: dict[str, Any] = field(default_factory=dict)  # the families' own options that were given
    reasoning: str | None = None  # a reasoning preset (`iqa_cli.reasoning`)
    max_new_tokens: int | None = None

    @classmethod
    def from_values(cls, values: dict[str, Any]) -> ModelSpec:
        """From option names -> values (a command's flags): common ones to fields, the rest to `family`."""
        common = {o.name: values[o.name] for o in COMMON if o.name in values}
        family = {k: v for k, v in values.items() if k not in common and v is not None}
        return cls(**common, family=family)

    def check(self) -> None:
        """One-line UserErrors before anything loads: a model or base that names a missing folder or a file (not the
        network: a finished output needs no model), choices, minimums, each family's own rules."""
        from iqa_cli.models import hub

        hub.check_name(self.model)
        if self.base is not None:
            hub.check_name(self.base, what="base model")
        declared = {o.name: o for o in options()}
        for name, value in {**asdict(self), **self.family}.items():
            if name == "family":
                continue
            if name not in declared:
                raise UserError(f"--{name.replace('_', '-')}: no model family takes this option")
            declared[name].check(value)
        for package in family_packages():
            check = getattr(package, "check_options", None)
            if check is not None:
                check(self.family)

    @property
    def dtype_name(self) -> str:
        """The dtype by its full name (`bf16` -> `bfloat16`)."""
        return DTYPE_ALIASES.get(self.dtype, self.dtype)

    def load_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `Scorer.from_pretrained` besides the model and the device."""
        kwargs = {"base": self.base, "revision": self.revision, "prompt": self.prompt, "dtype": self.dtype_name}
        optional = {k: getattr(self, k) for k in ("quantize", "reasoning", "max_new_tokens") if getattr(self, k)}
        return {**kwargs, **optional, **self.family}

    def request(self) -> dict[str, Any]:
        """What decides the scores, as a resume or a finished output records it (local folders by their files)."""
        from iqa_cli.files import directory_fingerprint

        return {
            "model": self.model,
            "model_files": directory_fingerprint(self.model),  # a checkpoint re-saved into the same directory
            "base": self.base,
            "base_files": directory_fingerprint(self.base) if self.base else None,
            "revision": self.revision,
            "prompt": self.prompt,
            "dtype": self.dtype,
            **({"quantize": self.quantize} if self.quantize else {}),
            **({"reasoning": self.reasoning} if self.reasoning else {}),
            **({"max_new_tokens": self.max_new_tokens} if self.max_new_tokens else {}),
            **self.family,
        }
