"""What a checkpoint's trainer state is made of: the run's counters (`TrainState`), the `Stateful` protocol and
`StatefulComponents`, the named, ordered set of components whose states make up a `trainer_state_rank{r}.pt`.

The entry names are the checkpoint format's (`llm.artifacts.checkpoint.TRAINER_STATE_LAYOUT`): a component can
only be registered under one of them, and a state is only complete with every required one, so the engine's
state and the format's check cannot drift apart. The checkpointer saves and restores the components without
knowing what they are.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any, Protocol, runtime_checkable

from llm.artifacts.checkpoint import TRAINER_STATE_LAYOUT, TRAINER_STATE_OPTIONAL


@runtime_checkable
class Stateful(Protocol):
    """Anything whose state is saved in a checkpoint and restored on resume."""

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> None: ...


@dataclass
class TrainState:
    """Counters that make up the run's position (saved in every checkpoint)."""

    step: int = 0  # optimizer steps taken
    epoch: int = 0
    samples_seen: int = 0
    tokens_seen: int = 0
    skipped_steps: int = 0  # total updates dropped by the non-finite policy
    consecutive_skips: int = 0
    last_val_step: int = -1

    def state_dict(self) -> dict[str, int]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, int]) -> None:
        # In place: whoever holds this object (the run context, callbacks) sees the restored counters. Built through
        # the constructor first, so an unknown counter fails as it always did and a missing one takes its default.
        restored = TrainState(**state)
        for name, value in asdict(restored).items():
            setattr(self, name, value)


class StateFns:
    """A `Stateful` made of two callables: for state that is not one object's own (the RNG streams, a metric window
    restored onto the run's device, an optimizer state that expert parallelism gathers and splits)."""

    def __init__(self, save: Callable[[], Any], load: Callable[[Any], None]) -> None:
        self._save, self._load = save, load

    def state_dict(self) -> Any:
        return self._save()

    def load_state_dict(self, state: Any) -> None:
        self._load(state)


def _with_legacy_entries(state: dict[str, Any]) -> dict[str, Any]:
    """Checkpoints written before the checkpointer was an engine service kept the metric window and the best
    checkpoint in `ModelCheckpoint`'s callback state: read them from there when the entries are missing."""
    legacy = state.get("callbacks", {}).get("ModelCheckpoint", {})
    upgraded = dict(state)
    if "meter" not in upgraded:
        upgraded["meter"] = legacy.get("meter")
    upgraded.setdefault("checkpointer", legacy)
    return upgraded


class StatefulComponents:
    """The components of a trainer state, by entry name, saved and restored in the order they were registered.

    A component may be None (no grad scaler without fp16): it saves None and skips its restore. An optional entry
    (`TRAINER_STATE_OPTIONAL`) that a checkpoint lacks or holds as None leaves its component as it is.
    """

    def __init__(self) -> None:
        self._components: dict[str, Stateful | None] = {}

    def register(self, name: str, component: Stateful | None) -> None:
        if name not in TRAINER_STATE_LAYOUT and name not in TRAINER_STATE_OPTIONAL:
            known = ", ".join([*TRAINER_STATE_LAYOUT, *TRAINER_STATE_OPTIONAL])
            raise ValueError(f"{name!r} is not an entry of the trainer state ({known})")
        if name in self._components:
            raise ValueError(f"the trainer state's {name!r} is registered already")
        self._components[name] = component

    def __contains__(self, name: str) -> bool:
        return name in self._components

    def __getitem__(self, name: str) -> Stateful | None:
        return self._components[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._components)

    def state_dict(self) -> dict[str, Any]:
        missing = [name for name in TRAINER_STATE_LAYOUT if name not in self._components]
        if missing:  # a programming error: the file would not pass the format's own check
            raise RuntimeError(f"the trainer state has no component for {', '.join(missing)}")
        return {name: c.state_dict() if c is not None else None for name, c in self._components.items()}

    def load_state_dict(self, state: dict[str, Any], skip: tuple[str, ...] = ()) -> None:
        """Restore every component from `state` (`skip`: entries restored otherwise, e.g. from FSDP shards).
        A required entry missing from `state` raises KeyError."""
        state = _with_legacy_entries(state)
        for name, component in self._components.items():
            if name in skip or component is None:
                continue
            if name in TRAINER_STATE_OPTIONAL and state.get(name) is None:
                continue
            component.load_state_dict(state[name])
