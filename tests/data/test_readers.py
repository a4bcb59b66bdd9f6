"""Streaming readers: pieces are bounded, cut at safe places, lose and duplicate nothing, and byte-range parts
of a file cover every unit exactly once."""

from __future__ import annotations

import json
import sys
import tracemalloc

import pytest

from llm.data.readers import Part, ReadOptions, cut_point, iter_documents, read_part
from llm.data.sources import resolve_files
from llm.errors import ConfigError

TEXT = ("line one\n" + "naïve café — 東京 🚀 " * 7 + "\n" + "x" * 150 + "🚀" * 20 + "\n") * 5


def pieces(path, chunk=64, start=0, stop=None, **kw):
    file = resolve_files(str(path))[0]
    return list(read_part(Part(file, start, stop), ReadOptions(chunk_bytes=chunk, **kw)))


def test_a_long_document_is_cut_into_bounded_pieces_that_concatenate_exactly(tmp_path):
    path = tmp_path / "doc.txt"
    path.write_text(TEXT, encoding="utf-8")
    got = pieces(path, chunk=64)
    assert len(got) > 10 and all(len(p.data) <= 64 for p in got)
    assert b"".join(p.data for p in got) == TEXT.encode()  # byte-identical: nothing lost or doubled
    assert [p.end for p in got] == [False] * (len(got) - 1) + [True]
    for p in got:
        p.data.decode("utf-8")  # never cut inside a character
    # Cuts prefer newlines, then spaces: most pieces end in one.
    assert sum(p.data[-1:] in (b"\n", b" ") for p in got[:-1]) >= len(got) // 2


def test_cut_point_falls_back_to_a_character_boundary():
    buf = "🚀".encode() * 10  # no newline, no space
    at = cut_point(buf[:23])
    assert at % 4 == 0 and 0 < at <= 23


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_byte_range_parts_cover_every_line_exactly_once(tmp_path, suffix):
    path = tmp_path / f"data{suffix}"
    if suffix == ".jsonl":
        lines = [json.dumps({"body": f"record {i} " + "é" * (i % 7)}) for i in range(40)]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    else:
        path.write_text(TEXT, encoding="utf-8")
    whole = pieces(path, chunk=50, text_field="body")
    size = path.stat().st_size
    for n in (2, 3, 7):
        cuts = [size * i // n for i in range(n + 1)]
        parts = [pieces(path, 50, cuts[i], cuts[i + 1] if i < n - 1 else None, text_field="body") for i in range(n)]
        assert b"".join(p.data for ps in parts for p in ps) == b"".join(p.data for p in whole)
        assert sum(p.end for ps in parts for p in ps) == sum(p.end for p in whole)


def test_jsonl_field_is_configurable_and_long_records_are_split(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"content": "ab " * 100}) + "\n" + json.dumps({"content": "short"}) + "\n")
    got = pieces(path, chunk=32, text_field="content")
    assert b"".join(p.data for p in got) == ("ab " * 100 + "short").encode()
    assert sum(p.end for p in got) == 2 and all(len(p.data) <= 32 for p in got)
    with pytest.raises(ConfigError, match="line 1 has no string 'text' field"):
        pieces(path)


def test_reader_memory_stays_within_a_few_chunks_on_a_large_input(tmp_path):
    """A 32 MB sparse file read in 64 KB chunks: 512 chunks, as a 4 GB file is in the default 8 MB chunks."""
    path = tmp_path / "sparse.txt"
    with open(path, "wb") as f:
        f.truncate(32 << 20)  # zeros: valid UTF-8, no disk blocks
    file = resolve_files(str(path))[0]
    chunk, total, largest = 64 << 10, 0, 0
    tracemalloc.start()
    try:
        for piece in read_part(Part(file), ReadOptions(chunk_bytes=chunk)):
            total += len(piece.data)
            largest = max(largest, len(piece.data))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert total == 32 << 20 and largest <= chunk
    # A few buffers of one chunk (read block, carry + block, the piece, its UTF-8 check), never the file.
    assert peak < 8 * chunk, f"peak {peak} bytes for {chunk}-byte chunks"


def test_parquet_and_arrow_sources_by_row_group_and_batch(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    texts = [f"row {i} " + "ü" * (i % 5) for i in range(50)]
    table = pa.table({"text": texts, "n": list(range(50))})
    pq.write_table(table, tmp_path / "d.parquet", row_group_size=7)
    with pa.OSFile(str(tmp_path / "d.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        for batch in table.to_batches(max_chunksize=6):
            writer.write_batch(batch)
    for name in ("d.parquet", "d.arrow"):
        files = resolve_files(str(tmp_path / name))
        assert list(iter_documents(files)) == texts
        size = files[0].size
        got = []
        for i in range(3):
            part = Part(files[0], size * i // 3, size * (i + 1) // 3 if i < 2 else None)
            got += [p.data.decode() for p in read_part(part, ReadOptions())]
        assert got == texts, name
    with pytest.raises(ConfigError, match="no column 'body'"):
        list(iter_documents(resolve_files(str(tmp_path / "d.parquet")), text_field="body"))


def test_missing_pyarrow_is_a_one_line_install_hint(tmp_path, monkeypatch):
    path = tmp_path / "d.parquet"
    path.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow -> ImportError
    with pytest.raises(ConfigError) as info:
        list(iter_documents(resolve_files(str(path))))
    assert "pip install 'llm[data]'" in str(info.value) and "\n" not in str(info.value)
