"""The callback contract: the hook grid, the `Callback` base class and `CallbackList` dispatch.

Hooks follow one grid, `on_<scope>_<start|end>` for the scopes train, epoch, batch (one optimizer step) and
validation, plus `on_save_checkpoint`, `on_load_checkpoint` and `on_exception`; each takes
`logs: dict[str, Any] | None`. Callbacks observe: the engine owns the schedule, checkpoints, signals and the
metrics channel, so no callback list or order can break a run. A callback steers only through explicit control
fields (`self.engine.should_stop = True`) and publishes values through `self.engine.log(...)`. A method that
looks like a hook but is not one (`on_train_begin`) is reported at start-up rather than silently never called.

A callback sees the run through its `RunContext` (context.py), never the engine itself: `self.engine` is that
context (the name is the one the user's guide and existing callbacks use).

This module is the bottom of the callback layer: the built-in callbacks (core/callbacks.py, sinks.py,
checkpointer.py, throughput.py) all build on it and never on each other.
"""

from __future__ import annotations

import logging
from typing import Any

from llm.errors import ConfigError, did_you_mean
from llm.training.observers.context import RunContext

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
    """Base class: override any hook of `HOOKS`. `self.engine`, the run's `RunContext`, is set before
    `on_train_start`."""

    context: RunContext

    @property
    def engine(self) -> RunContext:
        """The run as this callback sees it (`rank`, `logger`, `state`, `log(...)`, `should_stop`, ...)."""
        return self.context

    @engine.setter
    def engine(self, context: RunContext) -> None:
        # Code written when this was the engine itself assigns it (`self.engine = engine` in a sink's `open`).
        self.context = context

    @classmethod
    def from_config(cls, config: Any) -> Callback:
        """Build from the run config; override when the constructor needs arguments."""
        return cls()

    def set_engine(self, context: RunContext) -> None:
        """Attach the run's context (the name predates the context; it is what callers and tests call)."""
        self.context = context

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


# Other frameworks' words for the same moments (Keras' on_train_begin, HF's on_step_end).
_HOOK_SYNONYMS = {"_begin": "_start", "_finish": "_end", "_step_": "_batch_", "_eval_": "_validation_",
                  "_val_": "_validation_", "_fit_": "_train_", "_training_": "_train_"}


def misspelled_hooks(callback: Callback) -> list[str]:
    """Methods named like hooks (`on_*`) that are not hooks, with the hook they probably meant."""
    problems = []
    for name in dir(type(callback)):
        if name.startswith("on_") and name not in HOOKS and callable(getattr(type(callback), name, None)):
            guess = name
            for theirs, ours in _HOOK_SYNONYMS.items():
                guess = guess.replace(theirs, ours)
            hint = f" (did you mean {guess!r}?)" if guess in HOOKS else did_you_mean(name, HOOKS)
            problems.append(f"{type(callback).__name__}.{name} is not a hook{hint}")
    return problems


class CallbackList:
    """Dispatches each hook to every callback, in order; one explicit method per hook."""

    def __init__(self, callbacks: list[Callback]) -> None:
        self.callbacks = list(callbacks)
        keys = [cb.state_key for cb in self.callbacks]
        duplicates = {k for k in keys if keys.count(k) > 1}
        if duplicates:
            raise ConfigError(f"training.callbacks: duplicate callbacks {sorted(duplicates)}")

    def set_engine(self, context: RunContext) -> None:
        """Attach every callback to the run's context; report methods that look like hooks but are not."""
        for cb in self.callbacks:
            cb.set_engine(context)
            for problem in misspelled_hooks(cb):
                context.logger.warning(problem)

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
