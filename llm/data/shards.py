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
preparation of that slice once their writer is gone (`llm.fs.is_abandoned`).

Trust (the cheap check, on every open): an index is read in bounded time and memory and each typed field must have
its type and range (`check_index`: an integer is an int, not a float, bool, string, NaN or 1e300; totals add up),
before any count is used; every listed file must be a regular file (a FIFO would block) of exactly the listed size;
a segment table's header must give the listed shape before its rows are read, and its rows must add up to the
listed documents and bytes. Same-size damage (flipped bytes) needs the full check, `verify_checksums`, which re-reads
every file against the CRC-32 recorded at preparation (`python -m llm.data.prepare --verify OUT`).

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
from typing import Any, BinaryIO

import numpy as np

from llm import fs
from llm.data.sources import check_regular, open_regular
from llm.errors import ConfigError, shorten, show

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
    """Appends pieces' tokens to numbered shard files of at least `min_tokens` tokens, each renamed when complete.

    `add` takes one batch of pieces: their tokens concatenated (the separator already appended to pieces that end
    a document), each piece's token count, byte count and whether its document ends. A shard is cut only between
    pieces, so it may run past `min_tokens` by less than one piece (not a cap: see `PrepareOptions`).
    """

    def __init__(self, directory: Path, slice_index: int, dtype: np.dtype, min_tokens: int) -> None:
        if min_tokens < 1:
            raise ConfigError(f"--shard-min-tokens: invalid value {min_tokens}; must be >= 1")
        self.directory, self.slice_index, self.dtype = Path(directory), slice_index, np.dtype(dtype)
        self.min_tokens = min_tokens
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
            if self._cur.tokens >= self.min_tokens:
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
MAX_INDEX_BYTES = 64 << 20  # an index lists shards, a few hundred bytes each: far below this for any real corpus
MAX_COUNT = 1 << 62  # any count an index may hold: sums of such counts stay inside int64
_INDEX_INTS = {"version": 1, "slice": 0, "num_slices": 1, "num_tokens": 0, "num_docs": 0, "num_bytes": 0}
_SHARD_INTS = {"tokens": 1, "segments": 1, "docs": 0, "bytes": 0, "crc32": 0, "docs_crc32": 0}
_CRC_MAX = (1 << 32) - 1


def _int_field(where: str, name: str, value: Any, least: int, most: int = MAX_COUNT) -> int:
    """`value` if it is an integer in [least, most]; else `CacheMismatch` naming the field and the value. A bool,
    a float (even 3.0, NaN or 1e300) or a string is no count."""
    if type(value) is not int or not least <= value <= most:
        raise CacheMismatch(f"{where}{name}: invalid value {show(value)}; must be an integer in [{least}, {most}]")
    return value


def _name_field(where: str, name: str, value: Any) -> str:
    if not isinstance(value, str) or not value or os.path.basename(value) != value or value in (".", ".."):
        raise CacheMismatch(f"{where}{name}: invalid value {show(value)}; must be a plain file name")
    return value


