"""Freezing a resolved config: after resolution nothing assigns to it.

A run's config is resolved once (`llm.training.train.parse_config`) and then frozen: an assignment to a field of a
frozen config, or of any of its sections, raises `FrozenConfigError` naming the field, so a component that writes a
derived value into the shared config (which every other component would then see, or not, depending on order) fails
where it writes. The dataclasses stay plain `@dataclass`es that inherit `Freezable`; the flag lives in the instance,
so a frozen config pickles (spawned workers) and deep-copies as frozen. A changed copy is `replace_values`.

Lists inside a config (callbacks, betas) are not made immutable: they are saved as YAML lists and compared with
lists, and nothing in the framework mutates them in place.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, TypeVar

T = TypeVar("T")

_FLAG = "_frozen_as"  # instance attribute: the dotted path of a frozen object ("config", "config.training", ...)


class FrozenConfigError(dataclasses.FrozenInstanceError):
    """An assignment to a field of a resolved (frozen) config."""


class Freezable:
    """Base of the config dataclasses: instances accept assignment until `freeze` is called on them."""

    __slots__ = ()

    def __setattr__(self, name: str, value: Any) -> None:
        where = self.__dict__.get(_FLAG)
        if where is not None:
            raise FrozenConfigError(
                f"{where}.{name}: the run's config is resolved once and then frozen; set the value during resolution "
                "(defaults, task defaults, preset, YAML, flags, derived_defaults) or make a changed copy with "
                "llm.config.replace_values(config, {...})"
            )
        object.__setattr__(self, name, value)

    def __delattr__(self, name: str) -> None:
        where = self.__dict__.get(_FLAG)
        if where is not None:
            raise FrozenConfigError(f"{where}.{name}: the run's config is frozen; nothing is deleted from it")
        object.__delattr__(self, name)


def _children(obj: Any) -> list[tuple[str, Freezable]]:
    """The (field name, section) pairs of a dataclass whose values are freezable dataclasses themselves."""
    if not dataclasses.is_dataclass(obj):
        return []
    return [(f.name, value) for f in dataclasses.fields(obj) if isinstance(value := getattr(obj, f.name), Freezable)]


def freeze(obj: T, path: str = "config") -> T:
    """Freeze `obj` and every `Freezable` section under it, in place; returns `obj`."""
    for name, child in _children(obj):
        freeze(child, f"{path}.{name}")
    if isinstance(obj, Freezable):
        object.__setattr__(obj, _FLAG, path)
    return obj


def is_frozen(obj: Any) -> bool:
    return isinstance(obj, Freezable) and obj.__dict__.get(_FLAG) is not None


def thawed(obj: T) -> T:
    """A deep copy of `obj` that accepts assignment again (the original stays frozen)."""
    clone = copy.deepcopy(obj)

    def thaw(node: Any) -> None:
        for _, child in _children(node):
            thaw(child)
        if isinstance(node, Freezable):
            node.__dict__.pop(_FLAG, None)

    thaw(clone)
    return clone


def replace_values(obj: T, values: dict[str, Any]) -> T:
    """A copy of `obj` with `values` ({"section.field": value}) set, frozen if `obj` was: how code after the
    resolution derives a config (e.g. a worker's run directory name) without writing into the shared one."""
    clone = thawed(obj)
    for dest, value in values.items():
        owner = clone
        *sections, name = dest.split(".")
        for section in sections:
            owner = getattr(owner, section)
        if not any(f.name == name for f in dataclasses.fields(owner)):
            raise AttributeError(f"{type(owner).__name__} has no field {name!r} ({dest})")
        setattr(owner, name, value)
    return freeze(clone, obj.__dict__[_FLAG]) if is_frozen(obj) else clone
