"""Loading released mPLUG-Owl2 checkpoints by their own key names, from a directory or a Hugging Face repo.

Layouts (detected from the files present):
- "full": `config.json` + weights, as safetensors (`model.safetensors`, or shards listed in
  `model.safetensors.index.json`) or PyTorch pickles (`pytorch_model.bin`, or shards listed in
  `pytorch_model.bin.index.json`). DeQA-Score-Mix3, one-align, the mPLUG-Owl2 base, merged Q-Scorer.
- "lora": a peft LoRA adapter (`adapter_config.json` + `adapter_model.safetensors|bin`) and optionally
  `non_lora_trainables.bin` (keys prefixed `base_model.model.`), merged onto a full base model
  (DeQA-Score-LoRA-Mix3). The adapter's `base_model_name_or_path` is a path on the authors' machine, so
  the base is given by the caller (default `MAGAer13/mplug-owl2-llama2-7b`).
- "qscorer_lora": the same files for Q-Scorer (`2kxx/Qscorer_lora_5_1`): `non_lora_trainables.bin` holds
  `deepmlp.*` and the embeddings/LM head resized to 32005 rows for the five added tokens
  `<score1>`..`<score5>` (ids 32000..32004), which no saved tokenizer records.

Pickles are read with `torch.load(weights_only=True)` only. Every key is checked against the model built
from the config: a missing or unexpected key is a UserError that names it. The model is built on the meta
device and materialized with `load_state_dict(assign=True)`, so the weights exist once in memory. No
remote code is ever run.
"""

from __future__ import annotations

import json
import math
import pickle
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from iqa_cli.errors import UserError
from iqa_cli.models import hub
from iqa_cli.models.backbone import ADAPTER_CONFIG, CONFIG_FILE
from iqa_cli.models.mplug_owl2.abstractor import abstractor_pos_embeds
from iqa_cli.models.mplug_owl2.config import MPLUGOwl2Config
from iqa_cli.models.mplug_owl2.model import MPLUGOwl2ForCausalLM, build_skeleton

DEFAULT_BASE = "MAGAer13/mplug-owl2-llama2-7b"
SCORE_TOKENS = ("<score1>", "<score2>", "<score3>", "<score4>", "<score5>")  # Q-Scorer, ascending quality

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
NON_LORA = "non_lora_trainables.bin"
TOKENIZER_FILE = "tokenizer.model"
PREPROCESSOR_CONFIG = "preprocessor_config.json"
PEFT_PREFIX = "base_model.model."

# Files fetched before the weights: configs, indexes, tokenizer and preprocessor.
_META_PATTERNS = ["*.json", TOKENIZER_FILE]
# Keys a file may carry that are derived, not learned: the abstractor's sin-cos tables (computed when
# absent) and the RoPE inverse frequencies older transformers saved (always recomputed).
_OPTIONAL_KEY = re.compile(r"\.(q_pos_embed|k_pos_embed)$")
_IGNORED_KEY = re.compile(r"\.rotary_emb\.inv_freq$")
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")


@dataclass
class LoadedCheckpoint:
    """A model ready to run, and where everything it came from lives."""

    model: MPLUGOwl2ForCausalLM
    config: MPLUGOwl2Config
    layout: str  # "full" | "lora" | "qscorer_lora"
    weights_dir: Path  # directory of the weights (the adapter's for LoRA layouts)
    weight_format: str  # "safetensors" | "bin" (of the model files; the base's for LoRA layouts)
    tokenizer_dir: Path | None  # holds tokenizer.model: the model dir, else the base dir
    preprocessor_config: Path | None  # preprocessor_config.json of the model dir, else of the base dir
    score_token_ids: list[int] = field(default_factory=list)  # Q-Scorer <score1>..<score5>, ascending quality
    added_tokens: list[str] = field(default_factory=list)  # tokens the model has but no saved tokenizer records
    repo_id: str | None = None  # Hugging Face repo id, when loaded from the Hub (or its cache)
    revision: str | None = None  # commit hash of that snapshot
    base_dir: Path | None = None  # LoRA layouts: the base model's directory
    base_repo_id: str | None = None
    base_revision: str | None = None


# --- reading tensors --------------------------------------------------------------------------------


