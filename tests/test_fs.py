"""The package's one file rule (llm/fs.py): atomic replace, leftover temp files, failed writes in one line."""

from __future__ import annotations

import errno
import os
import socket
import stat
import time

import pytest
from helpers import disk_filling_open

from llm import fs


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


# ------------------------------------------------------------------------------------------ atomic writes
def test_atomic_write_replaces_the_content_and_leaves_no_temp(tmp_path):
    target = tmp_path / "config.yaml"
    fs.atomic_write(target, "old: 1\n")
    fs.atomic_write(target, b"new: 2\n")
    assert target.read_text() == "new: 2\n"
    assert os.listdir(tmp_path) == ["config.yaml"]
    assert _mode(target) == 0o666 & ~fs.umask()


def test_a_write_failing_half_way_keeps_the_old_content(tmp_path, monkeypatch):
    target = tmp_path / "best.json"
    fs.atomic_write(target, '{"step": 1}')
    half_open = disk_filling_open(lambda path, mode: "w" in mode)
    monkeypatch.setattr("builtins.open", half_open)
    with pytest.raises(OSError) as info:
        fs.atomic_write(target, '{"step": 2, "dir": "step-00000002"}')
    monkeypatch.undo()
    assert info.value.errno == errno.ENOSPC
    assert target.read_text() == '{"step": 1}'  # the old content, whole
    assert os.listdir(tmp_path) == ["best.json"]  # the half-written temp file is gone


def test_a_failed_write_of_a_new_file_leaves_nothing(tmp_path):
    target = tmp_path / "model.safetensors"
    with pytest.raises(RuntimeError, match="serializer died"):
        with fs.atomic_path(target) as tmp:
            assert tmp == tmp_path / "model.safetensors.tmp"  # the temp name resume and tests know
            tmp.write_bytes(b"partial")
            raise RuntimeError("serializer died")
    assert os.listdir(tmp_path) == []


def test_atomic_path_makes_a_0600_file_readable_and_a_named_temp_is_used(tmp_path):
    target = tmp_path / "index.json"
    with fs.atomic_path(target, tmp=tmp_path / "index.json.tmp-42", durable=False) as tmp:
        fd = os.open(tmp, os.O_CREAT | os.O_WRONLY, 0o600)  # as safetensors creates its files
        os.write(fd, b"{}")
        os.close(fd)
    assert target.read_bytes() == b"{}" and os.listdir(tmp_path) == ["index.json"]
    assert _mode(target) == 0o666 & ~fs.umask()


def test_replace_dir_swaps_a_whole_directory(tmp_path):
    final, tmp, aside = tmp_path / "step-1", tmp_path / ".tmp-step-1", tmp_path / ".tmp-old-step-1"
    final.mkdir()
    (final / "a").write_text("old")
    tmp.mkdir()
    (tmp / "b").write_text("new")
    fs.replace_dir(tmp, final, aside)
    assert sorted(os.listdir(tmp_path)) == ["step-1"] and os.listdir(final) == ["b"]
    fs.replace_dir(tmp_path / "step-1", tmp_path / "step-2", tmp_path / ".aside")  # no existing target
    assert os.listdir(tmp_path) == ["step-2"]


# ---------------------------------------------------------------------------------- leftover temp files
def _dead_pid() -> int:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)  # reaped: the pid surely no longer runs
    return pid


def _aged(path, seconds: float):
    old = time.time() - seconds
    for p in [*path.iterdir(), path] if path.is_dir() else [path]:
        os.utime(p, (old, old))
    return path


def test_owner_record_round_trips(tmp_path):
    assert fs.read_owner(tmp_path) is None
    fs.write_owner(tmp_path)
    assert fs.read_owner(tmp_path) == fs.Owner(socket.gethostname(), os.getpid())
    (tmp_path / fs.OWNER_FILE).write_text("{not json")
    assert fs.read_owner(tmp_path) is None


def test_staleness_rule(tmp_path):
    here = socket.gethostname()
    fresh = tmp_path / "fresh.tmp-1"
    fresh.write_bytes(b"x")
    assert fs.is_abandoned(fresh, fs.Owner(here, _dead_pid()))  # its writer is gone from this host
    assert not fs.is_abandoned(fresh, fs.Owner(here, os.getpid()))  # a live writer here
    assert not fs.is_abandoned(fresh, fs.Owner("another-host", _dead_pid()))  # a pid of another host says nothing
    assert not fs.is_abandoned(fresh, None)  # no record: only age can tell
    old = tmp_path / "old.tmp-2"
    old.write_bytes(b"x")
    _aged(old, 2 * fs.STALE_AFTER_S)
    assert fs.is_abandoned(old, None) and fs.is_abandoned(old, fs.Owner("another-host", 1))
    # A day unchanged outweighs a live pid: the writer's pid may have been reused by another process.
    assert fs.is_abandoned(old, fs.Owner(here, os.getpid()))
    assert not fs.is_abandoned(tmp_path / "vanished", None)  # changing under us: in use


def test_a_directory_is_as_recent_as_its_newest_entry(tmp_path):
    tmp = tmp_path / ".key.tmp-abc"
    tmp.mkdir()
    (tmp / "tokens.bin").write_bytes(b"\0")
    _aged(tmp, 2 * fs.STALE_AFTER_S)
    assert fs.is_abandoned(tmp, None)
    (tmp / "tokens.bin").write_bytes(b"\0\0")  # the writer is still at work
    assert not fs.is_abandoned(tmp, None)
    assert fs.is_abandoned(tmp, None, now=time.time() + 2 * fs.STALE_AFTER_S)


def test_pid_running():
    assert fs.pid_running(os.getpid())
    assert not fs.pid_running(_dead_pid())


# ----------------------------------------------------------------------------------------- failed writes
@pytest.mark.parametrize(("code", "reason"), [
    (errno.ENOSPC, "No space left on device"),
    (errno.EACCES, "Permission denied"),
    (errno.EROFS, "Read-only file system"),
])
def test_write_failure_names_the_file_and_the_os_reason(code, reason):
    exc = OSError(code, os.strerror(code))
    assert fs.write_errno(exc) == code
    assert fs.write_failure(exc, "/run/metrics.jsonl") == f"cannot write /run/metrics.jsonl: {reason}"
    assert fs.is_write_error(exc)
    assert fs.is_disk_full(exc) == (code == errno.ENOSPC)


def test_write_failure_reads_rust_and_chained_errors():
    class SafetensorError(Exception):  # safetensors' own type: the errno only in its text
        __module__ = "safetensors_rust"

    rust = SafetensorError("Error while serializing: I/O error: Read-only file system (os error 30)")
    assert fs.write_errno(rust) == errno.EROFS and fs.is_write_error(rust)
    assert fs.write_failure(rust, "/r/w.safetensors") == "cannot write /r/w.safetensors: Read-only file system"
    try:  # torch.save: a RuntimeError about stream positions, the OSError as its context
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598") from None
    except RuntimeError as wrapped:
        assert fs.write_failure_reason(wrapped) == "No space left on device" and fs.is_disk_full(wrapped)
    plain = ValueError("first line\nlast line")
    assert fs.write_errno(plain) is None and fs.write_failure_reason(plain) == "last line"
    assert not fs.is_write_error(plain)
    assert "\n" not in fs.write_failure(RuntimeError("a\nb"), "p")
