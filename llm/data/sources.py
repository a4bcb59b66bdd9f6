"""Text sources for the `lm` task: which files a corpus is made of, and the documents in them.

`data.path` may be a text file, a `.jsonl` file (one JSON object per line with a string field named by
`data.text_field`, `text` by default), a `.parquet` or `.arrow`/`.feather` file (that column; needs pyarrow), a
directory (every file below it, recursively, hidden entries and `__pycache__` skipped), or a glob
(`data/**/*.txt`). Empty `data.path` means the embedded default: the `*.py` sources of the running
interpreter's standard library (no test suites, no site-packages), which every machine has.

File order is sorted by path (the standard library: by a hash of the path, see `stdlib_files`), so a corpus
is the same on every machine and every run. A file is one document (a JSONL line is one document); documents
are what the token cache separates with the tokenizer's end-of-text id. A user file that cannot be read or is
not UTF-8 is a `ConfigError` naming it: silently skipping it would change the corpus without a word. How the
files are read (streamed in bounded chunks) is `readers.py`.

Inputs that could hang or lie are refused, not read: only regular files are data (a FIFO would block the run
forever, `/dev/zero` never ends, a socket or device is no corpus), files are opened non-blocking and checked on
the open descriptor (a path swapped after the listing cannot slip through), and a file over `data.max_file_bytes`
(when set) is refused before it is read. Directories and `**` globs follow symbolic links (a linked data set is
data) but a link back into its own ancestry is a directory loop and an error: Python's `glob` would follow it
40 levels deep, returning the same file 41 times (and, with two such links, never finishing).
"""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import os
import stat
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from llm.errors import ConfigError

_SKIP_DIRS = {"__pycache__", "site-packages", "dist-packages"}
_STDLIB_TEST_DIRS = {"test", "tests", "idle_test"}
# Default of `data.max_file_bytes`: no cap. Files are streamed in bounded chunks (`readers.py`), so a file's size
# no longer decides the memory a preparation needs; the cap stays as an opt-in guard against accidents.
DEFAULT_MAX_FILE_BYTES = 0


@dataclass(frozen=True)
class SourceFile:
    """One input file and the stat fields that key the token cache (a changed file re-tokenizes)."""

    path: str
    size: int
    mtime_ns: int

    def key(self) -> list[object]:
        return [self.path, self.size, self.mtime_ns]


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory")):
        if test(mode):
            return name
    return "not a plain file"


def check_regular(path: str | Path, st: os.stat_result, field: str = "data.path", max_file_bytes: int = 0) -> None:
    """Refuse anything but a regular file, and a regular file over `max_file_bytes` (0 = no cap)."""
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(
            f"{field}: {str(path)!r} is not a regular file ({_kind(st.st_mode)}); data must be regular files"
        )
    if max_file_bytes < 0:
        raise ConfigError(f"data.max_file_bytes: invalid value {max_file_bytes}; must be >= 0 (0 = no cap)")
    if max_file_bytes and st.st_size > max_file_bytes:
        raise ConfigError(
            f"{field}: {str(path)!r} is {st.st_size} bytes, over data.max_file_bytes={max_file_bytes}; split it, "
            "pre-tokenize it into a .bin, or raise data.max_file_bytes (0 = no cap)"
        )


