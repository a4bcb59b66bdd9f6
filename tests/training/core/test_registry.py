"""Registries: duplicates raise, misses list valid names and the closest one, module:Class works."""

from __future__ import annotations

import pytest

from llm.training.core.errors import ConfigError
from llm.training.core.registry import Registry, import_object


def test_register_and_duplicate():
    reg: Registry = Registry("widget", "widget_field")
    reg.register("a", int)

    @reg.register("b")
    class B:
        pass

    assert reg.get("a") is int and reg.get("b") is B
    assert reg.names() == ["a", "b"]
    with pytest.raises(ValueError, match="already registered"):
        reg.register("a", float)


def test_miss_lists_names_and_suggests():
    reg: Registry = Registry("widget", "widget_field")
    reg.register("cosine", object())
    reg.register("linear", object())
    with pytest.raises(ConfigError) as info:
        reg.get("cosin")
    message = str(info.value)
    assert "widget_field" in message and "cosine, linear" in message and "did you mean 'cosine'" in message


def test_module_colon_name_and_fallback():
    reg: Registry = Registry("widget", "widget_field")
    assert reg.get("collections:OrderedDict").__name__ == "OrderedDict"
    reg.add_fallback(lambda name: 42 if name == "magic" else None)
    assert reg.get("magic") == 42
    with pytest.raises(ConfigError, match="no attribute"):
        import_object("collections:Nope")
    with pytest.raises(ConfigError, match="cannot import"):
        import_object("no_such_module_xyz:Thing")


def test_builtin_registries_are_populated():
    from llm.registry import CALLBACKS
    from llm.training.core import callbacks
    from llm.training.core.callbacks import resolve_callback
    from llm.training.core.optimizers import OPTIMIZERS
    from llm.training.core.schedulers import SCHEDULERS

    assert {"cosine", "step", "plateau", "exponential", "linear", "constant", "wsd"} <= set(SCHEDULERS.names())
    assert {"adamw", "adam", "sgd"} <= set(OPTIMIZERS.names())
    for name in ("MetricsLogger", "TensorBoardLogger", "CSVLogger", "LRSchedulerCallback", "ProgressBar",
                 "ModelCheckpoint", "ThroughputMonitor", "EarlyStopping"):
        # the class the guide's name stands for (a name may be kept as an alias of a renamed class)
        assert resolve_callback(name) is getattr(callbacks, name)
    # The guide's recipe 2 creates WelcomeMessage; no built-in of that name may shadow or collide with it.
    assert "WelcomeMessage" not in CALLBACKS.names() and not hasattr(callbacks, "WelcomeMessage")


def test_old_import_paths_are_the_base_layer_objects():
    # The guide imports from llm.training.core.*; registering there must fill the registries llm.data uses.
    import llm.errors
    import llm.registry
    from llm.training.core import errors as old_errors
    from llm.training.core import registry as old_registry

    for name in old_registry.__all__:
        assert getattr(old_registry, name) is getattr(llm.registry, name), name
    for name in old_errors.__all__:
        assert getattr(old_errors, name) is getattr(llm.errors, name), name
    assert issubclass(old_errors.ConfigError, llm.errors.UserError)
