"""`training.profile_steps A:B`: a `torch.profiler` trace of optimizer steps A..B, written into the run directory.

`StepProfiler` is an observer on the engine's existing step hooks: it starts the profiler at the beginning of step
A (steps count from 1, as checkpoints do: step k is the k-th optimizer step), marks every profiled step with a
`llm.step k` range (so the trace names its steps), and at the end of step B (or of the run, if that comes first)
writes `RUN/profile/trace-steps-A-B-rank{r}.json` (Chrome trace format: chrome://tracing, Perfetto) and, on a CUDA
device, `memory-steps-A-B-rank{r}.pickle`, a CUDA memory snapshot of the same steps (the viewer at
pytorch.org/memory_viz). One log line says where. The engine attaches it whatever the callback list
(`requested_profiler`); runs without the field set have no profiler and pay nothing.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch
from torch.autograd.profiler import record_function

from llm.errors import invalid
from llm.training.observers.hooks import Callback

PROFILE_DIR = "profile"
FIELD = "training.profile_steps"
_SPEC = re.compile(r"^\s*(\d{1,12})\s*(?::\s*(\d{1,12})\s*)?$")


def parse_profile_steps(text: str) -> tuple[int, int] | None:
    """(A, B) of `A:B` (or `A` alone: A:A), None for ''. Anything else is a one-line ConfigError."""
    if not str(text).strip():
        return None
    match = _SPEC.match(str(text))
    first, last = (int(match.group(1)), int(match.group(2) or match.group(1))) if match else (0, 0)
    if not match or first < 1 or last < first:
        raise invalid(FIELD, text, "A:B, the first and last optimizer step to profile, 1 <= A <= B (e.g. 3:5)")
    return first, last


class StepProfiler(Callback):
    """Profiles optimizer steps `first`..`last` (see the module docstring)."""

    def __init__(self, first: int, last: int) -> None:
        self.first, self.last = first, last
        self._profiler: torch.profiler.profile | None = None
        self._range: Any = None  # the `llm.step k` range of the step under way
        self._memory = False  # recording CUDA memory history
        self._done = False

    @classmethod
    def from_config(cls, config: Any) -> StepProfiler:
        first, last = parse_profile_steps(config.training.profile_steps)
        return cls(first, last)

    def on_batch_start(self, logs: dict[str, Any] | None = None) -> None:
        step = int((logs or {}).get("step", self.context.step)) + 1  # the step about to run
        if self._profiler is None and not self._done and self.first <= step <= self.last:
            self._start()
        if self._profiler is not None:
            self._range = record_function(f"llm.step {step}")
            self._range.__enter__()

    def on_batch_end(self, logs: dict[str, Any] | None = None) -> None:
        if self._profiler is None:
            return
        self._end_range()
        if int((logs or {}).get("step", self.context.step)) >= self.last:
            self._finish()

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        if self._profiler is not None:  # the run ended inside the window: write the steps it ran
            self._end_range()
            self._finish()

    def on_exception(self, logs: dict[str, Any] | None = None) -> None:
        if self._profiler is not None:
            self._end_range()
            self._profiler.stop()
            self._profiler = None
            self._stop_memory()

    # -- internals --------------------------------------------------------------------------------
    def _device_is_cuda(self) -> bool:
        return torch.device(self.context.device).type == "cuda"

    def _start(self) -> None:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self._device_is_cuda():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
            torch.cuda.memory._record_memory_history(max_entries=200_000)
            self._memory = True
        self._profiler = torch.profiler.profile(activities=activities, record_shapes=True)
        self._profiler.start()

    def _end_range(self) -> None:
        if self._range is not None:
            self._range.__exit__(None, None, None)
            self._range = None

    def _stop_memory(self) -> None:
        if self._memory:
            torch.cuda.memory._record_memory_history(enabled=None)
            self._memory = False

    def _finish(self) -> None:
        profiler, self._profiler, self._done = self._profiler, None, True
        profiler.stop()
        run = self.context
        folder = Path(run.run_dir) / PROFILE_DIR
        folder.mkdir(parents=True, exist_ok=True)
        name = f"steps-{self.first}-{self.last}-rank{run.rank}"
        trace = folder / f"trace-{name}.json"
        partial = trace.with_name(f".{trace.name}.tmp")
        profiler.export_chrome_trace(str(partial))
        os.replace(partial, trace)
        written = [str(trace)]
        if self._memory:
            snapshot = folder / f"memory-{name}.pickle"
            torch.cuda.memory._dump_snapshot(str(snapshot))
            written.append(str(snapshot))
        self._stop_memory()
        run.logger.info("profile of steps %d-%d written to %s", self.first, self.last, " and ".join(written))


def requested_profiler(config: Any) -> list[Callback]:
    """The profiler the config asks for (`training.profile_steps`), as a callback list to append: [] when unset."""
    text = getattr(getattr(config, "training", None), "profile_steps", "")
    return [StepProfiler.from_config(config)] if text else []
