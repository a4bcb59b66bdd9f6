"""Streaming readers: the documents of a source file as a stream of bounded pieces of UTF-8 bytes.

No reader holds more than about `chunk_bytes` of a file at a time (plus one JSONL line or one Arrow record batch,
whatever size the file gives them), so preparing a corpus takes the same memory for 1 MB and for 1 TB.
A document longer than a chunk is cut into several pieces; a `Piece` says whether its document ends with it.
Cuts fall after the last newline of the chunk, else after its last space, else at its last character boundary:
the byte tokenizer's tokens of the pieces are the document's bytes exactly, and BPE (which never merges across
whitespace with our pre-tokenizer) sees almost the same words as in the whole document.

A `Part` is a byte range of a file, so several machines can each prepare a slice of one huge file: a unit (a
line of text or JSONL, a Parquet row group, an Arrow record batch) belongs to the part its first byte (for row
groups and batches: its share of the file) falls in, so the parts of a file cover every unit exactly once.
A text file is one document, so a part that stops before the file's end leaves its document open.

Readers are chosen by file suffix through a registry (`register_reader`); text is the fallback. Parquet and Arrow
need pyarrow, imported only when such a file is read.
"""

from __future__ import annotations

import codecs
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

from llm.data.sources import SourceFile, open_regular
from llm.errors import ConfigError

CHUNK_BYTES = 8 << 20  # bytes read at a time; a piece is at most this long (a JSONL record may exceed it)
_SCAN_BYTES = 1 << 20  # read size while looking for the next line start


@dataclass(frozen=True)
class Piece:
    """A run of UTF-8 bytes of one document; `end` when the document ends with it."""

    data: bytes
    end: bool


@dataclass(frozen=True)
class ReadOptions:
    """How to read: chunk size, the JSONL/Parquet text field, strict UTF-8 (else bad bytes are replaced with U+FFFD,
    or dropped with `skip_bad_bytes`: `--encoding-errors replace|skip`)."""

    chunk_bytes: int = CHUNK_BYTES
    text_field: str = "text"
    strict: bool = True
    skip_bad_bytes: bool = False  # not strict: drop bad bytes instead of replacing them
    field: str = "data.path"  # the config field errors name
    max_file_bytes: int = 0


@dataclass(frozen=True)
class Part:
    """The units of `file` that start in the byte range [start, stop) (stop None = the end of the file)."""

    file: SourceFile
    start: int = 0
    stop: int | None = None

    @property
    def end(self) -> int:
        return self.file.size if self.stop is None else min(self.stop, self.file.size)


Reader = Callable[[Part, ReadOptions], Iterator[Piece]]
READERS: dict[str, Reader] = {}


def register_reader(suffix: str, reader: Reader) -> Reader:
    """Read files ending in `suffix` (lower case, with the dot) with `reader`; a suffix has one reader."""
    if suffix in READERS:
        raise ValueError(f"a reader for {suffix!r} is already registered")
    READERS[suffix] = reader
    return reader


def reader_for(path: str) -> Reader:
    suffix = os.path.splitext(path)[1].lower()
    return READERS.get(suffix, read_text)


def read_part(part: Part, options: ReadOptions = ReadOptions()) -> Iterator[Piece]:
    """The pieces of the documents of `part`, in file order; empty documents are skipped."""
    return reader_for(part.file.path)(part, options)


# ------------------------------------------------------------------------------------------------------ helpers
def cut_point(buf: bytes) -> int:
    """Where to cut a full buffer: after its last newline, else its last space (either in its second half, so
    pieces stay long), else before its last character's first byte (never inside a character)."""
    half = len(buf) // 2
    for sep in (b"\n", b" "):
        at = buf.rfind(sep, half)
        if at >= 0:
            return at + 1
    at = len(buf) - 1
    while at > 0 and (buf[at] & 0xC0) == 0x80:  # a continuation byte: inside a character
        at -= 1
    return at or len(buf)


def split_document(data: bytes, limit: int) -> Iterator[Piece]:
    """One document's bytes as pieces of at most `limit` bytes, the last one ending the document."""
    start = 0
    while len(data) - start > limit:
        at = start + cut_point(data[start : start + limit])
        yield Piece(data[start:at], False)
        start = at
    yield Piece(data[start:] if start else data, True)


def _checked(data: bytes, part: Part, offset: int, options: ReadOptions) -> bytes:
    """`data` if it is UTF-8; else a `ConfigError` naming the file and offset, or (not strict) bytes repaired."""
    if data.isascii():  # most text: checked at memory speed, without building a str
        return data
    try:
        data.decode("utf-8")
        return data
    except UnicodeDecodeError as exc:
        if not options.strict:
            return data.decode("utf-8", errors="ignore" if options.skip_bad_bytes else "replace").encode("utf-8")
        raise ConfigError(
            f"{options.field}: {part.file.path!r} is not UTF-8 text (bad byte at offset {offset + exc.start}); "
            "convert it, pre-tokenize it into a .bin, or prepare it with --encoding-errors replace|skip"
        ) from None


