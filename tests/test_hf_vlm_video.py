"""A video through the transformers families, as transformers scores it: the tiny checkpoint's processor run on the
whole video prompt with the video (Qwen2-VL, Qwen2.5-VL, LLaVA-OneVision: `videos=`; Idefics3: the frames as
images), the model's own forward, the level logits at the last position, against `Scorer.score_frames` (the
video's ids spliced into the prompt's one slot); and a call of two videos of one frame count scores each as alone."""

from __future__ import annotations

import pytest
import torch

from iqa_cli.models.hf_vlm.tiny import tiny_checkpoint
from iqa_cli.scoring.scorer import Scorer
from iqa_cli.video import Sampling, load_video
from tests.videos import write_video

pytest.importorskip("av")


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "llava_onevision", "idefics3"])
def test_a_video_scores_as_the_processor_and_model_score_it(family, tmp_path):
    from transformers import AutoProcessor

    scorer = Scorer.from_pretrained(tiny_checkpoint(family, tmp_path / family), device="cpu", dtype="float32")
    clips = [load_video(write_video(tmp_path / f"{i}.mp4", frames=20, fps=6, seed=i), Sampling()) for i in range(2)]
    assert scorer.video_readout.prompt.count("this video") == 1
    together = scorer.score_frames(clips)
    processor = AutoProcessor.from_pretrained(tmp_path / family)
    image_token = scorer.backbone.image_token
    for i, video in enumerate(clips):
        if family == "idefics3":  # the frames as images in the slot
            text = scorer.video_readout.prompt.replace(image_token, image_token * len(video.frames))
            extra = {"images": [video.frames]}
        else:
            text = scorer.video_readout.prompt.replace(image_token, processor.video_token)
            metadata = {"fps": video.fps, "total_num_frames": video.frame_count, "frames_indices": video.indices}
            extra = {"videos": [video.frames], "do_sample_frames": False, "video_metadata": [metadata]}
        inputs = processor(text=[text], return_tensors="pt", add_special_tokens=False, **extra,
                           **scorer.backbone.images_kwargs)  # fmt: skip
        with torch.no_grad():
            logits = scorer.backbone.model(**inputs).logits[0, -1, list(scorer.video_readout.level_token_ids)]
        expected = torch.softmax(logits.double(), -1) @ torch.linspace(1, 5, 5, dtype=torch.float64)
        alone = scorer.score_frames([video])
        assert float(alone.score[0]) == pytest.approx(float(expected), abs=1e-5)
        assert float(together.score[i]) == pytest.approx(float(expected), abs=1e-5)
