"""Tokenizing a stream of pieces, in worker processes when the tokenizer is the bottleneck, in order, in bounded
memory; and the progress display of a preparation.

`encode_stream` groups pieces into batches of about `batch_bytes` and yields `(batch, ids, lengths)` in input
order. With `workers > 1` a `multiprocessing` pool (spawned: no forked copy of the parent's threads, torch or the
tokenizer's thread pool) encodes the batches; at most `2 * workers` batches are in flight, so memory stays bounded
however long the stream is (`Pool.imap` would read the whole input ahead). Each worker runs the tokenizer on one
thread (`TOKENIZERS_PARALLELISM=false`): the processes are the parallelism. With `workers <= 1` batches are encoded
in this process, where a Hugging Face tokenizer still uses its own threads.

The byte tokenizer never uses workers: its "encoding" is a copy of the bytes, cheaper than sending them to
another process.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys
import time
from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from llm.data.readers import Piece
from llm.data.tokenizers import ByteTokenizer, Tokenizer, from_worker_spec

log = logging.getLogger("llm")

BATCH_BYTES = 256 << 10  # bytes of text per task sent to a worker: hides the round trip, small enough to balance
_worker_tokenizer: Tokenizer | None = None


def _init_worker(spec: tuple[str, str]) -> None:
    global _worker_tokenizer
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per process: the pool is the parallelism
    _worker_tokenizer = from_worker_spec(spec)


def _encode_in_worker(pieces: list[bytes], dtype: str) -> tuple[np.ndarray, np.ndarray]:
    assert _worker_tokenizer is not None
    return _worker_tokenizer.encode_pieces(pieces, np.dtype(dtype))


def batches_of(pieces: Iterable[Piece], batch_bytes: int = BATCH_BYTES,
               max_pieces: int = 4096) -> Iterator[list[Piece]]:
    """Consecutive pieces grouped into lists of about `batch_bytes` bytes."""
    batch: list[Piece] = []
    size = 0
    for piece in pieces:
        batch.append(piece)
        size += len(piece.data)
        if size >= batch_bytes or len(batch) >= max_pieces:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def encode_stream(
    batches: Iterable[list[Piece]], tokenizer: Tokenizer, dtype: np.dtype, workers: int = 0,
) -> Iterator[tuple[list[Piece], np.ndarray, np.ndarray]]:
    """`(batch, ids, lengths)` for each batch, in order; ids as `dtype`, `lengths` per piece."""
    if workers <= 1 or isinstance(tokenizer, ByteTokenizer):
        for batch in batches:
            ids, lengths = tokenizer.encode_pieces([p.data for p in batch], dtype)
            yield batch, ids, lengths
        return
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, initializer=_init_worker, initargs=(tokenizer.worker_spec(),)) as pool:
        pending: deque[tuple[list[Piece], Any]] = deque()
        for batch in batches:
            pending.append((batch, pool.apply_async(_encode_in_worker, ([p.data for p in batch], dtype.name))))
            if len(pending) >= 2 * workers:
                done, result = pending.popleft()
                yield (done, *result.get())
        while pending:
            done, result = pending.popleft()
            yield (done, *result.get())


def default_workers(requested: int) -> int:
    """`requested` worker processes, 0 meaning one per core this process may use."""
    if requested > 0:
        return requested
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class Progress:
    """Bytes and tokens done: a tqdm bar on a terminal, else a log line every `every_s` seconds, or sooner once
    another `every_fraction` of the total is done (at most one a second), with bytes/s, tokens/s and the ETA; so a
    preparation in a batch job's log is never silent for long, and a short one still shows its progress."""

    def __init__(self, total_bytes: int, desc: str, every_s: float = 5.0, bar: bool | None = None,
                 every_fraction: float = 0.1) -> None:
        self.total, self.desc, self.every_s = max(1, total_bytes), desc, every_s
        self.every_fraction = every_fraction
        self.bytes = self.tokens = 0
        self.began = self.last = time.perf_counter()
        self._last_bytes = 0
        self._bar = None
        if sys.stderr.isatty() if bar is None else bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total_bytes, desc=desc, unit="B", unit_scale=True, dynamic_ncols=True)

    def update(self, nbytes: int, ntokens: int) -> None:
        self.bytes += nbytes
        self.tokens += ntokens
        # The total is an estimate where the source is compressed or encoded (Parquet, JSONL): never past 100%.
        self.total = max(self.total, self.bytes)
        if self._bar is not None:
            self._bar.update(nbytes)
            self._bar.set_postfix_str(f"{self.tokens:,} tokens", refresh=False)
            return
        now = time.perf_counter()
        step = self.bytes - self._last_bytes >= self.every_fraction * self.total and now - self.last >= 1.0
        if now - self.last >= self.every_s or step:
            self.last, self._last_bytes = now, self.bytes
            log.info("%s", self.line(now))

    def line(self, now: float | None = None) -> str:
        elapsed = max(1e-9, (now or time.perf_counter()) - self.began)
        rate = self.bytes / elapsed
        eta = (self.total - self.bytes) / rate if rate > 0 else float("inf")
        done = f"{self.bytes / 1e6:,.1f}/{self.total / 1e6:,.1f} MB ({100 * self.bytes / self.total:.0f}%)"
        speed = f"{rate / 1e6:.1f} MB/s, {self.tokens / elapsed / 1e6:.2f} M tokens/s"
        return f"{self.desc}: {done}, {speed}, ETA {eta:.0f} s"

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
