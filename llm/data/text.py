"""Language-model data: a memory-mapped token cache and the `TextDataModule` that cuts it into windows.

Flow: `prepare_data` (rank 0, once) resolves the source files (see `sources.py`), and unless `data.path` is a
prepared directory (`python -m llm.data.prepare`, recognised by its `index-*.json`; read in place), prepares the
corpus with the same streaming pipeline (`prepare.py`: bounded memory, worker processes for BPE, BPE trained on
a `data.bpe_sample_bytes` sample) into `CACHE_DIR/tokens/<key>/`: token shards, their index and `tokenizer.json`
for BPE (layout: `shards.py`). The key hashes the source files' paths, sizes and mtimes, the size cap, the text
field and the tokenizer, so an unchanged corpus is tokenized exactly once and every later run (and every rank)
maps the same files. The cache is written to a temporary directory and renamed into place, so a crash or a
concurrent run never leaves a half-written cache behind. `CACHE_DIR` is `data.cache_dir`, else `$LLM_CACHE_DIR`,
else `~/.cache/llm`. Single-file caches of earlier versions (v2: `tokens.bin` + `docs.npy` + `meta.json`) are not
read: the cache key includes the version, so such a corpus is re-tokenized once, transparently, into a new
directory (the old one may be deleted).

A cache is trusted only as far as it checks out: on reuse its index must name this cache's key, and every shard
and segment table must agree with it in size, count and shape (and a BPE run's `tokenizer.json` must be there); a
cache that does not (a truncated copy, a disk-full write, hand edits) is rebuilt with a warning instead of being
trained on or crashing. A user's prepared directory that does not check out is a `ConfigError`. Temporary
directories that a killed preparation left behind are removed by the next one, once their owner process is gone
(same host) or they sat unchanged for a day.

Pre-tokenized data: `data.path` ending in `.bin` is read in place (no cache). Its dtype comes from a sidecar
JSON next to it (`tokens.bin` -> `tokens.json`: `{"dtype": "uint16", "vocab_size": 50257, "num_bytes": N}`,
all optional but `dtype`); without a sidecar the dtype is uint16 for vocabularies up to 65536 ids and uint32
above (the nanoGPT convention). A size that is not a multiple of the dtype, or an id outside the
tokenizer's vocabulary, is a `ConfigError`: both are what a wrong dtype looks like.

Split and windows: validation is the last `val_fraction` of the tokens (moved to the nearest document
boundary when one is close), so train and validation never share a token. Training windows hold
`seq_len + 1` tokens at stride `seq_len`; with `data.sampling: random` (the default) the windows are
shuffled and their phase shifts by a seeded offset each epoch (different cuts every epoch, still
deterministic), with `sequential` they are read in order from offset 0. Batches are sharded over ranks and
resume exactly through `DataModule.make_loader`; each batch is one fancy-indexed read of the memmapped shards
(`TokenStore.gather`), and windows are defined on global token positions, so how the tokens are cut into shards
changes nothing about the batches.

Document masks (`data.document_mask`, `--data-document-mask`): windows still cross documents (no token is wasted),
but the model never attends across them. Preparation ends every document with the tokenizer's end-of-sequence token
(the separator); `window_document_ids` turns a window's tokens into document ids on the device (a cumulative sum
over the separators, no host sync), and the separator belongs to the document it ends: it sees that document, and
its target (the next document's first token) is predicted from it alone. Data without separators (a tokenizer
without one, a `.bin` that holds none) is refused: there would be no boundary to mask.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from llm import fs
from llm.data.bytecount import split_bytes
from llm.data.datamodule import SectionDataModule
from llm.data.prepare import PrepareOptions, prepare
from llm.data.readers import ReadOptions
from llm.data.shards import DTYPES as _DTYPES
from llm.data.shards import CacheMismatch, TokenStore, has_shards, index_files, is_prepared, open_store
from llm.data.sources import SourceFile, check_regular, read_regular, resolve_files
from llm.data.tokenizers import (
    TOKENIZER_FILE,
    ByteTokenizer,
    HFTokenizer,
    Tokenizer,
    copy_tokenizer,
)
from llm.errors import ConfigError
from llm.registry import register_data_module

__all__ = ["CacheMismatch", "TextDataModule", "TokenStore", "TokenWindows", "bits_per_byte", "cache_root",
           "clean_stale_temporaries", "open_bin", "split_point", "window_document_ids"]

log = logging.getLogger("llm")

# 2: meta.json records the cache key; 3: sharded (index + shards, see shards.py); 4: documents cut only where the
# tokenizer's ids cannot change (cuts.py), so a v3 BPE cache's ids may differ from what preparing now gives.
CACHE_VERSION = 4
SAMPLING_MODES = ("random", "sequential")
_TMP_MARK = ".tmp-"  # temporary cache directories: `.<key>.tmp-<hex>` next to the caches
_STALE_MARK = ".stale-"  # a rejected cache moved aside before removal: `.<key>.stale-<hex>`


def cache_root(cache_dir: str = "") -> Path:
    """Token caches live here: `data.cache_dir`, else `$LLM_CACHE_DIR`, else `~/.cache/llm`."""
    return Path(cache_dir or os.environ.get("LLM_CACHE_DIR") or Path.home() / ".cache" / "llm").expanduser()


def _write_cache(files: list[SourceFile], target: Path, options: PrepareOptions, tokenizer: Tokenizer | None) -> None:
    """Prepare `files` into `target` atomically (a temporary directory, then one rename)."""
    tmp = target.parent / f".{target.name}{_TMP_MARK}{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        fs.write_owner(tmp)  # what tells a later preparation whether this one is still at work (`_abandoned`)
        prepare(files, tmp, options, tokenizer)
        os.remove(tmp / fs.OWNER_FILE)
        try:
            fs.publish(tmp, target, durable=False)  # not durable, like the shards (see shards.py)
        except OSError:
            if not index_files(target):  # not a concurrent winner: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _open_cache(directory: Path, key: str | None = None, bpe: bool = False) -> TokenStore:
    """Open a cache directory, checking every file against its index; `CacheMismatch` says what is wrong."""
    store, index = open_store(directory)
    if key is not None and index.get("key") != key:
        raise CacheMismatch(f"its index names key {index.get('key')!r}, not {key!r} (another corpus' cache)")
    if bpe and not (directory / TOKENIZER_FILE).is_file():
        raise CacheMismatch(f"{TOKENIZER_FILE} is missing")
    return store


def _discard(directory: Path) -> None:
    """Remove a cache directory: first renamed aside (one atomic step, so no reader sees it half-deleted)."""
    aside = directory.parent / f".{directory.name}{_STALE_MARK}{uuid.uuid4().hex[:8]}"
    try:
        os.rename(directory, aside)
    except FileNotFoundError:
        return  # a concurrent preparation discarded it first
    shutil.rmtree(aside, ignore_errors=True)


def _abandoned(tmp: Path, now: float) -> bool:
    """Whether a temporary cache directory belongs to no live preparation: one moved aside to be discarded, or
    one the package's rule for leftovers (`llm.fs.is_abandoned`) finds without a live writer."""
    return _STALE_MARK in tmp.name or fs.is_abandoned(tmp, fs.read_owner(tmp), now=now)


