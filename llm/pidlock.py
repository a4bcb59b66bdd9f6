"""A lock that names the live process holding it: the one mechanism under the run directory's lock
(`llm.artifacts.lock.RunLock`) and a prepared slice's lock (`llm.data.prepare_lock.PrepareLock`).

It sits in the base layer so that both can use it (the data layer may not import `llm.artifacts`). The users give
it a path, the error class for "held by someone else" and the wording of their one-line messages; the rule is here:

The lock is a file created with `O_CREAT | O_EXCL` (atomic on local file systems and on NFSv3+), holding one line
of JSON: the holder's pid, host name, start time and, on Linux, the boot id and the process's start time in clock
ticks. It is released (deleted, if it still holds our record) when the holder is done. A lock left behind by a
process that died without releasing it (kill -9, power loss) is *stale* and is taken over. Stale means:

- same host: the pid is not running (or is a zombie), the machine rebooted since (boot id differs), the pid now
  belongs to another process (its start time differs from the recorded one: pids are reused), or the pid is ours
  but this process does not hold the lock (a container restart gave an earlier process's pid to this one);
- another host (a shared file system): the pid cannot be checked from here, so the holder refreshes the file's
  modification time every `HEARTBEAT_SECONDS` (30 s) and the lock is stale once it has not been refreshed for
  `STALE_AFTER_SECONDS` (10 minutes; this also absorbs clock skew between the hosts of a few minutes).

A record is read as untrusted input (`llm.untrusted`): a lock that is not a regular file or is larger than any
record is an error, never opened for reading or removed; a record whose values are not what `LockHolder.to_json`
writes is unreadable, never half-believed. An unreadable record younger than `_WRITE_GRACE_SECONDS` may be one its
writer is writing now, so it is refused rather than taken over. A take-over moves the file aside and checks that
it is still the record judged stale, so two processes taking over one lock cannot both win.
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


def boot_id() -> str | None:
    """This machine's boot id (Linux), None where there is none."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def proc_start(pid: int) -> int | None:
    """The start time of process `pid` in clock ticks since boot (Linux), None where /proc cannot tell."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # the command name in (...) may hold spaces
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


@dataclass(frozen=True)
class LockHolder:
    """Who holds a lock, as recorded in its file."""

    pid: int
    host: str
    started: float  # time.time() when it was taken
    boot_id: str | None = None
    proc_start: int | None = None

    @classmethod
    def this_process(cls) -> LockHolder:
        return cls(os.getpid(), socket.gethostname(), time.time(), boot_id(), proc_start(os.getpid()))

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
            data = untrusted.parse_json(raw, "lock file")
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
        boot = field("boot_id", lambda v: isinstance(v, str) and len(v) <= 255, "a boot id", optional=True)
        start = field("proc_start", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
                      "a process start time in clock ticks", optional=True)
        return cls(pid, host, float(started), boot, start)

    def describe(self, quote_host: bool = False) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return f"pid {self.pid} on host {show(self.host) if quote_host else self.host} (started {started})"


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
    boot = boot_id()
    if holder.boot_id and boot and holder.boot_id != boot:
        return "the machine has rebooted since"
    if holder.pid == os.getpid():
        return None if path.resolve() in _HELD else "it names this process's pid but was left by an earlier one"
    if not pid_running(holder.pid):
        return f"pid {holder.pid} is not running"
    start = proc_start(holder.pid)
    if holder.proc_start is not None and start is not None and start != holder.proc_start:
        return f"pid {holder.pid} now belongs to another process"
    return None


@dataclass(frozen=True)
class LockRecord:
    """A lock file as read: its bytes, its holder (None when the bytes are no valid record) and, then, why not."""

    raw: bytes
    holder: LockHolder | None
    why: str = ""

    @property
    def whole(self) -> bool:
        """Whether the bytes are a complete JSON object, however wrong its values: a writer caught mid-write has
        written a prefix of its one-line record, and no prefix of it is one."""
        try:
            return isinstance(json.loads(self.raw.decode("utf-8")), dict)
        except (ValueError, RecursionError):
            return False


def read_lock(path: Path) -> LockRecord:
    """The lock file at `path`; `FileNotFoundError` when there is none. A lock that is not a regular file (a FIFO:
    reading it would block forever), is larger than any record or cannot be read is an `UntrustedFileError`."""
    try:
        raw = untrusted.read_capped(path, MAX_LOCK_BYTES)
    except untrusted.UntrustedFileError as exc:
        if _unreadable_file(exc) and not os.path.lexists(path):
            raise FileNotFoundError(path) from None
        raise
    try:
        return LockRecord(raw, LockHolder.from_json(raw))
    except ValueError as exc:
        return LockRecord(raw, None, str(exc))


def _unreadable_file(exc: untrusted.UntrustedFileError) -> bool:
    """Whether `read_capped` failed to open or read the file (rather than refusing what it found)."""
    return exc.why.startswith("cannot be read")


def live_holder(path: Path) -> LockHolder | None:
    """The live holder of the lock at `path` other than this process, if any."""
    try:
        holder = read_lock(path).holder
    except (OSError, untrusted.UntrustedFileError):
        return None
    if holder is None or stale_reason(holder, path) is not None:
        return None
    return None if holder.pid == os.getpid() and holder.host == socket.gethostname() else holder


class LockInUse(ConfigError):
    """A lock is held by another live process (one line, exit status 2)."""


class PidLock:
    """The lock file `path`; `acquire` / `release`, or use it as a context manager.

    After `acquire`, `replaced` holds a line describing the stale lock that was taken over (None if there was
    none), for the caller to log. A user sets `error` (raised when the lock is held or is no lock file) and
    overrides the message methods below for its own wording; each returns one line.
    """

    error: type[ConfigError] = LockInUse
    thread_name = "pid-lock-heartbeat"

    def __init__(self, path: str | os.PathLike, heartbeat_seconds: float = HEARTBEAT_SECONDS) -> None:
        self.path = Path(path)
        self.heartbeat_seconds = heartbeat_seconds
        self.replaced: str | None = None
        self._record: bytes | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PidLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    @property
    def held(self) -> bool:
        return self._record is not None

    # -- the wording (one line each) and the one policy that differs between users ------------------------------
    def describe(self, holder: LockHolder) -> str:
        return holder.describe()

    def in_use(self, holder: LockHolder) -> str:
        return f"{self.path} is held by {self.describe(holder)}"

    def starting_now(self) -> str:
        return f"{self.path} is being written by a process that is taking it now"

    def keeps_changing(self) -> str:
        return f"{self.path} keeps changing: another process is taking it"

    def cannot_create(self, exc: OSError) -> str:
        return f"cannot create {self.path}: {exc.strerror or exc}"

    def not_a_lock(self, why: str, foreign: bool) -> str:
        """`why` the lock file cannot be read; `foreign`: it is something no holder writes (not a regular file,
        too large), as opposed to a file this process may not open."""
        return f"the lock {str(self.path)!r} {why}" + (", not a lock file; remove it if no process holds it"
                                                       if foreign else "")

    def unreadable(self, record: LockRecord) -> str:
        """Why an unreadable record is taken over (it is old, or not one a writer may still be writing)."""
        return f"its record is unreadable ({record.why})"

    def took_over(self, holder: LockHolder | None, reason: str) -> str:
        who = self.describe(holder) if holder is not None else "an unknown process"
        return f"took over the lock {self.path} held by {who}: {reason}"

    def may_be_half_written(self, record: LockRecord) -> bool:
        """Whether a young unreadable `record` may be one its writer is writing now (then it is refused)."""
        return True

    # -- the mechanism ------------------------------------------------------------------------------------------
    def acquire(self) -> None:
        """Take the lock: `error` when a live process holds it, `ConfigError` when it cannot be written."""
        if self.held:
            return
        record = LockHolder.this_process().to_json().encode()
        for _ in range(5):  # each round either takes the lock, refuses, or removes one stale lock
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._clear_stale()
                continue
            except OSError as exc:
                raise ConfigError(self.cannot_create(exc)) from None
            try:
                try:
                    os.write(fd, record)
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError as exc:  # a full disk: an empty lock left here would block the next taker for a while
                self.path.unlink(missing_ok=True)
                raise ConfigError(self.cannot_create(exc)) from None
            self._record = record
            _HELD.add(self.path.resolve())
            self._start_heartbeat()
            return
        raise self.error(self.keeps_changing())

    def _clear_stale(self) -> None:
        """Remove the existing lock file if it is stale; raise `error` if its holder is alive."""
        try:
            record = read_lock(self.path)
            mtime = self.path.stat().st_mtime
        except FileNotFoundError:
            return  # released meanwhile: try again
        except untrusted.UntrustedFileError as exc:
            raise self.error(self.not_a_lock(exc.why, foreign=not _unreadable_file(exc))) from None
        if record.holder is None:
            if time.time() - mtime < _WRITE_GRACE_SECONDS and self.may_be_half_written(record):
                raise self.error(self.starting_now())
            reason = self.unreadable(record)
        else:
            reason = stale_reason(record.holder, self.path)
            if reason is None:
                raise self.error(self.in_use(record.holder))
        # Take it over atomically: move it aside, then check it is still the record judged stale (another process
        # may have taken it over and written its own in between; that one goes back).
        aside = self.path.with_name(f"{self.path.name}.stale-{os.getpid()}-{threading.get_ident()}")
        try:
            os.replace(self.path, aside)
        except FileNotFoundError:
            return
        try:
            if aside.read_bytes() != record.raw:
                with contextlib.suppress(FileExistsError):
                    os.link(aside, self.path)  # never replaces a lock created meanwhile
                return
            self.replaced = self.took_over(record.holder, reason)
        finally:
            aside.unlink(missing_ok=True)

    def _start_heartbeat(self) -> None:
        # The mtime is what a host that cannot see our pid judges staleness by.
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name=self.thread_name, daemon=True)
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
