"""The sharded token cache: shard files, the index that lists them, and the one token array they make together.

A prepared directory holds, per slice `I` of `N` (one slice per machine that prepared part of the corpus):
- `tokens-IIIII-KKKKK.bin`: the tokens of shard K, a flat array of the index's dtype;
- `docs-IIIII-KKKKK.npy`: one row per segment of the shard, `(token end within the shard, UTF-8 bytes, closed)`,
  where a segment is a document, or the part of one that the shard (or the slice) ends inside (`closed` = 0);
  the last row ends at the shard's token count, so each shard's byte accounting is exact on its own;
- `index-IIIII-of-NNNNN.json`: format, dtype, tokenizer, the slice, and per shard its files, token, segment,
  document and byte counts and CRC-32 checksums (computed while writing; a CRC catches corruption and
  truncation at several times the speed of SHA-256, which would cost the byte path a third of its throughput);
  plus `tokenizer.json` for a Hugging Face tokenizer.

Crash safety: a shard is written under a temporary name (`.tmp-<pid>` suffix) and renamed when complete (`llm.fs`);
the index is written last, the same way. A run reads only what an index lists, and only when every slice's index is
present, so a killed preparation leaves nothing a run would use; its temporary files are removed by the next
preparation of that slice once their writer is gone (`llm.fs.is_abandoned`). On opening, every listed file must exist
with the size the index gives and every segment table must match its shard (cheap); `verify_checksums` re-reads the
tokens (`python -m llm.data.prepare --verify`).

`TokenStore` presents the shards as one array: global token positions, segment ends and document boundaries, and
`gather` reads any positions (a window crossing a shard boundary reads from both), so batches, the train/val split
and the data position do not depend on how the tokens were cut into shards.
"""

from __future__ import annotations

import glob
import json
import os
import re
import socket
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llm import fs
from llm.data.sources import check_regular
from llm.errors import ConfigError

FORMAT = "llm-token-shards"
FORMAT_VERSION = 1
DTYPES = {"uint8": np.uint8, "uint16": np.uint16, "uint32": np.uint32}
TMP_SUFFIX = ".tmp-"
_INDEX_RE = re.compile(r"^index-(\d{5})-of-(\d{5})\.json$")
_SHARD_RE = re.compile(r"^(tokens-\d{5}-\d{5}\.bin|docs-\d{5}-\d{5}\.npy)")


def index_name(slice_index: int, num_slices: int) -> str:
    return f"index-{slice_index:05d}-of-{num_slices:05d}.json"


def index_files(directory: str | os.PathLike) -> list[Path]:
    """The complete slices' index files of a prepared directory (empty when it is none)."""
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    return sorted(Path(directory) / n for n in names if _INDEX_RE.match(n))


def is_prepared(directory: str | os.PathLike) -> bool:
    return os.path.isdir(directory) and bool(index_files(directory))


def has_shards(directory: str | os.PathLike) -> bool:
    """Whether a directory holds token shards (complete or not): one without an index is an unfinished
    preparation, never a directory of text files."""
    try:
        return any(_SHARD_RE.match(n) for n in os.listdir(directory))
    except OSError:
        return False


class CacheMismatch(Exception):
    """A prepared directory whose files disagree with its index: a cache is rebuilt, a user's directory refused."""