def clean_stale_temporaries(parent: Path) -> list[Path]:
    """Remove temporary cache directories under `parent` that killed preparations left behind; returns them."""
    removed: list[Path] = []
    now = time.time()
    try:
        entries = [p for p in parent.iterdir() if p.name.startswith(".") and (_TMP_MARK in p.name
                                                                             or _STALE_MARK in p.name)]
    except OSError:
        return removed
    for tmp in entries:
        if tmp.is_dir() and not tmp.is_symlink() and _abandoned(tmp, now):
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    return removed


def _read_sidecar(path: str) -> dict[str, Any]:
    sidecar = Path(path).with_suffix(".json")
    if not os.path.lexists(sidecar):
        return {}
    try:
        meta = json.loads(read_regular(sidecar, "data.path", 1 << 20))
    except (ValueError, RecursionError) as exc:  # RecursionError: JSON nested too deeply
        raise ConfigError(f"data.path: cannot read the sidecar {str(sidecar)!r}: {exc}") from None
    if not isinstance(meta, dict) or meta.get("dtype", "uint16") not in _DTYPES:
        raise ConfigError(f"data.path: sidecar {str(sidecar)!r} must give dtype as one of {', '.join(_DTYPES)}")
    return meta


def open_bin(path: str, tokenizer: Tokenizer) -> TokenStore:
    """Map a pre-tokenized `.bin` in place, checking its dtype against the file size and the vocabulary."""
    meta = _read_sidecar(path)
    default = "uint16" if tokenizer.vocab_size <= 1 << 16 else "uint32"
    dtype = np.dtype(_DTYPES[meta.get("dtype", default)])
    how = "from its sidecar" if "dtype" in meta else "by default (no sidecar .json)"
    try:
        st = os.stat(path)
    except OSError as exc:
        raise ConfigError(f"data.path: cannot read {path!r}: {exc.strerror or exc}") from None
    check_regular(path, st)  # memory-mapped, so no size cap; but a device or FIFO is no token file
    size = st.st_size
    if size == 0:
        raise ConfigError(f"data.path: {path!r} is empty")
    if size % dtype.itemsize:
        raise ConfigError(
            f"data.path: {path!r} has {size} bytes, not a multiple of {dtype.itemsize} for dtype {dtype.name} "
            f"({how}); the file or its dtype is wrong"
        )
    if "vocab_size" in meta and int(meta["vocab_size"]) > tokenizer.vocab_size:
        raise ConfigError(
            f"data.tokenizer: tokenizer/vocab mismatch: {path!r} was made with a {meta['vocab_size']}-id vocabulary, "
            f"the tokenizer has {tokenizer.vocab_size}; pass the tokenizer.json the .bin was made with"
        )
    num_tokens = size // dtype.itemsize
    store = TokenStore([Path(path)], [num_tokens], dtype, np.array([num_tokens]), np.zeros(1))
    top = int(store.tokens().max())
    if top >= tokenizer.vocab_size:
        raise ConfigError(
            f"data.path: {path!r} read as {dtype.name} ({how}) holds token id {top}, outside the tokenizer's "
            f"{tokenizer.vocab_size} ids: a wrong dtype (write a sidecar .json with the dtype) or a tokenizer/vocab "
            "mismatch (set data.tokenizer)"
        )
    # Without a document index, bytes come from the sidecar or, for bytes, equal tokens; else they are estimated.
    nbytes = float(meta.get("num_bytes") or 0) or _estimate_bytes(store, tokenizer)
    store.seg_bytes = np.array([nbytes])
    return store


