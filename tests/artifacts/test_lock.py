"""The run-directory lock: a second run on a live run directory is refused, a stale lock is taken over, and the
lock is gone after a run ends, fails or stops on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO, TINY_REGRESSION, make_config, read_metrics

from llm import pidlock
from llm.artifacts import lock as runlock
from llm.artifacts.lock import LOCK_NAME, LockHolder, RunDirInUse, RunLock, live_holder, stale_reason
from llm.errors import UserError
from llm.training.train import train_worker

# Callbacks the runs below load by `module:Class`: one pauses at step 2 until told to go on, one fails at step 2.
PLUGIN = """
import os, time
from pathlib import Path
from llm.training.core.callbacks import Callback

class PauseAt2(Callback):
    def on_batch_end(self, logs=None):
        if self.engine.state.step == 2:
            Path(os.environ["PAUSED_MARKER"]).touch()
            while not Path(os.environ["GO_ON_MARKER"]).exists():
                time.sleep(0.05)

class FailAt2(Callback):
    def on_batch_end(self, logs=None):
        if self.engine.state.step == 2:
            raise RuntimeError("boom at step 2")
"""
BASE = ["--training-callbacks", "MetricsLogger", "LRSchedulerCallback"]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # reaped: the pid is free (and not reused this soon)
    return proc.pid


def _write_lock(run: Path, holder: LockHolder) -> Path:
    run.mkdir(parents=True, exist_ok=True)
    (run / LOCK_NAME).write_text(holder.to_json())
    return run / LOCK_NAME


def _snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# -- the lock itself ------------------------------------------------------------------------------------------
def test_acquire_release_and_refusal_in_one_process(tmp_path):
    run = tmp_path / "run"
    with RunLock(run) as lock:
        record = json.loads((run / LOCK_NAME).read_text())
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
        assert lock.replaced is None and live_holder(run) is None  # held by this process: not a foreign holder
        with pytest.raises(RunDirInUse, match=rf"is in use by pid {os.getpid()} on host "):
            RunLock(run).acquire()
    assert not (run / LOCK_NAME).exists()
    lock.release()  # idempotent


def test_a_lock_released_by_someone_else_is_not_deleted_on_release(tmp_path):
    run = tmp_path / "run"
    lock = RunLock(run)
    lock.acquire()
    other = _write_lock(run, LockHolder(_dead_pid(), socket.gethostname(), time.time()))
    lock.release()
    assert other.exists()  # not ours any more: left alone


def test_stale_rules(tmp_path):
    host, path = socket.gethostname(), _write_lock(tmp_path, LockHolder(1, "h", 0.0))
    assert "is not running" in stale_reason(LockHolder(_dead_pid(), host, time.time()), path)
    parent = os.getppid()  # alive; its start time is known from /proc on Linux
    start = pidlock.proc_start(parent)
    assert stale_reason(LockHolder(parent, host, time.time(), None, start), path) is None
    if start is not None:
        assert "another process" in stale_reason(LockHolder(parent, host, time.time(), None, start + 1), path)
    if pidlock.boot_id() is not None:
        assert "rebooted" in stale_reason(LockHolder(parent, host, time.time(), "another-boot"), path)
    # Our own pid in a lock this process did not take: left by an earlier process with the same pid.
    assert "earlier" in stale_reason(LockHolder(os.getpid(), host, time.time()), path)
    # Another host: judged by the heartbeat (the file's mtime).
    remote = LockHolder(4242, host + "-elsewhere", time.time())
    os.utime(path)
    assert stale_reason(remote, path) is None
    old = time.time() - runlock.STALE_AFTER_SECONDS - 60
    os.utime(path, (old, old))
    assert "not refreshed" in stale_reason(remote, path)


def test_heartbeat_refreshes_the_lock(tmp_path):
    lock = RunLock(tmp_path / "run", heartbeat_seconds=0.05)
    lock.acquire()
    try:
        old = time.time() - 1000
        os.utime(lock.path, (old, old))
        deadline = time.monotonic() + 10
        while lock.path.stat().st_mtime < old + 500 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert lock.path.stat().st_mtime > old + 500
    finally:
        lock.release()


def test_a_half_written_lock_is_in_use_until_it_is_old(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_NAME).write_text("")  # created, not yet written
    with pytest.raises(RunDirInUse, match="starting now"):
        RunLock(run).acquire()
    old = time.time() - 60
    os.utime(run / LOCK_NAME, (old, old))
    with RunLock(run) as lock:
        assert "unreadable" in lock.replaced


# -- train_worker -----------------------------------------------------------------------------------------------
def test_a_stale_lock_is_taken_over_with_a_warning_and_released_at_the_end(tmp_path):
    config, task_class = make_config(tmp_path, *BASE, "--training-max-steps", "3")
    run = Path(config.logging.log_dir)
    dead = _dead_pid()
    _write_lock(run, LockHolder(dead, socket.gethostname(), time.time() - 3600))
    train_worker(0, 1, config, task_class)
    log = (run / "train.log").read_text()
    assert f"took over the lock of {run} held by pid {dead}" in log and f"pid {dead} is not running" in log
    assert not (run / LOCK_NAME).exists()
    assert (run / "model.safetensors").exists()


def test_the_lock_is_released_when_the_run_fails(tmp_path, monkeypatch):
    (tmp_path / "lockplugin.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    config, task_class = make_config(tmp_path, "--training-callbacks", "MetricsLogger", "lockplugin:FailAt2",
                                     "--training-max-steps", "5")
    with pytest.raises(RuntimeError, match="boom at step 2"):
        train_worker(0, 1, config, task_class)
    assert not (Path(config.logging.log_dir) / LOCK_NAME).exists()
    # A user error of set-up (the data cannot fill one batch) comes before the lock and the run directory.
    config, task_class = make_config(tmp_path, *BASE, "--training-batch-size", "1000", "--logging-log-dir",
                                     str(tmp_path / "run2"))
    with pytest.raises(UserError, match="training.batch_size"):
        train_worker(0, 1, config, task_class)
    assert not (tmp_path / "run2").exists()


@pytest.mark.slow  # two real training processes, one paused until the other has been refused
def test_a_second_run_on_a_live_run_dir_exits_2_and_leaves_the_first_alone(tmp_path):
    """Run A pauses at step 2 holding the lock; run B on the same directory is refused (exit 2, one line naming
    A's pid) and writes nothing; A then gets SIGTERM, saves, stops cleanly and releases the lock."""
    (tmp_path / "lockplugin.py").write_text(PLUGIN)
    paused, go_on, run = tmp_path / "paused", tmp_path / "go-on", tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{tmp_path}", "OMP_NUM_THREADS": "1",
           "PAUSED_MARKER": str(paused), "GO_ON_MARKER": str(go_on)}
    first_args = [*TINY_REGRESSION, "--training-callbacks", "MetricsLogger", "lockplugin:PauseAt2",
                  "--training-max-steps", "50", "--logging-log-dir", str(run)]
    first = subprocess.Popen([sys.executable, "-m", "llm.training.train", *first_args], cwd=tmp_path, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not paused.exists():
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline, "the first run never reached step 2"
            time.sleep(0.05)
        before = _snapshot(run)
        assert json.loads(before[LOCK_NAME])["pid"] == first.pid
        second = subprocess.run([sys.executable, "-m", "llm.training.train", *TINY_REGRESSION, *BASE,
                                 "--logging-log-dir", str(run)], cwd=tmp_path, env=env, capture_output=True,
                                text=True, timeout=120)
        assert second.returncode == 2, second.stderr
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: logging.log_dir: {run} is in use by pid {first.pid} "
                                                       f"on host {socket.gethostname()} (started "), second.stderr
        assert lines[0].endswith("; wait for it, or pick another --logging-log-dir")
        assert _snapshot(run) == before  # config.yaml, logs and lock of the first run untouched
        first.send_signal(signal.SIGTERM)
        go_on.touch()
        _, stderr = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 0, stderr
    assert "received SIGTERM" in stderr and "Traceback" not in stderr
    assert not (run / LOCK_NAME).exists()
    assert max(m["step"] for m in read_metrics(run)) < 50  # it stopped on the signal