# --------------------------------------------------------------------------------------------------------- store
class TokenStore:
    """Token shards as one array, with segment ends (global), their UTF-8 bytes, and the document boundaries."""

    def __init__(self, paths: list[Path], counts: list[int], dtype: np.dtype, seg_ends: np.ndarray,
                 seg_bytes: np.ndarray, doc_ends: np.ndarray | None = None) -> None:
        self.paths, self.dtype = [Path(p) for p in paths], np.dtype(dtype)
        self.offsets = np.concatenate([[0], np.cumsum(np.asarray(counts, np.int64))]).astype(np.int64)
        self.num_tokens = int(self.offsets[-1])
        self.seg_ends, self.seg_bytes = np.asarray(seg_ends, np.int64), np.asarray(seg_bytes, np.float64)
        # Where documents end (split points may land there); a .bin without an index has none inside.
        self.doc_ends = self.seg_ends if doc_ends is None else np.asarray(doc_ends, np.int64)
        self._maps: dict[int, np.ndarray] = {}

    @property
    def path(self) -> Path:
        """The first shard (a single-file store's file)."""
        return self.paths[0]

    def __getstate__(self) -> dict[str, Any]:
        # Loader workers reopen the memmaps instead of receiving a pickled copy of the tokens.
        return {**self.__dict__, "_maps": {}}

    def _map(self, shard: int) -> np.ndarray:
        if shard not in self._maps:
            count = int(self.offsets[shard + 1] - self.offsets[shard])
            self._maps[shard] = np.memmap(self.paths[shard], dtype=self.dtype, mode="r", shape=(count,))
        return self._maps[shard]

    def gather(self, positions: np.ndarray) -> np.ndarray:
        """The tokens at global `positions` (any shape), wherever their shards' boundaries fall."""
        if len(self.paths) == 1:
            return self._map(0)[positions]
        shard = np.searchsorted(self.offsets, positions, side="right") - 1
        first, last = int(shard.min()), int(shard.max())
        if first == last:  # the common case: the whole batch inside one shard
            return self._map(first)[positions - self.offsets[first]]
        out = np.empty(positions.shape, self.dtype)
        for s in range(first, last + 1):
            mask = shard == s
            if mask.any():
                out[mask] = self._map(s)[positions[mask] - self.offsets[s]]
        return out

    def tokens(self) -> np.ndarray:
        """Every token: the memmap of a single shard, else a copy of all shards (small stores, tests, tools)."""
        if len(self.paths) == 1:
            return self._map(0)
        return np.concatenate([self._map(s) for s in range(len(self.paths))])

    def bytes_between(self, start: int, stop: int) -> float:
        """UTF-8 bytes the tokens [start, stop) stand for; a segment cut by the range counts pro rata."""
        starts = np.concatenate([[0], self.seg_ends[:-1]])
        lengths = np.maximum(self.seg_ends - starts, 1)
        overlap = np.clip(np.minimum(self.seg_ends, stop) - np.maximum(starts, start), 0, None)
        return float((self.seg_bytes * overlap / lengths).sum())


# -------------------------------------------------------------------------------------------------------- writer
@dataclass
class _Shard:
    tokens: int = 0
    rows: list[tuple[int, int, int]] = field(default_factory=list)
    docs: int = 0
    bytes: int = 0


