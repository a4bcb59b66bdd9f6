"""Compatibility path of `llm.registry`: the user's guide imports `register_*` from here.

The registries live in `llm/registry.py`, the package's base layer, so that `llm.data` can register its
data modules without importing `llm.training`. These are the same objects, not copies: registering
through either path fills the one registry.
"""

from llm.registry import (
    CALLBACKS,
    DATA_MODULES,
    OPTIMIZERS,
    SCHEDULERS,
    TASKS,
    Registry,
    import_object,
    import_plugins,
    register_callback,
    register_data_module,
    register_optimizer,
    register_scheduler,
    register_task,
)

__all__ = [
    "CALLBACKS",
    "DATA_MODULES",
    "OPTIMIZERS",
    "SCHEDULERS",
    "TASKS",
    "Registry",
    "import_object",
    "import_plugins",
    "register_callback",
    "register_data_module",
    "register_optimizer",
    "register_scheduler",
    "register_task",
]