class _TensorFiles:
    """The tensors of one or more weight files, read lazily file by file."""

    def __init__(self, files: list[Path], fmt: str):
        self.files, self.format = files, fmt
        self.keys: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: Counter[torch.dtype] = Counter()
        self._bins: dict[Path, dict[str, torch.Tensor]] = {}
        for f in files:
            for key, shape, dtype in self._header(f):
                if key in self.keys:
                    raise UserError(f"{f}: key {key} also appears in {self.keys[key]}")
                self.keys[key], self.shapes[key] = f, shape
                if dtype.is_floating_point:
                    self.dtypes[dtype] += 1

    def _header(self, f: Path) -> Iterator[tuple[str, tuple[int, ...], torch.dtype]]:
        if self.format == "safetensors":
            from safetensors import SafetensorError, safe_open

            try:
                with safe_open(str(f), framework="pt") as handle:
                    entries = [(k, handle.get_slice(k)) for k in handle.keys()]  # noqa: SIM118 - not a mapping
                    header = [(k, tuple(sl.get_shape()), _safetensors_dtype(sl.get_dtype())) for k, sl in entries]
            except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
                raise UserError(f"{f}: not a readable safetensors file ({exc})") from exc
            yield from header
        else:
            tensors = load_bin(f)
            self._bins[f] = tensors
            for key, t in tensors.items():
                yield key, tuple(t.shape), t.dtype

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(key, cpu tensor) for every key, one file at a time."""
        for f in self.files:
            if self.format == "safetensors":
                from safetensors import safe_open

                with safe_open(str(f), framework="pt") as handle:
                    for key in handle.keys():  # noqa: SIM118
                        yield key, handle.get_tensor(key)
            else:
                yield from self._bins.pop(f).items()

    @property
    def stored_dtype(self) -> torch.dtype:
        return self.dtypes.most_common(1)[0][0] if self.dtypes else torch.float32


def _safetensors_dtype(name: str) -> torch.dtype:
    names = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
    return names.get(name, torch.int64)


def load_bin(path: Path) -> dict[str, torch.Tensor]:
    """A PyTorch weights pickle through `torch.load(weights_only=True)`; anything but plain tensors is refused."""
    try:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:  # legacy (non-zip) files cannot be memory-mapped
            if "mmap" not in str(exc) and "zip" not in str(exc):
                raise
            data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "global" not in str(exc).lower():  # a corrupt or foreign file, not a forbidden object
            raise UserError(
                f"{path}: not a readable PyTorch weights file (corrupt or not a torch.save pickle)"
            ) from exc
        raise UserError(
            f"{path}: refusing to load: the pickle holds objects other than plain tensors"
            " (only torch.load(weights_only=True) files are accepted)"
        ) from exc
    except (OSError, RuntimeError, EOFError, ValueError) as exc:
        raise UserError(f"{path}: not a readable PyTorch weights file ({exc})") from exc
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a dict of tensors, found {type(data).__name__}")
    for key, value in data.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise UserError(f"{path}: entry {key!r} is not a tensor ({type(value).__name__})")
    return data


def _weight_files(directory: Path, source: hub.ModelFiles | None = None) -> _TensorFiles:
    """The full-model weights of `directory` (safetensors preferred over .bin)."""
    for index_name, fmt in ((SAFETENSORS_INDEX, "safetensors"), (BIN_INDEX, "bin")):
        index = directory / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                names = sorted(set(weight_map.values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                raise UserError(f"{index}: not a valid shard index ({exc})") from exc
            if source is not None:
                hub.fetch(source, names)
                directory = source.path
            missing = [n for n in names if not (directory / n).is_file()]
            if missing:
                raise UserError(f"{index}: shard file(s) missing: {', '.join(missing[:5])}")
            return _TensorFiles([directory / n for n in names], fmt)
    for name, fmt in (("model.safetensors", "safetensors"), ("pytorch_model.bin", "bin")):
        if source is not None:
            hub.fetch(source, [name])
            directory = source.path
        if (directory / name).is_file():
            return _TensorFiles([directory / name], fmt)
    raise UserError(
        f"{directory}: no model weights found (expected model.safetensors, pytorch_model.bin,"
        f" or a sharded {SAFETENSORS_INDEX} / {BIN_INDEX}, or a LoRA {ADAPTER_CONFIG})"
    )


# --- assembling the state dict ------------------------------------------------------------------------


def _key_list(keys: list[str] | set[str], limit: int = 5) -> str:
    keys = sorted(keys)
    more = f", ... ({len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _infer_deepmlp(config: MPLUGOwl2Config, shapes: dict[str, tuple[int, ...]]) -> None:
    """Q-Scorer: take the regressor's hidden sizes from the weights when the config does not record them."""
    blocks = {}
    for key, shape in shapes.items():
        m = re.fullmatch(r"deepmlp\.model\.(\d+)\.linear\.weight", key)
        if m:
            blocks[int(m.group(1))] = shape[0]
    if blocks and config.deepmlp_hidden_dims is None:
        config.deepmlp_hidden_dims = [blocks[i] for i in sorted(blocks)]


