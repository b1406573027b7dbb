"""In-loop evaluation: the test split of the metas scored the way `iqa score` will score the trained model,
PLCC/SRCC per dataset, logged and printed."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from iqa_cli import distributed, interrupts
from iqa_cli.training import data as train_data
from iqa_cli.training.model import Levels
from iqa_cli.training.session import Session, autocast, workers


def readout(levels: Levels):
    """The scoring readout (`scoring.readout.Readout`) of the levels being trained."""
    from iqa_cli.scoring.readout import Readout

    return Readout(levels.input_ids, levels.ids, levels.names, levels.prompt, levels.regressor)


def _readouts(session: Session) -> list[Any]:
    """The scoring readout of each prompt set (task, image or video): the levels' own for the run's task on images
    (what `iqa.json` records), the family's task prompt for the others."""
    from iqa_cli.scoring.readout import Readout

    levels, backbone, data = session.levels, session.backbone, session.data
    looks = []
    for task, video in data.prompt_sets:
        if (task, video) == (data.task(), False):
            looks.append(readout(levels))
            continue
        prompt, ids = train_data.scoring_ids(backbone, task, video, levels.tokens, levels.ids)
        looks.append(Readout(ids, levels.ids, levels.names, prompt, levels.regressor))
    return looks


def evaluate(session: Session) -> dict[str, Any]:
    """Scores the test split with the scoring readout (`scoring.readout.level_readout`; a dataset's task, a video's
    prompt) and reports PLCC/SRCC per dataset against the published MOS. Every rank scores a strided share of
    each prompt set's rows (the same number of batches on every rank, as FSDP needs); rank 0 gets the numbers."""
    from torch.utils.data import DataLoader

    from iqa_cli.metrics import plcc, srcc
    from iqa_cli.scoring.readout import level_readout

    test = session.data.test
    env = session.env
    backbone = session.backbone
    core = session.core
    was_training = core.training
    core.eval()
    results: dict[int, tuple[float, float]] = {}
    sets = test.prompt if test.prompt is not None else np.zeros(len(test), dtype=np.int64)
    try:
        for s, look in enumerate(_readouts(session)):
            members = np.flatnonzero(sets == s)
            if not len(members):
                continue
            video = session.data.prompt_sets[s][1]
            per_rank = math.ceil(len(members) / env.world_size)
            mine = members[np.arange(env.rank, per_rank * env.world_size, env.world_size) % len(members)]
            dataset = train_data.EvalImages(
                [test.paths[i] for i in mine],
                backbone.transform,
                video=video,
                video_transform=getattr(backbone, "video_transform", None),
                sampling=session.config.data.sampling(),
            )
            collate = backbone.video_collate if video else backbone.collate
            loader = DataLoader(
                dataset,
                batch_size=session.config.eval.batch_size,
                collate_fn=train_data.EvalCollate(collate),
                num_workers=workers(session),
                generator=torch.Generator().manual_seed(0),
                worker_init_fn=interrupts.leave_to_main_process,
            )
            for visual, index, ok in loader:
                # no_grad, not inference_mode: FSDP2 reuses the parameters it gathers, and inference tensors made in
                # the first forward of a process (a resumed run's final evaluation) cannot serve the next one
                with torch.no_grad(), autocast(session):
                    scores = level_readout(backbone, visual, look)
                score = scores.score.float().cpu()
                reg = torch.full_like(score, math.nan) if scores.score_reg is None else scores.score_reg.float().cpu()
                for j in range(len(index)):
                    if ok[j]:
                        results.setdefault(int(mine[int(index[j])]), (float(score[j]), float(reg[j])))
    finally:
        core.train(was_training)
    gathered: dict[int, tuple[float, float]] = {}
    for part in distributed.all_gather_object(results):
        gathered.update(part)
    if not env.is_main:
        return {}
    report: dict[str, Any] = {}
    rows = np.array(sorted(gathered), dtype=np.int64)
    if not len(rows):
        return report
    score = np.array([gathered[i][0] for i in rows])
    reg = np.array([gathered[i][1] for i in rows])
    for g, meta in enumerate(session.data.metas):
        pick = test.group[rows] == g
        if pick.sum() < 2:
            continue
        mos = test.mos_raw[rows[pick]]
        entry = {"n": int(pick.sum()), "plcc": plcc(score[pick], mos), "srcc": srcc(score[pick], mos)}
        if session.levels.regressor:
            entry["plcc_reg"] = plcc(reg[pick], mos)
            entry["srcc_reg"] = srcc(reg[pick], mos)
        report[meta.name] = entry
    return report


def evaluate_and_log(session: Session, say) -> dict[str, Any]:
    """`evaluate`, then the report into the run's log and one line per dataset through `say`."""
    report = evaluate(session)
    session.history.append({"step": session.progress.global_step, "report": report})
    if session.env.is_main and report:
        session.run.append_log({"step": session.progress.global_step, "eval": report})
        for name, entry in report.items():
            line = f"eval step {session.progress.global_step}: {name} PLCC {entry['plcc']:.4f} SRCC {entry['srcc']:.4f}"
            if "plcc_reg" in entry:
                line += f" (regressor PLCC {entry['plcc_reg']:.4f} SRCC {entry['srcc_reg']:.4f})"
            say(line)
    return report
