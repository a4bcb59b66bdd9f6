"""Battery, issue 22 kind 6 (and the day-one items of data preparation): preparing twice is safe.

Two preparations of one slice into one directory are locked out; a corrupted shard is caught before its tokens
train (the cheap check every open does, or `--verify`'s checksums); an index's typed fields are checked one by one;
a full disk or a read-only target is one line and leaves nothing a run would take as complete; and a non-UTF-8
byte is handled as `--encoding-errors` says. Each case asserts the exact outcome: exit status 2 and one `error:`
line naming the file or field and the value, files untouched, or the correct tokens.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llm import pidlock
from llm.data import prepare_lock
from llm.data import shards as shards_mod
from llm.data.prepare import PrepareOptions, main, prepare
from llm.data.readers import ReadOptions
from llm.data.shards import CacheMismatch, index_files, open_store
from llm.data.sources import resolve_files
from llm.errors import ConfigError
from tests.data.test_text import make_config, setup_dm

pytestmark = pytest.mark.usefixtures("own_cache")

DOCS = ["alpha beta gamma\n" * 20, "delta epsilon\nzeta eta theta\n" * 15, "iota kappa lambda mu\n" * 12]


def corpus(tmp_path: Path) -> Path:
    root = tmp_path / "corpus"
    root.mkdir()
    for i, text in enumerate(DOCS):
        (root / f"doc{i}.txt").write_text(text, encoding="utf-8")
    return root


def prepared(tmp_path: Path, name: str = "out") -> Path:
    """A byte-tokenized directory of several shards."""
    out = tmp_path / name
    assert main([str(corpus(tmp_path)), str(out), "--shard-min-tokens", "300", "--chunk-bytes", "64"]) == 0
    assert len(open_store(out)[0].paths) >= 3
    return out


def listing(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def one_error(capsys: pytest.CaptureFixture) -> str:
    """The single `error:` line of a failed command (log lines may precede it; a traceback may not)."""
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


# ---------------------------------------------------------------------------------------------------- the lock
def _holder_record(pid: int, host: str | None = None) -> str:
    return json.dumps({"pid": pid, "host": host or socket.gethostname(), "started": time.time(),
                       "proc_start": pidlock.proc_start(pid)})


def test_a_second_preparation_of_a_slice_is_locked_out(tmp_path, capsys):
    """A real second process holds slice 0: this one exits 2 naming the directory and the holder, writing nothing."""
    root, out = corpus(tmp_path), tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from llm.data.prepare_lock import PrepareLock; "
         "PrepareLock(sys.argv[1], 0).acquire(); print('held', flush=True); time.sleep(60)", str(out)],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        assert holder.stdout.readline().strip() == "held"
        before = listing(out)
        assert main([str(root), str(out)]) == 2
        line = one_error(capsys)
        assert str(out) in line and f"pid {holder.pid} on host" in line and ".prepare-00000.lock" in line, line
        assert listing(out) == before  # no shard, no index, the holder's lock untouched
        # Another slice of the same directory is another machine's work: not locked out.
        assert main([str(root), str(out), "--num-shards", "2", "--shard-index", "1"]) == 0
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("record, age_s, refused", [
    (lambda: _holder_record(os.getppid()), 0, f"is being prepared by pid {os.getppid()} on host"),  # alive, here
    (lambda: _holder_record(4_000_000), 0, None),  # a pid that is not running (above pid_max)
    (lambda: _holder_record(1, host="elsewhere"), 0, "is being prepared by pid 1 on host 'elsewhere'"),  # fresh
    (lambda: _holder_record(1, host="elsewhere"), 3600, None),  # another host, silent for an hour
    (lambda: "{half", 3600, None),  # unreadable and old: its writer died while writing it
    (lambda: "{half", 0, "is in use by a preparation that is starting now"),  # unreadable, young: being written
])
def test_the_lock_is_taken_over_only_when_stale(tmp_path, capsys, record, age_s, refused):
    root, out = corpus(tmp_path), tmp_path / "out"
    out.mkdir()
    lock = out / ".prepare-00000.lock"
    lock.write_text(text := record())
    os.utime(lock, (time.time() - age_s, time.time() - age_s))
    code = main([str(root), str(out)])
    if refused is None:
        assert code == 0 and len(index_files(out)) == 1 and not lock.exists()
    else:
        line = one_error(capsys)
        assert code == 2 and refused in line and str(out) in line, line
        assert index_files(out) == [] and lock.read_text() == text


# ---------------------------------------------------------------------------------------------- corrupted shards
def _flip(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x5A
    path.write_bytes(bytes(data))


def _truncate(path: Path, by: int = 1) -> None:
    path.write_bytes(path.read_bytes()[:-by])


def _fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


CORRUPTIONS = {
    # name: (what is done to shard 1's files, the file the message names, caught by the cheap check on open)
    "tokens truncated": (lambda d: _truncate(d / "tokens-00000-00001.bin"), "tokens-00000-00001.bin", True),
    "tokens extended": (lambda d: d.joinpath("tokens-00000-00001.bin").open("ab").write(b"x"),
                        "tokens-00000-00001.bin", True),
    "tokens missing": (lambda d: (d / "tokens-00000-00001.bin").unlink(), "tokens-00000-00001.bin", True),
    "tokens a FIFO": (lambda d: _fifo(d / "tokens-00000-00001.bin"), "tokens-00000-00001.bin", True),
    "segments truncated": (lambda d: _truncate(d / "docs-00000-00001.npy", 8), "docs-00000-00001.npy", True),
    "segments header flipped": (lambda d: _flip(d / "docs-00000-00001.npy", 30), "docs-00000-00001.npy", True),
    "segment bytes flipped": (lambda d: _flip(d / "docs-00000-00001.npy", 128 + 8), "docs-00000-00001.npy", True),
    "segments a FIFO": (lambda d: _fifo(d / "docs-00000-00001.npy"), "docs-00000-00001.npy", True),
    "index truncated": (lambda d: _truncate(d / "index-00000-of-00001.json", 40), "index-00000-of-00001.json", True),
    # Same size, other bytes: only the checksums recorded at preparation can tell.
    "token bytes flipped": (lambda d: _flip(d / "tokens-00000-00001.bin", 17), "tokens-00000-00001.bin", False),
}


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_a_corrupted_shard_is_caught_before_it_trains(tmp_path, capsys, kind):
    corrupt, named, on_open = CORRUPTIONS[kind]
    out = prepared(tmp_path)
    corrupt(out)
    before = listing(out) if "FIFO" not in kind else None
    if on_open:
        with pytest.raises(ConfigError, match=rf"does not check out: .*{named}") as info:
            setup_dm(make_config(out))
        assert "\n" not in str(info.value)
    else:
        assert open_store(out)[0].num_tokens > 0  # the cheap check cannot see it ...
    assert main(["--verify", str(out)]) == 2  # ... the full one can, and names the file
    line = one_error(capsys)
    assert named in line and str(out) in line, line
    if before is not None:
        assert listing(out) == before


def test_re_running_over_a_corrupted_complete_slice_refuses_instead_of_skipping(tmp_path, capsys):
    out = prepared(tmp_path)
    _truncate(out / "tokens-00000-00000.bin")
    before = listing(out)
    assert main([str(tmp_path / "corpus"), str(out), "--shard-min-tokens", "300", "--chunk-bytes", "64"]) == 2
    line = one_error(capsys)
    assert "tokens-00000-00000.bin" in line and "delete index-00000-of-00001.json" in line, line
    assert listing(out) == before


def test_verify_passes_a_sound_directory(tmp_path, capsys):
    out = prepared(tmp_path)
    assert main(["--verify", str(out)]) == 0
    assert "checksums match" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ typed index fields
def _set(index: dict, path: str, value: object) -> None:
    keys = path.replace("]", "").replace("[", ".").split(".")
    target = index
    for key in keys[:-1]:
        target = target[int(key)] if key.isdigit() else target[key]
    target[keys[-1]] = value


INDEX_FIELDS = [
    ("shards[0].tokens", "300", "'300'"),  # a string
    ("shards[0].tokens", 300.0, "300.0"),  # float where int
    ("shards[0].tokens", -300, "-300"),  # negative
    ("shards[0].tokens", float("nan"), "nan"),  # NaN
    ("shards[0].tokens", 10**30, "1000000000000000000000000000000"),  # huge
    ("shards[0].tokens", True, "True"),  # a bool is no count
    ("shards[0].segments", 0, "0"),
    ("shards[0].bytes", -1, "-1"),
    ("shards[0].crc32", 1 << 40, str(1 << 40)),
    ("shards[0].file", "../../etc/passwd", "'../../etc/passwd'"),
    ("shards[0].docs_file", 7, "7"),
    ("num_slices", 0, "0"),
    ("slice", 3, "3"),
    ("version", "1", "'1'"),
    ("dtype", "float32", "'float32'"),
    ("vocab_size", 1e9, "1000000000.0"),
    ("eos_id", -1, "-1"),
    ("num_tokens", 5, "5"),  # disagrees with the shards' sum
]


@pytest.mark.parametrize("field, value, shown", INDEX_FIELDS, ids=[f"{f}={v!r}" for f, v, _ in INDEX_FIELDS])
def test_a_bad_index_field_is_one_line_naming_it(tmp_path, capsys, field, value, shown):
    out = prepared(tmp_path)
    path = out / "index-00000-of-00001.json"
    index = json.loads(path.read_text())
    _set(index, field, value)
    path.write_text(json.dumps(index))  # NaN is written as JSON's NaN, which json.loads accepts
    before = listing(out)
    with pytest.raises(CacheMismatch) as info:
        open_store(out)
    assert f"{field}: invalid value {shown}" in str(info.value), info.value
    assert main(["--verify", str(out)]) == 2
    line = one_error(capsys)
    assert f"index-00000-of-00001.json: {field}: invalid value {shown}" in line, line
    assert listing(out) == before


def test_a_deeply_nested_index_is_one_line(tmp_path, capsys):
    out = prepared(tmp_path)
    (out / "index-00000-of-00001.json").write_text("[" * 100_000 + "]" * 100_000)
    assert main(["--verify", str(out)]) == 2
    assert "index-00000-of-00001.json is unreadable" in one_error(capsys)


# ------------------------------------------------------------------------------------ full disk, read-only target
class _FillingFile:
    """A file whose writes fail with ENOSPC once `budget` bytes were written (the disk fills up)."""

    def __init__(self, f, budget: list[int]) -> None:
        self.f, self.budget = f, budget

    def write(self, data) -> int:
        size = memoryview(data).nbytes
        if size > self.budget[0]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.budget[0] -= size
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


@pytest.mark.parametrize("budget", [0, 400, 1500])  # the first shard, a later shard, a segment table
def test_a_full_disk_is_one_line_and_leaves_nothing_complete_looking(tmp_path, capsys, monkeypatch, budget):
    root, out = corpus(tmp_path), tmp_path / "out"
    left = [budget]
    monkeypatch.setattr(shards_mod, "open", lambda *a, **k: _FillingFile(open(*a, **k), left), raising=False)
    assert main([str(root), str(out), "--shard-min-tokens", "300", "--chunk-bytes", "64"]) == 2
    line = one_error(capsys)
    assert line == f"error: OUT: cannot write {out}: No space left on device", line
    assert index_files(out) == [] and not [p for p in os.listdir(out) if ".tmp-" in p or p.endswith(".lock")]
    with pytest.raises(ConfigError, match="no index|holds no files"):
        setup_dm(make_config(out))
    monkeypatch.undo()  # the disk has room again: the same command finishes the job
    assert main([str(root), str(out), "--shard-min-tokens", "300", "--chunk-bytes", "64"]) == 0
    assert open_store(out)[0].tokens().tobytes() == b"".join(d.encode() + b"\0" for d in DOCS)


def test_a_full_disk_while_writing_the_index_leaves_no_index(tmp_path, capsys, monkeypatch):
    root, out = corpus(tmp_path), tmp_path / "out"

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(shards_mod.fs, "atomic_write", full)
    assert main([str(root), str(out)]) == 2
    assert one_error(capsys) == f"error: OUT: cannot write {out}: No space left on device"
    assert index_files(out) == [] and not [p for p in os.listdir(out) if ".tmp-" in p]


@pytest.mark.parametrize("exists", [True, False])
def test_a_read_only_target_is_one_line(tmp_path, capsys, monkeypatch, exists):
    root, out = corpus(tmp_path), tmp_path / "ro" / "out"
    if exists:
        out.mkdir(parents=True)
    real_open, real_mkdir = os.open, os.mkdir

    def ro_open(path, flags, *args, **kwargs):
        if str(path).startswith(str(tmp_path / "ro")) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args, **kwargs)

    def ro_mkdir(path, *args, **kwargs):
        if str(path).startswith(str(tmp_path / "ro")):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", ro_open)
    monkeypatch.setattr(os, "mkdir", ro_mkdir)
    assert main([str(root), str(out)]) == 2
    assert one_error(capsys) == f"error: OUT: cannot write {out}: Read-only file system"
    assert (os.listdir(out) == []) if exists else not out.exists()


# ------------------------------------------------------------------------------------------- encoding errors
BAD = b"caf\xc3\xa9 ok\nbad \xff byte\nend\n"


@pytest.mark.parametrize("mode, expected", [
    ("replace", "café ok\nbad \ufffd byte\nend\n".encode()),
    ("skip", "café ok\nbad  byte\nend\n".encode()),
])
def test_encoding_errors_replace_or_skip_the_bad_byte(tmp_path, mode, expected):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_bytes(BAD)
    out = tmp_path / "out"
    assert main([str(tmp_path / "in"), str(out), "--encoding-errors", mode]) == 0
    assert open_store(out)[0].tokens().tobytes() == expected + b"\0"


@pytest.mark.parametrize("args", [[], ["--encoding-errors", "strict"]])
def test_encoding_errors_strict_names_file_and_offset(tmp_path, capsys, args):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_bytes(BAD)
    out = tmp_path / "out"
    assert main([str(tmp_path / "in"), str(out), *args]) == 2
    line, offset = one_error(capsys), BAD.index(b"\xff")
    assert "a.txt" in line and f"offset {offset}" in line and "--encoding-errors" in line, line
    assert index_files(out) == []


def test_encoding_errors_rejects_an_unknown_mode(tmp_path, capsys):
    assert main([str(corpus(tmp_path)), str(tmp_path / "out"), "--encoding-errors", "ignore"]) == 2
    assert "--encoding-errors" in one_error(capsys) and not (tmp_path / "out").exists()


def test_the_old_shard_tokens_flag_points_at_its_new_name(tmp_path, capsys):
    assert main([str(corpus(tmp_path)), str(tmp_path / "out"), "--shard-tokens", "300"]) == 2
    assert "--shard-min-tokens" in one_error(capsys) and not (tmp_path / "out").exists()


def test_prepare_library_refuses_a_held_slice_too(tmp_path):
    """The library entry point (what the lm task's cache uses) takes the same lock."""
    root, out = corpus(tmp_path), tmp_path / "out"
    out.mkdir()
    (out / ".prepare-00000.lock").write_text(_holder_record(os.getppid()))
    with pytest.raises(prepare_lock.PrepareInUse, match=f"pid {os.getppid()}"):
        prepare(resolve_files(str(root)), out, PrepareOptions(read=ReadOptions(chunk_bytes=64)))
    assert sorted(os.listdir(out)) == [".prepare-00000.lock"]


@pytest.mark.parametrize("record", [
    {"pid": 10**30, "host": socket.gethostname(), "started": 0},  # huge
    {"pid": "1234", "host": socket.gethostname(), "started": float("nan")},  # a string, NaN
    {"pid": -5, "host": None},  # negative, no host
])
def test_a_malformed_lock_record_is_stale_and_taken_over_with_a_warning(tmp_path, caplog, record):
    root, out = corpus(tmp_path), tmp_path / "out"
    out.mkdir()
    (out / ".prepare-00000.lock").write_text(json.dumps(record))
    with caplog.at_level("WARNING", logger="llm"):
        prepare(resolve_files(str(root)), out, PrepareOptions(read=ReadOptions(chunk_bytes=64)))
    assert len(index_files(out)) == 1 and not (out / ".prepare-00000.lock").exists()
    assert any("its record is malformed" in r.getMessage() for r in caplog.records)


def test_a_full_disk_while_saving_the_bpe_tokenizer_is_one_line(tmp_path, capsys, monkeypatch):
    """The tokenizers library reports a full disk as its own error with "(os error 28)" in the text."""
    from llm.data.tokenizers import HFTokenizer

    def full(self, directory):
        raise Exception("No space left on device (os error 28)")  # noqa: TRY002 - the library's own shape

    monkeypatch.setattr(HFTokenizer, "save", full)
    root, out = corpus(tmp_path), tmp_path / "out"
    assert main([str(root), str(out), "--tokenizer", "bpe", "--vocab-size", "300"]) == 2
    assert one_error(capsys) == f"error: OUT: cannot write {out}: No space left on device"
    assert index_files(out) == [] and not [p for p in os.listdir(out) if "tokenizer" in p]


@pytest.mark.parametrize("mode, expected", [
    ("strict", None),
    ("replace", "caf\ufffd au lait\n".encode() + b"\0" + b"ok\0"),
    ("skip", b"caf au lait\n\0ok\0"),
])
def test_encoding_errors_in_jsonl(tmp_path, capsys, mode, expected):
    (tmp_path / "in").mkdir()
    raw = b'{"text": "caf\xe9 au lait\\n"}\n{"text": "ok"}\n'  # a Latin-1 byte inside the JSON string
    (tmp_path / "in" / "r.jsonl").write_bytes(raw)
    out = tmp_path / "out"
    code = main([str(tmp_path / "in"), str(out), "--encoding-errors", mode])
    if expected is None:
        assert code == 2
        line, offset = one_error(capsys), raw.index(b"\xe9")
        assert "r.jsonl" in line and f"offset {offset}" in line, line
        assert index_files(out) == []
    else:
        assert code == 0 and open_store(out)[0].tokens().tobytes() == expected


def test_shard_min_tokens_is_what_its_name_says(tmp_path):
    """Every shard but the last holds at least T tokens and at most one piece (--chunk-bytes, + its separator)
    more; the old name, which promised T per shard, is refused above."""
    out = prepared(tmp_path)
    counts = [s["tokens"] for s in json.loads((out / "index-00000-of-00001.json").read_text())["shards"]]
    assert all(300 <= c < 300 + 64 + 1 for c in counts[:-1]) and 0 < counts[-1] < 300 + 64 + 1, counts


def test_an_index_listing_one_shard_twice_is_refused(tmp_path, capsys):
    """Two entries naming one file pass every per-shard check; the directory would train on its tokens twice."""
    out = prepared(tmp_path)
    path = out / "index-00000-of-00001.json"
    index = json.loads(path.read_text())
    index["shards"][1] = dict(index["shards"][0])
    for total, key in (("num_tokens", "tokens"), ("num_docs", "docs"), ("num_bytes", "bytes")):
        index[total] = sum(s[key] for s in index["shards"])
    path.write_text(json.dumps(index))
    assert main(["--verify", str(out)]) == 2
    assert "list tokens-00000-00000.bin twice" in one_error(capsys)