class _StateBuilder:
    """Collects checked, cast tensors for `load_state_dict(assign=True)` on a meta-built model."""

    def __init__(self, model: MPLUGOwl2ForCausalLM, dtype: torch.dtype, device: torch.device):
        self.model, self.dtype, self.device = model, dtype, device
        self.expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        self.state: dict[str, torch.Tensor] = {}
        self.origin: dict[str, str] = {}

    def put(self, key: str, tensor: torch.Tensor, source: str, *, allow_fewer_rows: bool = False) -> None:
        if _IGNORED_KEY.search(key):
            return
        if key not in self.expected:
            raise UserError(f"{source}: unexpected key {key} (not part of the model its config describes)")
        want = self.expected[key]
        if tuple(tensor.shape) != want:
            fewer = allow_fewer_rows and tensor.ndim == 2 and tensor.shape[1] == want[1] and tensor.shape[0] < want[0]
            if not fewer:
                raise UserError(f"{source}: {key} has shape {list(tensor.shape)}, the config implies {list(want)}")
        if tensor.is_floating_point():
            tensor = tensor.to(dtype=self.dtype)
        self.state[key] = tensor.to(self.device)
        self.origin[key] = source

    def check_unexpected(self, keys: list[str], source: str) -> None:
        bad = [k for k in keys if k not in self.expected and not _IGNORED_KEY.search(k)]
        if bad:
            raise UserError(f"{source}: {len(bad)} unexpected key(s): {_key_list(bad)}")

    def finish(self, source: str) -> MPLUGOwl2ForCausalLM:
        missing = [k for k in self.expected if k not in self.state and not _OPTIONAL_KEY.search(k)]
        if missing:
            raise UserError(f"{source}: {len(missing)} missing key(s): {_key_list(missing)}")
        abstractor = self.model.config.abstractor
        q_pos, k_pos = abstractor_pos_embeds(abstractor, device=self.device)
        for key in self.expected:
            if key.endswith(".q_pos_embed") and key not in self.state:
                self.state[key] = q_pos.to(self.dtype)
            elif key.endswith(".k_pos_embed") and key not in self.state:
                self.state[key] = k_pos.to(self.dtype)
        for key, tensor in self.state.items():
            if tuple(tensor.shape) != self.expected[key]:  # rows the base lacks (added tokens)
                raise UserError(
                    f"{self.origin[key]}: {key} has {tensor.shape[0]} rows, the config needs {self.expected[key][0]}"
                )
        self.model.load_state_dict(self.state, strict=True, assign=True)
        self.state.clear()
        return self.model.eval()


def _parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
        "half": torch.float16,
    }
    if dtype not in names:
        raise UserError(f"dtype {dtype!r}: expected one of {', '.join(names)}")
    return names[dtype]


# --- LoRA -----------------------------------------------------------------------------------------------