class ShardWriter:
    """Appends pieces' tokens to numbered shard files of about `shard_tokens` tokens, each renamed when complete.

    `add` takes one batch of pieces: their tokens concatenated (the separator already appended to pieces that end
    a document), each piece's token count, byte count and whether its document ends. A shard is cut only between
    pieces, so it may run past `shard_tokens` by less than one piece.
    """

    def __init__(self, directory: Path, slice_index: int, dtype: np.dtype, shard_tokens: int) -> None:
        if shard_tokens < 1:
            raise ConfigError(f"--shard-tokens: invalid value {shard_tokens}; must be >= 1")
        self.directory, self.slice_index, self.dtype = Path(directory), slice_index, np.dtype(dtype)
        self.shard_tokens = shard_tokens
        self.done: list[dict[str, Any]] = []
        self._file: Any = None
        self._crc = 0
        self._cur = _Shard()
        self._seg_tokens = self._seg_bytes = 0  # the open segment: tokens and bytes since the last row

    def _names(self, k: int) -> tuple[str, str]:
        return f"tokens-{self.slice_index:05d}-{k:05d}.bin", f"docs-{self.slice_index:05d}-{k:05d}.npy"

    def _tmp(self, name: str) -> Path:
        return self.directory / f"{name}{TMP_SUFFIX}{os.getpid()}"

    def add(self, tokens: np.ndarray, lengths: np.ndarray, nbytes: Iterable[int], ends: Iterable[bool]) -> None:
        tokens = tokens.astype(self.dtype, copy=False)
        pos = 0
        for length, size, end in zip(lengths.tolist(), nbytes, ends):
            if self._file is None:
                self._file = open(self._tmp(self._names(len(self.done))[0]), "wb")
                self._crc = 0
            if length:
                chunk = memoryview(tokens[pos : pos + length]).cast("B")  # no copy: a slice is contiguous
                self._file.write(chunk)
                self._crc = zlib.crc32(chunk, self._crc)
            pos += length
            self._cur.tokens += length
            self._cur.bytes += size
            self._seg_tokens += length
            self._seg_bytes += size
            if end:
                self._row(closed=True)
            if self._cur.tokens >= self.shard_tokens:
                self._finish_shard()

    def _row(self, closed: bool) -> None:
        if self._seg_tokens or closed:
            self._cur.rows.append((self._cur.tokens, self._seg_bytes, int(closed)))
            self._cur.docs += int(closed)
        self._seg_tokens = self._seg_bytes = 0

    def _finish_shard(self) -> None:
        self._row(closed=False)  # a document the shard ends inside continues in the next one
        # Not durable (llm.fs, `durable=False`): the rename after a complete write is what protects against a killed
        # process; durability against a power cut would cost the byte path most of its throughput (a disk flush per
        # shard).
        self._file.close()
        self._file = None
        if self._cur.tokens == 0:  # nothing was written since the last shard
            os.remove(self._tmp(self._names(len(self.done))[0]))
            self._cur = _Shard()
            return
        tokens_name, docs_name = self._names(len(self.done))
        rows = np.asarray(self._cur.rows, np.int64).reshape(-1, 3)
        with open(self._tmp(docs_name), "wb") as f:
            np.save(f, rows, allow_pickle=False)
        docs_crc = zlib.crc32(self._tmp(docs_name).read_bytes())
        fs.publish(self._tmp(docs_name), self.directory / docs_name, durable=False)
        fs.publish(self._tmp(tokens_name), self.directory / tokens_name, durable=False)
        self.done.append({"file": tokens_name, "docs_file": docs_name, "tokens": self._cur.tokens,
                          "segments": len(rows), "docs": self._cur.docs, "bytes": self._cur.bytes,
                          "crc32": self._crc, "docs_crc32": docs_crc})
        self._cur = _Shard()

    def close(self) -> list[dict[str, Any]]:
        """Finish the last shard; returns the shards' index entries."""
        if self._file is not None:
            self._finish_shard()
        return self.done

    def abort(self) -> None:
        """Remove the shard being written (its completed siblings are unreachable without an index)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        for path in self.directory.glob(f"*-{self.slice_index:05d}-*{TMP_SUFFIX}{os.getpid()}"):
            path.unlink(missing_ok=True)


def write_index(directory: Path, slice_index: int, num_slices: int, meta: dict[str, Any],
                shards: list[dict[str, Any]]) -> Path:
    """Write a slice's index atomically (temporary name, then rename): the step that makes the slice usable. Not
    durable, like the shards it lists (see `ShardWriter._finish_shard`)."""
    index = {
        "format": FORMAT, "version": FORMAT_VERSION, **meta, "slice": slice_index, "num_slices": num_slices,
        "num_tokens": sum(s["tokens"] for s in shards), "num_docs": sum(s["docs"] for s in shards),
        "num_bytes": sum(s["bytes"] for s in shards), "shards": shards,
    }
    target = directory / index_name(slice_index, num_slices)
    tmp = directory / f"{target.name}{TMP_SUFFIX}{os.getpid()}"
    fs.atomic_write(target, json.dumps(index, indent=1), tmp=tmp, durable=False)
    return target


def remove_leftovers(directory: Path, slice_index: int | None = None) -> list[Path]:
    """Temporary shard and index files of killed preparations (of one slice, or all) in `directory`, by the one
    rule for leftovers (`llm.fs.is_abandoned`); returns what was removed.

    A temp name records its writer's pid (`.tmp-<pid>`) but not its host. A slice is prepared by one process at a
    time, so the pid is checked on this host: a leftover of a killed preparation elsewhere is removed unless its pid
    happens to run here (then it waits for the age bound; no index lists it, so no run reads it meanwhile).
    """
    pattern = "*" if slice_index is None else f"*-{slice_index:05d}-*"
    removed, host = [], socket.gethostname()
    for name in glob.glob(str(directory / f"{pattern}{TMP_SUFFIX}*")):
        path = Path(name)
        pid = path.name.rpartition(TMP_SUFFIX)[2]
        owner = fs.Owner(host, int(pid)) if pid.isdigit() else None
        if path.is_file() and fs.is_abandoned(path, owner):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


# -------------------------------------------------------------------------------------------------------- reader
def read_indexes(directory: str | os.PathLike) -> list[dict[str, Any]]:
    """Every slice's index, in slice order; `CacheMismatch` when one is unreadable, a slice is missing, or the
    slices disagree on what they are (tokenizer, dtype, slice count, source)."""
    indexes = []
    for path in index_files(directory):
        try:
            index = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise CacheMismatch(f"{path.name} is unreadable ({exc})") from None
        if not isinstance(index, dict) or index.get("format") != FORMAT or not isinstance(index.get("shards"), list):
            raise CacheMismatch(f"{path.name} is not a {FORMAT} index")
        if index.get("version") != FORMAT_VERSION or index.get("dtype") not in DTYPES:
            raise CacheMismatch(f"{path.name} has version {index.get('version')!r} or dtype {index.get('dtype')!r}, "
                                f"not {FORMAT_VERSION} / one of {', '.join(DTYPES)}")
        indexes.append(index)
    if not indexes:
        raise CacheMismatch("it holds no index-*.json")
    first = indexes[0]
    for index in indexes[1:]:
        for key in ("num_slices", "dtype", "tokenizer", "source_key"):
            if index.get(key) != first.get(key):
                raise CacheMismatch(f"its slices disagree on {key} ({first.get(key)!r} vs {index.get(key)!r}): "
                                    "slices of different preparations")
    n = first.get("num_slices")
    have = sorted(int(i.get("slice", -1)) for i in indexes)
    if have != list(range(n)):
        missing = sorted(set(range(n)) - set(have))
        raise CacheMismatch(f"it holds slices {have} of {n}; missing {missing} (still being prepared, or not "
                            "copied here)")
    return sorted(indexes, key=lambda i: i["slice"])


def open_store(directory: str | os.PathLike) -> tuple[TokenStore, dict[str, Any]]:
    """Open a prepared directory as one `TokenStore` (checking every file against the indexes) and the first
    slice's index (tokenizer, dtype, key); `CacheMismatch` says what does not check out."""
    directory = Path(directory)
    indexes = read_indexes(directory)
    dtype = np.dtype(DTYPES[indexes[0]["dtype"]])
    paths, counts, seg_ends, seg_bytes, closed = [], [], [], [], []
    offset = 0
    for index in indexes:
        for shard in index["shards"]:
            path, rows = _check_shard(directory, shard, dtype)
            paths.append(path)
            counts.append(int(shard["tokens"]))
            seg_ends.append(rows[:, 0] + offset)
            seg_bytes.append(rows[:, 1])
            closed.append(rows[:, 2].astype(bool))
            offset += int(shard["tokens"])
    if offset < 1:
        raise CacheMismatch("its indexes list no tokens")
    ends, is_closed = np.concatenate(seg_ends), np.concatenate(closed)
    store = TokenStore(paths, counts, dtype, ends, np.concatenate(seg_bytes), ends[is_closed])
    return store, indexes[0]


