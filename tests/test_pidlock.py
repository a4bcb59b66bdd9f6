"""The pid-file lock's own mechanism where its users' tests (tests/artifacts/test_lock.py, the run-lock cases of
tests/battery/test_untrusted_artifacts.py, the lock cases of tests/battery/test_data_prep.py) do not reach: a take-over
that loses a race puts the winner's lock back, a lock that keeps changing is refused, and a record that cannot be
written leaves no lock behind."""

from __future__ import annotations

import errno
import itertools
import os
import socket
import threading
import time

import pytest

from llm import pidlock
from llm.errors import ConfigError
from llm.pidlock import LockHolder, LockInUse, PidLock


def _record(pid: int) -> str:
    return LockHolder(pid, socket.gethostname(), time.time(), None, pidlock.proc_start(pid)).to_json()


def test_a_take_over_that_loses_the_race_puts_the_winners_lock_back(tmp_path, monkeypatch):
    """Between judging the lock stale and moving it aside, another process took it over and wrote its own record:
    that record goes back in place, and the live winner is then named."""
    path = tmp_path / "x.lock"
    path.write_text(_record(4_000_000))
    winner = _record(os.getppid())  # alive while this test runs
    real, calls = pidlock.stale_reason, []

    def racing(holder: LockHolder, lock_path, now=None):
        if not calls:
            calls.append(holder.pid)
            lock_path.write_text(winner)  # the other taker's record, written after ours was read
            return "stale for this test"
        return real(holder, lock_path, now)

    monkeypatch.setattr(pidlock, "stale_reason", racing)
    lock = PidLock(path)
    with pytest.raises(LockInUse, match=rf"^{path} is held by pid {os.getppid()} on host "):
        lock.acquire()
    assert calls == [4_000_000] and path.read_text() == winner
    assert not lock.held and lock.replaced is None
    assert sorted(tmp_path.iterdir()) == [path]  # the file moved aside is gone


def test_a_lock_that_keeps_changing_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "x.lock"
    path.write_text(_record(4_000_000))
    pids = itertools.count(4_000_001)

    def replaced_each_time(holder: LockHolder, lock_path, now=None):
        lock_path.write_text(_record(next(pids)))
        return "stale for this test"

    monkeypatch.setattr(pidlock, "stale_reason", replaced_each_time)
    with pytest.raises(LockInUse, match="keeps changing"):
        PidLock(path).acquire()
    assert next(pids) == 4_000_006  # five rounds, each put the newer record back
    assert LockHolder.from_json(path.read_bytes()).pid == 4_000_005


def test_a_record_that_cannot_be_written_leaves_no_lock(tmp_path, monkeypatch):
    """A full disk after the file was created: an empty lock left behind would refuse the next taker as one that
    is starting now, so it is removed, and the error is one line naming the lock."""
    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(pidlock.os, "fsync", full)
    path = tmp_path / "x.lock"
    lock = PidLock(path)
    with pytest.raises(ConfigError) as info:
        lock.acquire()
    assert type(info.value) is ConfigError and str(info.value) == f"cannot create {path}: {os.strerror(errno.ENOSPC)}"
    assert not path.exists() and not lock.held
    assert not [t for t in threading.enumerate() if t.name == PidLock.thread_name]
