"""One preparation per slice of an output directory: the lock file `OUT/.prepare-IIIII.lock`.

Two preparations of one slice into one directory would write the same shard names and each remove the other's
temporary files. So `prepare` takes this lock before it touches the directory, and a second preparation exits
with one line naming the directory and the holder. Slices have separate locks: N machines preparing N slices into
one shared directory is the intended use.

The lock is a file created with `O_CREAT | O_EXCL` (atomic on local file systems and NFSv3+) holding the holder's
host, pid and (Linux) process start time; it is deleted when the preparation ends, fails or is interrupted. A lock
whose holder died without deleting it is stale and taken over: on the same host, when the pid is gone or now
belongs to another process (its start time differs); from another host, whose pid means nothing here, when its
modification time (which the holder refreshes every `HEARTBEAT_S`) is older than `STALE_AFTER_S`. This is the run
lock's rule (`llm.artifacts.lock`), which the data layer may not import; the record is smaller.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

from llm import fs
from llm.errors import ConfigError, show

HEARTBEAT_S = 30.0
STALE_AFTER_S = 600.0
_WRITE_GRACE_S = 10.0  # a lock file younger than this that cannot be read is being written now
_HELD: set[Path] = set()  # lock files this process holds (a record naming our pid that is not one was left by a
#                           process before a container restart reused the pid)


class PrepareInUse(ConfigError):
    """Another live preparation holds this slice of the directory (one line, exit status 2)."""


def lock_name(slice_index: int) -> str:
    return f".prepare-{slice_index:05d}.lock"


def _proc_start(pid: int) -> int | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
        return int(text[text.rindex(")") + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _describe(record: dict[str, Any]) -> str:
    started = record.get("started")
    when = time.strftime(" (started %Y-%m-%d %H:%M:%S)", time.localtime(started)) \
        if isinstance(started, (int, float)) and 0 < started < 1e11 else ""
    return f"pid {show(record.get('pid'))} on host {show(record.get('host'))}{when}"


def _stale_reason(record: dict[str, Any], path: Path) -> str | None:
    """Why the lock recorded in `path` is stale, or None while its holder may be running."""
    pid, host = record.get("pid"), record.get("host")
    if type(pid) is not int or not isinstance(host, str) or not 1 <= pid < 1 << 31:
        return "its record is malformed"
    if host != socket.gethostname():
        age = time.time() - path.stat().st_mtime
        return f"not refreshed for {age / 60:.0f} minutes" if age > STALE_AFTER_S else None
    if pid == os.getpid():
        return None if path.resolve() in _HELD else "it names this process's pid but was left by an earlier one"
    if not fs.pid_running(pid):
        return f"pid {pid} is not running"
    start = record.get("proc_start")
    if start is not None and _proc_start(pid) not in (None, start):
        return f"pid {pid} now belongs to another process"
    return None


class PrepareLock:
    """The lock of one slice of an output directory; a context manager."""

    def __init__(self, directory: str | os.PathLike, slice_index: int) -> None:
        self.directory = Path(directory)
        self.path = self.directory / lock_name(slice_index)
        self.replaced: str | None = None  # a line about a stale lock that was taken over, for the caller to log
        self._record: bytes | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PrepareLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lock; `PrepareInUse` when a live preparation holds it, `ConfigError` when it cannot be written."""
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                             "proc_start": _proc_start(os.getpid())}).encode()
        for _ in range(5):  # each round takes the lock, refuses, or removes one stale lock
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._clear_stale()
                continue
            except OSError as exc:
                raise ConfigError(f"OUT: {fs.write_failure(exc, self.directory)}") from None
            try:
                os.write(fd, record)
            except OSError as exc:
                os.close(fd)
                self.path.unlink(missing_ok=True)
                raise ConfigError(f"OUT: {fs.write_failure(exc, self.directory)}") from None
            os.close(fd)
            self._record = record
            _HELD.add(self.path.resolve())
            self._stop.clear()
            self._thread = threading.Thread(target=self._beat, name="prepare-lock-heartbeat", daemon=True)
            self._thread.start()
            return
        raise PrepareInUse(f"OUT: {str(self.directory)!r} is being prepared ({self.path.name} keeps changing)")

    def _clear_stale(self) -> None:
        try:
            raw = self.path.read_bytes()
            mtime = self.path.stat().st_mtime
        except FileNotFoundError:
            return  # released meanwhile: try again
        try:
            record = json.loads(raw.decode("utf-8"))
            record = record if isinstance(record, dict) else {}
        except (UnicodeDecodeError, ValueError, RecursionError):
            record = {}
        if not record and time.time() - mtime < _WRITE_GRACE_S:
            raise PrepareInUse(f"OUT: {str(self.directory)!r} is in use by a preparation that is starting now "
                               f"({self.path.name}); wait for it")
        reason = _stale_reason(record, self.path) if record else "its record is unreadable"
        if reason is None:
            raise PrepareInUse(f"OUT: {str(self.directory)!r} is being prepared by {_describe(record)} "
                               f"({self.path.name}); wait for it to finish, or prepare into another directory")
        aside = self.path.with_name(f"{self.path.name}.stale-{os.getpid()}-{threading.get_ident()}")
        try:
            os.replace(self.path, aside)
        except FileNotFoundError:
            return
        try:
            if aside.read_bytes() != raw:  # another preparation took it over meanwhile: put its lock back
                with contextlib.suppress(FileExistsError):
                    os.link(aside, self.path)
                return
            self.replaced = f"took over the stale lock {self.path} ({reason})"
        finally:
            aside.unlink(missing_ok=True)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def release(self) -> None:
        """Delete the lock file if it is still ours (idempotent)."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        if self._record is None:
            return
        try:
            if self.path.read_bytes() == self._record:
                self.path.unlink()
        except OSError:
            pass
        finally:
            _HELD.discard(self.path.resolve())
            self._record = None
