"""User-facing errors.

A `UserError` is a mistake in what the user asked for (a flag, a YAML key, a data path, a
checkpoint). The CLI prints its message as one line and exits with status 2, without a traceback;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(Exception):
    """A problem with the user's input; reported as one line, exit status 2."""

    exit_code = 2


class ConfigError(UserError):
    """An invalid configuration value, key or flag."""


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """Return ' (did you mean X?)' for the closest candidate, or '' when nothing is close."""
    matches = difflib.get_close_matches(str(name), [str(c) for c in candidates], n=1, cutoff=0.6)
    return f" (did you mean {matches[0]!r}?)" if matches else ""


def invalid(field: str, value: object, valid: str, candidates: Iterable[str] | None = None) -> ConfigError:
    """Build the standard message: field, bad value, what is valid, and a suggestion where one fits."""
    hint = did_you_mean(str(value), candidates) if candidates is not None else ""
    return ConfigError(f"{field}: invalid value {value!r}; {valid}{hint}")
