"""Rank helpers: one place that knows how processes find each other.

Works under torchrun / the deepspeed launcher (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT set)
and directly under `srun` (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, first host of the job).
On machines without CUDA the backend is gloo and the DeepSpeed accelerator is `cpu`: the same
code path as on GPUs, which is what the tests exercise.
"""

from __future__ import annotations

import os
import socket
import subprocess
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


def _first_slurm_host() -> str | None:
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodelist:
        return None
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], check=True, capture_output=True, text=True
        ).stdout.split()
        return out[0] if out else None
    except (OSError, subprocess.CalledProcessError):
        return nodelist.split(",")[0]


def env_from_slurm() -> None:
    """Fill torch's rendezvous variables from Slurm's when a launcher did not set them."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ.get("SLURM_NTASKS", "1")
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    os.environ.setdefault("LOCAL_WORLD_SIZE", os.environ.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0])
    if "MASTER_ADDR" not in os.environ:
        host = _first_slurm_host()
        if host:
            os.environ["MASTER_ADDR"] = host
    if "MASTER_PORT" not in os.environ:
        # A job-specific port so two jobs sharing a node do not collide.
        os.environ["MASTER_PORT"] = str(20000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 20000)


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS reports free now. A guessed port (e.g. from the pid) can already be taken by another
    process or an ephemeral client socket, which fails rendezvous with EADDRINUSE."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(timeout_minutes: int = 30) -> tuple[int, int, int]:
    """Initialize the default process group (idempotent). Returns (rank, world_size, local_rank).

    A single process with no launcher variables runs as world size 1 without a process group
    unless one is needed, so scripts and tests work without torchrun.
    """
    env_from_slurm()
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            os.environ["MASTER_PORT"] = str(free_port())
    if not dist.is_initialized():
        import deepspeed  # lazy: math modules must not pull deepspeed in

        deepspeed.init_distributed(dist_backend=backend(), timeout=timedelta(minutes=timeout_minutes))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    return dist.get_rank(), dist.get_world_size(), local_rank


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def print0(*args, **kwargs) -> None:
    if is_main():
        print(*args, **kwargs, flush=True)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_ranks_true(flag: bool) -> bool:
    """Collective AND of a per-rank flag (every rank must call it: it is a collective)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return flag
    t = torch.tensor([0 if flag else 1], dtype=torch.int32, device=device())
    dist.all_reduce(t)
    return int(t.item()) == 0


def all_ranks_true_each(flags: list[bool]) -> list[bool]:
    """Collective element-wise AND of per-rank flags, in one all-reduce."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return list(flags)
    t = torch.tensor([0 if f else 1 for f in flags], dtype=torch.int32, device=device())
    dist.all_reduce(t)
    return [int(x) == 0 for x in t.tolist()]


# ---------------------------------------------------------------------------------------------
# the collectives every layer above uses (one place; each is a no-op without a process group of > 1)


def _grouped() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def _comm_device() -> torch.device:
    """Where collective tensors live: the GPU under NCCL, the CPU under gloo."""
    return device() if backend() == "nccl" else torch.device("cpu")


def all_max(values: int | list[int]) -> int | list[int]:
    """Collective element-wise MAX of one int or a list of ints (same length on every rank)."""
    if not _grouped():
        return values
    t = torch.tensor(values if isinstance(values, list) else [values], dtype=torch.long, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    out = [int(x) for x in t.tolist()]
    return out if isinstance(values, list) else out[0]


def all_reduce_sum(values: list[float]) -> list[float]:
    """Collective element-wise SUM of a list of floats (float64; same length on every rank)."""
    t = torch.tensor(values, dtype=torch.float64)
    if _grouped():
        t = t.to(_comm_device())
        dist.all_reduce(t)
    return t.cpu().tolist()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Collective: rank `src`'s (picklable) object on every rank."""
    if not _grouped():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj: Any) -> list[Any] | None:
    """Collective: every rank's object, in rank order, on rank 0 (None elsewhere)."""
    if not _grouped():
        return [obj]
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def all_gather_objects(obj: Any) -> list[Any]:
    """Collective: every rank's object, in rank order, on every rank."""
    if not _grouped():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
