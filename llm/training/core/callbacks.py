"""Callbacks: observe the run and cause side effects.

Hooks follow one grid, `on_<scope>_<start|end>` for the scopes train, epoch, batch (one optimizer
step) and validation, plus `on_save_checkpoint`, `on_load_checkpoint` and `on_exception`; each
takes `logs: dict[str, Any] | None`. A callback steers the run only through explicit control
fields on the engine (`engine.should_stop = True`). A method that looks like a hook but is not one
(`on_train_begin`) is reported at start-up rather than silently never called.

A `Callback` subclass defined in this module is found by its class name (the user's guide pastes
new callbacks here); callbacks elsewhere register with `@register_callback("Name")` or are named
as `package.module:Class`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from typing import TYPE_CHECKING, Any

from .errors import ConfigError, did_you_mean
from .registry import CALLBACKS, register_callback

if TYPE_CHECKING:  # pragma: no cover
    from .engine import TrainingEngine

HOOKS = (
    "on_train_start",
    "on_train_end",
    "on_epoch_start",
    "on_epoch_end",
    "on_batch_start",
    "on_batch_end",
    "on_validation_start",
    "on_validation_end",
    "on_save_checkpoint",
    "on_load_checkpoint",
    "on_exception",
)


class Callback:
    """Base class: override any hook of `HOOKS`. `self.engine` is set before `on_train_start`."""

    engine: TrainingEngine

    @classmethod
    def from_config(cls, config: Any) -> Callback:
        """Build from the run config; override when the constructor needs arguments."""
        return cls()

    def set_engine(self, engine: TrainingEngine) -> None:
        self.engine = engine

    @property
    def state_key(self) -> str:
        """Stable key of this callback's state inside a checkpoint."""
        return type(self).__name__

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def on_train_start(self, logs: dict[str, Any] | None = None) -> None: ...
    def on_train_end(self, logs: dict[str, Any] | None = None) -> None: ...
    def on_epoch_start(self, logs: dict[str, Any] | None = None) -> None: ...
    def on_epoch_end(self, logs: dict[str, Any] | None = None) -> None: ...
    def on_batch_start(self, logs: dict[str, Any] | None = None) -> None: ...
    def on_batch_end(self, logs: dict[str, Any] | None = None) -> None: ...
    def on_validation_start(self, logs: dict[str, Any] | None = None) -> None: ...
    def on_validation_end(self, logs: dict[str, Any] | None = None) -> None: ...
    def on_save_checkpoint(self, logs: dict[str, Any] | None = None) -> None: ...
    def on_load_checkpoint(self, logs: dict[str, Any] | None = None) -> None: ...
    def on_exception(self, logs: dict[str, Any] | None = None) -> None: ...


def misspelled_hooks(callback: Callback) -> list[str]:
    """Methods named like hooks (`on_*`) that are not hooks, with the hook they probably meant."""
    problems = []
    for name in dir(type(callback)):
        if name.startswith("on_") and name not in HOOKS and callable(getattr(type(callback), name, None)):
            # Other frameworks' words for the same moments (Keras' on_train_begin, HF's on_step_end).
            guess = name
            for theirs, ours in _HOOK_SYNONYMS.items():
                guess = guess.replace(theirs, ours)
            hint = f" (did you mean {guess!r}?)" if guess in HOOKS else did_you_mean(name, HOOKS)
            problems.append(f"{type(callback).__name__}.{name} is not a hook{hint}")
    return problems


_HOOK_SYNONYMS = {"_begin": "_start", "_finish": "_end", "_step_": "_batch_", "_eval_": "_validation_",
                  "_val_": "_validation_", "_fit_": "_train_", "_training_": "_train_"}


