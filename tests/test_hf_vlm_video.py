"""A video through the transformers families, as transformers scores it: the tiny checkpoint's processor run on the
whole video prompt with the video (Qwen2-VL, Qwen2.5-VL, LLaVA-OneVision: `videos=`; Idefics3: the frames as
images), the model's own forward, the level logits at the last position, against `Scorer.score_frames` (the
video's ids spliced into the prompt's one slot); and a call of two videos of one frame count scores each as alone.
Qwen3-VL (a `<t seconds>` and a vision start/end pair per temporal patch, the template's pair around the video
dropped): the ids equal the processor's for the chat template rendered with the video, for scoring, for training
(a micro batch with an image) and through `iqa score`."""

from __future__ import annotations

import numpy as np
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


# --- Qwen3-VL: a timestamp and a vision start/end pair per temporal patch ---------------------------------------


PIXELS = {"min_pixels": 128 * 128, "max_pixels": 128 * 128}  # a small budget: fewer visual tokens, a faster test


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    return tiny_checkpoint("qwen3_vl", tmp_path_factory.mktemp("qwen3_vl") / "model")


def _qwen3_inputs(processor, backbone, messages: list, video, **template) -> dict:
    """transformers alone: the chat template rendered with a video, the processor given the frames as sampled (a
    one-frame clip as its frame twice, the temporal padding Qwen3-VL gives a last patch) and the per-frame pixel cap
    that `iqa` passes (the reference qwen-vl-utils' budget)."""
    text = processor.apply_chat_template(messages, tokenize=False, **template)
    frames, indices = (video.frames * 2, video.indices * 2) if len(video.frames) == 1 else (video.frames, video.indices)
    metadata = {"fps": video.fps, "total_num_frames": video.frame_count, "frames_indices": indices}
    return processor(text=[text], videos=[frames], video_metadata=[metadata], do_sample_frames=False,
                     cap_pixels_per_frame=True, return_tensors="pt", add_special_tokens=False,
                     **backbone.images_kwargs)  # fmt: skip


def _asked(question: str, answer: str) -> list:
    return [
        {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]},
        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
    ]


def test_qwen3_vl_scores_a_video_with_its_frame_timestamps_as_transformers_does(qwen3, tmp_path):
    """The ids `iqa` builds equal the processor's (`<t seconds>` and a start/end pair per temporal patch, the
    template's pair around the video gone), and the level probabilities equal softmax of the model's own logits;
    two clips of one frame count but different sizes score in one call as alone."""
    from transformers import AutoProcessor

    from iqa_cli.tasks import question, response_prefix

    scorer = Scorer.from_pretrained(qwen3, device="cpu", dtype="float32", **PIXELS)
    backbone, readout = scorer.backbone, scorer.video_readout
    processor = AutoProcessor.from_pretrained(qwen3)
    sizes = ((32, 24), (40, 64), (24, 32))
    paths = [write_video(tmp_path / f"{i}.mp4", frames=n, fps=6, size=size, seed=i)
             for i, (n, size) in enumerate(zip((20, 18, 1), sizes, strict=True))]  # fmt: skip
    clips = [load_video(path, Sampling()) for path in paths]
    assert [len(c.frames) for c in clips] == [3, 3, 1]
    together = scorer.score_frames(clips[:2])
    messages = _asked(question("quality", True), response_prefix("quality", True))
    for i, video in enumerate(clips):
        inputs = _qwen3_inputs(processor, backbone, messages, video, continue_final_message=True)
        ids = processor.tokenizer.convert_ids_to_tokens(inputs["input_ids"][0])
        assert ids.count("<|vision_start|>") == ids.count("<|vision_end|>") == int(inputs["video_grid_thw"][0, 0])
        visual = backbone.video_collate([backbone.video_transform(video)], 1, torch.float32)
        spliced, _, _ = backbone._splice(visual, torch.tensor([readout.input_ids]), None)
        assert spliced["input_ids"].tolist() == inputs["input_ids"].tolist()
        assert spliced["mm_token_type_ids"].tolist() == inputs["mm_token_type_ids"].tolist()
        with torch.no_grad():
            logits = backbone.model(**inputs).logits[0, -1, list(readout.level_token_ids)]
        expected = torch.softmax(logits.double(), -1).float()
        torch.testing.assert_close(scorer.score_frames([video]).probs[0], expected, rtol=0, atol=1e-5)
        if i < 2:
            torch.testing.assert_close(together.probs[i], expected, rtol=0, atol=1e-5)
    assert not torch.allclose(together.probs[0], together.probs[1], atol=1e-4)  # the two clips differ


