"""`torch.distributed` plumbing: process-group set-up, collectives the engine needs, launching.

Launch modes: a single process; `--distributed-nproc-per-node N` spawning N local workers; or
`torchrun`, whose RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT the worker honours.
Backend: NCCL when the device is CUDA, gloo otherwise. Every collective has the configured timeout,
so a dead peer fails the job instead of hanging it.
"""

from __future__ import annotations

import datetime
import os
import socket
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def torchrun_env() -> tuple[int, int] | None:
    """(rank, world_size) when launched by torchrun, else None."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
    return device


def init_process_group(rank: int, world_size: int, backend: str, device: torch.device, timeout_minutes: float) -> None:
    if world_size <= 1 or is_distributed():
        return
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    dist.init_process_group(
        backend=backend,
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(minutes=timeout_minutes),
    )


def destroy_process_group() -> None:
    if is_distributed():
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_agree(flag: bool, device: torch.device) -> bool:
    """True only if every rank passes True: one rank's stop or error decision becomes everyone's."""
    if not is_distributed():
        return flag
    t = torch.tensor([0 if flag else 1], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return int(t.item()) == 0


def any_rank(flag: bool, device: torch.device) -> bool:
    return not all_agree(not flag, device)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not is_distributed():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def all_gather_object(obj: Any) -> list[Any]:
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _spawn_entry(local_rank: int, world_size: int, port: int, fn: Callable[..., Any], args: tuple) -> None:
    os.environ.update(
        {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": str(local_rank),
            "LOCAL_RANK": str(local_rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_WORLD_SIZE": str(world_size),
        }
    )
    fn(local_rank, world_size, *args)


def spawn(fn: Callable[..., Any], nprocs: int, args: tuple, port: int = 0) -> None:
    """Run `fn(rank, world_size, *args)` in `nprocs` local processes; the first failure ends all."""
    import torch.multiprocessing as mp

    mp.spawn(_spawn_entry, args=(nprocs, port or free_port(), fn, args), nprocs=nprocs, join=True)
