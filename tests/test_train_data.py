"""`iqa_cli.training.data`: metas -> rows, the epoch order, pairs, batches split over ranks, prompts, collate.

Also home of `prepare_synthetic`, which the other `test_train_*` modules import: `iqa_cli.synthetic`'s
images (what `iqa demo` trains on) prepared with the real `iqa prepare custom`.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from iqa_cli.constants import QUESTIONS
from iqa_cli.errors import UserError
from iqa_cli.models.mplug_owl2.backbone import MPLUGOwl2Backbone
from iqa_cli.models.mplug_owl2.tiny import build_tiny_tokenizer, write_tiny_checkpoint
from iqa_cli.models.mplug_owl2.tokenizer import (
    DEFAULT_PROMPT,
    IGNORE_INDEX,
    IMAGE_TOKEN_INDEX,
    LlamaTokenizer,
    level_token_ids,
    tokenize_prompt,
)
from iqa_cli.synthetic import make_synthetic_iqa
from iqa_cli.training import data as train_data
from tests.conftest import run_iqa

# --- synthetic IQA data (shared with the other train tests) -----------------------------------------------

write_tiny_model = write_tiny_checkpoint  # the name tests/test_train_run.py imports


def prepare_synthetic(tmp: Path, name: str, n: int, *, seed: int = 0, extra: tuple[str, ...] = (), **kwargs) -> Path:
    """Synthetic data prepared with the real `iqa prepare custom`; returns the data dir."""
    csv_path = make_synthetic_iqa(tmp / f"{name}-src", n, seed=seed, **kwargs)
    data_dir = tmp / "data"
    proc = run_iqa(
        "prepare", "custom", "--csv", str(csv_path), "--images", str(csv_path.parent / "images"),
        "--image-col", "image", "--mos-col", "mos", "--std-col", "std", "--name", name,
        "--data-dir", str(data_dir), "--json", *extra,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return data_dir


# --- metas ----------------------------------------------------------------------------------------------------


def _write_meta(path: Path, names: list[str], root: Path | str, *, n: int = 6, dataset: str = "toy") -> None:
    import pandas as pd

    from iqa_cli.prepare import write_meta

    k = len(names)
    frame = pd.DataFrame(
        {
            "image": [f"{dataset}{i}.png" for i in range(n)],
            "dataset": dataset,
            "split": ["train"] * (n - 2) + ["test"] * 2,
            "mos": np.linspace(10, 90, n),
            "std": np.full(n, 5.0),
            "mos_norm": np.linspace(1, 5, n),
            "std_norm": [np.nan] + [0.5] * (n - 1),
            "level": np.arange(n) % k,
        }
    )
    soft = np.full((n, k), 1.0 / k)
    metadata = {"level_names": json.dumps(names), "levels": str(k), "image_root": str(root), "dataset": dataset}
    write_meta(frame, soft, metadata, path)


def test_metas_are_found_by_name_or_path_and_unknown_names_list_the_prepared_ones(tmp_path):
    data = tmp_path / "data"
    _write_meta(data / "alpha.parquet", ["bad", "good"], tmp_path, dataset="alpha")
    _write_meta(tmp_path / "beta.parquet", ["bad", "good"], tmp_path, dataset="beta")
    loaded = train_data.load_train_data(["alpha", str(tmp_path / "beta.parquet")], data, check_files=False)
    assert loaded.dataset_names == ["alpha", "beta"]
    assert loaded.level_names == ("bad", "good")
    assert len(loaded.train) == 8 and len(loaded.test) == 4
    assert loaded.train.paths[0] == str(tmp_path / "alpha0.png")
    assert loaded.train.std[0] == 0.0  # no std: the fidelity target becomes a step
    with pytest.raises(UserError, match=r"unknown dataset 'gamma'.*prepared datasets in .*: alpha"):
        train_data.load_train_data(["gamma"], data)


def test_metas_with_different_level_sets_are_refused(tmp_path):
    _write_meta(tmp_path / "a.parquet", ["bad", "poor", "fair", "good", "excellent"], tmp_path, dataset="a")
    _write_meta(tmp_path / "b.parquet", ["one", "two", "three"], tmp_path, dataset="b")
    with pytest.raises(UserError, match=r"b\.parquet has levels \['one', 'two', 'three'\] but .*a\.parquet has"):
        train_data.load_train_data([str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet")], tmp_path)


def test_missing_images_and_missing_image_root_are_user_errors(tmp_path):
    _write_meta(tmp_path / "a.parquet", ["bad", "good"], tmp_path / "nowhere", dataset="a")
    with pytest.raises(UserError, match=r"none of the 6 images of a found under .*nowhere"):
        train_data.load_train_data([str(tmp_path / "a.parquet")], tmp_path)
    _write_meta(tmp_path / "b.parquet", ["bad", "good"], "", dataset="b")
    with pytest.raises(UserError, match=r"no image root recorded.*--images"):
        train_data.load_train_data([str(tmp_path / "b.parquet")], tmp_path)


def test_missing_images_are_skipped_counted_and_fingerprinted(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    _write_meta(tmp_path / "a.parquet", ["bad", "good"], images, n=8, dataset="a")
    for i in range(8):
        (images / f"a{i}.png").write_bytes(b"")
    full = train_data.load_train_data([str(tmp_path / "a.parquet")], tmp_path)
    assert not full.notes and capsys.readouterr().err == ""
    for i in (1, 2, 7):  # two train rows, one test row
        (images / f"a{i}.png").unlink()
    part = train_data.load_train_data([str(tmp_path / "a.parquet")], tmp_path)
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "skipped 3 image(s) not found: 3 of 8 of a" in err
    assert str(images / "a1.png") in err and part.notes == [err.strip().removeprefix("warning: ")]
    assert [Path(p).name for p in part.train.paths] == ["a0.png", "a3.png", "a4.png", "a5.png"]
    assert [Path(p).name for p in part.test.paths] == ["a6.png"]
    np.testing.assert_array_equal(part.train.mos, full.train.mos[[0, 3, 4, 5]])
    assert part.fingerprint != full.fingerprint  # a resumed run notices that other images are now missing


def test_all_images_missing_is_one_line_from_the_real_train_command(tmp_path):
    _write_meta(tmp_path / "a.parquet", ["bad", "good"], tmp_path / "nowhere", dataset="a")
    proc = run_iqa("train", "--datasets", str(tmp_path / "a.parquet"), "--out", str(tmp_path / "run"), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    root = tmp_path / "nowhere"
    assert proc.stderr.strip().splitlines() == [
        f"error: none of the 6 images of a found under {root} (e.g. {root / 'a0.png'}); pass --images DIR"
    ]
    assert not (tmp_path / "run").exists()


def test_a_relative_image_root_of_an_older_meta_resolves_beside_the_meta_else_in_the_cwd(tmp_path, monkeypatch):
    data = tmp_path / "data"
    (data / "imgs").mkdir(parents=True)
    _write_meta(data / "a.parquet", ["bad", "good"], "imgs", dataset="a")
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "pics").mkdir(parents=True)
    _write_meta(data / "b.parquet", ["bad", "good"], "pics", dataset="b")
    monkeypatch.chdir(elsewhere)
    loaded = train_data.load_train_data([str(data / "a.parquet"), str(data / "b.parquet")], data, check_files=False)
    assert [m.image_root for m in loaded.metas] == [data / "imgs", elsewhere / "pics"]
    assert loaded.train.paths[0] == str(data / "imgs" / "a0.png")


def test_questions_are_fixed_per_image_and_seeded_per_dataset():
    a = train_data.draw_questions(1000, "koniq", seed=3, count=len(QUESTIONS))
    assert np.array_equal(a, train_data.draw_questions(1000, "koniq", seed=3, count=len(QUESTIONS)))
    assert not np.array_equal(a, train_data.draw_questions(1000, "spaq", seed=3, count=len(QUESTIONS)))
    counts = np.bincount(a, minlength=len(QUESTIONS))
    assert counts.min() > 60  # every phrasing is used, roughly uniformly (expected 100 each)


# --- order, pairs, batches ---------------------------------------------------------------------------------------


def test_data_weights_repeat_rows_and_each_epoch_is_a_seeded_permutation():
    group = np.array([0, 0, 0, 1, 1])
    pool = train_data.weighted_rows(group, [2, 1])
    assert sorted(pool.tolist()) == [0, 0, 1, 1, 2, 2, 3, 4]
    e0 = train_data.epoch_order(pool, seed=1, epoch=0)
    assert sorted(e0.tolist()) == sorted(pool.tolist())
    assert np.array_equal(e0, train_data.epoch_order(pool, seed=1, epoch=0))
    assert not np.array_equal(e0, train_data.epoch_order(pool, seed=1, epoch=1))


def test_partners_come_from_the_same_dataset_are_never_the_image_itself_and_are_uniform():
    group = np.array([0] * 5 + [1] * 3 + [2] * 2)
    order = np.tile(np.arange(10), 3000)
    partners = train_data.draw_partners(order, group, seed=0, epoch=0)
    assert np.all(group[partners] == group[order])
    assert np.all(partners != order)
    # row 0's partners: uniform over rows 1..4 of its dataset (3000 draws, expected 750 each)
    counts = np.bincount(partners[order == 0], minlength=10)[1:5]
    assert counts.min() > 650 and counts.max() < 850
    assert np.all(partners[order == 8] == 9)  # a two-image dataset has one possible partner
    with pytest.raises(UserError, match="2\\+ train images"):
        train_data.draw_partners(np.array([0, 1]), np.array([0, 1]), seed=0, epoch=0)


def test_global_batch_is_split_over_ranks_and_accumulation_exactly_once():
    plan = train_data.BatchPlan(batch_size=12, world_size=2, accumulation=3)
    assert plan.micro_batch == 2
    order = np.arange(40)
    step = 2
    seen = np.concatenate([np.concatenate(plan.micro_batches(order, step, rank)) for rank in range(plan.world_size)])
    assert sorted(seen.tolist()) == list(range(24, 36))
    assert plan.steps_per_epoch(40) == 3  # the incomplete last batch is dropped
    with pytest.raises(UserError, match=r"--batch-size 10 is not divisible by 4 rank\(s\) x 1"):
        train_data.BatchPlan(batch_size=10, world_size=4)


def test_sampler_starts_at_the_resumed_step_and_yields_pairs():
    plan = train_data.BatchPlan(batch_size=2)
    order, partners = np.arange(6), np.array([5, 4, 3, 2, 1, 0])
    sampler = train_data.EpochSampler(order, partners, plan, rank=0, start_step=1)
    assert list(sampler) == [[(2, 3), (3, 2)], [(4, 1), (5, 0)]]
    assert len(sampler) == 2


# --- prompts and batches ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_tok(tmp_path_factory) -> LlamaTokenizer:
    return LlamaTokenizer.from_dir(build_tiny_tokenizer(tmp_path_factory.mktemp("tok")))


def text_backbone(tok: LlamaTokenizer, image_size: int = 4) -> MPLUGOwl2Backbone:
    """The family's prompt encoding and collate without a model."""
    return MPLUGOwl2Backbone(None, tok, SimpleNamespace(image_size=image_size))