def test_qwen3_vl_trains_on_a_video_as_transformers_computes_it(qwen3, tmp_path):
    """The training forward of a micro batch holding an image and a video: the video row's logits at its text
    positions equal the model's own on the processor's ids for the training conversation rendered with the video,
    and the image row's equal its logits alone."""
    from PIL import Image
    from transformers import AutoProcessor

    from iqa_cli.models.backbone import load_backbone
    from iqa_cli.tasks import question, response_prefix

    backbone = load_backbone(qwen3, dtype=torch.float32, device="cpu", **PIXELS)
    backbone.model.eval()
    processor = AutoProcessor.from_pretrained(qwen3)
    video = load_video(write_video(tmp_path / "clip.mp4", frames=18, fps=6), Sampling())
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 40, 3), dtype=np.uint8))
    ask, prefix = question("quality", True), response_prefix("quality", True)
    ids, _, level = backbone.encode_training(ask, "good", backbone.level_token_id("good"), image_first=True,
                                             response_prefix=prefix)  # fmt: skip
    row = torch.tensor([ids])
    items = [backbone.transform(image), backbone.video_transform(video)]
    with torch.no_grad():
        both, _ = backbone.training_forward(backbone.model, backbone.video_collate(items, 2, torch.float32),
                                            row.expand(2, -1), torch.ones(2, len(ids)))  # fmt: skip
        image_alone, _ = backbone.training_forward(backbone.model, backbone.collate(items[:1], 1, torch.float32), row,
                                                   torch.ones(1, len(ids)))  # fmt: skip
        inputs = _qwen3_inputs(processor, backbone, _asked(ask, f"{prefix} good."), video)
        own = backbone.model(**inputs).logits[0]
    full = inputs["input_ids"][0].tolist()
    tail = len(ids) - ids.index(backbone.image_token_id) - 2  # the ids after the template's end marker
    assert full[-tail:] == ids[-tail:]
    torch.testing.assert_close(both[1, -tail:], own[-tail:], rtol=0, atol=1e-5)
    torch.testing.assert_close(both[0], image_alone[0], rtol=0, atol=1e-5)
    assert level >= len(ids) - tail


def test_iqa_score_writes_a_qwen3_vl_videos_row(qwen3, tmp_path):
    import pyarrow.parquet as pq

    from tests.conftest import ONE_THREAD, run_iqa

    folder = tmp_path / "clips"
    folder.mkdir()
    write_video(folder / "a.mp4", frames=20, fps=6, seed=1)
    write_video(folder / "b-one.mp4", frames=1, fps=4, seed=2)
    out = tmp_path / "scores.parquet"
    pixels = ("--min-pixels", str(PIXELS["min_pixels"]), "--max-pixels", str(PIXELS["max_pixels"]))
    result = run_iqa("score", str(folder), "--model", str(qwen3), "--out", str(out), "--device", "cpu", *pixels,
                     env=ONE_THREAD)  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = pq.read_table(out).to_pandas().set_index("image")
    assert rows["error"].isna().all() and list(rows["frames"]) == [3, 1]
    scorer = Scorer.from_pretrained(qwen3, device="cpu", dtype="float32", **PIXELS)
    for name in rows.index:
        expected = scorer.score_frames([load_video(folder / name, Sampling())]).score[0]
        assert rows.loc[name, "score"] == pytest.approx(float(expected), abs=1e-5)
