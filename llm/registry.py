"""Name -> object registries for every extension point (tasks, callbacks, schedulers, optimizers,
data modules).

Registering a taken name raises, so two plugins cannot silently shadow each other. A lookup miss
lists the valid names and the closest one. Wherever a name is accepted, `package.module:Attr` is
accepted too, so user code can live in the user's own repository.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from llm.errors import ConfigError, did_you_mean

T = TypeVar("T")


def import_object(spec: str, field: str = "name") -> Any:
    """Import `package.module:Attr` (or `package.module.Attr`)."""
    module_name, _, attr = spec.partition(":") if ":" in spec else spec.rpartition(".")
    if not module_name or not attr:
        raise ConfigError(f"{field}: {spec!r} is not an importable 'package.module:Name'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"{field}: cannot import module {module_name!r} from {spec!r}: {exc}") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ConfigError(f"{field}: module {module_name!r} has no attribute {attr!r}") from None


def import_plugins(modules: list[str]) -> None:
    """Import user modules whose decorators register tasks, callbacks, schedulers, ..."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise ConfigError(f"plugins: cannot import {name!r}: {exc}") from None


class Registry(Generic[T]):
    """A dict of named extension objects with strict registration and helpful lookup errors."""

    def __init__(self, kind: str, field: str) -> None:
        self.kind = kind
        self.field = field  # the config field whose value is looked up here, named in errors
        self._items: dict[str, T] = {}
        # Extra places consulted on a miss (e.g. the callbacks module, so a class pasted into it
        # is found by its name as the user's guide shows).
        self._fallbacks: list[Callable[[str], T | None]] = []

    def register(self, name: str, obj: T | None = None) -> Any:
        """`register(name, obj)` or `@register(name)`; a duplicate name raises ValueError."""

        def add(item: T) -> T:
            if name in self._items and self._items[name] is not item:
                raise ValueError(f"{self.kind} {name!r} is already registered ({self._items[name]!r})")
            self._items[name] = item
            return item

        return add(obj) if obj is not None else add

    def add_fallback(self, finder: Callable[[str], T | None]) -> None:
        self._fallbacks.append(finder)

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        try:
            self.get(name)
        except ConfigError:
            return False
        return True

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def get(self, name: str) -> T:
        """Look `name` up: registered names, then fallbacks, then `module:Attr`."""
        if name in self._items:
            return self._items[name]
        for finder in self._fallbacks:
            found = finder(name)
            if found is not None:
                return found
        if ":" in name:
            return import_object(name, self.field)
        valid = ", ".join(self.names()) or "(none registered)"
        raise ConfigError(
            f"{self.field}: unknown {self.kind} {name!r}; valid: {valid} or 'package.module:Name'"
            f"{did_you_mean(name, self.names())}"
        )


TASKS: Registry[Any] = Registry("task", "task")
CALLBACKS: Registry[Any] = Registry("callback", "training.callbacks")
SCHEDULERS: Registry[Any] = Registry("scheduler", "training.scheduler_type")
OPTIMIZERS: Registry[Any] = Registry("optimizer", "training.optimizer")
DATA_MODULES: Registry[Any] = Registry("data module", "data.module")


def register_task(name: str, obj: Any = None) -> Any:
    return TASKS.register(name, obj)


def register_callback(name: str, obj: Any = None) -> Any:
    return CALLBACKS.register(name, obj)


def register_scheduler(name: str, obj: Any = None) -> Any:
    return SCHEDULERS.register(name, obj)


def register_optimizer(name: str, obj: Any = None) -> Any:
    return OPTIMIZERS.register(name, obj)


def register_data_module(name: str, obj: Any = None) -> Any:
    return DATA_MODULES.register(name, obj)
