"""transformers vision-language models as backbones (iqa_cli/models/hf_vlm): tiny random checkpoints of each family
in the real on-disk format, loaded through the registry, scored exactly as transformers' own forward scores them.
"""

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from iqa_cli.errors import UserError
from iqa_cli.labels import QUALITY_NAMES as DEFAULT_LEVEL_NAMES
from iqa_cli.models.backbone import family_of, load_backbone
from iqa_cli.models.hf_vlm.tiny import TINY_FAMILIES, tiny_checkpoint
from iqa_cli.scoring.scorer import Scorer
from tests.conftest import run_iqa

SIZES = [(40, 60), (70, 30), (50, 50)]  # (h, w): mixed aspect ratios, so Qwen-VL grids differ under --max-pixels


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """model_type -> a tiny random checkpoint directory of that family (built once per module)."""
    root = tmp_path_factory.mktemp("hf_vlm")
    return {family: tiny_checkpoint(family, root / family) for family in TINY_FAMILIES}


def _images(n=3, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in SIZES[:n]]


def _reference_probs(backbone, prompt, level_ids, image):
    """transformers' own path: processor over the rendered prompt and the image, the full forward, the logits of
    the last position at the level ids, softmax in float64."""
    inputs = backbone.processor(text=[prompt], images=[image], return_tensors="pt", **backbone.images_kwargs)
    with torch.no_grad():
        logits = backbone.model(**inputs).logits[0, -1]
    z = logits[level_ids].double()
    return torch.softmax(z, -1).numpy()


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_scores_equal_transformers_own_forward_at_the_level_ids(tiny, family):
    directory = tiny[family]
    assert family_of(directory)[0] == family
    scorer = Scorer.from_pretrained(directory, device="cpu", dtype="float32")
    backbone = scorer.backbone
    readout = scorer.readout
    assert readout.level_names == DEFAULT_LEVEL_NAMES and backbone.image_token in readout.prompt
    assert backbone.tokenizer.convert_ids_to_tokens(list(readout.level_token_ids)) == [
        f"Ġ{w}" for w in DEFAULT_LEVEL_NAMES
    ]
    # the rendered prompt is the chat template over [image, question] with the answer continued to "... is"
    assert readout.prompt.endswith("How would you rate the quality of this image?" + readout.prompt.split("?")[-1])
    assert readout.prompt.endswith("The quality of the image is")
    assert scorer.metadata["prompt"] == readout.prompt
    assert json.loads(scorer.metadata["input_ids"]) == backbone.encode_prompt(readout.prompt)
    assert json.loads(scorer.metadata["level_token_ids"]) == list(readout.level_token_ids)

    images = _images()
    results = scorer.score(images, batch_size=3)
    centers = np.linspace(1, 5, 5)
    for image, result in zip(images, results, strict=True):
        expected = _reference_probs(backbone, readout.prompt, list(readout.level_token_ids), image)
        np.testing.assert_allclose(result.probs, expected, rtol=0, atol=1e-5)
        assert result.score == pytest.approx(float(expected @ centers), abs=1e-5)
        std = float(np.sqrt(expected @ (centers - expected @ centers) ** 2))
        assert result.std == pytest.approx(std, abs=1e-5)


@pytest.mark.parametrize(
    ("family", "pixels"), [("qwen2_vl", 28 * 28 * 6), ("qwen3_vl", None), ("idefics3", None), ("llava_onevision", None)]
)
def test_a_score_does_not_depend_on_its_batch_mates(tiny, family, pixels):
    """Images of different visual-token counts in one batch (right-padded rows) score as they do alone."""
    options = {"min_pixels": 28 * 28, "max_pixels": pixels} if pixels else {}  # Qwen: a grid per aspect ratio
    backbone = Scorer.from_pretrained(tiny[family], device="cpu", dtype="float32", **options).backbone
    images = _images()
    items = [backbone.transform(image) for image in images]
    counts = {int((item["image_ids"] >= 0).sum()) for item in items}
    assert len(counts) > 1, counts  # the batch really mixes sequence lengths
    ids = torch.tensor([backbone.encode_prompt(backbone.default_prompt)])
    together = backbone.forward(backbone.collate(items, 4, torch.float32), ids.expand(4, -1)).logits[:, -1]
    assert torch.equal(together[3], torch.zeros_like(together[3]))  # the padding row is never computed
    failed = backbone.forward(backbone.collate([None, None], 2, torch.float32), ids.expand(2, -1)).logits
    assert failed.shape[0] == 2 and not failed.any()  # a batch of failed images only: nothing runs
    for row, item in enumerate(items):
        alone = backbone.forward(backbone.collate([item], 1, torch.float32), ids).logits[0, -1]
        torch.testing.assert_close(together[row], alone, rtol=0, atol=1e-5)


def test_qwen_pixel_budget_default_and_bounds(tiny):
    from iqa_cli.models.hf_vlm.backbone import load

    backbone = load_backbone(tiny["qwen2_vl"], dtype=torch.float32, device="cpu")
    for side in (100, 900):  # any square image becomes the papers' 448x448: 32 x 32 patches of 14 px
        grid = backbone.transform(Image.new("RGB", (side, side)))["image_grid_thw"]
        assert grid.tolist() == [1, 32, 32]
    grid = backbone.transform(_images(1)[0])["image_grid_thw"]  # other shapes keep their aspect, about as many pixels
    assert int(grid[1] * grid[2]) * 14 * 14 == pytest.approx(448 * 448, rel=0.1) and grid[1] != grid[2]
    with pytest.raises(UserError, match=r"--max-pixels 100 is below one 28x28 patch of qwen2_vl"):
        load(tiny["qwen2_vl"], device="cpu", max_pixels=100)
    with pytest.raises(UserError, match=r"apply to qwen2_vl, qwen2_5_vl, qwen3_vl, not idefics3"):
        load(tiny["idefics3"], device="cpu", max_pixels=448 * 448)