class CallbackList:
    """Dispatches each hook to every callback, in order; one explicit method per hook."""

    def __init__(self, callbacks: list[Callback]) -> None:
        self.callbacks = list(callbacks)
        keys = [cb.state_key for cb in self.callbacks]
        duplicates = {k for k in keys if keys.count(k) > 1}
        if duplicates:
            raise ConfigError(f"training.callbacks: duplicate callbacks {sorted(duplicates)}")

    def set_engine(self, engine: TrainingEngine) -> None:
        for cb in self.callbacks:
            cb.set_engine(engine)
            for problem in misspelled_hooks(cb):
                engine.logger.warning(problem)

    def find(self, key: str | type) -> Callback | None:
        for cb in self.callbacks:
            if (isinstance(key, str) and key in (cb.state_key, type(cb).__name__)) or (
                isinstance(key, type) and isinstance(cb, key)
            ):
                return cb
        return None

    def state_dict(self) -> dict[str, Any]:
        return {cb.state_key: cb.state_dict() for cb in self.callbacks}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for cb in self.callbacks:
            if cb.state_key in state:
                cb.load_state_dict(state[cb.state_key])

    def on_train_start(self, logs: dict[str, Any] | None = None) -> None:
        for cb in self.callbacks:
            cb.on_train_start(logs)

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        for cb in self.callbacks:
            cb.on_train_end(logs)

    def on_epoch_start(self, logs: dict[str, Any] | None = None) -> None:
        for cb in self.callbacks:
            cb.on_epoch_start(logs)

    def on_epoch_end(self, logs: dict[str, Any] | None = None) -> None:
        for cb in self.callbacks:
            cb.on_epoch_end(logs)

    def on_batch_start(self, logs: dict[str, Any] | None = None) -> None:
        for cb in self.callbacks:
            cb.on_batch_start(logs)

    def on_batch_end(self, logs: dict[str, Any] | None = None) -> None:
        for cb in self.callbacks:
            cb.on_batch_end(logs)

    def on_validation_start(self, logs: dict[str, Any] | None = None) -> None:
        for cb in self.callbacks:
            cb.on_validation_start(logs)

    def on_validation_end(self, logs: dict[str, Any] | None = None) -> None:
        for cb in self.callbacks:
            cb.on_validation_end(logs)

    def on_save_checkpoint(self, logs: dict[str, Any] | None = None) -> None:
        for cb in self.callbacks:
            cb.on_save_checkpoint(logs)

    def on_load_checkpoint(self, logs: dict[str, Any] | None = None) -> None:
        for cb in self.callbacks:
            cb.on_load_checkpoint(logs)

    def on_exception(self, logs: dict[str, Any] | None = None) -> None:
        # Every callback gets to clean up even if one of them fails while doing so.
        for cb in self.callbacks:
            try:
                cb.on_exception(logs)
            except Exception:  # noqa: BLE001
                logging.getLogger("llm").exception("callback %s failed in on_exception", cb.state_key)


def _is_metric(key: str) -> bool:
    return "/" in key or key == "lr"


def format_logs(logs: dict[str, Any]) -> str:
    parts = []
    for key, value in logs.items():
        if not _is_metric(key) or isinstance(value, str):
            continue
        parts.append(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}")
    return " ".join(parts)


# ---------------------------------------------------------------------------------------------
# Built-in callbacks
# ---------------------------------------------------------------------------------------------


class MetricsLogger(Callback):
    """Writes every log event to `RUN_DIR/metrics.jsonl` (one JSON object per line) and the console."""

    def __init__(self, filename: str = "metrics.jsonl") -> None:
        self.filename = filename
        self._file: Any = None

    def on_train_start(self, logs: dict[str, Any] | None = None) -> None:
        if self.engine.is_global_zero:
            # Append: a resumed run continues the same record.
            self._file = open(self.engine.run_dir / self.filename, "a", encoding="utf-8")  # noqa: SIM115

    def write(self, record: dict[str, Any]) -> None:
        if self._file is None:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._file.write(json.dumps(clean, default=str) + "\n")
        self._file.flush()

    def _emit(self, logs: dict[str, Any] | None, quiet: bool) -> None:
        if not logs or self._file is None:
            return
        self.write({k: v for k, v in logs.items() if k == "step" or _is_metric(k)})
        if not quiet:
            self.engine.logger.info("step %d %s", logs.get("step", 0), format_logs(logs))

    def on_batch_end(self, logs: dict[str, Any] | None = None) -> None:
        if logs and "train/loss" in logs:
            # With a progress bar on screen the train metrics are already visible there.
            self._emit(logs, quiet=self.engine.find_callback("ProgressBar") is not None and sys.stderr.isatty())

    def on_validation_end(self, logs: dict[str, Any] | None = None) -> None:
        self._emit(logs, quiet=False)

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        self.close()

    def on_exception(self, logs: dict[str, Any] | None = None) -> None:
        self.close()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class TensorBoardLogger(Callback):
    """Scalars (and text) as TensorBoard event files in `log_dir`, on rank 0."""

    def __init__(self, log_dir: str | os.PathLike = "runs") -> None:
        self.log_dir = str(log_dir)
        self.writer: Any = None

    @classmethod
    def from_config(cls, config: Any) -> TensorBoardLogger:
        return cls(log_dir=config.logging.log_dir)

    def on_train_start(self, logs: dict[str, Any] | None = None) -> None:
        if self.engine.is_global_zero:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=self.log_dir or str(self.engine.run_dir))

    def _write(self, logs: dict[str, Any] | None) -> None:
        if self.writer is None or not logs:
            return
        step = int(logs.get("step", 0))
        for key, value in logs.items():
            if not _is_metric(key):
                continue
            if isinstance(value, str):
                self.writer.add_text(key, value, step)
            elif isinstance(value, (int, float)):
                self.writer.add_scalar(key, value, step)

    def on_batch_end(self, logs: dict[str, Any] | None = None) -> None:
        if logs and "train/loss" in logs:
            self._write(logs)

    def on_validation_end(self, logs: dict[str, Any] | None = None) -> None:
        self._write(logs)
        if self.writer is not None:
            self.writer.flush()

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        self.close()

    def on_exception(self, logs: dict[str, Any] | None = None) -> None:
        self.close()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class LRSchedulerCallback(Callback):
    """Steps the engine's `LRSchedule`: after each optimizer step, at epoch end, after validation."""

    def on_batch_end(self, logs: dict[str, Any] | None = None) -> None:
        if self.engine.lr_schedule is not None and not (logs or {}).get("skipped", False):
            self.engine.lr_schedule.step_batch()

    def on_epoch_end(self, logs: dict[str, Any] | None = None) -> None:
        if self.engine.lr_schedule is not None:
            self.engine.lr_schedule.step_epoch()

    def on_validation_end(self, logs: dict[str, Any] | None = None) -> None:
        if self.engine.lr_schedule is not None and logs:
            self.engine.lr_schedule.step_validation(logs)