def _estimate_bytes(store: TokenStore, tokenizer: Tokenizer, sample: int = 1 << 20) -> float:
    if isinstance(tokenizer, ByteTokenizer):
        return float(store.num_tokens)
    head = store.tokens()[:sample]
    return len(tokenizer.decode(head.tolist()).encode("utf-8")) * store.num_tokens / max(1, len(head))


# --------------------------------------------------------------------------------------------------------- windows
class TokenWindows(Dataset):
    """Windows of `seq_len + 1` tokens of `tokens[start:stop]` at stride `seq_len`, as (inputs, targets).

    With `phase_seed` the windows shift by a seeded offset in [0, seq_len) per epoch (`set_epoch`), so every
    epoch cuts the text differently; the window count stays fixed so that sampler positions stay valid.
    `__getitems__` serves a whole batch with one fancy-indexed read of the memmap.
    """

    def __init__(self, store: TokenStore, start: int, stop: int, seq_len: int, phase_seed: int | None = None):
        self.store = store
        self.start, self.stop, self.seq_len = start, stop, seq_len
        self.phase_seed, self.phase = phase_seed, 0
        span = stop - start
        # Room for the largest phase (seq_len - 1) when shifting, so no window crosses `stop`.
        self.num_windows = max(0, (span - seq_len) // seq_len if phase_seed is not None else (span - 1) // seq_len)
        self._offsets = np.arange(seq_len + 1, dtype=np.int64)

    def set_epoch(self, epoch: int) -> None:
        if self.phase_seed is not None:
            self.phase = int(np.random.default_rng([self.phase_seed, epoch]).integers(self.seq_len))

    def __len__(self) -> int:
        return self.num_windows

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        starts = self.start + self.phase + np.asarray(indices, dtype=np.int64) * self.seq_len  # (B,)
        rows = torch.from_numpy(self.store.gather(starts[:, None] + self._offsets).astype(np.int64))  # (B, T + 1)
        return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()  # (B, T) each

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.__getitems__([index])
        return x[0], y[0]


def collate_windows(data: Any) -> Any:
    """`__getitems__` already returns a batch; a list of single windows (plain DataLoader use) is stacked."""
    if isinstance(data, tuple):
        return data
    return torch.utils.data.default_collate(data)


def window_document_ids(input_ids: torch.Tensor, separator: int) -> torch.Tensor:
    """Document ids (B, T) of windows (B, T) cut from a stream whose documents each end with ``separator``: 0 from
    the window's first token, one more after each separator (the separator belongs to the document it ends)."""
    ends = (input_ids == separator).to(torch.int64)  # (B, T)
    return ends.cumsum(dim=1) - ends  # (B, T)


def split_point(store: TokenStore, val_fraction: float) -> int:
    """First validation token: the last `val_fraction` of the tokens, at a document boundary if one is near."""
    n = store.num_tokens
    val = max(1, round(n * val_fraction))
    target = n - val
    inner = store.doc_ends[store.doc_ends < n]
    if len(inner):
        nearest = int(inner[np.argmin(np.abs(inner - target))])
        if abs(nearest - target) <= val // 4:  # keeps the split within 25% of the requested size
            return nearest
    return target


# ---------------------------------------------------------------------------------------------------- data module
@register_data_module("text")
class TextDataModule(SectionDataModule):
    """Token-cached text cut into `seq_len + 1` windows; batches are `(input_ids, targets)`, each (B, T) int64."""

    def __init__(self, data: Any, *, batch_size: int, seed: int = 0, run_dir: str = "") -> None:
        super().__init__(data, batch_size=batch_size, seed=seed, run_dir=run_dir)
        self.tokenizer: Tokenizer | None = None
        self.store: TokenStore | None = None
        self.cache_path: Path | None = None  # the token cache directory (None for a .bin)
        self.train_set: TokenWindows | None = None
        self.val_set: TokenWindows | None = None
        # Tokens per UTF-8 byte of each split: bits per byte = loss / ln 2 * tokens_per_byte.
        self.train_tokens_per_byte = 1.0
        self.val_tokens_per_byte = 1.0
        self._declared_bytes = False  # a .bin whose sidecar gives num_bytes
        # data.document_mask: the token that ends every document (set by `setup`; None = no document mask)
        self.document_separator: int | None = None

    # -- lifecycle ------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        self._load()  # the run's copy of the tokenizer is `save_tokenizer`'s, once the run directory exists

    def setup(self, stage: str = "fit") -> None:
        if self.store is None:
            self._load()
        assert self.store is not None
        d = self.data
        if getattr(d, "document_mask", False):
            self.document_separator = self._document_separator()
        split = split_point(self.store, d.val_fraction)
        random = d.sampling == "random"
        self.train_set = TokenWindows(self.store, 0, split, d.seq_len, phase_seed=self.seed if random else None)
        self.val_set = TokenWindows(self.store, split, self.store.num_tokens, d.seq_len)
        # Exact where the split cuts a document (its validation part counted from its tokens), unless declared.
        train_bytes, val_bytes = split_bytes(self.store, split, None if self._declared_bytes else self.tokenizer)
        self.train_tokens_per_byte = split / max(1e-9, train_bytes)
        self.val_tokens_per_byte = (self.store.num_tokens - split) / max(1e-9, val_bytes)
        global_batch = self.batch_size * self.world_size
        if len(self.train_set) < global_batch:
            raise ConfigError(
                f"data.seq_len: the training split ({split} tokens) gives {len(self.train_set)} windows of "
                f"{d.seq_len + 1} tokens, fewer than one global batch ({global_batch}); use more data or a smaller "
                "data.seq_len / training.batch_size"
            )
        if len(self.val_set) == 0:
            raise ConfigError(
                f"data.val_fraction: the validation split ({self.store.num_tokens - split} tokens) is shorter than "
                f"one window of {d.seq_len + 1} tokens; raise data.val_fraction or lower data.seq_len"
            )

    def train_dataloader(self) -> Iterable[Any]:
        assert self.train_set is not None, "call setup() first"
        self.train_set.set_epoch(self.position.epoch)
        shuffle = self.data.sampling == "random"
        return self.make_loader(
            self.train_set, self.batch_size, train=True, shuffle=shuffle, collate_fn=collate_windows
        )

    def val_dataloader(self) -> Iterable[Any] | None:
        assert self.val_set is not None, "call setup() first"
        return self.make_loader(self.val_set, self.batch_size, train=False, collate_fn=collate_windows)

    def save_tokenizer(self, directory: str | os.PathLike) -> None:
        """Copy the tokenizer next to a run's weights (no-op for bytes), so the run is self-contained."""
        if self.tokenizer is None:
            self._load()
        assert self.tokenizer is not None
        copy_tokenizer(self.tokenizer, directory)

    def _document_separator(self) -> int:
        """The separator that ends the documents, once the data is seen to hold it; else a `ConfigError`."""
        assert self.store is not None and self.tokenizer is not None
        eos, store = self.tokenizer.eos_id, self.store
        source = repr(self.data.path) if self.data.path else "the embedded corpus"
        found = False
        if eos is not None and self.cache_path is not None:  # an index: the last token of each document
            ends = store.doc_ends[store.doc_ends > 0][:1024]
            found = bool((store.gather(ends - 1) == eos).any())
        elif eos is not None:  # a .bin has no document index: look for the separator itself
            found = bool((store.tokens() == eos).any())
        if not found:
            why = ("the tokenizer has no end-of-sequence token" if eos is None
                   else f"the tokenizer's end-of-sequence token {eos} never occurs in it")
            raise ConfigError(f"data.document_mask: {source} marks no document boundaries ({why}); drop "
                              "--data-document-mask, or prepare the data with a tokenizer that has a separator")
        return eos

    # -- loading --------------------------------------------------------------------------------
    def _load(self) -> None:
        d = self.data
        if d.path.endswith(".bin") and not os.path.isdir(d.path):
            if d.tokenizer == "bpe":
                raise ConfigError(
                    f"data.tokenizer: 'bpe' trains on text but data.path {d.path!r} is pre-tokenized; "
                    "use 'byte' or the tokenizer.json the .bin was made with"
                )
            self.tokenizer = self._fixed_tokenizer()
            self.store = open_bin(d.path, self.tokenizer)
            # A sidecar's num_bytes is the user's statement about the whole file, believed over the tokens.
            self._declared_bytes = bool(_read_sidecar(d.path).get("num_bytes"))
            return
        if is_prepared(d.path):
            self._load_prepared(d.path)
            return
        if d.path and os.path.isdir(d.path) and has_shards(d.path):
            raise ConfigError(f"data.path: {d.path!r} holds token shards but no index-*.json: its preparation was "
                              "interrupted or is still running; run `python -m llm.data.prepare` for it again")
        files = resolve_files(d.path, max_file_bytes=d.max_file_bytes)
        key = self._cache_key(files)
        directory = cache_root(d.cache_dir) / "tokens" / key
        for stale in clean_stale_temporaries(directory.parent):
            log.info("data: removed %s, left behind by an interrupted preparation", stale)
        bpe = d.tokenizer == "bpe"
        store = None
        if directory.exists():
            try:
                store = _open_cache(directory, key, bpe)
                log.info("data: reusing token cache %s", directory)
            except CacheMismatch as exc:
                log.warning("data: the token cache %s is damaged (%s); rebuilding it", directory, exc)
                _discard(directory)
        if store is None:
            self._build_cache(files, directory)
            store = _open_cache(directory, key, bpe)
        self.cache_path, self.store = directory, store
        self.tokenizer = HFTokenizer.from_file(directory / TOKENIZER_FILE) if bpe else self._fixed_tokenizer()

    def _load_prepared(self, path: str) -> None:
        """A directory made by `python -m llm.data.prepare`: read in place, with the tokenizer it was made with."""
        try:
            store, index = open_store(path)
        except CacheMismatch as exc:
            raise ConfigError(f"data.path: the prepared directory {path!r} does not check out: {exc}") from None
        spec = self.data.tokenizer
        if index["tokenizer"] == ByteTokenizer.fingerprint:
            if spec != "byte":
                raise ConfigError(f"data.tokenizer: {spec!r}, but {path!r} was prepared with the byte tokenizer; "
                                  "use --data-tokenizer byte")
            tokenizer: Tokenizer = ByteTokenizer()
        else:
            tokenizer = HFTokenizer.from_file(Path(path) / TOKENIZER_FILE, field="data.path")
            if spec == "byte" or (spec != "bpe" and HFTokenizer.from_file(spec).fingerprint != tokenizer.fingerprint):
                raise ConfigError(
                    f"data.tokenizer: {spec!r} is not the tokenizer {path!r} was prepared with; use "
                    f"--data-tokenizer {os.path.join(path, TOKENIZER_FILE)}"
                )
            if tokenizer.fingerprint != index["tokenizer"]:
                raise ConfigError(f"data.path: {os.path.join(path, TOKENIZER_FILE)!r} is not the tokenizer its "
                                  "index names (replaced after preparation?)")
        log.info("data: reading the prepared directory %s (%d shards, %d tokens)", path, len(store.paths),
                 store.num_tokens)
        self.store, self.tokenizer, self.cache_path = store, tokenizer, Path(path)

    def _fixed_tokenizer(self) -> Tokenizer:
        spec = self.data.tokenizer
        return ByteTokenizer() if spec == "byte" else HFTokenizer.from_file(spec)

    def _cache_key(self, files: list[SourceFile]) -> str:
        d = self.data
        if d.tokenizer == "bpe":
            tok: Any = ["bpe", d.vocab_size]
        else:
            tok = self._fixed_tokenizer().fingerprint
        spec = {
            "version": CACHE_VERSION,
            "files": [f.key() for f in files],
            "max_bytes": d.max_bytes if not d.path else 0,
            "tokenizer": tok,
            "text_field": d.text_field,
        }
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]

    def _build_cache(self, files: list[SourceFile], directory: Path) -> None:
        d = self.data
        embedded = not d.path
        options = PrepareOptions(
            tokenizer=d.tokenizer, vocab_size=d.vocab_size, workers=d.prepare_workers,
            bpe_sample_bytes=d.bpe_sample_bytes,
            max_bytes=d.max_bytes if embedded else 0, source=d.path or "the Python standard library",
            key=directory.name,
            read=ReadOptions(text_field=d.text_field, strict=not embedded, max_file_bytes=d.max_file_bytes),
        )
        directory.parent.mkdir(parents=True, exist_ok=True)
        tokenizer = None if d.tokenizer == "bpe" else self._fixed_tokenizer()
        _write_cache(files, directory, options, tokenizer)


def bits_per_byte(loss: torch.Tensor | float, tokens_per_byte: float) -> torch.Tensor | float:
    """Bits per UTF-8 byte from a mean per-token cross-entropy ``loss`` in nats: ``loss / ln 2 * tokens_per_byte``.

    Per-token loss depends on the tokenizer (a BPE token carries several bytes), per-byte loss does not, so this
    is the number that compares runs with different tokenizers. ``tokens_per_byte`` is the split's token count over
    its UTF-8 byte count. Works on tensors (no host sync) and floats alike.
    """
    return loss / math.log(2) * tokens_per_byte
