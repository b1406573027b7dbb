"""The full-size 7B model, built on the meta device: names, shapes and sizes of the released checkpoints."""

import json

import pytest
import torch

from iqa_cli.models.mplug_owl2.config import MPLUGOwl2Config
from iqa_cli.models.mplug_owl2.model import MPLUGOwl2ForCausalLM
from tests.conftest import KEYS_FIXTURE

# DeQA-Score / Q-Align / mPLUG-Owl2 7B: 8,197,859,328 learned parameters; the state dict also holds the
# abstractor's 6 x (64 + 1025) x 1024 = 6,690,816 sin-cos buffer entries.
NUM_PARAMETERS_7B = 8_197_859_328
NUM_STATE_DICT_ELEMENTS_7B = 8_204_550_144


@pytest.fixture(scope="module")
def meta_7b() -> MPLUGOwl2ForCausalLM:
    with torch.device("meta"):
        return MPLUGOwl2ForCausalLM(MPLUGOwl2Config.from_name("mplug-owl2-7b"))


@pytest.fixture(scope="module")
def released_keys() -> dict:
    return json.loads(KEYS_FIXTURE.read_text())


def test_7b_state_dict_has_exactly_the_released_names_and_shapes(meta_7b, released_keys):
    ours = {k: list(v.shape) for k, v in meta_7b.state_dict().items()}
    theirs = {name: shape for name, shape in released_keys["keys"]}
    assert len(theirs) == 862
    assert sorted(set(ours) - set(theirs)) == []
    assert sorted(set(theirs) - set(ours)) == []
    assert {k: v for k, v in ours.items() if theirs[k] != v} == {}


def test_7b_parameter_count(meta_7b, released_keys):
    n_params = sum(p.numel() for p in meta_7b.parameters())
    n_state = sum(t.numel() for t in meta_7b.state_dict().values())
    assert n_params == NUM_PARAMETERS_7B == released_keys["num_parameters"]
    assert n_state == NUM_STATE_DICT_ELEMENTS_7B == released_keys["num_state_dict_elements"]
    parts = released_keys["state_dict_elements_by_part"]
    sd = meta_7b.state_dict()
    assert sum(t.numel() for k, t in sd.items() if k.startswith("model.vision_model.")) == parts["vision_model"]
    assert (
        sum(t.numel() for k, t in sd.items() if k.startswith("model.visual_abstractor.")) == parts["visual_abstractor"]
    )


def test_7b_config_round_trips_the_reference_config(released_keys):
    """The reference's own config.json (with all its PretrainedConfig defaults) reads as the 7B size and
    writes back unchanged."""
    reference = released_keys["config"]
    config = MPLUGOwl2Config.from_hf_dict(reference)
    seven_b = MPLUGOwl2Config.from_name("mplug-owl2-7b")
    assert config.language == seven_b.language
    assert (config.vision.hidden_size, config.vision.image_size, config.vision.patch_size) == (1024, 448, 14)
    assert config.abstractor.grid_size == 32 and config.abstractor.num_learnable_queries == 64
    assert config.num_visual_tokens == 65
    assert config.to_hf_dict() == reference


def test_7b_forward_shapes_on_meta(meta_7b):
    """One image becomes 65 LLM tokens; logits only at the last position when asked."""
    ids = torch.tensor([[1, 3148, 1001, 29901, -200, 29871, 319, 338]], device="meta")
    pixels = torch.empty(1, 3, 448, 448, device="meta")
    out = meta_7b(ids, pixels, logits_at="last")
    assert out.hidden_states.shape == (1, 8 - 1 + 65, 4096)
    assert out.logits.shape == (1, 1, 32000)


def test_config_save_load_keeps_qscorer_and_unknown_keys(tmp_path):
    config = MPLUGOwl2Config.from_name("mplug-owl2-tiny", vocab_size=517, deepmlp_hidden_dims=[2048, 1024])
    config.extra.update({"level_ids": [15129, 1781], "tune_visual_abstractor": True})
    config.visual_extra["note"] = "kept"
    path = config.save(tmp_path)
    data = json.loads(path.read_text())
    assert data["model_type"] == "mplug_owl2" and data["vocab_size"] == 517
    assert data["deepmlp_hidden_dims"] == [2048, 1024] and data["score_token_id"] == []
    assert data["visual_config"]["note"] == "kept" and data["level_ids"] == [15129, 1781]
    assert set(data["visual_config"]) == {"note", "visual_model", "visual_abstractor"}
    again = MPLUGOwl2Config.load(tmp_path)
    assert again == config
    assert again.to_hf_dict() == data


def test_config_errors_name_the_file(tmp_path):
    from iqa_cli.errors import UserError

    with pytest.raises(UserError, match="unknown model size 'owl-9000'"):
        MPLUGOwl2Config.from_name("owl-9000")
    bad = MPLUGOwl2Config.from_name("mplug-owl2-tiny").to_hf_dict()
    bad["visual_config"]["visual_abstractor"]["grid_size"] = 3
    (tmp_path / "config.json").write_text(json.dumps(bad))
    with pytest.raises(UserError, match=r"config\.json: unsupported mPLUG-Owl2 config: visual_abstractor\.grid_size 3"):
        MPLUGOwl2Config.load(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(UserError, match=r"config\.json: not a readable JSON config"):
        MPLUGOwl2Config.load(tmp_path / "config.json")
