"""Preparation progress without a terminal: lines often enough for a batch job's log, and a fraction that means
the same thing for every source (Parquet counts uncompressed text, not its compressed file)."""

from __future__ import annotations

import logging

import pytest

from llm.data import encode
from llm.data import prepare as prepare_mod
from llm.data.encode import Progress
from llm.data.prepare import PrepareOptions, prepare, text_bytes
from llm.data.readers import Part, ReadOptions
from llm.data.sources import resolve_files


def test_a_line_every_five_seconds_by_default(caplog, monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(encode.time, "perf_counter", lambda: clock[0])
    progress = Progress(10**9, "data: tokenizing", bar=False)
    with caplog.at_level(logging.INFO, logger="llm"):
        for _ in range(12):  # 12 s of slow progress (0.1% a second): a line at 5 s and 10 s, none in between
            clock[0] += 1.0
            progress.update(10**6, 1000)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and "10.0/1,000.0 MB" in lines[1] and "ETA" in lines[1], lines


def test_a_fast_preparation_logs_every_tenth_but_at_most_once_a_second(caplog, monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(encode.time, "perf_counter", lambda: clock[0])
    progress = Progress(1000, "data: tokenizing", bar=False)
    with caplog.at_level(logging.INFO, logger="llm"):
        for _ in range(40):  # 2.5% per update, 0.5 s apart: a tenth every 2 s, so a line every 2 s
            clock[0] += 0.5
            progress.update(25, 25)
    percents = [r.getMessage().split("(")[1].split("%")[0] for r in caplog.records]
    assert percents == ["10", "20", "30", "40", "50", "60", "70", "80", "90", "100"], percents


def test_progress_never_passes_100_percent(caplog):
    progress = Progress(100, "data: tokenizing", every_s=0.0, bar=False)
    with caplog.at_level(logging.INFO, logger="llm"):
        progress.update(150, 150)
    assert "150.0/0.0 MB" not in caplog.records[-1].getMessage() and "(100%)" in caplog.records[-1].getMessage()


def test_parquet_progress_counts_uncompressed_text(tmp_path, monkeypatch):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    texts = [f"document {i} " + "the same words again and again " * 40 for i in range(400)]
    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"text": texts}), path, compression="zstd", row_group_size=100)
    files = resolve_files(str(path))
    text = sum(len(t.encode()) for t in texts)
    assert files[0].size < text / 5  # compressed: the file size says nothing about the work
    expected = text_bytes(Part(files[0]), ReadOptions())
    assert abs(expected - text) < 0.03 * text, (expected, text)
    seen = []

    class Recording(Progress):
        def __init__(self, total_bytes, *args, **kwargs):
            super().__init__(total_bytes, *args, **kwargs)
            self.planned = total_bytes  # what prepare expected; `total` itself grows past 100%

        def close(self):
            seen.append((self.bytes, self.planned))
            super().close()

    monkeypatch.setattr(prepare_mod, "Progress", Recording)
    prepare(files, tmp_path / "out", PrepareOptions(read=ReadOptions(chunk_bytes=1 << 16)))
    # What progress counted over what it expected: 97-100% at the end, not 500% (decoded bytes over the compressed
    # file size, as before) or a few percent.
    done, total = seen[0]
    assert 0.97 <= done / total <= 1.0, (done, total)
