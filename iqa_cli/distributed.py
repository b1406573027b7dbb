"""Everything torchrun-specific in one place: rank/world from the environment, process group, collectives.

A single process (no torchrun) is a world of size 1 and every helper is a cheap no-op there, so callers
never branch on "distributed or not". The backend follows the device: NCCL for CUDA, gloo for CPU.
Object collectives (`broadcast_object`, `all_gather_object`) always go through a gloo group, so small
Python objects never need a GPU round trip and work the same with either backend.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from iqa_cli import process

DEFAULT_TIMEOUT = timedelta(minutes=30)

_object_group: Any = None  # gloo group for object collectives when the default group is NCCL
_owns_group = False  # True when `init` created the default group (so `destroy` may tear it down)


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in a torchrun launch (all zeros/ones for a plain process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def env() -> DistEnv:
    """Reads torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistEnv()
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    return DistEnv(
        rank=int(os.environ.get("RANK", "0")),
        world_size=world,
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        local_world_size=local_world,
    )


def resolve_device(device: str | torch.device = "auto", environment: DistEnv | None = None) -> torch.device:
    """`auto` -> this rank's GPU when CUDA is present, else CPU; a bare `cuda` also picks this rank's GPU.

    This rank's GPU is `cuda:LOCAL_RANK` under torchrun, and `cuda:0` when the process sees a single GPU (a
    scheduler that gives every task its own, e.g. SLURM's `--gpus-per-task 1`, where LOCAL_RANK may be
    anything). With several processes per node, `cuda:N` is refused: every rank would compute on that one GPU.

    Raises:
        UserError: not a torch device name, a CUDA device this machine lacks, or more local ranks than GPUs.
    """
    from iqa_cli.errors import UserError

    environment = environment or env()
    name = str(device)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        resolved = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {device!r}: not a torch device (use auto, cpu, cuda or cuda:N)") from None
    if resolved.type != "cuda":
        return resolved
    if not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available on this machine")
    count = torch.cuda.device_count()
    if resolved.index is None:
        return torch.device("cuda", _local_gpu(environment, count))
    if environment.is_distributed and environment.local_world_size > 1:
        raise UserError(
            f"--device {device}: under torchrun with {environment.local_world_size} processes per node every rank "
            "would compute on that one GPU; pass --device cuda (or auto) and each rank takes its LOCAL_RANK's GPU "
            "(CUDA_VISIBLE_DEVICES picks which GPUs those are)"
        )
    if resolved.index >= count:
        raise UserError(f"--device {device}: this machine has {count} CUDA device{'s' if count != 1 else ''}")
    return resolved


def _local_gpu(environment: DistEnv, count: int) -> int:
    """The GPU index of this rank: its LOCAL_RANK, or 0 when it sees one GPU (or is alone)."""
    from iqa_cli.errors import UserError

    if not environment.is_distributed or count == 1:
        return 0
    if environment.local_world_size > count:
        raise UserError(
            f"{environment.local_world_size} processes per node but this node shows {count} CUDA devices: "
            f"launch at most {count} (torchrun --nproc-per-node {count}), or give each process one GPU"
        )
    return environment.local_rank


def init(
    device: torch.device | None = None,
    *,
    backend: str | None = None,
    timeout: timedelta = DEFAULT_TIMEOUT,
) -> DistEnv:
    """Joins the process group when launched by torchrun with WORLD_SIZE > 1; idempotent.

    Args:
        device: the device this rank computes on; picks the backend (nccl for CUDA, gloo otherwise) and
            becomes the current CUDA device.
        backend: overrides the choice above. "gloo" on a CUDA device is a group for runs whose ranks only
            exchange Python objects (`iqa score`): no NCCL communicator is built, so none is left to time out
            or to be torn down by a rank that finishes early.
        timeout: how long collectives wait for the slowest rank.
    """
    global _object_group, _owns_group
    environment = env()
    if not environment.is_distributed or dist.is_initialized():
        return environment
    backend = backend or ("nccl" if device is not None and device.type == "cuda" else "gloo")
    if device is not None and device.type == "cuda":
        torch.cuda.set_device(device)
    kwargs = {"device_id": device} if backend == "nccl" and device is not None else {}
    dist.init_process_group(backend=backend, timeout=timeout, **kwargs)
    process.keep_final_collection()
    _owns_group = True
    _object_group = dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else None
    return environment


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def barrier() -> None:
    """Waits for every rank (through the gloo group, so no GPU stream is involved)."""
    if is_initialized():
        dist.barrier(group=_object_group)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Returns rank `src`'s `obj` on every rank (picklable objects)."""
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=_object_group)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's `obj`, indexed by rank."""
    if not is_initialized():
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj, group=_object_group)
    return gathered


