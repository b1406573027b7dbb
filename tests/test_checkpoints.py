"""Tiny models written in every released on-disk layout load back through `load_mplug_owl2` (the path real
checkpoints use) with the logits of an independent computation; bad inputs give one-line UserErrors."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from iqa_cli.errors import UserError
from iqa_cli.models.mplug_owl2.checkpoints import load_mplug_owl2, save_mplug_owl2
from iqa_cli.models.mplug_owl2.model import IMAGE_TOKEN_INDEX, MPLUGOwl2ForCausalLM
from tests.conftest import REPO_ROOT
from tests.factories import PEFT_PREFIX, random_pixels, tiny_model, write_checkpoint

IDS = torch.tensor([[1, 17, 33, IMAGE_TOKEN_INDEX, 29, 41, 7, 90], [1, IMAGE_TOKEN_INDEX, 5, 6, 7, 8, 9, 10]])


@pytest.fixture(scope="module")
def model() -> MPLUGOwl2ForCausalLM:
    return tiny_model(seed=0)


def _logits(model: MPLUGOwl2ForCausalLM) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS, random_pixels(2, model.config, seed=1)).logits


def _merged_reference(model: MPLUGOwl2ForCausalLM, adapter_file: Path, scale: float) -> MPLUGOwl2ForCausalLM:
    """`model` with W + scale * B @ A on every LoRA target, computed here from the adapter file."""
    adapter = torch.load(adapter_file, weights_only=True)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for key, a in adapter.items():
        if key.endswith(".lora_A.weight"):
            module = key[len(PEFT_PREFIX) : -len(".lora_A.weight")]
            b = adapter[key.replace(".lora_A.", ".lora_B.")]
            state[f"{module}.weight"] = state[f"{module}.weight"] + scale * (b @ a)
    reference = MPLUGOwl2ForCausalLM(model.config)
    reference.load_state_dict(state)
    return reference.eval()


# --- full checkpoints ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "shards", "pos_embeds"),
    [("safetensors", 1, True), ("safetensors", 3, False), ("bin", 1, False), ("bin", 2, True)],
)
def test_full_checkpoint_round_trip(tmp_path, model, fmt, shards, pos_embeds):
    written = write_checkpoint(model, tmp_path / "ckpt", fmt=fmt, shards=shards, pos_embeds=pos_embeds)
    loaded = load_mplug_owl2(written.path)
    assert (loaded.layout, loaded.weight_format) == ("full", fmt)
    assert loaded.weights_dir == written.path
    assert loaded.preprocessor_config == written.path / "preprocessor_config.json"
    assert loaded.repo_id is None and loaded.revision is None
    assert loaded.score_token_ids == [] and not loaded.model.training
    torch.testing.assert_close(_logits(loaded.model), _logits(model), rtol=0, atol=0)
    for (name, ours), theirs in zip(loaded.model.state_dict().items(), model.state_dict().values(), strict=True):
        assert torch.equal(ours, theirs), name


def test_save_then_load_round_trip_sharded(tmp_path, model):
    save_mplug_owl2(model, tmp_path / "out", max_shard_bytes=200_000)
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "out").glob("model-*.safetensors"))) > 1
    loaded = load_mplug_owl2(tmp_path / "out")
    torch.testing.assert_close(_logits(loaded.model), _logits(model), rtol=0, atol=0)
    assert loaded.config.to_hf_dict() == model.config.to_hf_dict()


def test_dtype_cast_and_device(tmp_path, model):
    written = write_checkpoint(model, tmp_path / "ckpt")
    loaded = load_mplug_owl2(written.path, dtype="bfloat16", device="cpu")
    assert {p.dtype for p in loaded.model.state_dict().values()} == {torch.bfloat16}
    cast = tiny_model(seed=0).to(torch.bfloat16)
    torch.testing.assert_close(_logits(loaded.model), _logits(cast), rtol=0, atol=0)


def test_stored_dtype_is_kept_by_default(tmp_path):
    half = tiny_model(seed=3).to(torch.float16)
    loaded = load_mplug_owl2(write_checkpoint(half, tmp_path / "ckpt", fmt="bin").path)
    assert loaded.model.dtype == torch.float16


# --- LoRA layouts ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("adapter_fmt", ["bin", "safetensors"])
def test_lora_layout_equals_base_with_merge_done_here(tmp_path, model, adapter_fmt):
    written = write_checkpoint(model, tmp_path / "lora", layout="lora", fmt="bin", shards=2, adapter_fmt=adapter_fmt)
    loaded = load_mplug_owl2(written.path, base=written.base)
    assert loaded.layout == "lora"
    assert loaded.base_dir == written.base and loaded.weights_dir == written.path
    adapter_file = tmp_path / "adapter.bin"
    torch.save(written.adapter, adapter_file)
    expected = _merged_reference(model, adapter_file, written.scale)
    torch.testing.assert_close(_logits(loaded.model), _logits(expected), rtol=1e-5, atol=1e-5)
    # both parts matter: without the merge, or with the base's own vision weights, the logits move
    assert (_logits(loaded.model) - _logits(model)).abs().max() > 1e-2
    base_only = load_mplug_owl2(written.base)
    assert (_logits(base_only.model) - _logits(model)).abs().max() > 1e-2


@pytest.mark.filterwarnings("ignore:Could not find a config file")  # peft looks for the authors' base path
@pytest.mark.parametrize("use_rslora", [False, True])
def test_lora_layout_equals_peft_on_the_unmerged_model(tmp_path, model, use_rslora):
    peft = pytest.importorskip("peft")
    written = write_checkpoint(model, tmp_path / "lora", layout="lora")
    config_path = written.path / "adapter_config.json"
    adapter_config = json.loads(config_path.read_text())
    adapter_config["use_rslora"] = use_rslora
    config_path.write_text(json.dumps(adapter_config))
    loaded = load_mplug_owl2(written.path, base=written.base)

    lora_config = peft.LoraConfig.from_pretrained(str(written.path))
    lora_config.task_type, lora_config.lora_dropout = None, 0.0  # a plain PeftModel; no generation API needed
    wrapped = peft.PeftModel(tiny_model(seed=0), lora_config).eval()
    result = peft.set_peft_model_state_dict(wrapped, torch.load(written.path / "adapter_model.bin"))
    assert result.unexpected_keys == []
    assert sorted(peft.get_peft_model_state_dict(wrapped)) == sorted(written.adapter)  # the factory writes peft's names
    torch.testing.assert_close(_logits(loaded.model), _logits(wrapped.base_model.model), rtol=1e-5, atol=1e-5)


def _qscorer_model(vocab: int = 517) -> MPLUGOwl2ForCausalLM:
    return tiny_model(seed=5, vocab_size=vocab, deepmlp_hidden_dims=[64, 32])


@pytest.mark.parametrize("deepmlp_in_config", [True, False])
def test_qscorer_layout(tmp_path, deepmlp_in_config):
    qscorer = _qscorer_model()
    written = write_checkpoint(
        qscorer, tmp_path / "q", layout="qscorer_lora", fmt="safetensors", deepmlp_in_config=deepmlp_in_config
    )
    loaded = load_mplug_owl2(written.path, base=written.base)
    assert loaded.layout == "qscorer_lora"
    assert loaded.config.language.vocab_size == 517
    assert loaded.config.deepmlp_hidden_dims == [64, 32]
    assert loaded.score_token_ids == [512, 513, 514, 515, 516]
    assert loaded.added_tokens == ["<score1>", "<score2>", "<score3>", "<score4>", "<score5>"]
    adapter_file = tmp_path / "adapter.bin"
    torch.save(written.adapter, adapter_file)
    expected = _merged_reference(qscorer, adapter_file, written.scale)
    px = random_pixels(2, qscorer.config, seed=1)
    with torch.no_grad():
        ours, theirs = loaded.model(IDS, px), expected(IDS, px)
        torch.testing.assert_close(ours.logits, theirs.logits, rtol=1e-5, atol=1e-5)
        assert ours.logits.shape[-1] == 517
        score = loaded.model.deepmlp(ours.hidden_states[:, -1])
        torch.testing.assert_close(score, expected.deepmlp(theirs.hidden_states[:, -1]), rtol=1e-5, atol=1e-5)
    assert score.shape == (2,)


def test_qscorer_vocab_follows_the_trained_rows_when_the_config_says_otherwise(tmp_path):
    """The reference builder loads the base at 32000 and resizes to len(tokenizer) whatever config.json says."""
    written = write_checkpoint(_qscorer_model(), tmp_path / "q", layout="qscorer_lora")
    config = json.loads((written.path / "config.json").read_text())
    config["vocab_size"] = 512
    (written.path / "config.json").write_text(json.dumps(config))
    loaded = load_mplug_owl2(written.path, base=written.base)
    assert loaded.config.language.vocab_size == 517
    assert loaded.score_token_ids == [512, 513, 514, 515, 516]


def test_merged_qscorer_score_tokens_from_the_tokenizer_records_or_the_last_rows(tmp_path):
    written = write_checkpoint(_qscorer_model(), tmp_path / "merged")
    loaded = load_mplug_owl2(written.path)
    assert loaded.layout == "full" and loaded.model.deepmlp is not None
    assert (loaded.score_token_ids, len(loaded.added_tokens)) == ([512, 513, 514, 515, 516], 5)
    recorded = {f"<score{i}>": 517 - i for i in range(1, 6)}  # any ids: read from the file, not assumed
    (written.path / "tokenizer.model").write_bytes(b"")  # makes the directory the tokenizer's
    (written.path / "added_tokens.json").write_text(json.dumps(recorded))
    loaded = load_mplug_owl2(written.path)
    assert (loaded.score_token_ids, loaded.added_tokens) == ([516, 515, 514, 513, 512], [])
    assert load_mplug_owl2(write_checkpoint(tiny_model(seed=4), tmp_path / "plain").path).score_token_ids == []


def test_qscorer_rows_missing_from_non_lora_are_the_mean_of_the_base_rows(tmp_path):
    qscorer = _qscorer_model()
    written = write_checkpoint(qscorer, tmp_path / "q", layout="qscorer_lora")
    non_lora_file = written.path / "non_lora_trainables.bin"
    non_lora = torch.load(non_lora_file, weights_only=True)
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        del non_lora[PEFT_PREFIX + key]
    torch.save(non_lora, non_lora_file)
    loaded = load_mplug_owl2(written.path, base=written.base)
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        rows = loaded.model.state_dict()[key]
        base_rows = qscorer.state_dict()[key][:512]
        torch.testing.assert_close(rows[:512], base_rows)
        torch.testing.assert_close(rows[512:], base_rows.mean(0).expand(5, -1))


def test_qscorer_backbone_adds_the_score_tokens_at_the_trained_ids(tmp_path):
    from iqa_cli.models.mplug_owl2.backbone import MPLUGOwl2Backbone
    from iqa_cli.models.mplug_owl2.tiny import build_tiny_tokenizer

    tokenizer_dir = build_tiny_tokenizer(tmp_path / "tok")
    from iqa_cli.models.mplug_owl2.tokenizer import LlamaTokenizer

    vocab = len(LlamaTokenizer.from_dir(tokenizer_dir))
    written = write_checkpoint(
        _qscorer_model(vocab + 5), tmp_path / "q", layout="qscorer_lora", tokenizer_dir=tokenizer_dir
    )
    loaded = load_mplug_owl2(written.path, base=written.base)
    assert loaded.tokenizer_dir == written.base  # no tokenizer in the adapter dir: the base's
    backbone = MPLUGOwl2Backbone.from_checkpoint(loaded)
    assert [backbone.tokenizer.token_to_id(t) for t in loaded.added_tokens] == list(range(vocab, vocab + 5))
    ids = backbone.encode_prompt("USER: How would you rate the quality of this image?\n<|image|> ASSISTANT: The")
    assert ids.count(IMAGE_TOKEN_INDEX) == 1
    pixels = torch.stack([backbone.preprocessor(_image())])
    out = backbone.forward({"pixel_values": pixels}, torch.tensor([ids]))
    assert out.logits.shape == (1, 1, vocab + 5)


def _image():
    from PIL import Image

    return Image.new("RGB", (40, 30), (200, 10, 10))


# --- errors -----------------------------------------------------------------------------------------------


def test_missing_config(tmp_path, model):
    written = write_checkpoint(model, tmp_path / "ckpt")
    (written.path / "config.json").unlink()
    with pytest.raises(UserError, match=r"ckpt.*no config\.json"):
        load_mplug_owl2(written.path)


def test_wrong_model_type(tmp_path, model):
    written = write_checkpoint(model, tmp_path / "ckpt")
    config = json.loads((written.path / "config.json").read_text())
    config["model_type"] = "llama"
    (written.path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=r"config\.json: model_type is 'llama', expected 'mplug_owl2'"):
        load_mplug_owl2(written.path)


def _rewrite_safetensors(path: Path, change) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path))


def test_missing_key_is_named(tmp_path, model):
    written = write_checkpoint(model, tmp_path / "ckpt")
    key = "model.layers.1.self_attn.v_proj.multiway.1.weight"
    _rewrite_safetensors(written.path / "model.safetensors", lambda t: t.pop(key))
    with pytest.raises(UserError, match=rf"1 missing key\(s\): {key.replace('.', '[.]')}$"):
        load_mplug_owl2(written.path)


def test_unexpected_key_is_named(tmp_path, model):
    written = write_checkpoint(model, tmp_path / "ckpt", fmt="bin")
    path = written.path / "pytorch_model.bin"
    state = torch.load(path, weights_only=True)
    state["model.layers.0.self_attn.extra_proj.weight"] = torch.zeros(2, 2)
    torch.save(state, path)
    with pytest.raises(UserError, match=r"unexpected key\(s\): model\.layers\.0\.self_attn\.extra_proj\.weight"):
        load_mplug_owl2(written.path)


def test_wrong_shape_is_named(tmp_path, model):
    written = write_checkpoint(model, tmp_path / "ckpt")
    _rewrite_safetensors(
        written.path / "model.safetensors", lambda t: t.__setitem__("model.norm.weight", torch.ones(7))
    )
    with pytest.raises(UserError, match=r"model\.norm\.weight has shape \[7\], the config implies \[64\]"):
        load_mplug_owl2(written.path)


class NotATensor:
    """A custom object: a pickle holding it is not a plain weights file."""

    def __reduce__(self):
        return (print, ("this would run on load",))


def test_pickle_that_is_not_plain_tensors_is_refused(tmp_path, model):
    written = write_checkpoint(model, tmp_path / "ckpt", fmt="bin")
    path = written.path / "pytorch_model.bin"
    state = torch.load(path, weights_only=True)
    state["payload"] = NotATensor()
    torch.save(state, path)
    with pytest.raises(UserError, match=r"pytorch_model\.bin: refusing to load: the pickle holds objects other than"):
        load_mplug_owl2(written.path)


def test_non_tensor_entry_is_refused(tmp_path, model):
    written = write_checkpoint(model, tmp_path / "ckpt", fmt="bin")
    path = written.path / "pytorch_model.bin"
    torch.save({**torch.load(path, weights_only=True), "epoch": 3}, path)
    with pytest.raises(UserError, match=r"pytorch_model\.bin: entry 'epoch' is not a tensor"):
        load_mplug_owl2(written.path)


def test_no_weights_and_bad_names(tmp_path, model):
    model.config.save(tmp_path / "only-config")
    with pytest.raises(UserError, match="no model weights found"):
        load_mplug_owl2(tmp_path / "only-config")
    with pytest.raises(UserError, match=r"model folder not found: .*does-not-exist"):
        load_mplug_owl2(str(tmp_path / "does-not-exist"))


def test_lora_errors_name_the_file(tmp_path, model):
    written = write_checkpoint(model, tmp_path / "lora", layout="lora")
    non_lora_file = written.path / "non_lora_trainables.bin"
    non_lora = torch.load(non_lora_file, weights_only=True)
    torch.save({**non_lora, PEFT_PREFIX + "model.vision_model.head.weight": torch.zeros(1)}, non_lora_file)
    with pytest.raises(UserError, match=r"non_lora_trainables\.bin: 1 unexpected key\(s\): model\.vision_model\.head"):
        load_mplug_owl2(written.path, base=written.base)
    torch.save(non_lora, non_lora_file)
    adapter = dict(written.adapter)
    adapter[PEFT_PREFIX + "model.norm.lora_A.weight"] = torch.zeros(4, 64)
    adapter[PEFT_PREFIX + "model.norm.lora_B.weight"] = torch.zeros(64, 4)
    torch.save(adapter, written.path / "adapter_model.bin")
    with pytest.raises(UserError, match=r"adapter_model\.bin: LoRA target model\.norm is not a linear layer"):
        load_mplug_owl2(written.path, base=written.base)
    (written.path / "adapter_model.bin").unlink()
    with pytest.raises(UserError, match=r"no adapter_model\.safetensors or adapter_model\.bin"):
        load_mplug_owl2(written.path, base=written.base)


# --- the Hugging Face cache (subprocess: huggingface_hub reads HF_HOME / HF_HUB_OFFLINE at import) -------


def _run_python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO_ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_offline_repo_id_without_cache_is_one_clear_error(tmp_path):
    code = """
        from iqa_cli.errors import UserError
        from iqa_cli.models.mplug_owl2.checkpoints import load_mplug_owl2
        try:
            load_mplug_owl2("zhiyuanyou/DeQA-Score-Mix3")
        except UserError as exc:
            print("USERERROR", exc)
    """
    result = _run_python(code, {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "empty-hf-home")})
    assert result.returncode == 0, result.stderr
    line = result.stdout.strip()
    assert line.startswith("USERERROR model zhiyuanyou/DeQA-Score-Mix3: not in the Hugging Face cache")
    assert "HF_HUB_OFFLINE is set; use a local copy of its folder" in line
    assert "\n" not in line


def test_repo_id_resolves_through_the_cache_and_records_the_commit(tmp_path, model):
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "hub" / "models--tiny-org--tiny-owl"
    write_checkpoint(model, repo / "snapshots" / commit, fmt="bin", shards=2)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    code = f"""
        import torch
        from iqa_cli.models.mplug_owl2.checkpoints import load_mplug_owl2
        a = load_mplug_owl2("tiny-org/tiny-owl")
        b = load_mplug_owl2({str(repo / "snapshots" / commit)!r})
        same = all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))
        print(a.repo_id, a.revision, b.repo_id, b.revision, a.layout, a.weight_format, same)
    """
    result = _run_python(code, {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["tiny-org/tiny-owl", commit, "tiny-org/tiny-owl", commit, "full", "bin", "True"]


@pytest.mark.gpu
def test_lora_loads_straight_onto_the_gpu_in_bfloat16(tmp_path, model):
    written = write_checkpoint(model, tmp_path / "lora", layout="lora")
    loaded = load_mplug_owl2(written.path, base=written.base, dtype=torch.bfloat16, device="cuda")
    assert {(t.device.type, t.dtype) for t in loaded.model.state_dict().values()} == {("cuda", torch.bfloat16)}
    cpu = load_mplug_owl2(written.path, base=written.base, dtype=torch.bfloat16)
    for (name, a), b in zip(loaded.model.state_dict().items(), cpu.model.state_dict().values(), strict=True):
        torch.testing.assert_close(a.cpu(), b, rtol=0, atol=1e-2, msg=name)


def test_corrupt_bin_is_reported_as_unreadable(tmp_path, model):
    written = write_checkpoint(model, tmp_path / "ckpt", fmt="bin")
    (written.path / "pytorch_model.bin").write_bytes(b"not a pickle at all" * 10)
    with pytest.raises(UserError, match=r"pytorch_model\.bin: not a readable PyTorch weights file"):
        load_mplug_owl2(written.path)


def test_corrupt_safetensors_is_reported_as_unreadable(tmp_path, model):
    written = write_checkpoint(model, tmp_path / "ckpt", fmt="safetensors", shards=2)
    (written.path / "model-00002-of-00002.safetensors").write_bytes(b"garbage" * 10)
    with pytest.raises(UserError, match=r"model-00002-of-00002\.safetensors: not a readable safetensors file"):
        load_mplug_owl2(written.path)


def test_skeleton_has_the_models_parameters_and_buffers_and_leaves_torch_dynamo_unimported(tmp_path):
    """Loading builds the model on meta without initializers: same names, shapes and dtypes as a real build,
    and (in a fresh process) no import of torch._dynamo, which torch's meta kernels pull in (~1 s)."""
    code = """
        import sys
        import torch
        from iqa_cli.models.mplug_owl2.config import MPLUGOwl2Config
        from iqa_cli.models.mplug_owl2.model import MPLUGOwl2ForCausalLM, build_skeleton
        config = MPLUGOwl2Config.from_name("mplug-owl2-tiny", deepmlp_hidden_dims=[8, 4])
        skeleton = build_skeleton(config)
        print("dynamo" if "torch._dynamo" in sys.modules else "no-dynamo")
        real = MPLUGOwl2ForCausalLM(config)
        a = [(k, tuple(v.shape), v.dtype, v.device.type) for k, v in skeleton.state_dict().items()]
        b = [(k, tuple(v.shape), v.dtype, "meta") for k, v in real.state_dict().items()]
        print(a == b, len(a))
        print(torch.nn.init.normal_(torch.zeros(3)).abs().sum() > 0)  # the initializers are back
    """
    result = _run_python(code, {})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.split("\n")
    assert lines[0] == "no-dynamo"
    assert lines[1].startswith("True ") and int(lines[1].split()[1]) > 50
    assert lines[2] == "tensor(True)"