def test_level_token_is_located_in_the_response_for_words_and_added_score_tokens(tiny_tok, tmp_path):
    words = ["bad", "poor", "fair", "good", "excellent"]
    ids = level_token_ids(tiny_tok, words)
    table = train_data.encode_conversations(text_backbone(tiny_tok), QUESTIONS[:2], words, ids, image_first=True)
    for (_, k), enc in table.items():
        assert enc.input_ids[enc.level_pos] == ids[k] == enc.labels[enc.level_pos]
        assert enc.input_ids[1:3] != (IMAGE_TOKEN_INDEX,) and IMAGE_TOKEN_INDEX in enc.input_ids
        assert enc.labels[enc.level_pos - 1] != IGNORE_INDEX  # the response is supervised up to the level
    tok = LlamaTokenizer.from_dir(tiny_tok.save(tmp_path / "tok"))
    score = [f"<score{i}>" for i in range(1, 6)]
    score_ids = tok.add_tokens(score)
    scoring = train_data.encode_conversations(text_backbone(tok), ["How would you rate the quality of this image?"],
                                              score, score_ids, image_first=False)  # fmt: skip
    enc = scoring[0, 2]
    prompt = tokenize_prompt(tok, DEFAULT_PROMPT)
    # the response piece between "is" and an added token is a lone "▁", which scoring must feed too
    assert list(enc.input_ids[: len(prompt)]) == prompt
    assert [tok.id_to_token(i) for i in enc.input_ids[len(prompt) : enc.level_pos]] == ["▁"]


