"""One run per run directory: the lock file `RUN_DIR/.lock` that rank 0 holds for the whole run.

Two runs on one `--logging-log-dir` would resume each other's checkpoints, delete each other's temp directories
and pair one run's config with the other's weights. So `train_worker` takes this lock on rank 0 before it writes
anything into the directory, and a second run exits with one line naming the holder. The lock is released when the
run ends, fails or stops on SIGTERM; one left by a run that died is taken over with a warning.

The mechanism (the record, what makes a lock stale, the heartbeat, the take-over) is `llm.pidlock`'s, shared with
the data preparation's lock; this module gives it the run directory's path, `RunDirInUse` and its messages.
"""

from __future__ import annotations

import os
from pathlib import Path

from llm.errors import ConfigError
from llm.pidlock import (
    HEARTBEAT_SECONDS,
    MAX_PID,
    STALE_AFTER_SECONDS,
    LockHolder,
    LockRecord,
    PidLock,
    stale_reason,
)
from llm.pidlock import live_holder as _live_holder

LOCK_NAME = ".lock"


class RunDirInUse(ConfigError):
    """The run directory is locked by another live run (one line, exit status 2)."""


def live_holder(run_dir: str | os.PathLike) -> LockHolder | None:
    """The live holder of `run_dir`'s lock other than this process, if any (for code that must not touch a
    directory another run is using)."""
    return _live_holder(Path(run_dir) / LOCK_NAME)


class RunLock(PidLock):
    """The lock of one run directory; `acquire` / `release`, or use it as a context manager.

    After `acquire`, `replaced` holds a line describing the stale lock that was taken over (None if there was
    none), for the caller to log once its logging is set up.
    """

    error = RunDirInUse
    thread_name = "run-lock-heartbeat"

    def __init__(self, run_dir: str | os.PathLike, heartbeat_seconds: float = HEARTBEAT_SECONDS) -> None:
        self.run_dir = Path(run_dir)
        super().__init__(self.run_dir / LOCK_NAME, heartbeat_seconds)

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def acquire(self) -> None:
        """Create the run directory if needed and take its lock; raise `RunDirInUse` when a live run holds it."""
        if self.held:
            return
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"logging.log_dir: cannot create {self.run_dir}: {exc.strerror or exc}") from None
        super().acquire()

    def in_use(self, holder: LockHolder) -> str:
        return (f"logging.log_dir: {self.run_dir} is in use by {self.describe(holder)}; wait for it, or pick another "
                "--logging-log-dir")

    def starting_now(self) -> str:
        return (f"logging.log_dir: {self.run_dir} is in use by a run that is starting now; wait for it, or pick "
                "another --logging-log-dir")

    def keeps_changing(self) -> str:
        return (f"logging.log_dir: {self.run_dir} is locked ({self.path}) and the lock keeps changing; another run is "
                "starting there")

    def cannot_create(self, exc: OSError) -> str:
        return f"logging.log_dir: cannot create {self.path}: {exc.strerror or exc}"

    def not_a_lock(self, why: str, foreign: bool) -> str:
        return f"logging.log_dir: its lock {str(self.path)!r} {why}" + (
            ", not a lock file a run writes; remove it if no run is using the directory" if foreign else "")

    def unreadable(self, record: LockRecord) -> str:
        return f"its lock file is unreadable ({record.why})"

    def took_over(self, holder: LockHolder | None, reason: str) -> str:
        who = self.describe(holder) if holder is not None else "an unknown process"
        return f"took over the lock of {self.run_dir} held by {who}: {reason}"


__all__ = ["HEARTBEAT_SECONDS", "LOCK_NAME", "MAX_PID", "STALE_AFTER_SECONDS", "LockHolder", "RunDirInUse", "RunLock",
           "live_holder", "stale_reason"]
