"""One run per run directory: the lock file `RUN_DIR/.lock` that rank 0 holds for the whole run.

Two runs on one `--logging-log-dir` would resume each other's checkpoints, delete each other's temp directories
and pair one run's config with the other's weights. So `train_worker` takes this lock on rank 0 before it writes
anything into the directory, and a second run exits with one line naming the holder.

The lock is a file created with `O_CREAT | O_EXCL` (atomic on local file systems and on NFSv3+), holding JSON:
the holder's pid, host name, start time and, on Linux, the boot id and the process's start time in clock ticks.
It is released (deleted) when the run ends, fails or stops on SIGTERM. A lock left behind by a process that died
without releasing it (kill -9, power loss) is *stale* and is taken over with a warning. Stale means:

- same host: the pid is not running (or is a zombie), the machine rebooted since (boot id differs), or the pid
  now belongs to another process (its start time differs from the recorded one: pids are reused);
- another host (a shared file system): the pid cannot be checked from here, so the holder refreshes the file's
  modification time every `HEARTBEAT_SECONDS` (30 s) and the lock is stale once it has not been refreshed for
  `STALE_AFTER_SECONDS` (10 minutes; this also absorbs clock skew between the hosts of a few minutes).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llm import untrusted
from llm.errors import ConfigError, show
from llm.fs import pid_running

LOCK_NAME = ".lock"
MAX_LOCK_BYTES = 64 * 2**10  # a lock record is about 150 bytes
MAX_PID = 2**22  # Linux's largest pid_max
MAX_TIME = 2**40  # seconds since 1970: far beyond any clock, and what time.localtime can print
HEARTBEAT_SECONDS = 30.0
STALE_AFTER_SECONDS = 600.0
# A lock file is written right after it is created: an unreadable one younger than this is being written now.
_WRITE_GRACE_SECONDS = 10.0

# Lock files this process holds (resolved paths): a record naming our own pid that is not one of these was left
# by an earlier process that had the same pid (a restarted container), so it is stale.
_HELD: set[Path] = set()


class RunDirInUse(ConfigError):
    """The run directory is locked by another live run (one line, exit status 2)."""


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks since boot) of a Linux process, None where /proc cannot tell."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # the command name in (...) may hold spaces
    try:
        return fields[0], int(fields[19])
    except (IndexError, ValueError):
        return None


@dataclass(frozen=True)
class LockHolder:
    """Who holds a run directory's lock, as recorded in its `.lock` file."""

    pid: int
    host: str
    started: float  # time.time() when it was taken
    boot_id: str | None = None
    proc_start: int | None = None

    @classmethod
    def this_process(cls) -> LockHolder:
        stat = _proc_stat(os.getpid())
        return cls(os.getpid(), socket.gethostname(), time.time(), _boot_id(), stat[1] if stat else None)

    def to_json(self) -> str:
        return json.dumps({"pid": self.pid, "host": self.host, "started": self.started, "boot_id": self.boot_id,
                           "proc_start": self.proc_start}) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes) -> LockHolder:
        """The holder a lock file records; a `ValueError` naming the field when a value is not what `to_json` writes
        (a lock file is anyone's to edit: a pid of 0 or -1 would make `kill(pid, 0)` ask about a process group, a
        float would be truncated to another process's pid, a NaN time would fail only when it is printed)."""
        raw = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
        try:
            data = untrusted.parse_json(raw, LOCK_NAME)
        except untrusted.UntrustedFileError as exc:
            raise ValueError(exc.why) from None
        if not isinstance(data, dict):
            raise ValueError(f"holds a JSON {type(data).__name__}, not an object")

        def field(name: str, ok: Any, valid: str, optional: bool = False) -> Any:
            value = data.get(name)
            if (value is None and not optional) or (value is not None and not ok(value)):
                raise ValueError(f"its {name} is {show(value)}, not {valid}")
            return value

        def count(value: Any) -> bool:
            return isinstance(value, int) and not isinstance(value, bool) and 0 < value <= MAX_PID

        pid = field("pid", count, f"a process id (an integer in [1, {MAX_PID}])")
        host = field("host", lambda v: isinstance(v, str) and 0 < len(v) <= 255, "a host name")
        started = field("started", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
                        and 0 <= v <= MAX_TIME, "a time in seconds since 1970")
        boot_id = field("boot_id", lambda v: isinstance(v, str) and len(v) <= 255, "a boot id", optional=True)
        proc_start = field("proc_start", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
                           "a process start time in clock ticks", optional=True)
        return cls(pid, host, float(started), boot_id, proc_start)

    def describe(self) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return f"pid {self.pid} on host {self.host} (started {started})"


def stale_reason(holder: LockHolder, path: Path, now: float | None = None) -> str | None:
    """Why the lock `holder` recorded in `path` is stale, or None when its holder may still be running."""
    if holder.host != socket.gethostname():
        try:
            age = (time.time() if now is None else now) - path.stat().st_mtime
        except FileNotFoundError:
            return "it was released"
        if age > STALE_AFTER_SECONDS:
            return f"not refreshed for {age / 60:.0f} minutes (the holder refreshes it every {HEARTBEAT_SECONDS:.0f} s)"
        return None
    boot = _boot_id()
    if holder.boot_id and boot and holder.boot_id != boot:
        return "the machine has rebooted since"
    if holder.pid == os.getpid():
        return None if path.resolve() in _HELD else "it names this process's pid but was left by an earlier one"
    if not pid_running(holder.pid):
        return f"pid {holder.pid} is not running"
    stat = _proc_stat(holder.pid)
    if holder.proc_start is not None and stat is not None and stat[1] != holder.proc_start:
        return f"pid {holder.pid} now belongs to another process"
    return None


