"""`RunContext`: what callbacks, metric sinks, tasks and the checkpointer see of a run, instead of the engine.

One object per run, built by the engine and filled in as its set-up proceeds (the model, the schedule and the run
length exist only after set-up). Everything here is read-only for its users except two channels: `log(...)`
publishes values through the engine's metrics channel, and `should_stop = True` is the control field that ends
the run at the next step boundary. `Callback.engine` returns this object, so callbacks written against the
engine (`self.engine.rank`, `self.engine.logger`, `self.engine.state.step`) keep working.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llm.training.optim.schedulers import LRSchedule
from llm.training.state import TrainState


class RunContext:
    """The run as its observers see it: process, place, counters, and the two channels (`log`, `should_stop`)."""

    def __init__(
        self,
        config: Any,
        *,
        rank: int,
        world_size: int,
        device: torch.device,
        run_dir: Path,
        state: TrainState,
        log: Callable[[dict[str, Any], int | None], None],
        logger: logging.Logger | None = None,
    ) -> None:
        self.config = config  # the resolved run config (read it, never change it)
        self.rank, self.world_size, self.device = rank, world_size, device
        self.run_dir = Path(run_dir)
        self.logger = logger or logging.getLogger("llm")
        self.state = state  # the live counters (step, epoch, samples_seen, ...), restored in place on resume
        self._log = log
        self.should_stop = False  # the control field: set it to end the run after the current step
        # Filled in by the engine's set-up:
        self.total_steps = 0  # optimizer steps this run takes in all
        self.steps_per_epoch = 0  # 0 for a data loader without a length
        self.model: nn.Module | None = None  # the model being trained, unwrapped (no DDP or compile wrapper)
        self.data_module: Any = None
        self.lr_schedule: LRSchedule | None = None  # warmup + scheduler (the engine steps it)
        # Whether a forward pass is a collective (FSDP gathers weights, expert parallelism exchanges tokens): then
        # every rank must run the same forwards, e.g. to generate samples.
        self.forward_is_collective = False

    @property
    def is_global_zero(self) -> bool:
        return self.rank == 0

    @property
    def step(self) -> int:
        return self.state.step

    @property
    def epoch(self) -> int:
        return self.state.epoch

    @property
    def lrs(self) -> list[float]:
        """The current learning rate of each parameter group (empty before set-up)."""
        if self.lr_schedule is None:
            return []
        return [float(group["lr"]) for group in self.lr_schedule.optimizer.param_groups]

    @property
    def lr(self) -> float:
        """The first parameter group's learning rate (0.0 before set-up)."""
        lrs = self.lrs
        return lrs[0] if lrs else 0.0

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        """Publish `metrics` for `step` (default: the current one) to every metric sink, once (rank 0 writes)."""
        self._log(metrics, step)
