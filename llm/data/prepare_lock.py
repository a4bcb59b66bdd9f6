"""One preparation per slice of an output directory: the lock file `OUT/.prepare-IIIII.lock`.

Two preparations of one slice into one directory would write the same shard names and each remove the other's
temporary files. So `prepare` takes this lock before it touches the directory, and a second preparation exits
with one line naming the directory and the holder. Slices have separate locks: N machines preparing N slices into
one shared directory is the intended use. The lock is deleted when the preparation ends, fails or is interrupted.

The mechanism (the record, what makes a lock stale, the heartbeat, the take-over) is `llm.pidlock`'s, shared with
the run directory's lock; this module gives it the slice's path, `PrepareInUse` and its messages. One policy is
its own: a young record that is a whole JSON object with wrong values is taken over at once as malformed (only a
record that is not one may still be being written), where the run lock waits for any young unreadable record.
"""

from __future__ import annotations

import os
from pathlib import Path

from llm import fs
from llm.errors import ConfigError
from llm.pidlock import LockHolder, LockRecord, PidLock


class PrepareInUse(ConfigError):
    """Another live preparation holds this slice of the directory (one line, exit status 2)."""


def lock_name(slice_index: int) -> str:
    return f".prepare-{slice_index:05d}.lock"


class PrepareLock(PidLock):
    """The lock of one slice of an output directory; a context manager. `replaced` is a line about a stale lock
    that was taken over, for the caller to log."""

    error = PrepareInUse
    thread_name = "prepare-lock-heartbeat"

    def __init__(self, directory: str | os.PathLike, slice_index: int) -> None:
        self.directory = Path(directory)
        super().__init__(self.directory / lock_name(slice_index))

    def __enter__(self) -> PrepareLock:
        self.acquire()
        return self

    def describe(self, holder: LockHolder) -> str:
        return holder.describe(quote_host=True)

    def in_use(self, holder: LockHolder) -> str:
        return (f"OUT: {str(self.directory)!r} is being prepared by {self.describe(holder)} ({self.path.name}); "
                "wait for it to finish, or prepare into another directory")

    def starting_now(self) -> str:
        return (f"OUT: {str(self.directory)!r} is in use by a preparation that is starting now ({self.path.name}); "
                "wait for it")

    def keeps_changing(self) -> str:
        return f"OUT: {str(self.directory)!r} is being prepared ({self.path.name} keeps changing)"

    def cannot_create(self, exc: OSError) -> str:
        return f"OUT: {fs.write_failure(exc, self.directory)}"

    def not_a_lock(self, why: str, foreign: bool) -> str:
        return f"OUT: its lock {str(self.path)!r} {why}" + (
            ", not a lock file a preparation writes; remove it if no preparation is using the directory"
            if foreign else "")

    def may_be_half_written(self, record: LockRecord) -> bool:
        return not record.whole

    def unreadable(self, record: LockRecord) -> str:
        return f"its record is {'malformed' if record.whole else 'unreadable'} ({record.why})"

    def took_over(self, holder: LockHolder | None, reason: str) -> str:
        return f"took over the stale lock {self.path} ({reason})"
