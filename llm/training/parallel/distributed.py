"""`torch.distributed` plumbing: process-group set-up, collectives the engine needs, launching, failures.

Launch modes: a single process; `--distributed-nproc-per-node N` spawning N local workers; or
`torchrun`, whose RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT the worker honours.
Backend: NCCL when the device is CUDA, gloo otherwise. Every collective has the configured timeout,
so a dead peer fails the job instead of hanging it.

Wrapping a model for data parallelism (DDP or FSDP2) is `parallel.parallelize`; this module knows nothing of
FSDP, so fsdp.py can use its collectives without an import cycle.

Failures: when one rank raises, the others see their next collective fail ("connection closed by
peer") or are terminated by the launcher (mp.spawn's join, torchrun's elastic agent). So that the job
reports the cause once, not once per rank, a failing rank claims the report in the process group's
store while the group is still up (`claim_failure_report`); ranks that merely lost a peer stay quiet
and wait to be terminated, so the launcher sees the original failure first (`report_worker_failure`).
"""

from __future__ import annotations

import datetime
import os
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from llm.errors import ConfigError, UserError

# Store key under which the first failing rank registers itself; the suffix is a token rank 0 draws when the group
# starts, because torchrun's store outlives a restarted attempt (its keys would answer for the failed one).
_FAILURE_KEY = "llm/first_failure/"
_group_token = ""
# Substrings of the errors a collective raises when a peer process died or closed its connections.
_PEER_LOST = (
    "connection closed by peer",
    "connection reset by peer",
    "broken pipe",
    "connection refused",
    "remote process exited",
    "communicator was aborted",
    "socket closed",
)
# How long a rank that lost a peer waits for the launcher to terminate it before it exits on its own.
PEER_FAILURE_GRACE_S = 5.0


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


def check_processes_fit_devices(device: str, local_processes: int) -> None:
    """Refuse a launch that would put two processes of one machine on one GPU (NCCL fails on it with "Duplicate
    GPU detected"); each process binds `cuda:LOCAL_RANK`, so a machine needs one visible GPU per local process."""
    uses_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if local_processes <= 1 or not uses_cuda:
        return
    if ":" in device:
        raise ConfigError(
            f"training.device: {device!r} puts all {local_processes} local processes on one GPU; use 'cuda' (each "
            "process then binds cuda:LOCAL_RANK) or 'cpu'"
        )
    count = torch.cuda.device_count()
    if local_processes > count:
        raise ConfigError(
            f"distributed.nproc_per_node: {local_processes} processes per machine but this machine has {count} "
            f"visible GPU(s); start at most {count} (torchrun --nproc-per-node / --distributed-nproc-per-node), or "
            "train on the CPU with --training-device cpu"
        )


def resolve_backend(backend: str, device: torch.device) -> str:
    """`auto` -> NCCL for CUDA devices, gloo otherwise; an explicit choice must suit the device."""
    if backend == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise UserError(f"distributed.backend: nccl needs CUDA devices, this run uses {device.type}; use gloo or auto")
    return backend


