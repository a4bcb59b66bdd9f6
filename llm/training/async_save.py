"""Asynchronous checkpoint writes (`checkpoint.async_save`): stage the state on the training thread, write it in one
background thread.

A save has two halves. Staging runs on the training thread at the step boundary and is what training waits for: the
trainer state (optimizer, schedule, counters, data position, callbacks, RNG) and the weights are copied into host
memory (`stage`), so the next steps can change the live tensors. Writing (serializing, fsyncing, hashing the files
for the manifest, the rename that commits the directory, pruning) runs in a `BackgroundWriter` thread while training
continues; a sharded state (FSDP, tensor parallelism) is staged shard by shard and written there by torch's
distributed checkpoint (weights.py, `ShardedWeights.stage`). The checkpointer (checkpointer.py) keeps the format's
guarantees on top of this:

- one write in flight: a save, a rollback, the final save and the run's end first wait for the pending write;
- a failed write is kept and raised on the training thread at the next step boundary (or at the end of the run),
  never dropped: the run fails with the write's one-line error, and the temp directory is removed;
- the step directory appears by the same rename as a synchronous save, so it is complete or absent; pruning runs
  after that rename in the same thread, and counts only complete directories, so it never counts or deletes an
  unfinished one.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch


def stage(obj: Any) -> Any:
    """A copy of a state in host memory: every tensor copied to the CPU, every container rebuilt (a callback's list
    that grows after the step must not grow in the staged copy); plain values are immutable and kept. A DTensor (a
    shard of FSDP or tensor parallelism) stays a DTensor of the same mesh and placements whose local shard is the
    host copy, which torch's distributed checkpoint writes as it writes the live one."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if type(obj) in (list, tuple, set):
        return type(obj)(stage(item) for item in obj)
    if isinstance(obj, dict):  # dict, OrderedDict, Counter: the same type, filled key by key
        copy = type(obj)()
        for key, value in obj.items():
            copy[key] = stage(value)
        return copy
    return obj


def stage_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`stage` for a model's state dict, keeping tied tensors tied: entries that share storage (the same weight under
    two names) share one host copy, so the safetensors writer stores them once, as it does for the live model."""
    copies: dict[tuple[int, int, tuple[int, ...], tuple[int, ...]], torch.Tensor] = {}
    out = {}
    for name, tensor in tensors.items():
        tensor = tensor.detach()
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.stride())
        if key not in copies:
            copies[key] = tensor.to("cpu", copy=True)
        out[name] = copies[key]
    return out


class BackgroundWriter:
    """Runs one job at a time in a daemon thread and keeps its outcome for the training thread.

    `submit` starts a job (the previous one must have been collected with `wait`); `done` says, without blocking,
    whether the job has ended; `wait` blocks until it has, and returns its result or raises its exception. Nothing
    is collective: in a multi-process run each rank has its own writer.
    """

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._result: Any = None
        self._error: BaseException | None = None
        self.label: Any = None  # what the caller needs to report the job when it is collected

    @property
    def pending(self) -> bool:
        """A job was submitted and not collected yet (running or ended)."""
        return self._thread is not None

    @property
    def done(self) -> bool:
        """The submitted job has ended (successfully or not) and waits to be collected."""
        return self._thread is not None and not self._thread.is_alive()

    def submit(self, job: Callable[[], Any], label: Any = None) -> None:
        if self._thread is not None:
            raise RuntimeError("BackgroundWriter.submit: the previous job was not collected (call wait first)")
        self._result, self._error, self.label = None, None, label

        def run() -> None:
            try:
                self._result = job()
            except BaseException as exc:  # noqa: BLE001  (kept for the training thread, which raises it)
                self._error = exc

        self._thread = threading.Thread(target=run, name="llm-checkpoint-writer", daemon=True)
        self._thread.start()

    def wait(self) -> Any:
        """Block until the pending job has ended; its result, or its exception raised here. None when idle."""
        thread = self._thread
        if thread is None:
            return None
        thread.join()
        self._thread = None
        error, self._error = self._error, None
        if error is not None:
            raise error
        return self._result


class StagedModel(torch.nn.Module):
    """A stand-in module whose state dict is a staged copy (`stage_tensors`), for writers that take a module (the
    safetensors `save_model`, which stores tied tensors once)."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self._staged = tensors

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:  # type: ignore[override]
        return dict(self._staged)
