"""Text sources for the `lm` task: which files a corpus is made of, and the documents in them.

`data.path` may be a text file, a `.jsonl` file (one JSON object per line with a string `text` field), a
directory (every regular file below it, recursively, hidden entries and `__pycache__` skipped), or a glob
(`data/**/*.txt`). Empty `data.path` means the embedded default: the `*.py` sources of the running
interpreter's standard library (no test suites, no site-packages), which every machine has.

File order is sorted by path (the standard library: by a hash of the path, see `stdlib_files`), so a corpus
is the same on every machine and every run. A file is one document (a JSONL line is one document); documents
are what the token cache separates with the tokenizer's end-of-text id. A user file that cannot be read or is
not UTF-8 is a `ConfigError` naming it: silently skipping it would change the corpus without a word.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from llm.errors import ConfigError

_SKIP_DIRS = {"__pycache__", "site-packages", "dist-packages"}
_STDLIB_TEST_DIRS = {"test", "tests", "idle_test"}


@dataclass(frozen=True)
class SourceFile:
    """One input file and the stat fields that key the token cache (a changed file re-tokenizes)."""

    path: str
    size: int
    mtime_ns: int

    @property
    def is_jsonl(self) -> bool:
        return self.path.endswith(".jsonl")

    def key(self) -> list[object]:
        return [self.path, self.size, self.mtime_ns]


def _stat(path: str | Path, field: str) -> SourceFile:
    try:
        st = os.stat(path)
    except OSError as exc:
        raise ConfigError(f"{field}: cannot read {str(path)!r}: {exc.strerror or exc}") from None
    return SourceFile(os.path.abspath(path), st.st_size, st.st_mtime_ns)


def _walk(root: str, skip: set[str]) -> Iterator[str]:
    for dirpath, dirnames, filenames in os.walk(root):
        # Pruning in place keeps os.walk out of skipped trees; sorting makes the walk deterministic.
        dirnames[:] = sorted(d for d in dirnames if d not in skip and not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith("."):
                yield os.path.join(dirpath, name)


def stdlib_files() -> list[SourceFile]:
    """The `*.py` files of this interpreter's standard library, minus test suites, in a fixed shuffled order.

    The order is a hash of each path relative to the library root, the same on every machine: the held-out
    tail (and the `max_bytes` cut) is then a sample of the whole library, not its alphabetical end (xml, zip).
    """
    root = sysconfig.get_paths()["stdlib"]
    paths = [p for p in _walk(root, _SKIP_DIRS | _STDLIB_TEST_DIRS) if p.endswith(".py")]
    paths.sort(key=lambda p: hashlib.sha1(os.path.relpath(p, root).encode("utf-8")).hexdigest())
    return [_stat(p, "data.path") for p in paths]


def resolve_files(path: str, field: str = "data.path") -> list[SourceFile]:
    """Expand a user's `data.path` (file, directory or glob) into a sorted list of files."""
    if not path:
        return stdlib_files()
    if os.path.isdir(path):
        paths = list(_walk(path, _SKIP_DIRS))
        where = f"directory {path!r} holds no files"
    elif glob.has_magic(path):
        paths = [p for p in glob.glob(path, recursive=True) if not os.path.isdir(p)]
        where = f"glob {path!r} matched no files"
    elif os.path.lexists(path):
        paths = [path]
        where = ""
    else:
        raise ConfigError(f"{field}: invalid value {path!r}; no such file, directory or glob match")
    if not paths:
        raise ConfigError(f"{field}: {where}")
    return [_stat(p, field) for p in sorted(paths)]


def _read_text(file: SourceFile, field: str, strict: bool) -> str:
    try:
        with open(file.path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ConfigError(f"{field}: cannot read {file.path!r}: {exc.strerror or exc}") from None
    try:
        return data.decode("utf-8", errors="strict" if strict else "replace")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{field}: {file.path!r} is not UTF-8 text (bad byte at offset {exc.start}); "
            "convert it, or pre-tokenize it into a .bin"
        ) from None


def _jsonl_documents(file: SourceFile, text: str, field: str) -> Iterator[str]:
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{field}: {file.path!r} line {lineno} is not JSON: {exc.msg}") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise ConfigError(f"{field}: {file.path!r} line {lineno} has no string 'text' field")
        yield record["text"]


def iter_documents(
    files: list[SourceFile], max_bytes: int = 0, strict: bool = True, field: str = "data.path"
) -> Iterator[str]:
    """The documents of `files` in order; with `max_bytes` > 0, stop once that many UTF-8 bytes were given
    (the last document is cut to fit, at a character boundary). `strict=False` replaces undecodable bytes
    (for the standard library, which has a few Latin-1 files) instead of raising."""
    budget = max_bytes if max_bytes > 0 else None
    for file in files:
        text = _read_text(file, field, strict=strict)
        docs = _jsonl_documents(file, text, field) if file.is_jsonl else iter([text])
        for doc in docs:
            if not doc:
                continue
            if budget is not None:
                raw = doc.encode("utf-8")
                if len(raw) >= budget:
                    yield raw[:budget].decode("utf-8", errors="ignore")
                    return
                budget -= len(raw)
            yield doc
