"""Reading files nobody vouches for: a regular-file check that cannot hang, and checked JSON.

A model folder, a checkpoint or a run directory is whatever was copied or downloaded into it, so every JSON file
of one (an HF ``config.json``, a shard index, a manifest, a lock) is read here, in bounded time and memory:

- only a regular file is opened, and on its descriptor (opening a FIFO without a writer blocks forever; a device
  never ends), with the read capped at ``max_bytes``;
- the text must be UTF-8 and plain JSON: ``NaN``/``Infinity`` and numbers beyond a double (``1e999`` reads as
  ``inf``) are refused, a key repeated in one object is refused (Python keeps the last one silently: a file that
  says two things), nesting deeper than the parser can follow is one error instead of a ``RecursionError``, and
  a lone surrogate escape (``"\\ud800"``, which no UTF-8 text can hold and no message can print) is refused.

Errors are `UntrustedFileError`s whose ``why`` is a clause ("is not a regular file (a FIFO)") for the caller to
put after the name of the field or file it was reading.
"""

from __future__ import annotations

import json
import math
import os
import stat
from typing import Any

from llm.errors import UserError, show

JSON_MAX_BYTES = 64 * 2**20  # a config or a shard index is kilobytes; a manifest of many shards a few megabytes


class UntrustedFileError(UserError):
    """A file that cannot be read as what it should be; ``why`` says so as a clause."""

    def __init__(self, path: str | os.PathLike, why: str) -> None:
        super().__init__(f"{str(path)!r} {why}")
        self.path, self.why = str(path), why


def kind_of(mode: int) -> str:
    """What a file is, for a message: 'a FIFO', 'a directory', ..."""
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


def check_regular(path: str | os.PathLike) -> os.stat_result:
    """``os.stat`` of ``path``, refusing anything but a regular file (without opening it, so it cannot block)."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise UntrustedFileError(path, f"cannot be read: {exc.strerror or exc}") from None
    if not stat.S_ISREG(st.st_mode):
        raise UntrustedFileError(path, f"is not a regular file ({kind_of(st.st_mode)})")
    return st


def read_capped(path: str | os.PathLike, max_bytes: int) -> bytes:
    """The bytes of the regular file ``path``, at most ``max_bytes`` of them (more is an error).

    Opened non-blocking and checked on the descriptor, so a path swapped for a FIFO after a check cannot hang.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise UntrustedFileError(path, f"cannot be read: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UntrustedFileError(path, f"is not a regular file ({kind_of(st.st_mode)})")
        if st.st_size > max_bytes:
            raise UntrustedFileError(path, f"is {st.st_size:,} bytes, more than the {max_bytes:,} such a file can be")
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as exc:
        raise UntrustedFileError(path, f"cannot be read: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise UntrustedFileError(path, f"grew past {max_bytes:,} bytes while it was read")
    return data


class _Refused(ValueError):
    """A value plain JSON does not have, raised from inside the parser's hooks."""


def _constant(name: str) -> Any:
    raise _Refused(f"holds {name}, which is not a JSON number")


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Refused(f"holds the number {shorten_number(text)}, beyond the range of a double")
    return value


def shorten_number(text: str) -> str:
    return text if len(text) <= 40 else f"{text[:20]}...{text[-10:]}"


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _Refused(f"repeats the key {show(key)} in one object (which value is meant?)")
        out[key] = value
    return out


def _surrogate_in(data: Any) -> str | None:
    """The first string (key or value) holding a lone surrogate, or None; iterative, so depth costs no stack."""
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return item.encode("utf-8", "backslashreplace").decode("ascii")
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return None


def parse_json(raw: bytes, path: str | os.PathLike) -> Any:
    """``raw`` as plain JSON (see the module docstring); errors name ``path``."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UntrustedFileError(path, f"is not UTF-8 text (byte {exc.start})") from None
    try:
        data = json.loads(text, parse_constant=_constant, parse_float=_float, object_pairs_hook=_object)
    except _Refused as exc:
        raise UntrustedFileError(path, str(exc)) from None
    except json.JSONDecodeError as exc:
        raise UntrustedFileError(path, f"is not JSON: {exc.msg} (line {exc.lineno} column {exc.colno})") from None
    except RecursionError:
        raise UntrustedFileError(path, "is nested too deeply to be read") from None
    except ValueError as exc:  # an integer of more digits than Python converts
        raise UntrustedFileError(path, f"holds a value that cannot be read: {show(str(exc))}") from None
    bad = _surrogate_in(data)
    if bad is not None:
        raise UntrustedFileError(path, f"holds a lone surrogate escape, which is not Unicode text: {show(bad)}")
    return data


def read_json(path: str | os.PathLike, max_bytes: int = JSON_MAX_BYTES) -> Any:
    """The JSON value in the regular file ``path`` (at most ``max_bytes``), checked as `parse_json` does."""
    return parse_json(read_capped(path, max_bytes), path)


def is_regular(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a regular file (following links), without opening it."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def exists(path: str | os.PathLike) -> bool:
    """Whether anything (a file, a FIFO, a dangling link) is at ``path``: a name that is taken but unusable is an
    error for the caller to report, not a file that is absent."""
    return os.path.lexists(path)


__all__ = ["JSON_MAX_BYTES", "UntrustedFileError", "check_regular", "exists", "is_regular", "kind_of", "parse_json",
           "read_capped", "read_json"]
