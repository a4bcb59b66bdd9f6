"""The config layer: generic machinery for a tree of config dataclasses, below every other package but the base.

`fields` (types, help text from trailing comments, resume policy from field metadata, YAML value checking),
`yaml_file` (reading a config file safely), `freeze` (a resolved config refuses assignment). It imports nothing
of `llm.training`: the run's dataclasses live in `llm/training/core/config.py` and the model's in
`llm/models/config.py`, and both use this package.
"""

from llm.config.fields import (
    MODES,
    ResumePolicy,
    append_or_replace,
    coerce,
    field_help,
    field_types,
    for_tasks,
    is_better,
    on_resume,
    resume_policy,
    resume_tables,
    type_name,
    unwrap_optional,
)
from llm.config.freeze import Freezable, FrozenConfigError, freeze, is_frozen, replace_values, thawed
from llm.config.yaml_file import MAX_YAML_BYTES, load_yaml

__all__ = [
    "MAX_YAML_BYTES", "MODES", "is_better", "Freezable", "FrozenConfigError", "ResumePolicy", "append_or_replace",
    "coerce", "field_help", "field_types", "for_tasks", "freeze", "is_frozen", "load_yaml", "on_resume",
    "replace_values", "resume_policy", "resume_tables", "thawed", "type_name", "unwrap_optional",
]