def test_a_level_word_of_several_tokens_is_one_line_with_its_tokens_and_alternatives(tiny):
    backbone = load_backbone(tiny["qwen2_vl"], dtype=torch.float32, device="cpu")
    with pytest.raises(UserError) as caught:
        backbone.level_token_ids(["bad", "superb"])
    message = str(caught.value)
    assert "\n" not in message and "level word 'superb' is" in message
    tokens = backbone.level_tokens("superb")
    assert len(tokens) > 1 and str(tokens) in message
    # " Good" is not in the tiny vocabulary either, " good" is: the lower-case form is offered for "Good"
    with pytest.raises(UserError, match=r"one-token alternatives: good"):
        backbone.level_token_id("Good")


def test_iqa_score_writes_rows_for_a_folder_with_a_qwen2_vl_model(tiny, tmp_path):
    """Mixed sizes at native resolution, two per batch, broken files among them: rows equal each image alone."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, image in enumerate(_images()):
        image.save(folder / f"{i}.png")
    (folder / "broken.jpg").write_bytes(b"not an image")
    (folder / "broken2.jpg").write_bytes(b"not an image either")  # a last batch of failed images only
    out = tmp_path / "scores.parquet"
    model = str(tiny["qwen2_vl"])
    pixels = {"min_pixels": 28 * 28, "max_pixels": 28 * 28 * 6}
    flags = ["--min-pixels", str(pixels["min_pixels"]), "--max-pixels", str(pixels["max_pixels"])]
    common = ["--device", "cpu", "--batch-size", "2", "--workers", "1", "--quiet"]
    result = run_iqa("score", str(folder), "--model", model, "--out", str(out), *common, *flags)
    assert result.returncode == 0, result.stderr
    frame = pd.read_parquet(out).sort_values("image")
    assert len(frame) == 5 and frame["error"].notna().sum() == 2
    good = frame[frame["error"].isna()]
    scorer = Scorer.from_pretrained(model, device="cpu", dtype="float32", **pixels)
    expected = scorer.score([folder / name for name in good["image"]], batch_size=1)  # each alone
    np.testing.assert_allclose(good["score"].to_numpy(float), [r.score for r in expected], rtol=0, atol=1e-5)
    import pyarrow.parquet as pq

    metadata = {k.decode(): v.decode() for k, v in pq.read_schema(out).metadata.items()}
    assert "<|image_pad|>" in metadata["prompt"]
    assert json.loads(metadata["level_token_ids"]) == list(scorer.readout.level_token_ids)
    assert json.loads(metadata["image_processing"]) == {"size": {"shortest_edge": 784, "longest_edge": 4704}}

    too_small = run_iqa("score", str(folder), "--model", model, "--out", str(tmp_path / "x.parquet"), *common,
                        "--max-pixels", "100")  # fmt: skip
    assert too_small.returncode == 2, too_small.stderr
    assert too_small.stderr.strip().splitlines() == [
        "error: --max-pixels 100 is below one 28x28 patch of qwen2_vl (784 pixels)"
    ]


def _copy(source, target, edit=None, remove=()):
    shutil.copytree(source, target)
    for name in remove:
        (target / name).unlink()
    if edit is not None:
        name, change = edit
        data = json.loads((target / name).read_text())
        change(data)
        (target / name).write_text(json.dumps(data))
    return target


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("no_template", r"the processor has no chat template"),
        ("remote_code", r"config\.json: the checkpoint needs remote code"),
        ("unknown_type", r"model_type 'qwen2_audio' is not a supported model family \(supported: .*qwen2_vl"),
    ],
)
def test_bad_checkpoints_are_one_line_and_exit_2(tiny, tmp_path, case, expected):
    source = tiny["idefics3"]
    if case == "no_template":
        model = _copy(source, tmp_path / "m", remove=["chat_template.jinja"])
    elif case == "remote_code":
        model = _copy(source, tmp_path / "m", edit=("config.json", lambda d: d.update(auto_map={"AutoModel": "x.Y"})))
    else:
        model = _copy(source, tmp_path / "m", edit=("config.json", lambda d: d.update(model_type="qwen2_audio")))
    Image.new("RGB", (16, 16)).save(tmp_path / "a.png")
    result = run_iqa(
        "score",
        str(tmp_path / "a.png"),
        "--model",
        str(model),
        "--out",
        str(tmp_path / "s.parquet"),
        "--device",
        "cpu",
        "--quiet",
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    import re

    assert re.search(expected, lines[0]), lines[0]
    assert not (tmp_path / "s.parquet").exists()


def test_bench_families_runs_on_a_tiny_family():
    import subprocess
    import sys

    from tests.conftest import REPO_ROOT

    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "bench_families.py"), "--families", "mplug_owl2,idefics3",
         "--batch-sizes", "1,2", "--repeat", "1", "--size", "64x48", "--json"],
        capture_output=True, text=True, timeout=300, cwd=REPO_ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)["results"]
    assert [r["batch"] for r in rows["idefics3"]] == [1, 2] and rows["mplug_owl2"][0]["visual_tokens"] > 0
    assert all(r["model_images_per_s"] > 0 for r in rows["idefics3"])
