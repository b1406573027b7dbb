"""The interface every model family implements, and the registry that picks a family from a checkpoint.

A backbone turns (visual inputs, prompt token ids, optional response ids appended to them) into per-position
logits and hidden states, and knows its own image preprocessing, batching of visual inputs, tokenizer and
prompt. Scoring talks only to `Backbone`, and training to `TrainableBackbone` (the same plus conversation
encoding, the regressor hook, LoRA targets, trainable groups, FSDP2 units and saving), so a new family
(Qwen2-VL, LLaVA, ...) is one folder under `iqa_cli/models/` plus one line in `BUILTIN_FAMILIES` (or a
`register_family` call).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from iqa_cli.constants import RUN_FILE
from iqa_cli.errors import UserError
from iqa_cli.files import read_json_object
from iqa_cli.models import hub

if TYPE_CHECKING:  # importing the registry needs no torch (`iqa train --help` reads the default family's defaults)
    import torch

CONFIG_FILE = "config.json"  # Hugging Face layout: its `model_type` names the family
ADAPTER_CONFIG = "adapter_config.json"  # a peft adapter: no config of its own, the base's family
RUN_FAMILY_KEY = "family"  # `iqa.json` key naming the family of an `iqa train` run

# model_type -> module whose `FAMILY` (a `Family`) loads that family's checkpoints; imported on first use.
BUILTIN_FAMILIES = {"mplug_owl2": "iqa_cli.models.mplug_owl2.backbone"}
# transformers' own vision-language models: every model_type below loads through one module (its `FAMILIES`)
HF_VLM_MODULE = "iqa_cli.models.hf_vlm.backbone"
BUILTIN_FAMILIES |= dict.fromkeys(("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava_onevision", "idefics3"), HF_VLM_MODULE)
DEFAULT_FAMILY = "mplug_owl2"  # the family of DEFAULT_MODEL and of every released checkpoint `iqa` scores

VisualInputs = Mapping[str, "torch.Tensor"]  # one image's (or a batch's, rows first) visual tensors, by name


@dataclass
class BackboneOutput:
    logits: torch.Tensor | None  # B, P, V at the positions asked for (see Backbone.forward)
    hidden_states: torch.Tensor  # B, L, C after the final norm, over the backbone's own (expanded) sequence
    text_positions: torch.Tensor  # B, T: where each input id landed in that sequence
    last_index: torch.Tensor  # B: each row's last real position in that sequence
    past_key_values: Any = None  # the family's cache, when asked for (see Backbone.decode_step)


@dataclass(frozen=True)
class Provenance:
    """Where a loaded backbone's files came from (recorded with every score)."""

    model: str  # Hugging Face repo id, or the resolved weights directory
    revision: str = ""  # commit of a Hub snapshot
    layout: str = ""  # the family's name for the on-disk layout (e.g. "full", "lora")
    weights_dir: Path | None = None  # where `iqa.json` of an `iqa train` run sits
    base_model: str = ""  # adapters: the model they were merged onto
    base_revision: str = ""


class VisualCollate(Protocol):
    """Batches per-image visual inputs into tensors with the batch first; picklable (DataLoader workers run it).

    `items` has `batch_size` entries or fewer; None (a failed image) and missing rows are padding that must not
    change the other rows' results. Allocating with `iqa_cli.batch_buffer.batch_buffer` makes a worker build
    the batch in shared memory, so handing it to the main process copies nothing; such a block may be reused
    from an earlier batch (`iqa_cli.batch_buffer.BatchPool`), so the collate writes every element it allocates.
    """

    def __call__(
        self, items: list[VisualInputs | None], batch_size: int, dtype: torch.dtype
    ) -> dict[str, torch.Tensor]: ...


class ModuleBackbone:
    """What a family's backbone takes from the torch module it wraps (`self.model`): where it runs and in what."""

    model: Any

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype


@runtime_checkable
class Backbone(Protocol):
    """What scoring needs from a multimodal LLM."""

    name: str  # the family, as BUILTIN_FAMILIES names it
    image_token: str  # the placeholder a prompt holds once, e.g. "<|image|>"
    tokenizer: Any  # the family's tokenizer
    preprocessor: Any  # the family's image preprocessing settings (saved with a trained model)
    transform: Callable[[Any], dict[str, torch.Tensor]]  # RGB PIL image -> visual inputs; picklable
    collate: VisualCollate
    provenance: Provenance

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def has_regressor(self) -> bool:
        """Whether the checkpoint carries a regression head (`regress`)."""
        ...

    def default_scoring(self) -> tuple[str, list[int], str | None]:
        """(prompt, level token ids or [] for the default level words, regressor readout) the checkpoint's
        authors score it with, when no `iqa.json` says otherwise."""
        ...

    def encode_prompt(self, prompt: str) -> list[int]:
        """Token ids of a prompt holding `image_token` once; the level is read after the last id."""
        ...

    def level_token_id(self, word: str) -> int:
        """The id whose probability after the prompt is the level's: an added token by name, else the token the
        word starts with after a space."""
        ...

    def forward(
        self,
        visual: VisualInputs,
        input_ids: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        logits_at: str | torch.Tensor = "last",
        use_cache: bool = False,
    ) -> BackboneOutput:
        """Visual inputs (a collated batch) and ids [B, T] (prompt, then any response) -> logits and hidden
        states; `logits_at` is "last", "all", "none" or positions in the family's sequence."""
        ...

    def decode_step(self, input_ids: torch.Tensor, past_key_values: Any) -> BackboneOutput:
        """One cached step: ids [B, 1] after a `forward(..., use_cache=True)` -> logits at that token."""
        ...

    def regress(self, hidden: torch.Tensor) -> torch.Tensor:
        """The regression head on hidden states [B, C] -> scores [B]."""
        ...