def destroy() -> None:
    """Leaves the process group that `init` created (a no-op otherwise)."""
    global _object_group, _owns_group
    if _owns_group and is_initialized():
        dist.destroy_process_group()
    _object_group = None
    _owns_group = False


def shard(n: int, environment: DistEnv | None = None) -> slice:
    """This rank's share of `n` ordered items as a strided slice (rank r takes r, r + world, ...)."""
    environment = environment or env()
    return slice(environment.rank, n, environment.world_size)


# --- training (iqa train): DDP for LoRA, FSDP2 for full tuning ------------------------------------------------


def wrap_ddp(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel over the default group; a plain module when not distributed.

    Parameters are broadcast from rank 0 when wrapping, so every rank starts from the same weights. Buffers
    are not re-sent before each forward: the families' buffers (position tables, rotary frequencies) are
    computed from the config, the same on every rank, and never trained, and the abstractor's alone are ~27 MB
    a step. Every trainable parameter must get a gradient each step (no `find_unused_parameters`): a family
    leaves what its forward never reaches out of training (`trainable_groups()["unused"]`).
    """
    if not is_initialized():
        return module
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    renamed = "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters  # torch 2.14
    no_resend = {"forward_sync_buffers": False} if renamed else {"broadcast_buffers": False}
    return DistributedDataParallel(module, device_ids=ids, output_device=ids[0] if ids else None, **no_resend)


def shard_units(
    model: torch.nn.Module,
    units: list[torch.nn.Module],
    device: torch.device,
    mixed_precision: torch.dtype | None = None,
) -> None:
    """FSDP2 (`fully_shard`) in place: one unit per module of `units` (the family's `fsdp_units()`: its
    layers), the whole model as the root. Every rank must hold the same full weights before this call.

    Args:
        model: the backbone's model.
        units: its submodules, each sharded as one unit, in order.
        device: this rank's device (its type picks the device mesh: cuda or cpu/gloo).
        mixed_precision: the dtype parameters are gathered and computed in (None: as stored); gradients are
            reduced and the sharded master weights kept in float32. `iqa train` passes None and computes under
            bf16 autocast on CUDA, as one GPU does.
    """
    if not is_initialized():
        return
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = (
        MixedPrecisionPolicy(param_dtype=mixed_precision, reduce_dtype=torch.float32)
        if mixed_precision is not None
        else MixedPrecisionPolicy()
    )
    for unit in units:
        fully_shard(unit, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)


@contextlib.contextmanager
def grad_sync(module: torch.nn.Module, enabled: bool = True):
    """Gradient accumulation: under DDP, no gradient all-reduce unless `enabled` (the last micro step).

    FSDP2 reduce-scatters every micro step whatever `enabled` says: with its sync off it would keep each
    parameter's unsharded float32 gradient until the last micro step (the whole model's, ~33 GB per rank at
    8.2B parameters), where synced it keeps only this rank's shard, summed across micro steps.
    """
    from torch.nn.parallel import DistributedDataParallel

    if enabled or not is_initialized() or not isinstance(module, DistributedDataParallel):
        yield
        return
    with module.no_sync():
        yield


def clip_grad_norm(parameters: list[torch.nn.Parameter], max_norm: float) -> float:
    """Clips the global gradient norm (sharded DTensor gradients included) and returns it; 0 = no clipping."""
    grads = [p for p in parameters if p.grad is not None]
    if not grads:
        return 0.0
    norm = torch.nn.utils.clip_grad_norm_(grads, max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


def mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """Each key's mean over the ranks (for logging losses)."""
    if not is_initialized():
        return dict(values)
    gathered = all_gather_object(values)
    return {k: sum(g[k] for g in gathered) / len(gathered) for k in values}


def full_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded state dict on rank 0's CPU ({} on other ranks); every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(module, options=options)


def init_single_process(device: torch.device) -> None:
    """A process group of one rank (no torchrun), so FSDP2 can run in a single process (benchmarks, tests)."""
    global _owns_group
    if is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
    _owns_group = True
