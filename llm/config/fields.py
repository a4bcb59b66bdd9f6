"""Generic field machinery of a dataclass config tree: types, help text, resume policy, value checking.

Works on any dataclass (it imports nothing of `llm.training`): the run config's sections, `ModelConfig`, a user's
own. What a field is, is declared beside it:

- its help text (the `--help` line) is the field's trailing comment, read from the source (`field_help`), so the
  user's guide can paste a plain `name: type = default  # help` line into a config class;
- its resume policy (what resuming a checkpoint does when the field's value changed) is `field(metadata=
  on_resume(...))` on the field, or on a section field of the root config for the whole section; `resume_policy`
  reads it. A field without one is `warn`: the change is reported;
- its type, checked against YAML values by `coerce` (ints widen to floats, nothing else is guessed).
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import types
import typing
from dataclasses import dataclass
from typing import Any, List

from llm.errors import ConfigError, show

# ---------------------------------------------------------------------------------------------
# Resume policy: declared per field, read by the checkpointer.
# ---------------------------------------------------------------------------------------------

RESUME_KINDS = ("warn", "expected", "applied", "refused")

# Whether a smaller or a larger monitored metric is better (early stopping, the best checkpoint, plateau).
MODES = ("min", "max")


def is_better(value: float, best: float | None, mode: str, min_delta: float = 0.0) -> bool:
    """Whether `value` improves on `best` (None: nothing yet) by more than `min_delta` in direction `mode`."""
    if best is None:
        return True
    return value < best - min_delta if mode == "min" else value > best + min_delta


@dataclass(frozen=True)
class ResumePolicy:
    """What resuming a checkpoint does when a field changed since it was written.

    `warn` (the default): the change is reported as a config change. `expected`: a normal thing to change on
    resume (more steps, another log interval), said nothing of. `applied`: expected, and logged with `note` (what it
    changes, e.g. "the schedule's horizon"). `refused`: the saved state does not fit the new value; `note` is the
    flag that restores it.
    """

    kind: str = "warn"
    note: str = ""

    def __post_init__(self) -> None:
        if self.kind not in RESUME_KINDS:
            raise ValueError(f"resume policy {self.kind!r}: one of {', '.join(RESUME_KINDS)}")


def on_resume(kind: str, note: str = "") -> dict[str, ResumePolicy]:
    """Field metadata declaring a resume policy: `field(default=0, metadata=on_resume("expected"))`."""
    return {"resume": ResumePolicy(kind, note)}


def for_tasks(*names: str) -> dict[str, tuple[str, ...]]:
    """Field metadata naming the only tasks that read the field: `field(default=0.1, metadata=for_tasks("dpo"))`.
    The train CLI's `--help` lists such a field only under those tasks (a flag is still accepted everywhere), so one
    task's help is not buried under every other task's knobs."""
    return {"tasks": names}


def resume_tables(root: type) -> tuple[tuple[str, ...], dict[str, str], dict[str, str]]:
    """The resume policies of every field under the dataclass `root` as a checkpointer reads them: (prefixes of the
    fields expected to change, a section as "section."; {field: what an applied change does}; {field: the flag that
    restores a refused one}). A section field with a policy of its own gives it to its whole section."""
    expected: list[str] = []
    applied: dict[str, str] = {}
    refused: dict[str, str] = {}
    types_ = field_types(root)
    for f in dataclasses.fields(root):
        section = types_.get(f.name)
        if not (isinstance(section, type) and dataclasses.is_dataclass(section)) or "resume" in f.metadata:
            entries = [(f"{f.name}." if dataclasses.is_dataclass(section) else f.name, f)]
        else:
            entries = [(f"{f.name}.{g.name}", g) for g in dataclasses.fields(section)]
        for path, owner in entries:
            policy = owner.metadata.get("resume", ResumePolicy())
            if policy.kind == "refused":
                refused[path] = policy.note
            elif policy.kind != "warn":
                expected.append(path)
                if policy.kind == "applied":
                    applied[path] = policy.note
    return tuple(expected), applied, refused


def resume_policy(root: type, field_path: str) -> ResumePolicy:
    """The resume policy of `field_path` ("training.lr", "task") under the dataclass `root`.

    The field's own metadata wins; otherwise the nearest enclosing section field's (e.g. every field of
    `checkpoint:` is `expected`); otherwise `warn`. An unknown path is `warn` too (a field of an older version)."""
    found, cls = ResumePolicy(), root
    for name in field_path.split("."):
        if cls is None or not dataclasses.is_dataclass(cls):
            return found
        f = next((f for f in dataclasses.fields(cls) if f.name == name), None)
        if f is None:
            return found
        found = f.metadata.get("resume", found)
        section = field_types(cls).get(name)
        cls = section if isinstance(section, type) and dataclasses.is_dataclass(section) else None
    return found


# ---------------------------------------------------------------------------------------------
# Field introspection: types and the help text taken from each field's trailing comment.
# ---------------------------------------------------------------------------------------------


def field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def field_help(cls: type) -> dict[str, str]:
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    helps: dict[str, str] = {}
    for match in re.finditer(r"^\s+(\w+)\s*:[^\n#]*#\s*(.+)$", source, flags=re.M):
        helps.setdefault(match.group(1), match.group(2).strip())
    # A field whose default spans lines carries its comment on the closing line.
    for match in re.finditer(r"^\s+(\w+)\s*:[^\n]*\(\n(?:[^\n]*\n)*?\s*\)\s*#\s*(.+)$", source, flags=re.M):
        helps.setdefault(match.group(1), match.group(2).strip())
    return helps


def unwrap_optional(tp: Any) -> tuple[Any, bool]:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return tp, False


def type_name(tp: Any) -> str:
    base, optional = unwrap_optional(tp)
    if typing.get_origin(base) in (list, List):
        inner = typing.get_args(base)[0]
        name = f"list of {getattr(inner, '__name__', inner)}"
    else:
        name = getattr(base, "__name__", str(base))
    return f"{name} or null" if optional else name


_YAML12_FLOAT = re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?")


def coerce(path: str, value: Any, tp: Any) -> Any:
    """Check a YAML value against a field type; ints widen to floats, nothing else is guessed."""
    base, optional = unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{path}: expected {type_name(tp)}, got null")
    if typing.get_origin(base) in (list, List):
        inner = typing.get_args(base)[0]
        if not isinstance(value, list):
            value = [value]
        return [coerce(f"{path}[{i}]", v, inner) for i, v in enumerate(value)]
    if base is bool:
        if isinstance(value, bool):
            return value
    elif base is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif base is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # YAML 1.1 (PyYAML) reads `1e-3` as text, YAML 1.2 and every user as a number: take what 1.2 would.
        if isinstance(value, str) and _YAML12_FLOAT.fullmatch(value.strip()):
            return float(value)
    elif base is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(f"{path}: expected {type_name(tp)}, got {show(value)} ({type(value).__name__})")


def append_or_replace(path: str, current: Any, value: Any) -> Any:
    """A list of names whose items all start with `+` appends to `current`; any other value replaces it.

    So `--training-callbacks +EarlyStopping` (or `callbacks: [+EarlyStopping]` in YAML) keeps the
    task's callbacks instead of making the user retype them. Only lists of strings take part: in a
    list of numbers `+0.9` is just a positive number.
    """
    if not isinstance(value, list) or not any(isinstance(v, str) and v.startswith("+") for v in value):
        return value
    if not all(isinstance(v, str) and v.startswith("+") for v in value):
        raise ConfigError(
            f"{path}: {value} mixes '+NAME' (append to the defaults) with plain names (replace them); "
            "prefix every name with + or none"
        )
    added = [v[1:] for v in value]
    if not all(added):
        raise ConfigError(f"{path}: a lone '+' names nothing; write +NAME, e.g. +EarlyStopping")
    return [*current, *added]