def test_collate_pads_right_and_puts_partners_after_their_images(tiny_tok):
    words = ["bad", "good"]
    ids = level_token_ids(tiny_tok, words)
    backbone = text_backbone(tiny_tok)
    table = train_data.encode_conversations(backbone, QUESTIONS[:2], words, ids, image_first=True)
    rows = train_data.Rows(
        paths=["a", "b", "c"],
        group=np.zeros(3, dtype=np.int64),
        mos=np.array([1.0, 3.0, 5.0]),
        std=np.array([0.1, 0.2, 0.3]),
        mos_raw=np.array([1.0, 3.0, 5.0]),
        level=np.array([0, 1, 1]),
        soft=np.array([[0.9, 0.1], [0.4, 0.6], [0.0, 1.0]], dtype=np.float32),
        question=np.array([0, 1, 0]),
    )

    def item(row: int) -> dict:
        return {"row": row, "path": rows.paths[row], "visual": {"pixel_values": torch.full((3, 4, 4), float(row))},
                "error": None, "enc": table[int(rows.question[row]), int(rows.level[row])]}  # fmt: skip

    broken = {**item(2), "visual": None, "error": "c: truncated"}
    collate = train_data.Collate(tiny_tok.pad_id, rows, paired=True, visual_collate=backbone.collate)
    batch = collate([(item(0), item(1)), (item(1), broken)])
    assert batch.pairs == 1 and len(batch) == 2  # the pair with an undecodable image is dropped
    assert batch.skipped == ["c: truncated"]
    assert batch.visual["pixel_values"][:, 0, 0, 0].tolist() == [0.0, 1.0]  # A first, then its partner B
    a, b = table[0, 0], table[1, 1]
    assert batch.input_ids.shape[1] == max(len(a.input_ids), len(b.input_ids))
    short = 0 if len(a.input_ids) < len(b.input_ids) else 1
    n = len((a, b)[short].input_ids)
    assert (batch.input_ids[short, n:] == tiny_tok.pad_id).all() and (batch.labels[short, n:] == IGNORE_INDEX).all()
    assert batch.attention_mask.sum(1).tolist() == [len(a.input_ids), len(b.input_ids)]
    assert batch.level_pos.tolist() == [a.level_pos, b.level_pos]
    assert torch.equal(batch.soft_labels, torch.tensor([[0.9, 0.1], [0.4, 0.6]]))
    assert batch.mos.tolist() == [1.0, 3.0]
