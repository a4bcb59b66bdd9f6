"""Name -> object registries for every extension point (tasks, callbacks, schedulers, optimizers,
data modules).

Registering a taken name is a `DuplicateNameError` (a `ConfigError`, so the CLI reports it as one line
with exit status 2) naming both objects, so two plugins, or a plugin and a built-in, cannot silently
shadow each other; a plugin that means to replace a built-in says so with `override=True`. A lookup
miss lists the valid names and the closest one. Wherever a name is accepted, `package.module:Attr` is
accepted too, so user code can live in the user's own repository.

Importing user code (`--plugins`, `module:Attr`) turns every failure of that import, whatever the
exception, into one line naming the module: a plugin's own bug is still the user's input, not ours.
"""

from __future__ import annotations

import importlib
import re
import traceback
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from llm.errors import ConfigError, UserError, did_you_mean, show

T = TypeVar("T")

# A dotted Python module path: what `--plugins` accepts.
_MODULE_NAME = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


class DuplicateNameError(ConfigError, ValueError):
    """A name registered twice without `override=True`. Also a ValueError, which it was before it was a
    ConfigError, so code that caught that keeps working."""


def describe(obj: Any) -> str:
    """`module:QualName` of a class or function (where a registration came from), else its repr."""
    module, name = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    return f"{module}:{name}" if module and name else show(obj)


def _where(exc: BaseException) -> str:
    """' (file.py:LINE)' of the innermost frame of an exception raised by user code, for the one-line report."""
    frames = traceback.extract_tb(exc.__traceback__)
    return f" ({frames[-1].filename}:{frames[-1].lineno})" if frames else ""


def _file_hint(name: str) -> str:
    """A hint for a file name given where a module name belongs (`my_plugin.py`, `src/my_plugin.py`)."""
    if not name.endswith(".py"):
        return ""
    guess = name[:-3].replace("/", ".").replace("\\", ".").strip(".")
    return f" (did you mean {guess!r}? plugins are imported by module name, from the PYTHONPATH)"


def _import_user_module(module_name: str, field: str) -> Any:
    """Import user code; any failure is a ConfigError naming `field` and the module (and where it failed)."""
    try:
        return importlib.import_module(module_name)
    except UserError as exc:  # e.g. the module registers a taken name: already one line, say which module
        raise ConfigError(f"{field}: importing {module_name!r}: {exc}") from None
    except ImportError as exc:
        raise ConfigError(f"{field}: cannot import {module_name!r}: {exc}{_file_hint(module_name)}") from None
    except Exception as exc:  # noqa: BLE001  (the module's own code failed while being imported)
        raise ConfigError(
            f"{field}: importing {module_name!r} failed: {type(exc).__name__}: {exc}{_where(exc)}"
        ) from None


def import_object(spec: str, field: str = "name") -> Any:
    """Import `package.module:Attr` (or `package.module.Attr`)."""
    module_name, _, attr = spec.partition(":") if ":" in spec else spec.rpartition(".")
    if not module_name or not attr or not _MODULE_NAME.fullmatch(module_name):
        raise ConfigError(f"{field}: {show(spec)} is not an importable 'package.module:Name'")
    module = _import_user_module(module_name, field)
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ConfigError(f"{field}: module {module_name!r} has no attribute {show(attr)}") from None


def check_plugin_names(modules: list[str]) -> None:
    """Each `--plugins` entry must be a dotted module name, listed once; a file name gets its module name."""
    for name in modules:
        if not isinstance(name, str) or not _MODULE_NAME.fullmatch(name):
            hint = _file_hint(name) if isinstance(name, str) else ""
            raise ConfigError(
                f"plugins: {show(name)} is not a module name; expected a dotted Python module path such as "
                f"my_pkg.my_module{hint}"
            )
    repeated = sorted({name for name in modules if modules.count(name) > 1})
    if repeated:
        raise ConfigError(f"plugins: duplicate plugins {repeated}")


def import_plugins(modules: list[str]) -> None:
    """Import user modules whose decorators register tasks, callbacks, schedulers, ..."""
    check_plugin_names(modules)
    for name in modules:
        _import_user_module(name, "plugins")


class Registry(Generic[T]):
    """A dict of named extension objects with strict registration and helpful lookup errors."""

    def __init__(self, kind: str, field: str) -> None:
        self.kind = kind
        self.field = field  # the config field whose value is looked up here, named in errors
        self._items: dict[str, T] = {}
        # Extra places consulted on a miss (e.g. the callbacks module, so a class pasted into it
        # is found by its name as the user's guide shows).
        self._fallbacks: list[Callable[[str], T | None]] = []

    def register(self, name: str, obj: T | None = None, *, override: bool = False) -> Any:
        """`register(name, obj)` or `@register(name)`.

        A name that is taken by another object raises `DuplicateNameError` unless `override=True`, which
        replaces it (a plugin's own version of a built-in). Registering the same object again is a no-op.
        """
        if not isinstance(name, str) or not name.strip() or name != name.strip():
            raise ConfigError(f"{self.field}: cannot register a {self.kind} under the name {show(name)}; "
                              "a name is a non-empty string without surrounding spaces")

        def add(item: T) -> T:
            taken = self._items.get(name)
            if taken is not None and taken is not item and not override:
                raise DuplicateNameError(
                    f"{describe(item)} registers {self.kind} {name!r}, which is already registered by "
                    f"{describe(taken)}; use another name, or register it with override=True to replace it"
                )
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
            f"{self.field}: unknown {self.kind} {show(name)}; valid: {valid} or 'package.module:Name'"
            f"{did_you_mean(name, self.names())}"
        )


TASKS: Registry[Any] = Registry("task", "task")
CALLBACKS: Registry[Any] = Registry("callback", "training.callbacks")
SCHEDULERS: Registry[Any] = Registry("scheduler", "training.scheduler_type")
OPTIMIZERS: Registry[Any] = Registry("optimizer", "training.optimizer")
DATA_MODULES: Registry[Any] = Registry("data module", "data.module")


def register_task(name: str, obj: Any = None, *, override: bool = False) -> Any:
    return TASKS.register(name, obj, override=override)


def register_callback(name: str, obj: Any = None, *, override: bool = False) -> Any:
    return CALLBACKS.register(name, obj, override=override)


def register_scheduler(name: str, obj: Any = None, *, override: bool = False) -> Any:
    return SCHEDULERS.register(name, obj, override=override)


def register_optimizer(name: str, obj: Any = None, *, override: bool = False) -> Any:
    return OPTIMIZERS.register(name, obj, override=override)


def register_data_module(name: str, obj: Any = None, *, override: bool = False) -> Any:
    return DATA_MODULES.register(name, obj, override=override)
