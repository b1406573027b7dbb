"""The options of `iqa serve`, checked before anything starts, and their trip to the worker processes."""

from __future__ import annotations

import ipaddress
import json
import os
from dataclasses import asdict, dataclass, field

from iqa_cli.constants import DEFAULT_PORT
from iqa_cli.errors import UserError
from iqa_cli.images import DEFAULT_MAX_PIXELS
from iqa_cli.model_options import ModelSpec

CONFIG_ENV = "IQA_SERVE_CONFIG"  # how the supervisor hands the config to the worker processes it spawns


@dataclass
class ServeConfig:
    model: ModelSpec = field(default_factory=ModelSpec)  # which model and how, as `iqa score` loads it
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    devices: list[str] = field(default_factory=lambda: ["auto"])  # resolved by `resolve_devices`
    max_batch: int = 64  # images per model call; every call has exactly this many rows (batch invariance)
    call_sizes: list[int] | None = None  # smaller fixed call shapes besides max_batch (e.g. 8, 16, 32): lower latency
    max_wait_ms: float = 10.0  # how long a model call waits for more images to fill its batch
    token: str | None = None  # requests need `Authorization: Bearer <token>` when set
    max_body_mb: float = 64.0  # request body limit
    max_images: int = 256  # images per request
    image_pixel_limit: int = DEFAULT_MAX_PIXELS  # decompression-bomb limit per image (width x height)
    timeout_s: float = 120.0  # per request, from arrival to answer
    max_queue: int | None = None  # images waiting per worker before 503 [default: max(4 x max_batch, max_images)]
    lock_dir: str = ""  # set by `serve`: where workers claim their device (one lock file per device)

    def __post_init__(self) -> None:
        if isinstance(self.model, str):  # a repo id or folder: its defaults
            self.model = ModelSpec(self.model)
        elif isinstance(self.model, dict):  # the trip to the workers (`to_env`)
            self.model = ModelSpec(**self.model)

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
        if self.max_queue is not None and self.max_queue < self.max_images:
            raise UserError(f"--max-queue {self.max_queue}: must be at least --max-images ({self.max_images})")
        for flag, number in (("--max-wait-ms", self.max_wait_ms), ("--max-body-mb", self.max_body_mb)):
            if not number >= 0:
                raise UserError(f"{flag} {number}: must not be negative")
        if not self.timeout_s > 0:
            raise UserError(f"--timeout {self.timeout_s}: must be positive")
        if self.token is not None and not self.token.strip():
            raise UserError("--token is empty")
        self.devices = resolve_devices(self.devices)

    def to_env(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_env(cls) -> ServeConfig:
        return cls(**json.loads(os.environ[CONFIG_ENV]))


def parse_call_sizes(text: str | None) -> list[int] | None:
    """`--call-sizes`: comma-separated row counts ("8,16,32"); None or "" for --max-batch rows in every call."""
    if not text:
        return None
    try:
        return sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise UserError(f"--call-sizes {text!r}: give row counts such as 8,16,32") from None


def parse_devices(text: str) -> list[str]:
    """`--devices`: "auto", "cpu", or comma-separated CUDA indices ("0,1") or names ("cuda:0")."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise UserError(f"--devices {text!r}: give auto, cpu, or CUDA indices such as 0,1")
    return [f"cuda:{p}" if p.isdigit() else p for p in parts]


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