@dataclass
class _LoraConfig:
    r: int
    alpha: float
    use_rslora: bool
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]

    @classmethod
    def read(cls, path: Path) -> _LoraConfig:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise UserError(f"{path}: not a readable adapter config ({exc})") from exc
        if str(data.get("peft_type", "LORA")).upper() != "LORA":
            raise UserError(f"{path}: peft_type {data.get('peft_type')!r} is not supported (only LORA)")
        if data.get("use_dora"):
            raise UserError(f"{path}: DoRA adapters (use_dora) are not supported")
        try:
            return cls(
                r=int(data["r"]),
                alpha=float(data.get("lora_alpha", 8)),
                use_rslora=bool(data.get("use_rslora", False)),
                rank_pattern=dict(data.get("rank_pattern") or {}),
                alpha_pattern=dict(data.get("alpha_pattern") or {}),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"{path}: malformed adapter config ({exc})") from exc

    def scaling(self, module: str) -> tuple[int, float]:
        """(rank, scale) of one module, as peft computes them (patterns match a dotted suffix)."""
        r, alpha = self.r, self.alpha
        for pattern, value in self.rank_pattern.items():
            if re.match(rf"(.*\.)?({pattern})$", module):
                r = int(value)
                break
        for pattern, value in self.alpha_pattern.items():
            if re.match(rf"(.*\.)?({pattern})$", module):
                alpha = float(value)
                break
        return r, alpha / (math.sqrt(r) if self.use_rslora else r)


def lora_delta(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """peft's merged update for an nn.Linear: scale * B @ A, in float32 (fan_in_fan_out never applies to Linear)."""
    return scale * (b.float() @ a.float())


def _adapter_weights(directory: Path) -> tuple[dict[str, torch.Tensor], Path]:
    st, binf = directory / "adapter_model.safetensors", directory / "adapter_model.bin"
    if st.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(st)), st
        except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
            raise UserError(f"{st}: not a readable safetensors file ({exc})") from exc
    if binf.is_file():
        return load_bin(binf), binf
    raise UserError(f"{directory}: {ADAPTER_CONFIG} but no adapter_model.safetensors or adapter_model.bin")


def _strip_peft(key: str) -> str:
    key = key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key
    return key.replace(".base_layer.", ".")  # peft >= 0.7 names the wrapped Linear `base_layer`


def _merge_lora(builder: _StateBuilder, adapter: dict[str, torch.Tensor], path: Path, cfg: _LoraConfig) -> None:
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in adapter.items():
        if not key.startswith(PEFT_PREFIX):
            raise UserError(f"{path}: unexpected key {key} (peft keys start with {PEFT_PREFIX!r})")
        rel = key[len(PEFT_PREFIX) :]
        m = _LORA_KEY.match(rel)
        if m:
            pairs.setdefault(m.group("module"), {})[m.group("which")] = tensor
        elif "lora_" in rel:
            raise UserError(f"{path}: unsupported LoRA tensor {key} (only lora_A/lora_B of Linear layers)")
        else:  # modules_to_save: a full replacement of a base weight
            builder.put(_strip_peft(rel), tensor, str(path))
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise UserError(
                f"{path}: {module} has lora_{'A' if 'A' in ab else 'B'} but no lora_{'B' if 'A' in ab else 'A'}"
            )
        weight_key = f"{module}.weight"
        try:
            target = builder.model.get_submodule(module)
        except AttributeError:
            target = None
        if not isinstance(target, nn.Linear) or weight_key not in builder.state:
            raise UserError(f"{path}: LoRA target {module} is not a linear layer of the model")
        r, scale = cfg.scaling(module)
        a, b, w = ab["A"], ab["B"], builder.state[weight_key]
        if a.shape != (r, w.shape[1]) or b.shape != (w.shape[0], r):
            raise UserError(
                f"{path}: {module} lora_A {list(a.shape)} / lora_B {list(b.shape)} do not fit weight"
                f" {list(w.shape)} with r={r}"
            )
        merged = w.float() + lora_delta(a.to(w.device), b.to(w.device), scale)
        builder.state[weight_key] = merged.to(w.dtype)


# --- the entry point --------------------------------------------------------------------------------------