def _read(f: BinaryIO, size: int, part: Part, field: str) -> bytes:
    try:
        return f.read(size)
    except OSError as exc:
        raise ConfigError(f"{field}: cannot read {part.file.path!r}: {exc.strerror or exc}") from None


def _line_start_at_or_after(f: BinaryIO, pos: int, part: Part, field: str) -> int:
    """The first line start >= pos (or the file's end): the byte before `pos` and the scan to the next newline."""
    if pos <= 0:
        return 0
    f.seek(pos - 1)
    at = pos - 1
    while True:
        block = _read(f, _SCAN_BYTES, part, field)
        if not block:
            return at
        newline = block.find(b"\n")
        if newline >= 0:
            return at + newline + 1
        at += len(block)


def _line_range(f: BinaryIO, part: Part, field: str) -> tuple[int, int]:
    begin = _line_start_at_or_after(f, part.start, part, field)
    end = part.file.size if part.end >= part.file.size else _line_start_at_or_after(f, part.end, part, field)
    return begin, max(begin, end)


def _check_size(part: Part, options: ReadOptions, f: BinaryIO) -> None:
    """A file that grew past the cap (or beyond its listed size by more than the cap) since it was listed."""
    if options.max_file_bytes and os.fstat(f.fileno()).st_size > options.max_file_bytes:
        raise ConfigError(
            f"{options.field}: {part.file.path!r} grew past data.max_file_bytes={options.max_file_bytes} while it "
            "was read; split it, or raise data.max_file_bytes (0 = no cap)"
        )


# ------------------------------------------------------------------------------------------------------- readers
def read_text(part: Part, options: ReadOptions) -> Iterator[Piece]:
    """A text file is one document, read in chunks and cut at newlines (see `cut_point`)."""
    with open_regular(part.file.path, options.field, options.max_file_bytes) as f:
        _check_size(part, options, f)
        begin, end = _line_range(f, part, options.field)
        f.seek(begin)
        pos, carry = begin, b""
        while pos < end:
            block = _read(f, min(options.chunk_bytes - len(carry), end - pos), part, options.field)
            if not block:
                break  # the file shrank since it was listed
            pos += len(block)
            buf = carry + block if carry else block
            if pos >= end:
                carry = buf
                break
            at = cut_point(buf)
            yield Piece(_checked(buf[:at], part, pos - len(buf), options), False)
            carry = buf[at:]
        if carry:
            # The document ends here unless the part stops before the file does (another part continues it).
            yield Piece(_checked(carry, part, pos - len(carry), options), end >= part.file.size)


def _json_text(line: bytes, where: str, part: Part, options: ReadOptions) -> bytes:
    try:
        record = json.loads(line)
    except RecursionError:  # the C scanner recurses once per nesting level
        raise ConfigError(f"{options.field}: {part.file.path!r} {where} is JSON nested too deeply to read") from None
    except (ValueError, UnicodeDecodeError) as exc:  # also integers of more digits than Python converts
        msg = getattr(exc, "msg", None) or ("not UTF-8" if isinstance(exc, UnicodeDecodeError) else str(exc))
        raise ConfigError(f"{options.field}: {part.file.path!r} {where} is not JSON: {msg}") from None
    text = record.get(options.text_field) if isinstance(record, dict) else None
    if not isinstance(text, str):
        raise ConfigError(
            f"{options.field}: {part.file.path!r} {where} has no string {options.text_field!r} field "
            "(set data.text_field to the field that holds the text)"
        )
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate escape such as "\ud800"
        if options.strict:
            raise ConfigError(f"{options.field}: {part.file.path!r} {where} holds text that is not valid "
                              "Unicode (a lone surrogate)") from None
        return text.encode("utf-8", errors="ignore" if options.skip_bad_bytes else "replace")


def read_jsonl(part: Part, options: ReadOptions) -> Iterator[Piece]:
    """One document per line's text field; a line is held whole, a long text is split into pieces."""
    with open_regular(part.file.path, options.field, options.max_file_bytes) as f:
        _check_size(part, options, f)
        begin, end = _line_range(f, part, options.field)
        f.seek(begin)
        pos, lineno = begin, 0
        while pos < end:
            try:
                line = f.readline()
            except OSError as exc:
                raise ConfigError(f"{options.field}: cannot read {part.file.path!r}: {exc.strerror or exc}") from None
            if not line:
                break
            lineno += 1
            where = f"line {lineno}" if begin == 0 else f"line at byte {pos}"
            pos += len(line)
            if not line.strip():
                continue
            line = _checked(line, part, pos - len(line), options)  # a bad byte: named by offset, or repaired
            data = _json_text(line, where, part, options)
            if data:
                yield from split_document(data, options.chunk_bytes)


def _pyarrow(part: Part, options: ReadOptions) -> Any:
    try:
        import pyarrow
    except ImportError:
        raise ConfigError(
            f"{options.field}: reading {part.file.path!r} needs pyarrow, which is not installed: "
            "pip install 'llm[data]'"
        ) from None
    return pyarrow


