"""What a prompt asks about: the task (quality or aesthetics) and the medium (an image or a video).

The papers' scoring prompt asks "How would you rate the quality of this image?" and reads the level after "The
quality of the image is" (`constants.DEFAULT_QUESTION`, `RESPONSE_PREFIX`). Q-Align's scorers
(q_align/evaluate/scorer.py) change two words: `QAlignAestheticScorer` asks about "the aesthetics of this image"
and answers "The aesthetics of the image is", `QAlignVideoScorer` about "the quality of this video" / "The quality
of the video is". Aesthetics of a video (no reference asks it) follows the same pattern. Each family renders the
question and answer in its own template (`Backbone.task_prompt`); the training questions are the ten phrasings
of `constants.QUESTIONS` with the same two words changed.
"""

from __future__ import annotations

from iqa_cli.constants import DEFAULT_QUESTION, QUESTIONS, RESPONSE_PREFIX
from iqa_cli.errors import UserError

TASKS = ("quality", "aesthetics")
DEFAULT_TASK = "quality"


def check_task(task: str) -> str:
    """A task name, or a one-line UserError listing the tasks."""
    if task not in TASKS:
        raise UserError(f"--task {task}: choose {' or '.join(TASKS)}")
    return task


def _reworded(text: str, task: str, video: bool) -> str:
    """`text` (a quality/image phrasing) asking about `task` of a video or an image."""
    if task != DEFAULT_TASK:
        text = text.replace("quality", check_task(task))
    if video:
        text = text.replace("image", "video").replace("picture", "video")
    return text


def question(task: str = DEFAULT_TASK, video: bool = False) -> str:
    """The scoring question ("How would you rate the aesthetics of this video?")."""
    return _reworded(DEFAULT_QUESTION, task, video)


def response_prefix(task: str = DEFAULT_TASK, video: bool = False) -> str:
    """The answer up to the level ("The aesthetics of the video is")."""
    return _reworded(RESPONSE_PREFIX, task, video)


def training_questions(task: str = DEFAULT_TASK, video: bool = False) -> tuple[str, ...]:
    """The ten training phrasings for a task and medium (the papers' ten for quality of an image)."""
    return tuple(_reworded(q, task, video) for q in QUESTIONS)
