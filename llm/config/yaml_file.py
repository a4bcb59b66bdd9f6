"""Reading a config file: plain YAML, bounded in size, without aliases or duplicate keys."""

from __future__ import annotations

import os
from typing import Any

import yaml

from llm.errors import ConfigError, shorten, show

MAX_YAML_BYTES = 8 * 2**20  # a config is a few kilobytes; this bounds what a wrong path can cost


class _Refused(Exception):
    """A construct the config loader refuses, with the line it is on."""

    def __init__(self, what: str, mark: Any) -> None:
        super().__init__(what)
        self.what, self.line = what, mark.line + 1 if mark is not None else 0


class _ConfigLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` without aliases and without duplicate keys.

    An alias (`*name`) refers to a node by reference, so nine lines of aliases to aliases (a "billion laughs"
    file) stand for a billion values: safe to load, but every walk over it (the config's own checks) takes
    minutes and gigabytes. A config never needs one, so aliases are refused when the file is composed, before
    anything is expanded. A repeated key would silently take the last value, so it is refused too.
    """

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise _Refused(f"YAML aliases are not accepted (*{event.anchor}); write the value out",
                                event.start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, (str, int, float, bool)):
                continue  # an unhashable key is the constructor's error, reported as invalid YAML
            if key in seen:
                raise _Refused(f"duplicate key {show(key)}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_yaml(path: str) -> dict[str, Any]:
    """Read a config file: a regular file of at most MAX_YAML_BYTES, plain YAML (see `_ConfigLoader`)."""
    if not os.path.exists(path):
        raise ConfigError(f"config: file not found: {show(path)}")
    if not os.path.isfile(path):  # a directory, FIFO or device: reading it would fail, hang or never end
        raise ConfigError(f"config: {show(path)} is not a regular file")
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_YAML_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"config: cannot read {show(path)}: {exc.strerror or exc}") from None
    if len(raw) > MAX_YAML_BYTES:
        raise ConfigError(f"config: {show(path)} is larger than {MAX_YAML_BYTES:,} bytes; not a config file")
    try:
        data = yaml.load(raw.decode("utf-8"), Loader=_ConfigLoader)  # noqa: S506  (a SafeLoader subclass)
    except _Refused as exc:
        raise ConfigError(f"config: {show(path)} line {exc.line}: {exc.what}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise ConfigError(f"config: {show(path)} is not valid YAML: {shorten(first)}") from None
    except RecursionError:
        raise ConfigError(f"config: {show(path)} is nested too deeply to be a config") from None
    except ValueError as exc:  # e.g. an integer of more digits than Python converts
        raise ConfigError(f"config: {show(path)} holds a value that cannot be read: {show(str(exc))}") from None
    return data or {}