def check_index(index: Any, name: str) -> dict[str, Any]:
    """`index` (parsed from the file `name`) if every typed field has its type and range and the totals add up;
    else `CacheMismatch` naming the first bad field and its value, before any count is used."""
    if not isinstance(index, dict) or index.get("format") != FORMAT or not isinstance(index.get("shards"), list):
        raise CacheMismatch(f"{name} is not a {FORMAT} index")
    where = f"{name}: "
    if index.get("version") != FORMAT_VERSION or type(index.get("version")) is not int:
        raise CacheMismatch(f"{where}version: invalid value {show(index.get('version'))}; must be {FORMAT_VERSION}")
    if index.get("dtype") not in DTYPES:
        raise CacheMismatch(f"{where}dtype: invalid value {show(index.get('dtype'))}; must be one of "
                            f"{', '.join(DTYPES)}")
    for key, least in _INDEX_INTS.items():
        _int_field(where, key, index.get(key), least)
    if index["slice"] >= index["num_slices"]:
        raise CacheMismatch(f"{where}slice: invalid value {index['slice']}; must be below num_slices "
                            f"({index['num_slices']})")
    for key in ("vocab_size", "eos_id"):
        if index.get(key) is not None:
            _int_field(where, key, index[key], 1 if key == "vocab_size" else 0, 1 << 32)
    if index.get("eos_id") is not None and index.get("vocab_size") is not None \
            and index["eos_id"] >= index["vocab_size"]:
        raise CacheMismatch(f"{where}eos_id: invalid value {index['eos_id']}; must be below vocab_size "
                            f"({index['vocab_size']})")
    if not isinstance(index.get("tokenizer"), str):
        raise CacheMismatch(f"{where}tokenizer: invalid value {show(index.get('tokenizer'))}; must be a string")
    if index.get("vocab_size") is not None and index["vocab_size"] > 1 << (8 * np.dtype(index["dtype"]).itemsize):
        raise CacheMismatch(f"{where}vocab_size: invalid value {index['vocab_size']}; dtype {index['dtype']} holds "
                            "fewer ids")
    for k, shard in enumerate(index["shards"]):
        at = f"{where}shards[{k}]."
        if not isinstance(shard, dict):
            raise CacheMismatch(f"{where}shards[{k}]: invalid value {show(shard)}; must be an object")
        _name_field(at, "file", shard.get("file"))
        _name_field(at, "docs_file", shard.get("docs_file"))
        for key, least in _SHARD_INTS.items():
            _int_field(at, key, shard.get(key), least, _CRC_MAX if "crc" in key else MAX_COUNT)
    for total, key in (("num_tokens", "tokens"), ("num_docs", "docs"), ("num_bytes", "bytes")):
        listed = sum(s[key] for s in index["shards"])
        if listed != index[total]:
            raise CacheMismatch(f"{where}{total}: invalid value {index[total]}; its shards hold {listed}")
    return index


