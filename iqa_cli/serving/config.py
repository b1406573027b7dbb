"""The options of `iqa serve`, checked before anything starts, and their trip to the worker processes."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

from iqa_cli.constants import DEFAULT_MAX_PIXELS, DEFAULT_PORT
from iqa_cli.errors import UserError
from iqa_cli.model_options import ModelSpec
from iqa_cli.option_field import option
from iqa_cli.scoring.config import ScoreConfig, check_sampling, video_sampling
from iqa_cli.tasks import check_task
from iqa_cli.video import Sampling

CONFIG_ENV = "IQA_SERVE_CONFIG"  # how the supervisor hands the config to the worker processes it spawns


LIMITS = "Batching and limits"  # the help panel of the batching and request-limit flags


def score_option(name: str) -> Any:
    """`iqa score`'s declaration of one of its options (help, default, metavar, panel), so `iqa serve`'s flag is
    the same one and a served score is read as `iqa score` reads it."""
    declared = ScoreConfig.__dataclass_fields__[name]
    return dataclasses.field(
        default=declared.default, default_factory=declared.default_factory, metadata=declared.metadata
    )


@dataclass
class ServeConfig:
    """`iqa serve`'s options: each field with its flag (`iqa_cli.option_field.option`)."""

    panel: ClassVar[str] = "Server"
    model: ModelSpec = option(default_factory=ModelSpec, cli=False)  # which model and how (the model flags)
    host: str = option("127.0.0.1", "Address to listen on.", metavar="ADDRESS")
    port: int = option(DEFAULT_PORT, f"Port (Flow-GRPO's reward client uses {DEFAULT_PORT}).", metavar="PORT")
    devices: list[str] = option(
        help="auto (every GPU, else the CPU), cpu, or GPU indices: 0,1,... (one worker per device).",
        default_factory=lambda: ["auto"], alias="--device", metavar="LIST", completion="devices",
    )  # fmt: skip
    token: str | None = option(
        None, "Require Authorization: Bearer TOKEN (or set IQA_SERVE_TOKEN, kept off the process list).",
        metavar="TOKEN", envvar="IQA_SERVE_TOKEN",
    )  # fmt: skip
    timeout: float = option(120.0, "Per-request time limit in seconds.", metavar="S")
    max_batch: int = option(
        64, "Images per model call (every call has N rows, or one of --call-sizes: a score never depends on its "
        "batch).",
        metavar="N", panel=LIMITS,
    )  # fmt: skip
    call_sizes: list[int] | None = option(
        None, "Smaller fixed call shapes besides --max-batch (e.g. 8,16,32): lower latency when few images wait "
        "[default: none, every call has --max-batch rows].",
        metavar="LIST", panel=LIMITS,
    )  # fmt: skip
    max_wait_ms: float = option(10.0, "Wait for more images to batch.", metavar="MS", panel=LIMITS)
    max_body_mb: float = option(64.0, "Request body limit.", metavar="MB", panel=LIMITS)
    max_images: int = option(256, "Images per request limit.", metavar="N", panel=LIMITS)
    max_queue: int | None = option(
        None, "Images waiting per worker before 503 [default: max(4 x --max-batch, --max-images)].",
        metavar="N", panel=LIMITS,
    )  # fmt: skip
    task: str | None = score_option("task")
    fps: float | None = score_option("fps")  # videos: how their frames are sampled, as `iqa score` samples them
    frames: int | None = score_option("frames")
    max_frames: int = score_option("max_frames")
    image_pixel_limit: int = option(DEFAULT_MAX_PIXELS, cli=False)  # decompression-bomb limit (width x height)
    lock_dir: str = option("", cli=False)  # set by `serve`: where workers claim their device (a lock file each)

    def __post_init__(self) -> None:
        if isinstance(self.model, str):  # a repo id or folder: its defaults
            self.model = ModelSpec(self.model)
        elif isinstance(self.model, dict):  # the trip to the workers (`to_env`)
            self.model = ModelSpec(**self.model)
        self.devices = [f"cuda:{name}" if name.isdigit() else name for name in self.devices]  # --devices 0,1

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)

    @property
    def queue_limit(self) -> int:
        return self.max_queue if self.max_queue is not None else max(4 * self.max_batch, self.max_images)

    @property
    def loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def check(self) -> None:
        """One-line UserErrors for values no server could run with; devices resolved in place."""
        if not 0 < self.port < 65536:
            raise UserError(f"--port {self.port}: choose 1..65535")
        for flag, value, low in (("--max-batch", self.max_batch, 1), ("--max-images", self.max_images, 1)):
            if value is not None and value < low:
                raise UserError(f"{flag} {value}: must be at least {low}")
        for size in self.call_sizes or ():
            if not 1 <= size <= self.max_batch:
                raise UserError(f"--call-sizes {size}: each must be between 1 and --max-batch ({self.max_batch})")
        self.model.check()
        if self.task is not None:
            check_task(self.task)
        check_sampling(self)
        if self.frames is not None and self.frames > self.max_frames:
            raise UserError(
                f"--frames {self.frames}: over --max-frames {self.max_frames}, the most frames a served video may cost "
                "(a request cannot ask for more work than that); raise --max-frames"
            )
        if self.max_queue is not None and self.max_queue < self.max_images:
            raise UserError(f"--max-queue {self.max_queue}: must be at least --max-images ({self.max_images})")
        for flag, number in (("--max-wait-ms", self.max_wait_ms), ("--max-body-mb", self.max_body_mb)):
            if not number >= 0:
                raise UserError(f"{flag} {number}: must not be negative")
        if not self.timeout > 0:
            raise UserError(f"--timeout {self.timeout}: must be positive")
        if self.token is not None and not self.token.strip():
            raise UserError("--token is empty")
        if not self.devices:
            raise UserError("--devices is empty: give auto, cpu, or CUDA indices such as 0,1")
        self.devices = resolve_devices(self.devices)

    def sampling(self) -> Sampling:
        """How videos are sampled (`iqa_cli.video.Sampling`): `iqa score`'s rule."""
        return video_sampling(self)

    def to_env(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_env(cls) -> ServeConfig:
        return cls(**json.loads(os.environ[CONFIG_ENV]))


def resolve_devices(devices: list[str]) -> list[str]:
    """`auto` -> every CUDA device (else the CPU); checks each name against this machine, once each."""
    if devices == ["cpu"]:
        return devices  # no torch import in the supervisor for the CPU
    import torch

    if devices == ["auto"]:
        count = torch.cuda.device_count()
        return [f"cuda:{i}" for i in range(count)] if count else ["cpu"]
    resolved: list[str] = []
    for name in devices:
        try:
            device = torch.device(name)
        except RuntimeError:
            raise UserError(
                f"--devices: {name!r} is not a device (use auto, cpu, or CUDA indices such as 0,1)"
            ) from None
        if device.type == "cuda":
            count = torch.cuda.device_count()
            index = 0 if device.index is None else device.index
            if index >= count:
                raise UserError(f"--devices: {name} does not exist on this machine ({count} CUDA devices)")
            name = f"cuda:{index}"
        elif device.type != "cpu":
            raise UserError(f"--devices: {name!r}: only cpu and CUDA devices are served")
        if name in resolved:
            raise UserError(f"--devices: {name} is named twice")
        resolved.append(name)
    if "cpu" in resolved and len(resolved) > 1:
        raise UserError("--devices: cpu cannot be mixed with CUDA devices")
    return resolved