def open_regular(path: str | Path, field: str = "data.path", max_file_bytes: int = 0) -> BinaryIO:
    """Open a regular file for binary reading, refusing FIFOs, devices, sockets and files over `max_file_bytes`.

    The file is opened non-blocking (opening a FIFO without a writer would block forever) and checked on its
    descriptor, so a path swapped for something else after it was listed cannot slip through.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise ConfigError(f"{field}: cannot read {str(path)!r}: {exc.strerror or exc}") from None
    try:
        check_regular(path, os.fstat(fd), field, max_file_bytes)  # before fdopen, which refuses a directory
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb")


def read_regular(path: str | Path, field: str = "data.path", max_file_bytes: int = 0, prefix: int = 0) -> bytes:
    """The bytes of a regular file (only its first `prefix` bytes if > 0), as `open_regular` checks it; the read
    stops one byte past the cap, so a file that grows after the check is caught too."""
    with open_regular(path, field, max_file_bytes) as f:
        try:
            if prefix > 0:
                return f.read(prefix)
            data = f.read(max_file_bytes + 1) if max_file_bytes else f.read()
        except OSError as exc:
            raise ConfigError(f"{field}: cannot read {str(path)!r}: {exc.strerror or exc}") from None
    if max_file_bytes and len(data) > max_file_bytes:
        raise ConfigError(
            f"{field}: {str(path)!r} grew past data.max_file_bytes={max_file_bytes} while it was read; "
            "split it, or raise data.max_file_bytes (0 = no cap)"
        )
    return data


def _stat(path: str | Path, field: str, max_file_bytes: int = 0) -> SourceFile:
    try:
        st = os.stat(path)
    except OSError as exc:
        raise ConfigError(f"{field}: cannot read {str(path)!r}: {exc.strerror or exc}") from None
    check_regular(path, st, field, max_file_bytes)
    return SourceFile(os.path.abspath(path), st.st_size, st.st_mtime_ns)


def _dir_id(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path or ".")
    except OSError:
        return None  # a dangling link: reported as unreadable when it is stat'ed as a file
    return (st.st_dev, st.st_ino) if stat.S_ISDIR(st.st_mode) else None


def _entries(directory: str) -> list[str]:
    try:
        return sorted(os.listdir(directory or "."))
    except NotADirectoryError:
        return []
    except OSError as exc:
        raise ConfigError(f"data.path: cannot list {directory!r}: {exc.strerror or exc}") from None


def _join(base: str, name: str) -> str:
    return os.path.join(base, name) if base else name


def _loop(path: str, field: str) -> ConfigError:
    return ConfigError(
        f"{field}: {path!r} is a directory loop (a symbolic link to a directory that contains it); "
        "remove the link or point data.path below it"
    )


def _walk(root: str, skip: set[str], field: str = "data.path", ancestors: frozenset = frozenset()) -> Iterator[str]:
    """Every non-hidden entry below `root` that is not a directory, depth first in sorted order.

    Directory links are followed; one that leads back to a directory on the current path is an error.
    """
    here = _dir_id(root)
    if here in ancestors:
        raise _loop(root, field)
    inner = ancestors | {here}
    for name in _entries(root):
        if name.startswith("."):
            continue
        path = os.path.join(root, name)
        if _dir_id(path) is None:
            yield path
        elif name not in skip:
            yield from _walk(path, skip, field, inner)


def _match(base: str, parts: list[str], field: str, ancestors: frozenset) -> Iterator[str]:
    """Paths below `base` matching the pattern components `parts` (glob semantics, hidden names skipped)."""
    if not parts:
        yield base
        return
    part, rest = parts[0], parts[1:]
    if part == "**":
        here = _dir_id(base)
        if here is None:
            return
        if here in ancestors:
            raise _loop(base, field)
        inner = ancestors | {here}
        if rest:
            yield from _match(base, rest, field, inner)
        for name in _entries(base):
            if name.startswith("."):
                continue
            path = _join(base, name)
            if not rest:
                yield path
            if _dir_id(path) is not None:
                yield from _match(path, parts, field, inner)
    elif glob.has_magic(part):
        for name in _entries(base):
            if (part.startswith(".") or not name.startswith(".")) and fnmatch.fnmatch(name, part):
                yield from _match(_join(base, name), rest, field, ancestors)
    elif os.path.lexists(_join(base, part)):
        yield from _match(_join(base, part), rest, field, ancestors)


def expand_glob(pattern: str, field: str = "data.path") -> list[str]:
    """The paths `pattern` matches (like `glob.glob(pattern, recursive=True)`), refusing directory loops.

    Duplicates are dropped (`a/**/**/x` matches a path twice, as in `glob`), first occurrence kept.
    """
    parts = pattern.split(os.sep)
    start = ""
    if parts and parts[0] == "":  # an absolute pattern
        start, parts = os.sep, parts[1:]
    return list(dict.fromkeys(_match(start, [p for p in parts if p], field, frozenset())))


def stdlib_files() -> list[SourceFile]:
    """The `*.py` files of this interpreter's standard library, minus test suites, in a fixed shuffled order.

    The order is a hash of each path relative to the library root, the same on every machine: the held-out
    tail (and the `max_bytes` cut) is then a sample of the whole library, not its alphabetical end (xml, zip).
    """
    root = sysconfig.get_paths()["stdlib"]
    paths = [p for p in _walk(root, _SKIP_DIRS | _STDLIB_TEST_DIRS) if p.endswith(".py")]
    paths.sort(key=lambda p: hashlib.sha1(os.path.relpath(p, root).encode("utf-8")).hexdigest())
    return [_stat(p, "data.path") for p in paths]


def resolve_files(path: str, field: str = "data.path", max_file_bytes: int = 0) -> list[SourceFile]:
    """Expand a user's `data.path` (file, directory or glob) into a sorted list of regular files, each within
    `max_file_bytes` (0 = no cap). Anything else found there (FIFO, device, socket, a directory loop) is an error.
    """
    if not path:
        return stdlib_files()
    if os.path.isdir(path):
        paths = list(_walk(path, _SKIP_DIRS, field))
        where = f"directory {path!r} holds no files"
    elif glob.has_magic(path):
        paths = [p for p in expand_glob(path, field) if _dir_id(p) is None]
        where = f"glob {path!r} matched no files"
    elif os.path.lexists(path):
        paths = [path]
        where = ""
    else:
        raise ConfigError(f"{field}: invalid value {path!r}; no such file, directory or glob match")
    if not paths:
        raise ConfigError(f"{field}: {where}")
    return [_stat(p, field, max_file_bytes) for p in sorted(paths)]