def load_mplug_owl2(
    model: str | Path,
    *,
    base: str | Path | None = None,
    revision: str | None = None,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
) -> LoadedCheckpoint:
    """Loads a released (or `iqa train`-written) mPLUG-Owl2 checkpoint.

    Args:
        model: a checkpoint directory or a Hugging Face repo id.
        base: the full model a LoRA adapter is merged onto (directory or repo id); default DEFAULT_BASE.
        revision: branch, tag or commit of a Hub repo (ignored for directories).
        dtype: cast every floating weight to this; None keeps the checkpoint's stored dtype.
        device: where the weights go; None means CPU.
    """
    target_device = torch.device(device) if device is not None else torch.device("cpu")
    want_dtype = _parse_dtype(dtype)
    src = hub.resolve(model, revision, _META_PATTERNS)
    if (src.path / ADAPTER_CONFIG).is_file():
        return _load_lora(src, base, want_dtype, target_device)
    if base is not None:
        raise UserError(f"base model {base}: a base applies to LoRA adapters only, and {model} is a full model")
    config = MPLUGOwl2Config.load(src.path)
    files = _weight_files(src.path, src)
    _infer_deepmlp(config, files.shapes)
    meta = build_skeleton(config)
    builder = _StateBuilder(meta, want_dtype or files.stored_dtype, target_device)
    builder.check_unexpected(list(files.keys), str(src.path))
    for key, tensor in files.tensors():
        builder.put(key, tensor, str(files.keys[key]))
    loaded = builder.finish(str(src.path))
    return LoadedCheckpoint(
        model=loaded,
        config=config,
        layout="full",
        weights_dir=src.path,
        weight_format=files.format,
        tokenizer_dir=_first_with(TOKENIZER_FILE, src.path),
        preprocessor_config=_file_in(PREPROCESSOR_CONFIG, src.path),
        **_score_tokens(config, _first_with(TOKENIZER_FILE, src.path), None),
        repo_id=src.repo_id,
        revision=src.revision,
    )


def _load_lora(
    src: hub.ModelFiles, base: str | Path | None, dtype: torch.dtype | None, device: torch.device
) -> LoadedCheckpoint:
    hub.fetch(src, ["adapter_model.safetensors", "adapter_model.bin", NON_LORA])
    lora_cfg = _LoraConfig.read(src.path / ADAPTER_CONFIG)
    base_src = hub.resolve(base if base is not None else DEFAULT_BASE, None, _META_PATTERNS, what="base model")
    if (base_src.path / ADAPTER_CONFIG).is_file():
        raise UserError(f"base model {base_src.path}: is itself a LoRA adapter; the base must be a full model")
    config_path = src.path / CONFIG_FILE
    config = MPLUGOwl2Config.load(config_path if config_path.is_file() else base_src.path)
    base_files = _weight_files(base_src.path, base_src)
    non_lora: dict[str, torch.Tensor] = {}
    non_lora_path = src.path / NON_LORA
    if non_lora_path.is_file():
        non_lora = {_strip_peft(k): v for k, v in load_bin(non_lora_path).items()}
    _infer_deepmlp(config, {k: tuple(v.shape) for k, v in non_lora.items()})
    embed = non_lora.get("model.embed_tokens.weight")
    if embed is not None and embed.ndim == 2:  # Q-Scorer: the trained (resized) rows are the truth, as in
        config.language.vocab_size = embed.shape[0]  # the reference builder, which resizes to len(tokenizer)
    qscorer = config.deepmlp_hidden_dims is not None
    meta = build_skeleton(config)
    builder = _StateBuilder(meta, dtype or base_files.stored_dtype, device)
    builder.check_unexpected(list(base_files.keys), f"base model {base_src.path}")
    builder.check_unexpected(list(non_lora), str(non_lora_path))
    adapter, adapter_path = _adapter_weights(src.path)
    vocab_keys = ("model.embed_tokens.weight", "lm_head.weight")
    for key, tensor in base_files.tensors():
        if key in non_lora:  # replaced below; skip the copy
            continue
        builder.put(key, tensor, str(base_files.keys[key]), allow_fewer_rows=key in vocab_keys)
    for key, tensor in non_lora.items():
        builder.put(key, tensor, str(non_lora_path))
    non_lora.clear()
    base_vocab = base_files.shapes.get("model.embed_tokens.weight", (config.language.vocab_size,))[0]
    for key in vocab_keys:  # rows for added tokens that no file provides: the mean of the existing rows
        if key in builder.state and builder.state[key].shape[0] < builder.expected[key][0]:
            rows = builder.state[key]
            mean = rows.float().mean(0, keepdim=True).to(rows.dtype)
            extra = builder.expected[key][0] - rows.shape[0]
            builder.state[key] = torch.cat([rows, mean.expand(extra, -1)], dim=0)
    _merge_lora(builder, adapter, adapter_path, lora_cfg)
    adapter.clear()
    loaded = builder.finish(str(src.path))
    tokenizer_dir = _first_with(TOKENIZER_FILE, src.path, base_src.path)
    return LoadedCheckpoint(
        model=loaded,
        config=config,
        layout="qscorer_lora" if qscorer else "lora",
        weights_dir=src.path,
        weight_format=base_files.format,
        tokenizer_dir=tokenizer_dir,
        preprocessor_config=_file_in(PREPROCESSOR_CONFIG, src.path, base_src.path),
        **_score_tokens(config, tokenizer_dir, base_vocab),
        repo_id=src.repo_id,
        revision=src.revision,
        base_dir=base_src.path,
        base_repo_id=base_src.repo_id,
        base_revision=base_src.revision,
    )