def _check_shard(directory: Path, shard: dict[str, Any], dtype: np.dtype) -> tuple[Path, np.ndarray]:
    try:
        name, docs_name, tokens = shard["file"], shard["docs_file"], int(shard["tokens"])
        segments = int(shard["segments"])
    except (KeyError, TypeError, ValueError):
        raise CacheMismatch(f"a shard entry lacks file, docs_file, tokens or segments: {shard!r:.200}") from None
    if os.path.basename(name) != name or os.path.basename(docs_name) != docs_name:
        raise CacheMismatch(f"shard names must be plain file names, not {name!r}/{docs_name!r}")
    path = directory / name
    try:
        st = os.stat(path)
        check_regular(path, st, "data.path")
        rows = np.load(directory / docs_name, allow_pickle=False)
    except (OSError, ValueError, ConfigError) as exc:
        raise CacheMismatch(f"{name} or {docs_name} is unreadable ({exc})") from None
    if st.st_size != tokens * dtype.itemsize or tokens < 1:
        raise CacheMismatch(f"{name} has {st.st_size} bytes, the index says {tokens} {dtype.name} tokens")
    if rows.dtype != np.int64 or rows.shape != (segments, 3) or int(rows[-1, 0]) != tokens \
            or bool((np.diff(rows[:, 0]) < 0).any()):
        raise CacheMismatch(f"{docs_name} does not index {segments} segments ending at token {tokens}")
    return path, rows


def verify_checksums(directory: str | os.PathLike) -> list[str]:
    """Re-read every listed file; returns the names whose CRC-32 differs from the index (empty = all good)."""
    directory = Path(directory)
    bad = []
    for index in read_indexes(directory):
        for shard in index["shards"]:
            for name, key in ((shard["file"], "crc32"), (shard["docs_file"], "docs_crc32")):
                crc = 0
                with open(directory / name, "rb") as f:
                    while block := f.read(8 << 20):
                        crc = zlib.crc32(block, crc)
                if crc != shard.get(key):
                    bad.append(name)
    return bad
