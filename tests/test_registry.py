"""Registries: duplicates raise, misses list valid names and the closest one, module:Class works."""

from __future__ import annotations

import pytest

from llm.errors import ConfigError
from llm.registry import Registry, import_object


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
    from llm.training.optim.optimizers import OPTIMIZERS
    from llm.training.optim.schedulers import SCHEDULERS

    assert {"cosine", "step", "plateau", "exponential", "linear", "constant", "wsd"} <= set(SCHEDULERS.names())
    assert {"adamw", "adam", "sgd"} <= set(OPTIMIZERS.names())
    for name in ("MetricsLogger", "TensorBoardLogger", "CSVLogger", "LRSchedulerCallback", "ProgressBar",
                 "ModelCheckpoint", "ThroughputMonitor", "EarlyStopping"):
        # the class the guide's name stands for (a name may be kept as an alias of a renamed class)
        assert resolve_callback(name) is getattr(callbacks, name)
    # The guide's recipe 2 creates WelcomeMessage; no built-in of that name may shadow or collide with it.
    assert "WelcomeMessage" not in CALLBACKS.names() and not hasattr(callbacks, "WelcomeMessage")


# ---------------------------------------------------------------------------------------------
# Issue 12, item 9: a taken name is an error unless the plugin asks to override; plugin names are checked.
# ---------------------------------------------------------------------------------------------


def test_duplicate_is_a_config_error_naming_both_objects_and_override_replaces():
    from llm.registry import DuplicateNameError

    reg: Registry = Registry("widget", "widget_field")

    class First:
        pass

    class Second:
        pass

    reg.register("w", First)
    reg.register("w", First)  # the same object again (a module imported twice): a no-op
    with pytest.raises(DuplicateNameError) as info:
        reg.register("w")(Second)
    assert isinstance(info.value, ConfigError) and isinstance(info.value, ValueError)
    message = str(info.value)
    assert f"{__name__}:test_duplicate_is_a_config_error_naming_both_objects_and_override_replaces.<locals>.Second " \
           "registers widget 'w', which is already registered by" in message
    assert "First" in message and "override=True" in message
    assert reg.get("w") is First  # a refused registration changes nothing
    assert reg.register("w", override=True)(Second) is Second and reg.get("w") is Second


@pytest.mark.parametrize("name", ["", "  ", " padded", 3])
def test_empty_or_padded_names_cannot_be_registered(name):
    reg: Registry = Registry("widget", "widget_field")
    with pytest.raises(ConfigError, match="widget_field: cannot register a widget under the name"):
        reg.register(name, int)


def test_register_functions_take_override(monkeypatch):
    from llm import registry

    for fn, reg in [(registry.register_task, registry.TASKS), (registry.register_callback, registry.CALLBACKS),
                    (registry.register_scheduler, registry.SCHEDULERS),
                    (registry.register_optimizer, registry.OPTIMIZERS),
                    (registry.register_data_module, registry.DATA_MODULES)]:
        monkeypatch.setattr(reg, "_items", {"taken": int})  # restored after the test
        with pytest.raises(registry.DuplicateNameError):
            fn("taken", float)
        assert fn("taken", float, override=True) is float and reg.get("taken") is float


@pytest.mark.parametrize(
    "plugins, message",
    [
        ([""], "plugins: '' is not a module name; expected a dotted Python module path"),
        (["a b"], "plugins: 'a b' is not a module name"),
        (["pkg..mod"], "plugins: 'pkg..mod' is not a module name"),
        (["plugins/my_plugin.py"], "(did you mean 'plugins.my_plugin'? plugins are imported by module name"),
        (["my_plugin.py"], "cannot import 'my_plugin.py': No module named 'my_plugin' (did you mean 'my_plugin'?"),
        (["collections", "collections"], "plugins: duplicate plugins ['collections']"),
        (["no_such_plugin_xyz"], "plugins: cannot import 'no_such_plugin_xyz': No module named 'no_such_plugin_xyz'"),
    ],
)
def test_bad_plugin_names_are_one_line_errors(plugins, message):
    from llm.registry import import_plugins

    with pytest.raises(ConfigError) as info:
        import_plugins(plugins)
    assert message in str(info.value) and "\n" not in str(info.value)


def _plugin(tmp_path, monkeypatch, name: str, source: str) -> str:
    (tmp_path / f"{name}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(__import__("sys").modules, name, raising=False)
    return name


def test_a_plugin_that_fails_on_import_is_named_with_the_line(tmp_path, monkeypatch):
    from llm.registry import import_object, import_plugins

    name = _plugin(tmp_path, monkeypatch, "raising_plugin_h2", "x = 1\nraise RuntimeError('boom')\n")
    with pytest.raises(ConfigError) as info:
        import_plugins([name])
    assert str(info.value) == (f"plugins: importing 'raising_plugin_h2' failed: RuntimeError: boom "
                               f"({tmp_path / 'raising_plugin_h2.py'}:2)")
    with pytest.raises(ConfigError, match="task: importing 'raising_plugin_h2' failed: RuntimeError: boom"):
        import_object("raising_plugin_h2:Task", "task")
    with pytest.raises(ConfigError, match="is not an importable 'package.module:Name'"):
        import_object("a b:Task", "task")


def test_a_plugin_taking_a_builtin_name_is_refused_unless_it_overrides(tmp_path, monkeypatch):
    import llm.training.train  # noqa: F401  (registers the task table)
    from llm.registry import CALLBACKS, TASKS, import_plugins

    monkeypatch.setattr(TASKS, "_items", dict(TASKS._items))
    monkeypatch.setattr(CALLBACKS, "_items", dict(CALLBACKS._items))
    for builtin in ("regression", "lm"):
        name = _plugin(tmp_path, monkeypatch, f"dup_{builtin}_h2", (
            "from llm.registry import register_task\n"
            "from llm.training.tasks.regression_task import RegressionTask\n"
            f"@register_task({builtin!r})\n"
            "class Mine(RegressionTask):\n    pass\n"))
        with pytest.raises(ConfigError) as info:
            import_plugins([name])
        assert str(info.value).startswith(
            f"plugins: importing {name!r}: {name}:Mine registers task {builtin!r}, which is already registered by "
            "llm.training.tasks.")
    name = _plugin(tmp_path, monkeypatch, "dup_callback_h2", (
        "from llm.training.core.callbacks import Callback\n"
        "from llm.registry import register_callback\n"
        "register_callback('MetricsLogger', type('Mine', (Callback,), {}))\n"))
    with pytest.raises(ConfigError, match="registers callback 'MetricsLogger', which is already registered"):
        import_plugins([name])

    name = _plugin(tmp_path, monkeypatch, "override_h2", (
        "from llm.registry import register_task\n"
        "from llm.training.tasks.regression_task import RegressionTask\n"
        "@register_task('regression', override=True)\n"
        "class Mine(RegressionTask):\n    pass\n"))
    import_plugins([name])
    from llm.training.train import resolve_task

    assert resolve_task("regression").__module__ == "override_h2"  # the table does not shadow the override