def _read(path: Path) -> tuple[bytes, LockHolder | None, str]:
    """The raw bytes of the lock file, its holder (None: unreadable, e.g. being written right now) and, for an
    unreadable one, why. A lock that is not a regular file (a FIFO: reading it would block forever) or is larger
    than any lock is a `RunDirInUse` error: it is no lock a run wrote, and it is not this framework's to remove."""
    try:
        raw = untrusted.read_capped(path, MAX_LOCK_BYTES)
    except untrusted.UntrustedFileError as exc:
        if exc.why.startswith("cannot be read"):
            if not os.path.lexists(path):
                raise FileNotFoundError(path) from None
            raise RunDirInUse(f"logging.log_dir: its lock {str(path)!r} {exc.why}") from None
        raise RunDirInUse(f"logging.log_dir: its lock {str(path)!r} {exc.why}, not a lock file a run writes; "
                          "remove it if no run is using the directory") from None
    try:
        return raw, LockHolder.from_json(raw), ""
    except ValueError as exc:
        return raw, None, str(exc)


def live_holder(run_dir: str | os.PathLike) -> LockHolder | None:
    """The live holder of `run_dir`'s lock other than this process, if any (for code that must not touch a
    directory another run is using)."""
    path = Path(run_dir) / LOCK_NAME
    try:
        _, holder, _ = _read(path)
    except (OSError, RunDirInUse):
        return None
    if holder is None or stale_reason(holder, path) is not None:
        return None
    return None if holder.pid == os.getpid() and holder.host == socket.gethostname() else holder


class RunLock:
    """The lock of one run directory; `acquire` / `release`, or use it as a context manager.

    After `acquire`, `replaced` holds a line describing the stale lock that was taken over (None if there was
    none), for the caller to log once its logging is set up.
    """

    def __init__(self, run_dir: str | os.PathLike, heartbeat_seconds: float = HEARTBEAT_SECONDS) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.heartbeat_seconds = heartbeat_seconds
        self.replaced: str | None = None
        self._record: bytes | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    @property
    def held(self) -> bool:
        return self._record is not None

    def acquire(self) -> None:
        """Create the run directory if needed and take its lock; raise `RunDirInUse` when a live run holds it."""
        if self.held:
            return
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"logging.log_dir: cannot create {self.run_dir}: {exc.strerror or exc}") from None
        record = LockHolder.this_process().to_json().encode()
        for _ in range(5):  # each round either takes the lock, refuses, or removes one stale lock
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._clear_stale()
                continue
            except OSError as exc:
                raise ConfigError(f"logging.log_dir: cannot create {self.path}: {exc.strerror or exc}") from None
            try:
                os.write(fd, record)
                os.fsync(fd)
            finally:
                os.close(fd)
            self._record = record
            _HELD.add(self.path.resolve())
            self._start_heartbeat()
            return
        raise RunDirInUse(f"logging.log_dir: {self.run_dir} is locked ({self.path}) and the lock keeps changing; "
                          "another run is starting there")

    def _clear_stale(self) -> None:
        """Remove the existing lock file if it is stale; raise `RunDirInUse` if its holder is alive."""
        try:
            raw, holder, unreadable = _read(self.path)
            mtime = self.path.stat().st_mtime
        except FileNotFoundError:
            return  # released meanwhile: try again
        if holder is None:
            if time.time() - mtime < _WRITE_GRACE_SECONDS:
                raise RunDirInUse(f"logging.log_dir: {self.run_dir} is in use by a run that is starting now; wait "
                                  "for it, or pick another --logging-log-dir")
            reason, who = f"its lock file is unreadable ({unreadable})", "an unknown process"
        else:
            reason, who = stale_reason(holder, self.path), holder.describe()
            if reason is None:
                raise RunDirInUse(f"logging.log_dir: {self.run_dir} is in use by {holder.describe()}; wait for it, "
                                  "or pick another --logging-log-dir")
        # Take it over atomically: move it aside, then check it is still the record judged stale (another run
        # may have taken it over and written its own in between; that one goes back).
        aside = self.path.with_name(f"{LOCK_NAME}.stale-{os.getpid()}-{threading.get_ident()}")
        try:
            os.replace(self.path, aside)
        except FileNotFoundError:
            return
        try:
            if aside.read_bytes() != raw:
                with contextlib.suppress(FileExistsError):
                    os.link(aside, self.path)  # never replaces a lock created meanwhile
                return
            self.replaced = f"took over the lock of {self.run_dir} held by {who}: {reason}"
        finally:
            aside.unlink(missing_ok=True)

    def _start_heartbeat(self) -> None:
        # The mtime is what a host that cannot see our pid judges staleness by.
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_seconds):
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
            pass  # gone already (removed by hand, or the directory with it)
        finally:
            _HELD.discard(self.path.resolve())
            self._record = None