def read_index(path: Path) -> dict[str, Any]:
    """One slice's index, read in bounded time and memory (a regular file under `MAX_INDEX_BYTES`, JSON nested no
    deeper than an index is) and checked field by field (`check_index`)."""
    try:
        with open_regular(path, "data.path", MAX_INDEX_BYTES) as f:
            raw = f.read(MAX_INDEX_BYTES // 64)  # a bounded read that does not reserve the whole cap up front
            while len(raw) <= MAX_INDEX_BYTES and (more := f.read(max(len(raw), 1 << 16))):
                raw += more
        if len(raw) > MAX_INDEX_BYTES:
            raise CacheMismatch(f"{path.name} grew past {MAX_INDEX_BYTES} bytes while it was read")
        index = json.loads(raw.decode("utf-8"))
    except (ConfigError, OSError, ValueError, RecursionError) as exc:
        reason = type(exc).__name__ if isinstance(exc, RecursionError) else str(exc).splitlines()[0] if str(exc) \
            else type(exc).__name__
        raise CacheMismatch(f"{path.name} is unreadable ({shorten(reason)})") from None
    return check_index(index, path.name)


def read_indexes(directory: str | os.PathLike) -> list[dict[str, Any]]:
    """Every slice's index, in slice order; `CacheMismatch` when one is unreadable or malformed (`read_index`), a
    slice is missing, or the slices disagree on what they are (tokenizer, dtype, slice count, source)."""
    indexes = [read_index(path) for path in index_files(directory)]
    if not indexes:
        raise CacheMismatch("it holds no index-*.json")
    first = indexes[0]
    for index in indexes[1:]:
        for key in ("num_slices", "dtype", "tokenizer", "source_key"):
            if index.get(key) != first.get(key):
                raise CacheMismatch(f"its slices disagree on {key} ({show(first.get(key))} vs "
                                    f"{show(index.get(key))}): slices of different preparations")
    n = first["num_slices"]
    have = sorted(i["slice"] for i in indexes)
    if have != list(range(n)):
        missing = sorted(set(range(n)) - set(have))
        raise CacheMismatch(f"it holds slices {shorten(str(have))} of {n}; missing {shorten(str(missing))} (still "
                            "being prepared, or not copied here)")
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
        for shard, (path, rows) in zip(index["shards"], check_slice(directory, index)):
            paths.append(path)
            counts.append(int(shard["tokens"]))
            seg_ends.append(rows[:, 0] + offset)
            seg_bytes.append(rows[:, 1])
            closed.append(rows[:, 2].astype(bool))
            offset += int(shard["tokens"])
    if offset < 1:
        raise CacheMismatch("its indexes list no tokens")
    names = [n for index in indexes for s in index["shards"] for n in (s["file"], s["docs_file"])]
    if len(set(names)) != len(names):
        twice = next(n for n in names if names.count(n) > 1)
        raise CacheMismatch(f"its indexes list {twice} twice (its tokens would be read twice)")
    ends, is_closed = np.concatenate(seg_ends), np.concatenate(closed)
    store = TokenStore(paths, counts, dtype, ends, np.concatenate(seg_bytes), ends[is_closed])
    return store, indexes[0]


def check_slice(directory: str | os.PathLike, index: dict[str, Any]) -> list[tuple[Path, np.ndarray]]:
    """The cheap check (`_check_shard`) of every shard a slice's checked index lists: each shard's path and rows."""
    dtype = np.dtype(DTYPES[index["dtype"]])
    return [_check_shard(Path(directory), shard, dtype) for shard in index["shards"]]


def _check_shard(directory: Path, shard: dict[str, Any], dtype: np.dtype) -> tuple[Path, np.ndarray]:
    """The cheap check of one listed shard (its index entry already type-checked): the token file is a regular
    file of exactly the listed size; the segment table's header gives the listed shape and dtype before any of it
    is read, and its rows add up to the listed documents and bytes, ending at the listed token count."""
    name, docs_name, tokens, segments = shard["file"], shard["docs_file"], shard["tokens"], shard["segments"]
    path = directory / name
    try:
        st = os.stat(path)
        check_regular(path, st, "data.path")
        with open_regular(directory / docs_name, "data.path") as f:
            rows = _read_rows(f, docs_name, segments)
    except (OSError, ConfigError) as exc:
        raise CacheMismatch(f"{name} or {docs_name} is unreadable ({exc})") from None
    if st.st_size != tokens * dtype.itemsize:
        raise CacheMismatch(f"{name} has {st.st_size} bytes, the index says {tokens} {dtype.name} tokens "
                            f"({tokens * dtype.itemsize} bytes): truncated, extended or not this index's file")
    ends = rows[:, 0]
    if int(ends[-1]) != tokens or int(ends[0]) < 0 or bool((np.diff(ends) < 0).any()) \
            or bool((rows[:, 1] < 0).any()) or not bool(np.isin(rows[:, 2], (0, 1)).all()) \
            or int(rows[:, 1].sum()) != shard["bytes"] or int(rows[:, 2].sum()) != shard["docs"]:
        raise CacheMismatch(f"{docs_name} does not index {segments} segments ending at token {tokens} with "
                            f"{shard['docs']} documents and {shard['bytes']} bytes (corrupted)")
    return path, rows


def _read_rows(f: BinaryIO, docs_name: str, segments: int) -> np.ndarray:
    """A segment table from an open .npy file, its header checked before its data is read (a corrupted header
    cannot make this read a huge array)."""
    try:
        version = np.lib.format.read_magic(f)
        header = (np.lib.format.read_array_header_1_0 if version == (1, 0) else
                  np.lib.format.read_array_header_2_0)(f)
    except (ValueError, SyntaxError, TypeError) as exc:
        raise CacheMismatch(f"{docs_name} is not a segment table ({shorten(str(exc))})") from None
    shape, fortran, dtype = header
    if shape != (segments, 3) or fortran or dtype != np.dtype("<i8"):
        raise CacheMismatch(f"{docs_name} holds a {dtype} array of shape {shape}, the index says {segments} "
                            "int64 rows of 3")
    data = f.read(segments * 24 + 1)
    if len(data) != segments * 24:
        raise CacheMismatch(f"{docs_name} holds {len(data)} bytes of rows, not {segments * 24} (truncated or "
                            "extended)")
    return np.frombuffer(data, "<i8").reshape(segments, 3).astype(np.int64)


def verify_checksums(directory: str | os.PathLike) -> list[str]:
    """Re-read every listed file; returns the names whose CRC-32 differs from the index or that cannot be read
    (empty = all good)."""
    directory = Path(directory)
    bad = []
    for index in read_indexes(directory):
        for shard in index["shards"]:
            for name, key in ((shard["file"], "crc32"), (shard["docs_file"], "docs_crc32")):
                crc = 0
                try:
                    with open_regular(directory / name, "data.path") as f:
                        while block := f.read(8 << 20):
                            crc = zlib.crc32(block, crc)
                except (OSError, ConfigError):
                    crc = -1
                if crc != shard[key]:
                    bad.append(name)
    return bad
