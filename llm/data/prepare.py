"""Prepare a corpus once into a sharded token directory, on one machine or on several, and train on it.

    python -m llm.data.prepare SOURCE OUT [--tokenizer byte|bpe|PATH] [--num-shards N --shard-index I]
                                          [--workers W] [--shard-min-tokens T] [--text-field text]
                                          [--encoding-errors strict|replace|skip]
    python -m llm.data.prepare --verify OUT

SOURCE is what `data.path` accepts (a file, directory or glob of text, JSONL, Parquet or Arrow files). OUT receives
token shards and an index (see `shards.py`); `--data-path OUT` trains on it. `--num-shards N --shard-index I`
prepares slice I of N: the corpus, files in sorted order taken as one byte stream, is cut into N equal byte
ranges, so slices split by file when there are many files and by byte range (at line starts; Parquet/Arrow: by
row group / record batch) inside a large one. Each machine writes its own slice's files and index into OUT (a
shared file system, or copied together afterwards); a run uses OUT once every slice's index is there, with the
slices' tokens in slice order: exactly the tokens one machine would have written.

Tokenizers: `byte`; `bpe`, trained on a bounded sample (`--bpe-sample-bytes`, 100 MB by default, taken from every
file in proportion to its size) rather than the whole corpus; or a tokenizer.json by path. Slices must share one
tokenizer, so with N > 1 `bpe` is refused: train it once with `--tokenizer-only` (writes OUT/tokenizer.json and
stops), then prepare every slice with `--tokenizer OUT/tokenizer.json`.

Token ids do not depend on `--chunk-bytes` or `--num-shards`: pieces of a document are re-cut, and slices cut a
text file, only where the tokenizer's ids cannot change, plus forced cuts that depend on the text alone
(`cuts.py`); a BPE trained here sees its sample cut the same way.

Memory stays bounded whatever the corpus size (streamed readers, a bounded window of batches in flight, shards
written as they fill); tokenizing runs in `--workers` processes (default: every core) when the tokenizer is the
bottleneck (`encode.py`). A preparation re-run for a slice already complete is skipped (after the cheap check of
its files: a damaged one is refused with one line); one killed midway leaves only temporary files, removed by the
next run.

Safe to run twice: a slice is prepared under a lock (`prepare_lock.py`), so a second preparation of it into OUT
exits 2 naming the holder; a full disk or a read-only OUT is one line (`OUT: cannot write ...`) and leaves no
file a run would take as complete. A corrupted directory is caught before it trains: every open checks each index
field's type and range, each shard's size and segment table (`shards.py`); `--verify` also re-reads every file
against the CRC-32 recorded at preparation, which catches flipped bytes too.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from llm import fs
from llm.data.cuts import CutRule, align_cut, cut_rule, recut
from llm.data.encode import Progress, batches_of, default_workers, encode_stream
from llm.data.prepare_lock import PrepareLock
from llm.data.readers import Part, ReadOptions, _owned, iter_pieces, read_part, read_text, reader_for
from llm.data.shards import (
    CacheMismatch,
    ShardWriter,
    check_slice,
    index_files,
    index_name,
    open_store,
    read_index,
    remove_leftovers,
    verify_checksums,
    write_index,
)
from llm.data.sources import SourceFile, resolve_files
from llm.data.tokenizers import TOKENIZER_FILE, ByteTokenizer, HFTokenizer, Tokenizer, vocab_dtype
from llm.errors import ConfigError, UserError, run_tool

log = logging.getLogger("llm")

DEFAULT_SHARD_TOKENS = 1 << 28  # 256 Mi tokens: 256 MB-1 GB per shard file, a few files per 1e9 tokens
DEFAULT_BPE_SAMPLE_BYTES = 100_000_000
# Below this, worker processes (seconds to spawn, each importing the caller's main module) cost more than they
# save: in this process a Hugging Face tokenizer's batch encode already runs on every core.
MIN_PARALLEL_BYTES = 32 << 20
# What a byte that is not UTF-8 does. strict by default: replacing or dropping bytes changes the corpus, which a
# user should choose knowingly; the error names the file, the offset and this flag.
ENCODING_ERRORS = ("strict", "replace", "skip")


@dataclass
class PrepareOptions:
    """What to prepare and how; the CLI flags and the lm task's `data.*` fields map onto these."""

    tokenizer: str = "byte"  # byte | bpe | path/to/tokenizer.json
    vocab_size: int = 4096  # BPE vocabulary when training one
    bpe_sample_bytes: int = DEFAULT_BPE_SAMPLE_BYTES  # bytes of text BPE is trained on (0 = all)
    num_slices: int = 1  # machines preparing the corpus together (--num-shards)
    slice_index: int = 0  # this machine's slice (--shard-index)
    workers: int = 0  # tokenizer processes (0 = one per core)
    # A shard file closes at the first piece boundary at or past this many tokens: every shard but a slice's last
    # holds at least this many, and at most one piece (--chunk-bytes of text) more. Not a cap: cutting a piece's
    # tokens would need to split its byte count, which the exact bits-per-byte accounting keeps whole.
    shard_min_tokens: int = DEFAULT_SHARD_TOKENS
    max_bytes: int = 0  # stop after this many bytes of text (0 = all)
    read: ReadOptions = field(default_factory=ReadOptions)
    source: str = ""  # how messages and the index name the corpus
    key: str = ""  # recorded in the index (the lm task's cache key)
    min_parallel_bytes: int = MIN_PARALLEL_BYTES