@runtime_checkable
class TensorInputs(Protocol):
    """Optional for a family: its preprocessing in torch, for `Scorer.score_tensors` (rewards in training loops)."""

    def tensor_inputs(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """One image [3, H, W] float RGB in [0, 1], on any device -> its visual inputs (as `transform` gives them,
        before `collate`), computed in torch with autograd kept."""
        ...

    # Optional too: `tensor_collate(rows, batch_size) -> VisualInputs` for a family whose rows differ in shape
    # (Qwen-VL's patch grids); without it `score_tensors` stacks the rows and pads with zero rows.


@runtime_checkable
class GeneratingBackbone(Protocol):
    """Optional for a family: the conversation and greedy generation that reasoning models answer through
    (`iqa score --reasoning`, `iqa train --method grpo`)."""

    def render_conversation(self, messages: list[dict]) -> str:
        """Chat-template messages (one image placeholder) with the generation prompt -> the prompt text."""
        ...

    def generate_greedy(
        self, visual: VisualInputs, input_ids: torch.Tensor, *, max_new_tokens: int, record_ids: tuple[int, ...] = ()
    ) -> Any:
        """Greedy batched decoding with the KV cache after the prompt ids [B, T] -> each row's new ids (up to its
        end of sequence) and the logits of `record_ids` at every generated position."""
        ...


@runtime_checkable
class TrainableBackbone(Backbone, Protocol):
    """What `iqa train` needs on top of scoring: all of it in input-id coordinates, the family mapping them to
    its own sequence (image tokens expanded) itself."""

    model: Any  # the torch module the optimizer trains (peft wraps it in place for LoRA)
    default_prompt: str  # the scoring prompt of a trained model
    lora_targets: tuple[str, ...]  # default LoRA target module-name suffixes

    @property
    def vocab_size(self) -> int: ...

    @property
    def pad_id(self) -> int:
        """The id training batches are right-padded with (masked out by the attention mask)."""
        ...

    def level_token_ids(self, words: list[str] | tuple[str, ...]) -> list[int]:
        """The id each level word is read at; two words sharing one is a UserError."""
        ...

    def add_tokens(self, tokens: list[str] | tuple[str, ...]) -> list[int]:
        """Adds special tokens (Q-Scorer's <scoreK>) and resizes the embeddings."""
        ...

    def record_score_tokens(self, ids: list[int] | tuple[int, ...]) -> None:
        """Notes the added score token ids in the model's saved config."""
        ...

    def encode_training(
        self, question: str, level_token: str, level_token_id: int, *, image_first: bool
    ) -> tuple[list[int], list[int], int]:
        """(input ids, labels, position of the level token) of one conversation, labels masked the family's way."""
        ...

    def add_regressor(self, dims: list[int]) -> None:
        """A freshly initialized regression head with these hidden sizes (kept if the checkpoint has one)."""
        ...

    def lora_target_modules(self, suffixes: list[str] | tuple[str, ...]) -> list[str]:
        """Full names of the language model's linear layers ending with one of `suffixes`."""
        ...

    def trainable_groups(self) -> dict[str, list[Any]]:
        """Parameters by part: "vision", "projector", "output" (the LM head) and "regressor"; optionally "unused":
        parameters the forward never reaches (kept frozen)."""
        ...

    def set_gradient_checkpointing(self, enabled: bool = True) -> None: ...

    def fsdp_units(self) -> list[Any]:
        """Submodules that FSDP2 shards one by one (the model is the root)."""
        ...

    def training_forward(
        self,
        module: Any,
        visual: VisualInputs,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        hidden_at: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits [N, T, V] at the input ids' positions and hidden states [N, C] at input-id positions
        `hidden_at`, by calling `module` (the model, or a wrapper of it such as peft's)."""
        ...

    def save(self, out: Any, *, state: dict | None = None, dtype: Any = None, processing: bool = True) -> None:
        """The full model in the family's own format (`state`: a gathered FSDP state dict to write instead),
        and with `processing` its tokenizer and preprocessing files; the family's `load` reads it back."""
        ...

    def save_adapter(self, peft_model: Any, out: Any, base: str | None) -> None:
        """A LoRA run in the family's adapter layout, with its tokenizer and preprocessing files."""
        ...

    processing_files: tuple[str, ...]  # what besides the weights makes a directory loadable


# --- the registry -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Family:
    """A model family as the registry knows it."""

    name: str  # the `model_type` of its config.json
    image_token: str  # what a prompt holds once (checked before any weights are read)
    load: Callable[..., Backbone]  # (model, *, base, revision, dtype, device) -> Backbone
    wrap: Callable[[Any], Backbone] | None = None  # an already built torch model -> Backbone (forward passes only)
    # what its `save`/`save_adapter` write into a run directory (glob patterns): `iqa train --overwrite` removes them
    output_files: tuple[str, ...] = ()


_registered: dict[str, Family] = {}


def register_family(family: Family) -> None:
    """Adds (or replaces) a family: checkpoints whose config says `family.name` load through it."""
    _registered[family.name] = family


def family_package(name: str = DEFAULT_FAMILY) -> Any:
    """A built-in family's package: its constants (`DEFAULT_TRAIN_MODEL`, `LORA_TARGETS`) without torch."""
    return importlib.import_module(BUILTIN_FAMILIES[name].rpartition(".")[0])


def family_output_files() -> list[str]:
    """The files (glob patterns) any supported family writes into a run directory, each once."""
    return sorted({pattern for name in supported_families() for pattern in get_family(name).output_files})


def supported_families() -> list[str]:
    return sorted({*BUILTIN_FAMILIES, *_registered})


def get_family(model_type: str, source: str = "") -> Family:
    """A family by name; an unknown one is a one-line UserError listing the supported families."""
    if model_type in _registered:
        return _registered[model_type]
    if model_type in BUILTIN_FAMILIES:
        module = importlib.import_module(BUILTIN_FAMILIES[model_type])
        return getattr(module, "FAMILIES", {}).get(model_type) or module.FAMILY
    where = f"{source}: " if source else ""
    supported = ", ".join(supported_families())
    raise UserError(f"{where}model_type {model_type!r} is not a supported model family (supported: {supported})")


def family_of(model: str | Path, *, base: str | Path | None = None, revision: str | None = None) -> tuple[str, str]:
    """(family, the file that said so) for a checkpoint directory or Hub repo id.

    Read in order: the run directory's `iqa.json` `family`; `config.json` `model_type`; for a peft adapter
    without a config, its base's family. A Hub repo's `config.json` comes from the local cache, else it alone
    is downloaded (a few KB), so `--model Qwen/Qwen2.5-VL-7B-Instruct` picks its family before the weights
    come; a repo without one (a LoRA adapter) or a directory with none of these files is the default family,
    whose loader reports what is missing. What the name is (a folder, a repo, a mistake) is `hub.locate`'s call.
    """
    where = hub.locate(model, revision)  # a missing folder, an unknown repo, no network: one line, at once
    if not isinstance(where, Path):
        config = hub.hub_file(where, CONFIG_FILE, revision)
        return (_model_type(config), str(config)) if config is not None else (DEFAULT_FAMILY, "")
    path = where
    run_file = path / RUN_FILE
    if run_file.is_file():
        family = read_json_object(run_file).get(RUN_FAMILY_KEY)
        if isinstance(family, str):
            return family, str(run_file)
    if (path / CONFIG_FILE).is_file():
        return _model_type(path / CONFIG_FILE), str(path / CONFIG_FILE)
    if (path / ADAPTER_CONFIG).is_file() and base is not None:
        return family_of(base)
    return DEFAULT_FAMILY, ""


def load_backbone(
    model: str | Path,
    *,
    base: str | Path | None = None,
    revision: str | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    **options: Any,
) -> Backbone:
    """Loads any supported checkpoint (directory or Hub repo id) as its family's `Backbone`; `options` set to
    other than None (e.g. Qwen-VL's `max_pixels`) go to families whose loader takes them, else a UserError."""
    family = get_family(*family_of(model, base=base, revision=revision))
    given = family_options(family, options)
    return family.load(model, base=base, revision=revision, dtype=dtype, device=device, **given)


def family_options(family: Family, options: dict[str, Any]) -> dict[str, Any]:
    """The `options` set to other than None, each one the family's loader takes (e.g. Qwen-VL's `max_pixels`);
    one it does not take is a UserError naming its flag, before anything loads."""
    given = {k: v for k, v in options.items() if v is not None}
    accepted = inspect.signature(family.load).parameters
    for name in given:
        if name not in accepted:
            raise UserError(f"--{name.replace('_', '-')} does not apply to {family.name} models")
    return given


def _model_type(path: Path) -> str:
    model_type = read_json_object(path).get("model_type")
    if not isinstance(model_type, str):
        raise UserError(f"{path}: no model_type (supported: {', '.join(supported_families())})")
    return model_type
