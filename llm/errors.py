"""User-facing errors.

A `UserError` is a mistake in what the user asked for (a flag, a YAML key, a data path, a
checkpoint). The CLI prints its message as one line and exits with status 2, without a traceback;
anything else is a bug and keeps its traceback.

Messages quote the user's values, and a value can be anything a file holds (a 1 MB string from a
YAML file): `shorten` caps a quoted value at `MAX_VALUE_CHARS`, and every message is capped at
`MAX_MESSAGE_CHARS` when it is turned into text, so no input can produce a megabyte-long error line.
"""

from __future__ import annotations

import difflib
import sys
from collections.abc import Callable, Iterable

MAX_VALUE_CHARS = 200  # a quoted value in a message
MAX_MESSAGE_CHARS = 2000  # a whole message (room for a list of valid names)


def shorten(text: str, limit: int = MAX_VALUE_CHARS) -> str:
    """`text` cut to at most `limit` characters, keeping its head and tail around an ellipsis with the count cut."""
    if len(text) <= limit:
        return text
    marker = f"...[{len(text) - limit} chars]..."
    keep = max(limit - len(marker), 2)
    return text[: keep - keep // 4] + marker + text[len(text) - keep // 4:]


def show(value: object, limit: int = MAX_VALUE_CHARS) -> str:
    """`repr(value)` for a message, shortened."""
    return shorten(repr(value), limit)


class UserError(Exception):
    """A problem with the user's input; reported as one line, exit status 2."""

    exit_code = 2

    def __str__(self) -> str:
        return shorten(super().__str__(), MAX_MESSAGE_CHARS)


class ConfigError(UserError):
    """An invalid configuration value, key or flag."""


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """Return ' (did you mean X?)' for the closest candidate, or '' when nothing is close."""
    name = str(name)
    if len(name) > MAX_VALUE_CHARS:  # nothing that long is a typo of a name; and difflib is quadratic
        return ""
    matches = difflib.get_close_matches(name, [str(c) for c in candidates], n=1, cutoff=0.6)
    return f" (did you mean {matches[0]!r}?)" if matches else ""


def invalid(field: str, value: object, valid: str, candidates: Iterable[str] | None = None) -> ConfigError:
    """Build the standard message: field, bad value (shortened), what is valid, and a suggestion where one fits."""
    hint = did_you_mean(str(value), candidates) if candidates is not None else ""
    return ConfigError(f"{field}: invalid value {show(value)}; {valid}{hint}")


def run_tool(body: Callable[[], object]) -> int:
    """Run a command-line tool's ``body``: exit status 0; a ``UserError`` is one ``error:`` line on stderr and exit
    status 2 (no traceback); Ctrl-C is exit status 130."""
    try:
        body()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    return 0