def plan_parts(files: list[SourceFile], num_slices: int, slice_index: int,
               rule: CutRule = CutRule.ANYWHERE) -> list[Part]:
    """The parts of `files` that slice `slice_index` of `num_slices` reads: the files as one byte stream cut into
    equal byte ranges (each file's share; a reader rounds the cuts to its units). A cut inside a text file (one
    document) moves to where `rule` lets the tokenizer cut it (`cuts.align_cut`), so the slices' tokens together
    are one machine's tokens."""
    total = sum(f.size for f in files)
    lo = _aligned(files, total * slice_index // num_slices, rule)
    hi = _aligned(files, total * (slice_index + 1) // num_slices, rule)
    parts, offset = [], 0
    for f in files:
        start, stop = max(offset, lo), min(offset + f.size, hi)
        if start < stop:
            parts.append(Part(f, start - offset, None if stop >= offset + f.size else stop - offset))
        offset += f.size
    return parts


def _aligned(files: list[SourceFile], pos: int, rule: CutRule) -> int:
    """`pos` in the files' byte stream, moved to an allowed cut when it falls inside a text file."""
    offset = 0
    for f in files:
        if offset < pos < offset + f.size:
            return offset + align_cut(f, pos - offset, rule) if reader_for(f.path) is read_text else pos
        offset += f.size
    return pos


def text_bytes(part: Part, read: ReadOptions) -> int:
    """About how many bytes of text `part` decodes to, which is what progress counts: its byte range for text,
    JSONL and Arrow files; for Parquet (compressed on disk) the uncompressed size of the text column's row groups
    that the part owns, less the 4-byte length of each value. The file size where the metadata cannot be read
    (the reader reports why)."""
    size = part.end - part.start
    if not part.file.path.lower().endswith(".parquet"):
        return size
    try:
        import pyarrow.parquet as pq

        meta = pq.ParquetFile(part.file.path).metadata
        column = [meta.schema.column(j).path for j in range(meta.num_columns)].index(read.text_field)
        total = 0
        for i in _owned(meta.num_row_groups, part):
            chunk = meta.row_group(i).column(column)
            total += max(0, chunk.total_uncompressed_size - 4 * chunk.num_values)
        return total
    except Exception:  # noqa: BLE001 - pyarrow missing, not Parquet, no such column: the reader says which
        return size


def source_key(files: list[SourceFile], extra: Any = None) -> str:
    """Identifies a corpus (its files' paths, sizes, mtimes) so slices of different corpora never combine."""
    spec = {"files": [f.key() for f in files], "extra": extra}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]


def sample_texts(parts: list[Part], options: PrepareOptions) -> Iterator[str]:
    """At most `bpe_sample_bytes` of text for BPE training: every part contributes its size's share (its head)."""
    budget = options.bpe_sample_bytes
    if options.max_bytes:
        budget = min(budget, options.max_bytes) if budget else options.max_bytes
    total = sum(p.end - p.start for p in parts)
    # Pieces cut only where our BPE's pre-tokenizer allows (`cuts.py`): its word counts, and so its merges, do not
    # depend on --chunk-bytes.
    if not budget or total <= budget:
        for piece in recut(iter_pieces(parts, options.read, options.max_bytes), CutRule.SAFE_POINTS):
            yield piece.data.decode("utf-8")
        return
    for part in parts:
        share, taken = max(1, budget * (part.end - part.start) // total), 0
        with contextlib.closing(recut(read_part(part, options.read), CutRule.SAFE_POINTS)) as pieces:
            for piece in pieces:
                yield piece.data[: share - taken].decode("utf-8", errors="ignore")
                taken += len(piece.data)
                if taken >= share:
                    break


def build_tokenizer(parts: list[Part], options: PrepareOptions) -> Tokenizer:
    spec = options.tokenizer
    if spec == "byte":
        return ByteTokenizer()
    if spec != "bpe":
        return HFTokenizer.from_file(spec)
    if options.num_slices > 1:
        raise ConfigError(
            f"--tokenizer: 'bpe' with --num-shards {options.num_slices} would train a different tokenizer on each "
            "machine; train it once (--tokenizer bpe --tokenizer-only), then pass --tokenizer OUT/tokenizer.json"
        )
    began = time.perf_counter()
    tokenizer = HFTokenizer.train_bpe(sample_texts(parts, options), options.vocab_size)
    log.info("data: trained a %d-id BPE tokenizer on a sample of %s in %.1f s", tokenizer.vocab_size,
             options.source, time.perf_counter() - began)
    return tokenizer


def _check_out(out: Path, options: PrepareOptions, key: str, fingerprint: str) -> dict[str, Any] | None:
    """This slice's index when it is already complete for this corpus and tokenizer and its files pass the cheap
    check; an error when OUT holds another preparation, or this slice's files do not check out."""
    for path in index_files(out):
        try:
            index = read_index(path)
        except CacheMismatch:
            continue  # another slice's problem: reported when the directory is used
        same = (index.get("source_key") == key and index.get("tokenizer") == fingerprint
                and index.get("num_slices") == options.num_slices)
        if not same:
            raise ConfigError(
                f"OUT: {str(out)!r} already holds {path.name} of another preparation (other files, tokenizer or "
                "number of slices); use an empty directory or delete that one"
            )
        if path.name == index_name(options.slice_index, options.num_slices):
            try:
                check_slice(out, index)
            except CacheMismatch as exc:
                raise ConfigError(f"OUT: {str(out)!r} holds slice {options.slice_index} complete, but its files do "
                                  f"not check out: {exc}; delete {path.name} and prepare it again") from None
            return index
    return None


@contextlib.contextmanager
def _writing(out: Path) -> Iterator[None]:
    """A failed write into OUT (a full disk, a read-only or unwritable directory) as one line; what was being
    written is removed by the writer, and nothing unfinished carries a name a run would read."""
    try:
        yield
    except UserError:
        raise
    except Exception as exc:  # an OSError, or the tokenizers library's error with "(os error N)" in its text
        if fs.write_errno(exc) is None:
            raise
        raise ConfigError(f"OUT: {fs.write_failure(exc, out)}") from None


def prepare(files: list[SourceFile], out: str | os.PathLike, options: PrepareOptions,
            tokenizer: Tokenizer | None = None) -> dict[str, Any]:
    """Tokenize this slice of `files` into shards in `out` and write its index last; returns the index.

    The slice's lock (`prepare_lock.py`) is held throughout: a second preparation of it into `out` is refused."""
    out = Path(out)
    _check_options(options)
    if tokenizer is None:
        tokenizer = build_tokenizer(plan_parts(files, options.num_slices, options.slice_index), options)
    rule = cut_rule(tokenizer)
    parts = plan_parts(files, options.num_slices, options.slice_index, rule)
    with _writing(out):
        out.mkdir(parents=True, exist_ok=True)
    with PrepareLock(out, options.slice_index) as lock:
        if lock.replaced:
            log.warning("data: %s", lock.replaced)
        return _prepare_locked(files, parts, out, options, tokenizer, rule)


def _prepare_locked(files: list[SourceFile], parts: list[Part], out: Path, options: PrepareOptions,
                    tokenizer: Tokenizer, rule: CutRule) -> dict[str, Any]:
    key = source_key(files, [options.max_bytes, options.read.text_field])
    done = _check_out(out, options, key, tokenizer.fingerprint)
    if done is not None:
        log.info("data: slice %d of %d is already prepared in %s", options.slice_index, options.num_slices, out)
        return done
    with _writing(out):
        for stale in remove_leftovers(out, options.slice_index):
            log.info("data: removed %s, left behind by an interrupted preparation", stale)
    dtype, eos = vocab_dtype(tokenizer.vocab_size), tokenizer.eos_id
    total = sum(p.end - p.start for p in parts)
    if options.max_bytes:
        total = min(total, options.max_bytes)
    progress_total = sum(text_bytes(p, options.read) for p in parts)
    if options.max_bytes:
        progress_total = min(progress_total, options.max_bytes)
    parallel = not isinstance(tokenizer, ByteTokenizer) and total >= options.min_parallel_bytes
    workers = default_workers(options.workers) if parallel else 0
    log.info("data: tokenizing %d files (%.1f MB) of %s into %s with %s", len(parts), total / 1e6, options.source,
             out, f"{workers} worker processes" if workers > 1 else "this process")
    writer = ShardWriter(out, options.slice_index, dtype, options.shard_min_tokens)
    progress = Progress(progress_total, "data: tokenizing")
    began = time.perf_counter()
    try:
        # Re-cut where the tokenizer's ids cannot change (`cuts.py`): the ids do not depend on --chunk-bytes.
        pieces = recut(iter_pieces(parts, options.read, options.max_bytes), rule)
        for batch, ids, lengths in encode_stream(batches_of(pieces), tokenizer, dtype, workers):
            ends = np.fromiter((p.end for p in batch), bool, len(batch))
            nbytes = [len(p.data) for p in batch]
            progress.update(sum(nbytes), len(ids))
            if eos is not None and ends.any():
                # The separator stands for the document boundary: one byte, so bytes == tokens for bytes.
                ids = np.insert(ids, np.cumsum(lengths)[ends], np.asarray(eos, dtype))
                lengths = lengths + ends
                nbytes = [n + int(e) for n, e in zip(nbytes, ends.tolist())]
            with _writing(out):
                writer.add(ids, lengths, nbytes, ends.tolist())
        with _writing(out):
            shards = writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        progress.close()
    if not shards and options.num_slices == 1:
        raise ConfigError(f"data.path: {options.source!r} holds no text (every document is empty)")
    meta = {"dtype": dtype.name, "tokenizer": tokenizer.fingerprint, "vocab_size": tokenizer.vocab_size,
            "eos_id": eos, "source": options.source, "source_key": key, "key": options.key, "files": len(parts)}
    with _writing(out):
        if isinstance(tokenizer, HFTokenizer):
            _save_tokenizer(tokenizer, out)
        write_index(out, options.slice_index, options.num_slices, meta, shards)
    index = read_index(out / index_name(options.slice_index, options.num_slices))
    seconds = time.perf_counter() - began
    log.info("data: %d documents, %d tokens (%.2f tokens/byte) in %d shards, %.1f s (%.1f MB/s)",
             index["num_docs"], index["num_tokens"], index["num_tokens"] / max(1, index["num_bytes"]), len(shards),
             seconds, index["num_bytes"] / 1e6 / max(1e-9, seconds))
    return index


def _save_tokenizer(tokenizer: HFTokenizer, out: Path) -> None:
    """Every slice writes the same tokenizer.json; written aside and renamed, so a reader never sees half of it."""
    target = out / TOKENIZER_FILE
    if target.is_file() and HFTokenizer.from_file(target).fingerprint == tokenizer.fingerprint:
        return
    tmp = out / f".{TOKENIZER_FILE}.tmp-{os.getpid()}"  # `save` takes a directory: the temp file is inside it
    tmp.mkdir(exist_ok=True)
    try:
        with fs.atomic_path(target, tmp=tmp / TOKENIZER_FILE, durable=False):  # not durable, like the shards
            tokenizer.save(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _check_options(options: PrepareOptions) -> None:
    if options.num_slices < 1:
        raise ConfigError(f"--num-shards: invalid value {options.num_slices}; must be >= 1")
    if not 0 <= options.slice_index < options.num_slices:
        raise ConfigError(f"--shard-index: invalid value {options.slice_index}; must be in [0, {options.num_slices})")
    if options.shard_min_tokens < 1:
        raise ConfigError(f"--shard-min-tokens: invalid value {options.shard_min_tokens}; must be >= 1")
    if options.workers < 0:
        raise ConfigError(f"--workers: invalid value {options.workers}; must be >= 0 (0 = one per core)")
    if options.bpe_sample_bytes < 0:
        raise ConfigError(f"--bpe-sample-bytes: invalid value {options.bpe_sample_bytes}; must be >= 0 (0 = all)")
    if options.vocab_size < 257:
        raise ConfigError(f"--vocab-size: invalid value {options.vocab_size}; must be >= 257 (256 bytes + 1)")
    if options.read.chunk_bytes < 16:
        raise ConfigError(f"--chunk-bytes: invalid value {options.read.chunk_bytes}; must be >= 16")


# ------------------------------------------------------------------------------------------------------------ CLI
class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UserError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m llm.data.prepare", description=__doc__.splitlines()[0],
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("source", metavar="SOURCE", help="file, directory or glob of text/JSONL/Parquet/Arrow files")
    p.add_argument("out", metavar="OUT", nargs="?",
                   help="directory that receives the shards and index (train: --data-path OUT)")
    p.add_argument("--tokenizer", default="byte", help="byte | bpe (trained on a sample) | path/to/tokenizer.json")
    p.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size")
    p.add_argument("--bpe-sample-bytes", type=int, default=DEFAULT_BPE_SAMPLE_BYTES,
                   help="bytes of text BPE is trained on, spread over the files (0 = all)")
    p.add_argument("--tokenizer-only", action="store_true",
                   help="train the BPE tokenizer on a sample of all of SOURCE, write OUT/tokenizer.json, stop")
    p.add_argument("--num-shards", type=int, default=1, help="number of slices (machines) preparing SOURCE")
    p.add_argument("--shard-index", type=int, default=0, help="the slice this machine prepares, 0-based")
    p.add_argument("--workers", type=int, default=0, help="tokenizer processes (0 = one per core)")
    p.add_argument("--shard-min-tokens", type=int, default=DEFAULT_SHARD_TOKENS,
                   help="a shard file closes at the first piece boundary past this many tokens (it may hold up to "
                   "one piece, --chunk-bytes of text, more)")
    p.add_argument("--shard-tokens", help=argparse.SUPPRESS)  # the old name: a pointer to the new one
    p.add_argument("--encoding-errors", choices=ENCODING_ERRORS, default="strict",
                   help="a byte that is not UTF-8: strict = stop with one line naming the file and offset; replace "
                   "= U+FFFD; skip = drop it")
    p.add_argument("--text-field", default="text", help="JSONL field / Parquet or Arrow column holding the text")
    p.add_argument("--chunk-bytes", type=int, default=ReadOptions.chunk_bytes, help="bytes read at a time")
    p.add_argument("--verify", action="store_true",
                   help="only check OUT (`--verify OUT` or `SOURCE OUT --verify`): every index field, shard size "
                   "and CRC-32 checksum recorded at preparation")
    return p


def _verify(out: str) -> str:
    """The full check of a prepared directory: the cheap one every run does on opening (index fields, file sizes,
    segment tables), then every file re-read against the CRC-32 its index recorded."""
    if not os.path.isdir(out):
        raise ConfigError(f"OUT: {out!r} is not a directory")
    try:
        store, _ = open_store(out)
        bad = verify_checksums(out)
    except CacheMismatch as exc:
        raise ConfigError(f"OUT: {out!r} does not check out: {exc}") from None
    if bad:
        raise ConfigError(f"OUT: {out!r} has files whose checksum differs from the index (corrupted): "
                          f"{', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}")
    return f"{out}: {len(store.paths)} shards, {store.num_tokens:,} tokens, checksums match"


def run(args: argparse.Namespace) -> str:
    if args.shard_tokens is not None:
        raise ConfigError("--shard-tokens: renamed --shard-min-tokens (a shard closes at the first piece boundary "
                          "past that many tokens; it never was a cap)")
    if args.verify:
        return _verify(args.source if args.out is None else args.out)
    if args.out is None:
        raise ConfigError("OUT: missing; usage: python -m llm.data.prepare SOURCE OUT [options]")
    options = PrepareOptions(
        tokenizer=args.tokenizer, vocab_size=args.vocab_size, bpe_sample_bytes=args.bpe_sample_bytes,
        num_slices=args.num_shards, slice_index=args.shard_index, workers=args.workers,
        shard_min_tokens=args.shard_min_tokens, source=args.source,
        read=ReadOptions(chunk_bytes=args.chunk_bytes, text_field=args.text_field, field="SOURCE",
                         strict=args.encoding_errors == "strict", skip_bad_bytes=args.encoding_errors == "skip"),
    )
    _check_options(options)
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ConfigError(f"OUT: {args.out!r} exists and is not a directory")
    files = resolve_files(args.source, field="SOURCE")
    if args.tokenizer_only:
        if args.tokenizer != "bpe":
            raise ConfigError(f"--tokenizer-only: trains a BPE tokenizer, so it needs --tokenizer bpe, not "
                              f"{args.tokenizer!r}")
        tokenizer = build_tokenizer(plan_parts(files, 1, 0), dataclasses.replace(options, num_slices=1, slice_index=0))
        with _writing(Path(args.out)):
            os.makedirs(args.out, exist_ok=True)
            _save_tokenizer(tokenizer, Path(args.out))
        return f"{os.path.join(args.out, TOKENIZER_FILE)}: {tokenizer.vocab_size} ids"
    index = prepare(files, args.out, options)
    return (f"{args.out}: slice {index['slice']} of {index['num_slices']}: {index['num_docs']:,} documents, "
            f"{index['num_tokens']:,} tokens in {len(index['shards'])} shards")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    return run_tool(lambda: print(run(build_parser().parse_args(argv))))


if __name__ == "__main__":
    sys.exit(main())