_SCORE_TOKEN = re.compile(r"<score(\d+)>")


def _score_tokens(config: MPLUGOwl2Config, tokenizer_dir: Path | None, base_vocab: int | None) -> dict[str, list]:
    """Q-Scorer's <score1>..<score5> ids (ascending quality) and whether the tokenizer must add them.

    Ids come from the tokenizer files if they record the tokens, else from the config's `score_token_id`
    (stored in the reference's reversed order, <score5> first), else they are the five rows appended to
    the vocabulary (the base's vocab size .. + 4 for LoRA layouts).
    """
    if config.deepmlp_hidden_dims is None:
        return {"score_token_ids": [], "added_tokens": []}
    recorded = _recorded_added_tokens(tokenizer_dir)
    numbered = sorted((int(m.group(1)), i) for t, i in recorded.items() if (m := _SCORE_TOKEN.fullmatch(t)))
    if numbered:  # a tokenizer that records its score tokens (any K, e.g. an `iqa train` run) is the truth
        return {"score_token_ids": [i for _, i in numbered], "added_tokens": []}
    vocab = config.language.vocab_size
    ids = list(reversed(config.score_token_id))
    if not ids and (base_vocab is None or vocab - base_vocab == len(SCORE_TOKENS)):
        ids = list(range(vocab - len(SCORE_TOKENS), vocab))
    return {"score_token_ids": ids, "added_tokens": list(SCORE_TOKENS) if ids else []}


def _recorded_added_tokens(tokenizer_dir: Path | None) -> dict[str, int]:
    """Added tokens a saved tokenizer records (added_tokens.json, or tokenizer_config's added_tokens_decoder)."""
    if tokenizer_dir is None:
        return {}
    found: dict[str, int] = {}
    try:
        added = tokenizer_dir / "added_tokens.json"
        if added.is_file():
            found.update({str(k): int(v) for k, v in json.loads(added.read_text(encoding="utf-8")).items()})
        config = tokenizer_dir / "tokenizer_config.json"
        if config.is_file():
            decoder = json.loads(config.read_text(encoding="utf-8")).get("added_tokens_decoder") or {}
            for token_id, token in decoder.items():
                content = token.get("content") if isinstance(token, dict) else token
                found.setdefault(str(content), int(token_id))
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        raise UserError(f"{tokenizer_dir}: unreadable added-token records ({exc})") from exc
    return found


def _first_with(name: str, *dirs: Path) -> Path | None:
    for d in dirs:
        if (d / name).is_file():
            return d
    return None


def _file_in(name: str, *dirs: Path) -> Path | None:
    d = _first_with(name, *dirs)
    return d / name if d is not None else None


# --- writing --------------------------------------------------------------------------------------------


def save_mplug_owl2(model: MPLUGOwl2ForCausalLM, directory: str | Path, *, max_shard_bytes: int | None = None) -> Path:
    """Writes config.json and safetensors weights under the released key names (sharded with an index
    when `max_shard_bytes` is given and exceeded); `load_mplug_owl2(directory)` reads it back."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.config.save(directory)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if max_shard_bytes is not None and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(directory / "model.safetensors"), metadata={"format": "pt"})
        return directory
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return directory