def init_process_group(rank: int, world_size: int, backend: str, device: torch.device, timeout_minutes: float) -> None:
    """Join the job's process group (env:// rendezvous: torchrun or `spawn` set the variables)."""
    if world_size <= 1 or is_distributed():
        return
    backend = resolve_backend(backend, device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    try:
        dist.init_process_group(
            backend=backend,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    except Exception as exc:
        if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0 and _uses_agent_store():
            raise RuntimeError(f"{exc}\n{STALE_STORE_HINT}") from None
        raise
    global _group_token
    _group_token = broadcast_object(os.urandom(8).hex())


# torchrun (2.5+) keeps one store for all attempts of a job, so a restarted group can read the previous
# attempt's connection addresses and fail (pytorch/pytorch#135712); its opt-out gives each attempt a fresh store.
STALE_STORE_HINT = (
    "hint: this is a restarted torchrun attempt, which may have read the failed attempt's addresses from torchrun's "
    "shared store; launch torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 when using --max-restarts"
)


def _uses_agent_store() -> bool:
    return os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"


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


def all_reduce_max(value: int, device: torch.device) -> int:
    if not is_distributed():
        return value
    t = torch.tensor([value], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def all_agree(flag: bool, device: torch.device) -> bool:
    """True only if every rank passes True: one rank's stop or error decision becomes everyone's."""
    if not is_distributed():
        return flag
    t = torch.tensor([0 if flag else 1], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return int(t.item()) == 0


def any_rank(flag: bool, device: torch.device) -> bool:
    return not all_agree(not flag, device)


class DeferredVote:
    """Whether any rank raised a flag, agreed one call late, without a host sync per call.

    `cast(flag)` starts an asynchronous sum over the ranks of this call's flag and returns the verdict of the
    previous call's, which every rank reads at the same call: the decision is deterministic (the same call on every
    rank) and costs no device-to-host copy that waits for the queued work. On CUDA the sum is copied to pinned host
    memory behind an event, so reading it waits at most for the end of the previous step's work (already done while
    this step's work was queued); on a CPU (gloo) the reduction is waited for. Its result is read through a numpy
    view of the host buffer, made once. `collect()` drains the last vote (the run's end, before a save).
    In one process, `cast` returns its own flag at once.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._work: Any = None
        self._event: torch.cuda.Event | None = None
        self._value: torch.Tensor | None = None

    def _buffers(self) -> None:
        self._value = torch.zeros(1, dtype=torch.int32, device=self.device)
        cpu = self.device.type == "cpu"
        self._host = self._value if cpu else torch.zeros(1, dtype=torch.int32, pin_memory=True)
        self._view = self._host.numpy()  # the one read path: numpy, no tensor read per call

    def cast(self, flag: bool) -> bool:
        """Vote `flag` for this call; returns whether any rank voted True at the previous call."""
        if not is_distributed():
            return flag
        if self._value is None:
            self._buffers()
        assert self._value is not None
        verdict = self.collect()
        self._value.fill_(int(flag))
        self._work = dist.all_reduce(self._value, op=dist.ReduceOp.SUM, async_op=True)
        if self.device.type != "cpu":
            self._work.wait()  # NCCL: the current stream waits for the reduction, the host does not
            self._host.copy_(self._value, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        return verdict

    def collect(self) -> bool:
        """The verdict of the pending vote (False if none), waiting for it."""
        if self._work is None:
            return False
        if self._event is not None:
            self._event.synchronize()
            self._event = None
        else:
            self._work.wait()
        self._work = None
        return bool(self._view[0])


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


# ---------------------------------------------------------------------------------------------
# Failures: one report per job
# ---------------------------------------------------------------------------------------------


def is_peer_failure(exc: BaseException) -> bool:
    """True when `exc` is a collective failing because another process died or dropped its connections."""
    if isinstance(exc, UserError) or not isinstance(exc, (RuntimeError, OSError)):
        return False
    text = str(exc).lower()
    return any(marker in text for marker in _PEER_LOST)


def _summary(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


def claim_failure_report(exc: BaseException, rank: int) -> None:
    """Decide, while the process group is still up, whether this rank reports `exc` for the whole job.

    The first rank to fail wins an atomic compare-and-set in the group's store and reports; a later one
    stays quiet when its error reads the same (the common case of a decision every rank took, like a
    config error found in set-up) and notes its own otherwise. A rank that only lost a peer never claims.
    The verdict is kept on the exception (`llm_report`: "first", "same", "other" or "peer").
    """
    if is_peer_failure(exc):
        exc.llm_report = "peer"  # type: ignore[attr-defined]
        return
    verdict = "first"
    if is_distributed():
        mine = f"{rank}\n{_summary(exc)}"
        try:
            store = dist.distributed_c10d._get_default_store()
            winner = store.compare_set(_FAILURE_KEY + _group_token, "", mine).decode(errors="replace")
            if winner != mine:
                verdict = "same" if winner.split("\n", 1)[-1] == _summary(exc) else "other"
        except Exception:  # noqa: BLE001  (the store went down with its host: report rather than lose the error)
            verdict = "first"
    exc.llm_report = verdict  # type: ignore[attr-defined]


def report_worker_failure(exc: BaseException, rank: int, world_size: int) -> int:
    """Print `exc` as this job's one report (or stay quiet, per `claim_failure_report`); returns the exit status.

    A `UserError` is one `error: ...` line (status 2); anything else keeps its traceback (status 1). A rank that
    lost a peer waits up to `PEER_FAILURE_GRACE_S` for the launcher to terminate it (so the launcher sees the
    failing rank exit first) and then exits with one line of its own.
    """
    verdict = getattr(exc, "llm_report", "first")
    status = getattr(exc, "exit_code", 2) if isinstance(exc, UserError) else 1
    where = f"[rank {rank}] " if world_size > 1 else ""
    if verdict == "peer":
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the launcher's SIGTERM ends us now, whatever was installed
        time.sleep(PEER_FAILURE_GRACE_S)
        print(f"error: {where}lost contact with another process of the job, which failed or was killed "
              f"({_summary(exc)})", file=sys.stderr, flush=True)
    elif verdict == "other":
        print(f"error: {where}also failed: {_summary(exc)}", file=sys.stderr, flush=True)
    elif verdict == "first":
        if isinstance(exc, UserError):
            print(f"error: {exc}", file=sys.stderr, flush=True)
        else:
            text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
            print(f"{where}{text}".rstrip(), file=sys.stderr, flush=True)
    return status


# ---------------------------------------------------------------------------------------------
# Local launching
# ---------------------------------------------------------------------------------------------


def _share_cpu_threads(world_size: int) -> None:
    """Give each of `world_size` local CPU workers its share of the cores (torchrun sets OMP_NUM_THREADS=1).

    Without this every worker starts one intra-op thread per core, so N workers oversubscribe the cores N
    times over and their spinning OpenMP threads wait on each other (small CPU steps slow down many-fold).
    """
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))


def _spawn_entry(local_rank: int, world_size: int, port: int, fn: Callable[..., Any], args: tuple) -> None:
    _share_cpu_threads(world_size)
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