def _owned(count: int, part: Part) -> list[int]:
    """Which of `count` units (row groups, record batches) spread evenly over the file belong to `part`."""
    size = max(1, part.file.size)
    return [i for i in range(count) if part.start <= i * size // count < (part.end if part.end < size else size + 1)]


def _arrow_texts(batches: Iterator[Any], part: Part, options: ReadOptions) -> Iterator[Piece]:
    for batch in batches:
        names = batch.schema.names
        if options.text_field not in names:
            raise ConfigError(f"{options.field}: {part.file.path!r} has no column {options.text_field!r} "
                              f"(columns: {', '.join(names)}); set data.text_field")
        column = batch.column(names.index(options.text_field))
        for value in column.to_pylist():
            if value is None or value == "":
                continue
            if not isinstance(value, str):
                raise ConfigError(f"{options.field}: {part.file.path!r} column {options.text_field!r} holds "
                                  f"{type(value).__name__} values, not strings")
            yield from split_document(_checked(value.encode("utf-8", errors="surrogatepass"), part, 0, options),
                                      options.chunk_bytes)


def read_parquet(part: Part, options: ReadOptions) -> Iterator[Piece]:
    """One document per row of the text column, read row group by row group in record batches."""
    pa = _pyarrow(part, options)
    import pyarrow.parquet as pq

    with open_regular(part.file.path, options.field, options.max_file_bytes) as f:
        try:
            pf = pq.ParquetFile(f)
        except (pa.ArrowException, OSError) as exc:
            raise ConfigError(f"{options.field}: {part.file.path!r} is not a Parquet file: {exc}") from None
        groups = _owned(pf.num_row_groups, part)
        if not groups:
            return
        if options.text_field not in pf.schema_arrow.names:
            raise ConfigError(f"{options.field}: {part.file.path!r} has no column {options.text_field!r} "
                              f"(columns: {', '.join(pf.schema_arrow.names)}); set data.text_field")
        batches = pf.iter_batches(batch_size=1024, row_groups=groups, columns=[options.text_field])
        yield from _arrow_texts(batches, part, options)


def read_arrow(part: Part, options: ReadOptions) -> Iterator[Piece]:
    """One document per row of the text column of an Arrow IPC file or stream (memory-mapped, batch by batch)."""
    pa = _pyarrow(part, options)
    with open_regular(part.file.path, options.field, options.max_file_bytes):
        pass  # the same refusals as every other source (FIFOs, devices, the size cap) before mapping it
    source = pa.memory_map(part.file.path)
    try:
        try:
            reader = pa.ipc.open_file(source)
            count, get = reader.num_record_batches, reader.get_batch
        except pa.ArrowInvalid:  # the stream format (what `datasets` caches hold): count the batches first
            source.seek(0)
            batches = list(pa.ipc.open_stream(source))  # zero-copy views into the mapping
            count, get = len(batches), batches.__getitem__
        yield from _arrow_texts((get(i) for i in _owned(count, part)), part, options)
    except pa.ArrowInvalid as exc:
        raise ConfigError(f"{options.field}: {part.file.path!r} is not an Arrow IPC file: {exc}") from None
    finally:
        source.close()


register_reader(".jsonl", read_jsonl)
register_reader(".parquet", read_parquet)
register_reader(".arrow", read_arrow)
register_reader(".feather", read_arrow)


# -------------------------------------------------------------------------------------------------- documents
def iter_pieces(parts: list[Part], options: ReadOptions = ReadOptions(), max_bytes: int = 0) -> Iterator[Piece]:
    """The pieces of `parts` in order; with `max_bytes` > 0, stop once that many bytes were given (the last
    document is cut to fit, at a character boundary, and ends there)."""
    budget = max_bytes if max_bytes > 0 else None
    for part in parts:
        for piece in read_part(part, options):
            if budget is not None and len(piece.data) >= budget:
                yield Piece(piece.data[:budget].decode("utf-8", errors="ignore").encode("utf-8"), True)
                return
            if budget is not None:
                budget -= len(piece.data)
            yield piece


def iter_documents(
    files: list[SourceFile], max_bytes: int = 0, strict: bool = True, field: str = "data.path",
    max_file_bytes: int = 0, text_field: str = "text",
) -> Iterator[str]:
    """The documents of `files` as whole strings (for small corpora and tests; preparation streams pieces)."""
    options = ReadOptions(text_field=text_field, strict=strict, field=field, max_file_bytes=max_file_bytes)
    decoder = codecs.getincrementaldecoder("utf-8")()
    parts: list[str] = []
    for piece in iter_pieces([Part(f) for f in files], options, max_bytes):
        parts.append(decoder.decode(piece.data))
        if piece.end:
            yield "".join(parts) + decoder.decode(b"", final=True)
            parts = []
    if parts:  # the last document of a part that stops inside it
        yield "".join(parts)
