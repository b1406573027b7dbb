"""Training on videos with the tiny mPLUG-Owl2: a micro batch mixing an image and a video gives each row the logits
it has alone (the video collate masks the image row's missing frames), and `iqa train` runs on metas of images
(quality), aesthetics and clips together, recording each dataset's task."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from iqa_cli.models.backbone import load_backbone
from iqa_cli.models.mplug_owl2.tiny import write_tiny_checkpoint
from iqa_cli.prepare import write_meta
from iqa_cli.video import Sampling, load_video
from tests.conftest import ONE_THREAD, run_iqa
from tests.videos import write_video

pytest.importorskip("av")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model")


def test_a_mixed_micro_batch_gives_each_row_its_own_logits(tiny, tmp_path):
    backbone = load_backbone(tiny, dtype=torch.float32, device="cpu")
    backbone.model.eval()
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 40, 3), dtype=np.uint8))
    video = load_video(write_video(tmp_path / "clip.mp4", frames=18, fps=6), Sampling())
    items = [backbone.transform(image), backbone.video_transform(video)]
    ids, _, level = backbone.encode_training("How would you rate the quality of this image?", "good",
                                                  backbone.level_token_id("good"), image_first=True)  # fmt: skip
    row = torch.tensor([ids])

    def logits(visual, rows: int) -> torch.Tensor:
        with torch.no_grad():
            out, _ = backbone.training_forward(backbone.model, visual, row.expand(rows, -1), torch.ones(rows, len(ids)))
        return out

    mixed = logits(backbone.video_collate(items, 2, torch.float32), 2)
    assert backbone.video_collate(items, 2, torch.float32)["frame_counts"].tolist() == [1, 3]
    alone_image = logits(backbone.collate(items[:1], 1, torch.float32), 1)
    alone_video = logits(backbone.video_collate(items[1:], 1, torch.float32), 1)
    torch.testing.assert_close(mixed[0], alone_image[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(mixed[1], alone_video[0], rtol=0, atol=1e-5)
    assert not torch.allclose(alone_image[0, level], alone_video[0, level])  # the two rows differ


def _meta(path, names, root, task=None):
    n = len(names)
    rng = np.random.default_rng(len(names))
    mos = rng.uniform(1, 5, n)
    frame = pd.DataFrame({"image": names, "dataset": path.stem, "split": ["train"] * (n - 2) + ["test"] * 2,
                          "mos": mos, "std": 0.5, "mos_norm": mos, "std_norm": 0.5,
                          "level": np.clip(np.rint(mos) - 1, 0, 4).astype(np.int32), "fallback": False})  # fmt: skip
    soft = np.eye(5, dtype=np.float32)[frame["level"]]
    metadata = {"dataset": path.stem, "image_root": str(root), "level_names": json.dumps(["bad", "poor", "fair",
                "good", "excellent"]), "levels": "5", **({"task": task} if task else {})}  # fmt: skip
    write_meta(frame, soft, metadata, path)


def test_iqa_train_mixes_images_aesthetics_and_clips(tiny, tmp_path):
    """Q-Scorer (score tokens, the regressor read at the level position) on the three kinds at once."""
    media = tmp_path / "media"
    media.mkdir()
    for i in range(6):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(media / f"{i}.png")
        write_video(media / f"{i}.mp4", frames=8, fps=4, seed=i)
    data = tmp_path / "data"
    data.mkdir()
    _meta(data / "stills.parquet", [f"{i}.png" for i in range(6)], media)
    _meta(data / "looks.parquet", [f"{i}.png" for i in range(6)], media, task="aesthetics")
    _meta(data / "clips.parquet", [f"{i}.mp4" for i in range(6)], media)
    run = tmp_path / "run"
    proc = run_iqa("train", "--datasets", "stills,looks,clips", "--data-dir", str(data), "--model", str(tiny),
                   "--out", str(run), "--method", "qscorer", "--max-steps", "3", "--batch-size", "4", "--lr", "1e-3",
                   "--no-gradient-checkpointing", "--workers", "0", "--frames", "2", "-q", "--mlp-dims", "16,8",
                   env=ONE_THREAD)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    info = json.loads((run / "iqa.json").read_text())
    assert info["tasks"] == {"stills": "quality", "looks": "aesthetics", "clips": "quality"}
    assert info["task"] == "quality" and "quality of this image" in info["prompt"]
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss"]) for r in log if "loss" in r)
    evaluated = [r["eval"] for r in log if "eval" in r][-1]
    assert set(evaluated) == {"stills", "looks", "clips"}  # each dataset scored with its own prompt
