"""Callbacks: observe the run and add behaviour; the built-in ones; lookup by name.

The contract (hook grid, `Callback`, `CallbackList`) lives in hooks.py and is re-exported here, because the
user's guide pastes new callbacks into this module: a `Callback` subclass defined here is found by its class
name (and wins over a registered one of the same name). Callbacks elsewhere register with
`@register_callback("Name")` or are named as `package.module:Class`.

What a run cannot do without is not a callback: the engine steps the learning-rate schedule, checkpoints and
resumes, handles signals and fans metrics out to the loggers whatever this list holds. The names of those
services stay valid here (`LRSchedulerCallback`, `ModelCheckpoint`, `MetricsLogger`, `TensorBoardLogger`,
`ProgressBar`), so configs written for the list-driven design keep working; listing them configures or observes
the service, leaving them out never turns it off.
"""

from __future__ import annotations

from typing import Any

import torch

from llm.config import MODES, is_better
from llm.errors import ConfigError
from llm.registry import CALLBACKS, register_callback
from llm.training.checkpointer import ModelCheckpoint
from llm.training.observers.hooks import HOOKS, Callback, CallbackList, misspelled_hooks
from llm.training.observers.sinks import ConsoleLogger, CSVLogger, MetricsLogger, TensorBoardLogger
from llm.training.observers.throughput import ThroughputMonitor
from llm.training.optim.optimizers import group_lrs

__all__ = [
    "HOOKS", "Callback", "CallbackList", "CSVLogger", "EarlyStopping", "LRSchedulerCallback", "MetricsLogger",
    "ModelCheckpoint", "ProgressBar", "TensorBoardLogger", "ThroughputMonitor", "build_callbacks",
    "misspelled_hooks", "resolve_callback",
]

#: The console display: a progress bar on a terminal, progress lines otherwise (the `console` logger).
ProgressBar = ConsoleLogger


class LRSchedulerCallback(Callback):
    """Observes the learning-rate schedule (the engine steps it): the lr of each parameter group at every log step
    when the groups differ (`lr/muon`, `lr/adamw`, ...: `optim.optimizers.group_lrs` names them), and a log line
    whenever a plateau schedule cuts the lr."""

    def __init__(self) -> None:
        self._last: list[float] | None = None
        self._step_lrs: list[Any] = []

    def on_batch_start(self, logs: dict[str, Any] | None = None) -> None:
        # The lrs this step's update uses, read where the engine reads `lr` (before the schedule steps), so `lr` and
        # `lr/<group>` on one record agree. A tensor lr is copied, not read: no host sync on steps that do not log.
        schedule = self.engine.lr_schedule
        groups = schedule.optimizer.param_groups if schedule is not None else []
        self._step_lrs = [g["lr"].clone() if isinstance(g["lr"], torch.Tensor) else g["lr"] for g in groups]

    def on_batch_end(self, logs: dict[str, Any] | None = None) -> None:
        if not (logs and "train/loss" in logs and self._step_lrs):
            return
        lrs = [float(lr) for lr in self._step_lrs]
        if len(set(lrs)) > 1:
            named = group_lrs(self.engine.lr_schedule.optimizer, lrs)
            self.engine.log({f"lr/{name}": lr for name, lr in named.items()}, int(logs["step"]))

    def on_validation_start(self, logs: dict[str, Any] | None = None) -> None:
        self._last = self.engine.lrs

    def on_validation_end(self, logs: dict[str, Any] | None = None) -> None:
        schedule, now = self.engine.lr_schedule, self.engine.lrs
        if schedule is not None and schedule.is_plateau and self._last and now[0] < self._last[0]:
            self.engine.logger.info("plateau: %s did not improve; lr %.3g -> %.3g at step %d", schedule.monitor,
                                    self._last[0], now[0], self.engine.state.step)


class EarlyStopping(Callback):
    """Stops the run when a validation metric has not improved for `patience` validations."""

    def __init__(self, monitor: str = "val/loss", mode: str = "min", patience: int = 3, min_delta: float = 0.0):
        if mode not in MODES:
            raise ConfigError(f"training.early_stopping_mode: invalid value {mode!r}; min or max")
        self.monitor, self.mode, self.patience, self.min_delta = monitor, mode, patience, min_delta
        self.best: float | None = None
        self.bad_validations = 0

    @classmethod
    def from_config(cls, config: Any) -> EarlyStopping:
        t = config.training
        return cls(
            t.early_stopping_monitor, t.early_stopping_mode, t.early_stopping_patience, t.early_stopping_min_delta
        )

    def _improved(self, value: float) -> bool:
        return is_better(value, self.best, self.mode, self.min_delta)

    def on_validation_end(self, logs: dict[str, Any] | None = None) -> None:
        if not logs or self.monitor not in logs:
            return
        value = float(logs[self.monitor])
        if self._improved(value):
            self.best, self.bad_validations = value, 0
            return
        self.bad_validations += 1
        if self.bad_validations >= self.patience:
            # Every rank sees the same reduced metric, so every rank takes the same decision.
            self.engine.should_stop = True
            self.engine.logger.info(
                "early stopping: %s did not improve for %d validations (best %.5g)",
                self.monitor, self.patience, self.best,
            )

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "bad_validations": self.bad_validations}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.bad_validations = state["best"], state["bad_validations"]


for _name, _cls in (("MetricsLogger", MetricsLogger), ("TensorBoardLogger", TensorBoardLogger),
                    ("CSVLogger", CSVLogger), ("ProgressBar", ProgressBar), ("ModelCheckpoint", ModelCheckpoint),
                    ("ThroughputMonitor", ThroughputMonitor), ("LRSchedulerCallback", LRSchedulerCallback),
                    ("EarlyStopping", EarlyStopping)):
    register_callback(_name, _cls)


def _find_in_this_module(name: str) -> type[Callback] | None:
    # The guide's recipe 2: a class pasted into this module is found by its name.
    obj = globals().get(name)
    return obj if isinstance(obj, type) and issubclass(obj, Callback) and obj is not Callback else None


CALLBACKS.add_fallback(_find_in_this_module)


def resolve_callback(name: str) -> type[Callback]:
    """The callback class for a name (registered, defined in this module, or `module:Class`)."""
    # A class defined in this module wins over the registry, so a callback pasted here (the
    # guide's recipe 2) replaces a built-in of the same name instead of being shadowed by it.
    obj = _find_in_this_module(name) or CALLBACKS.get(name)
    if not (isinstance(obj, type) and issubclass(obj, Callback)):
        raise ConfigError(f"training.callbacks: {name!r} is not a Callback subclass")
    return obj


def build_callbacks(config: Any) -> list[Callback]:
    """Instantiate `config.training.callbacks` in order."""
    return [resolve_callback(name).from_config(config) for name in config.training.callbacks]