class ProgressBar(Callback):
    """A tqdm bar on rank 0 (loss, lr, throughput, ETA); plain log lines when not on a terminal."""

    def __init__(self) -> None:
        self.bar: Any = None
        self._last_print = 0.0
        self._start: tuple[float, int] | None = None

    def on_train_start(self, logs: dict[str, Any] | None = None) -> None:
        if not self.engine.is_global_zero:
            return
        if sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=self.engine.total_steps, initial=self.engine.state.step, unit="step", dynamic_ncols=True
            )

    def on_batch_end(self, logs: dict[str, Any] | None = None) -> None:
        if not self.engine.is_global_zero or not logs:
            return
        if self.bar is not None:
            self.bar.update(logs["step"] - self.bar.n)
            if "train/loss" in logs:
                postfix = {"loss": f"{logs['train/loss']:.4f}", "lr": f"{logs.get('lr', 0.0):.2e}"}
                if "train/tokens_per_s" in logs:
                    postfix["tok/s"] = f"{logs['train/tokens_per_s']:.0f}"
                self.bar.set_postfix(postfix, refresh=False)
        elif "train/loss" in logs and time.monotonic() - self._last_print > 10.0:
            # Not a terminal (CI, a log file): a short line now and then instead of a bar.
            now, step, total = time.monotonic(), logs["step"], self.engine.total_steps
            if self._start is None:
                self._start = (now, step)
            rate = (step - self._start[1]) / max(now - self._start[0], 1e-9)
            eta = (total - step) / rate if rate > 0 else float("nan")
            self._last_print = now
            self.engine.logger.info(
                "progress %d/%d (%.0f%%) loss=%.4f eta=%s", step, total, 100 * step / max(total, 1),
                logs["train/loss"], "?" if math.isnan(eta) else time.strftime("%H:%M:%S", time.gmtime(eta)),
            )

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        self.close()

    def on_exception(self, logs: dict[str, Any] | None = None) -> None:
        self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class EarlyStopping(Callback):
    """Stops the run when a validation metric has not improved for `patience` validations."""

    def __init__(self, monitor: str = "val/loss", mode: str = "min", patience: int = 3, min_delta: float = 0.0):
        if mode not in ("min", "max"):
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
        if self.best is None:
            return True
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

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


class WelcomeMessage(Callback):
    """The user's guide's example callback: a message when training starts and ends."""

    def on_train_start(self, logs: dict[str, Any] | None = None):
        if self.engine.rank == 0:
            self.engine.logger.info("======================================")
            self.engine.logger.info("🎉 Welcome to the training session! 🎉")
            self.engine.logger.info("======================================")

    def on_train_end(self, logs: dict[str, Any] | None = None):
        if self.engine.rank == 0:
            self.engine.logger.info("======================================")
            self.engine.logger.info("👋 Training finished. Goodbye! 👋")
            self.engine.logger.info("======================================")


for _cls in (MetricsLogger, TensorBoardLogger, LRSchedulerCallback, ProgressBar, EarlyStopping, WelcomeMessage):
    register_callback(_cls.__name__, _cls)


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


# Built-in callbacks that live in their own modules register themselves on import.
from . import checkpointing, throughput  # noqa: E402,F401,I001  (ModelCheckpoint, ThroughputMonitor)
