"""Files on disk, one rule for the whole package: atomic writes, leftover temp files, and failed writes in one line.

Atomic write (`atomic_path`, `atomic_write`, `publish`): the bytes go to a temp name beside the target (same
directory, so the rename cannot cross file systems), the file is fsynced, renamed over the target, and the directory
is fsynced so the rename itself survives a power cut. A reader sees the old content or the new, never a mix; a
failed write removes its temp file and leaves the target as it was. Files get the mode an ordinary `open()` gives
(0666 minus the umask): safetensors creates its files 0600, which would hide a run's weights from a team sharing a
machine. `replace_dir` does the same for a directory written in full under a temp name (a checkpoint, an export):
on Linux the two directories are exchanged in one `renameat2(RENAME_EXCHANGE)`, so the target is the old directory
or the new one at every instant; where the file system cannot exchange, the old one is renamed aside first, and a
crash between the two renames is undone by `recover_replaced_dir` (the old directory comes back).

Writes never go through a symbolic link planted at a temp name: a leftover `<name>.tmp` is removed (the link, not
what it points to) before the temp file is created, and the rename replaces a link at the target itself, never the
file it points to. `open_append` opens a log file for appending without following a link (`O_NOFOLLOW`).
`dir_lock` serialises the final step of writers that replace the same directory (two exports into one folder).

The token-cache writers pass `durable=False`: they keep the temp-then-rename (a killed process leaves nothing that
looks complete) but skip the fsyncs, which would cost the byte path most of its throughput; a cache lost to a power
cut fails its size checks and is rebuilt.

Leftover temp files (`is_abandoned`): see the rule's comment there.

Failed writes (`write_errno`, `write_failure_reason`, `write_failure`, `is_write_error`): the writers report a full
disk, a permission error or a read-only file system in different shapes (an OSError; torch.save's RuntimeError
with the OSError as its context; safetensors' Rust error with "(os error 28)" in its text); these find the
operating system's error in any of them and say it in one line, e.g. "cannot write PATH: No space left on device".

This is the base layer: it imports nothing from the package but `llm.errors`.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import json
import os
import re
import shutil
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TMP_SUFFIX = ".tmp"  # the default temp name of a target: `<name>.tmp` beside it
OWNER_FILE = "owner.json"  # inside a temp directory: the host and pid writing it (`write_owner`)
STALE_AFTER_S = 24 * 3600  # a temp whose writer cannot be checked from here is abandoned once unchanged this long
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")  # how safetensors (Rust's std::io::Error) names the errno

PathLike = str | os.PathLike


# -------------------------------------------------------------------------------------------- modes and fsync
def umask() -> int:
    """This process's umask, read without changing it where the OS allows."""
    try:  # Linux reports it without changing it (os.umask can only read by setting, racing other threads)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def make_readable(path: PathLike) -> None:
    """Give a file the mode an ordinary `open()` would (0666 minus the umask, e.g. 0644)."""
    os.chmod(path, 0o666 & ~umask())


def fsync_file(path: PathLike) -> None:
    """Flush a file's data to the disk (for files written by a library that does not fsync)."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: PathLike) -> None:
    """Make a rename or a new entry in `path` durable (a no-op where directories cannot be opened or fsynced)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_durable(path: PathLike, data: bytes | memoryview) -> None:
    """Write `data` to `path` and fsync it, in place (not atomic): for files inside a temp directory that
    `replace_dir` commits as a whole."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


# --------------------------------------------------------------------------------------------- atomic writes
def temp_path(path: PathLike) -> Path:
    """The default temp name of `path`: `<name>.tmp` beside it."""
    path = Path(path)
    return path.with_name(path.name + TMP_SUFFIX)


def publish(tmp: PathLike, target: PathLike, *, durable: bool = True) -> None:
    """Rename the finished `tmp` over `target` (a file or a directory); with `durable`, fsync a file first and the
    directory after, so that neither the data nor the rename can be lost to a power cut."""
    tmp, target = Path(tmp), Path(target)
    if durable and tmp.is_file():
        fsync_file(tmp)
    os.replace(tmp, target)
    if durable:
        fsync_dir(target.parent)


@contextlib.contextmanager
def atomic_path(path: PathLike, *, tmp: PathLike | None = None, durable: bool = True) -> Iterator[Path]:
    """Yield the temp path to write `path` through (for writers that take a path: safetensors, tokenizers); when the
    block ends, it is made readable (0666 minus the umask) and `publish`ed over `path`. If the block raises, the temp
    file is removed and `path` keeps its old content (or stays absent)."""
    path = Path(path)
    tmp = temp_path(path) if tmp is None else Path(tmp)
    try:
        # A leftover temp (or a link planted at its name) is removed first: the writer creates a new file, so that
        # it never writes through a link into a file outside the directory.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        yield tmp
        make_readable(tmp)
        publish(tmp, path, durable=durable)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def atomic_write(path: PathLike, data: bytes | memoryview | str, *, tmp: PathLike | None = None,
                 durable: bool = True) -> None:
    """Replace `path` with `data` (a str is written as UTF-8) atomically: see `atomic_path`."""
    payload = data.encode("utf-8") if isinstance(data, str) else data
    with atomic_path(path, tmp=tmp, durable=durable) as staged, open(staged, "wb") as f:
        f.write(payload)  # fsynced by `publish` once closed


def _load_renameat2() -> Any:
    """libc's renameat2 (Linux, glibc 2.28+), or None where there is none."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        function = libc.renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_RENAMEAT2 = _load_renameat2()
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def exchange(a: PathLike, b: PathLike) -> bool:
    """Swap the two existing paths `a` and `b` in one atomic step (Linux `renameat2(RENAME_EXCHANGE)`). Returns
    False where the system or the file system cannot (nothing was changed then); raises for any other failure."""
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), os.fspath(b))


def recover_replaced_dir(final: PathLike, aside: PathLike) -> bool:
    """Undo what a crash inside `replace_dir`'s fallback can leave: `final` absent and the old directory at
    `aside` (renamed back; returns True). With `final` present, an `aside` left over is an old copy whose removal
    was cut short, and is removed. Callers that can run concurrently hold `dir_lock` on the parent."""
    final, aside = Path(final), Path(aside)
    if not os.path.lexists(aside):
        return False
    if not os.path.lexists(final) and aside.is_dir() and not aside.is_symlink():
        os.replace(aside, final)
        fsync_dir(final.parent)
        return True
    if aside.is_dir() and not aside.is_symlink():
        shutil.rmtree(aside, ignore_errors=True)
    else:
        aside.unlink()
    return False


def replace_dir(tmp: PathLike, final: PathLike, aside: PathLike) -> None:
    """Make the finished directory `tmp` the directory `final`; the old `final` (if any) passes through `aside` (a
    temp name the caller's cleanup of leftovers knows) and is removed. `final` is never a half-written or
    half-deleted directory: on Linux the two are exchanged in one step; elsewhere a crash between the two renames
    leaves `final` absent with the old one at `aside`, which `recover_replaced_dir` (run first here) restores."""
    tmp, final, aside = Path(tmp), Path(final), Path(aside)
    recover_replaced_dir(final, aside)
    if not os.path.lexists(final):
        os.replace(tmp, final)
        fsync_dir(final.parent)
        return
    if final.is_dir() and not final.is_symlink() and exchange(tmp, final):
        os.replace(tmp, aside)  # tmp holds the old directory now: to the one name a crash's cleanup knows
    else:
        os.replace(final, aside)  # a link at `final` is moved itself, never what it points to
        try:
            os.replace(tmp, final)
        except BaseException:
            os.replace(aside, final)  # the old one back: only a kill leaves the window to `recover_replaced_dir`
            raise
    fsync_dir(final.parent)
    shutil.rmtree(aside, ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        if os.path.lexists(aside):
            aside.unlink()  # a link, or a file: what rmtree does not remove


@contextlib.contextmanager
def dir_lock(directory: PathLike) -> Iterator[None]:
    """Hold an exclusive `flock` on `directory` itself (no lock file is created) while the block runs: writers
    that replace an entry of it take turns for their last step. Where the file system has no locks, nothing is
    held (the renames are still atomic; only the "last one wins" order is lost)."""
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as exc:
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                raise
        yield
    finally:
        os.close(fd)  # releases the lock


def open_append(path: PathLike, *, binary: bool = False, readable: bool = False) -> Any:
    """Open `path` for appending (created with the mode `open()` gives) without following a symbolic link at it:
    a link raises OSError(ELOOP), so a log never writes into a file the link points to."""
    flags = (os.O_RDWR if readable else os.O_WRONLY) | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(path, flags, 0o666)
    try:
        if binary:
            return os.fdopen(fd, "rb+" if readable else "ab", buffering=0)
        return os.fdopen(fd, "a", encoding="utf-8", newline="")
    except BaseException:
        os.close(fd)
        raise


def is_link_error(exc: BaseException) -> bool:
    """Whether `exc` is how `O_NOFOLLOW` refuses a symbolic link (ELOOP)."""
    return isinstance(exc, OSError) and exc.errno == errno.ELOOP


# ------------------------------------------------------------------------------------- leftover temp files
@dataclass(frozen=True)
class Owner:
    """The process writing a temp file or directory: its host and pid."""

    host: str
    pid: int

    @classmethod
    def this_process(cls) -> Owner:
        return cls(socket.gethostname(), os.getpid())


def write_owner(directory: PathLike) -> None:
    """Record this process as the writer of the temp directory `directory` (`OWNER_FILE`)."""
    owner = Owner.this_process()
    (Path(directory) / OWNER_FILE).write_text(json.dumps({"host": owner.host, "pid": owner.pid}), encoding="utf-8")


def read_owner(directory: PathLike) -> Owner | None:
    """The writer `write_owner` recorded in `directory`; None when there is no readable record."""
    try:
        data = json.loads((Path(directory) / OWNER_FILE).read_text(encoding="utf-8"))
        return Owner(str(data["host"]), int(data["pid"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None  # not written yet, or another layout: only age can tell


def pid_running(pid: int) -> bool:
    """Whether process `pid` exists on this host and has not exited (a zombie waiting to be reaped has)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, run by another user
    except OSError:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc: os.kill said it exists
    fields = stat[stat.rindex(")") + 2:].split()  # the command name in (...) may hold spaces
    return not (fields and fields[0] in ("Z", "X"))


def last_change(path: PathLike) -> float:
    """The newest modification time of `path` and, for a directory, of its entries (a writer touches those)."""
    path = Path(path)
    times = [path.stat().st_mtime]
    if path.is_dir() and not path.is_symlink():
        times += [p.stat(follow_symlinks=False).st_mtime for p in path.iterdir()]
    return max(times)


# The one rule for leftover temp files. Two rules were in use: the checkpoints' ("every temp is stale unless the run
# directory's lock has another live holder") and the token cache's ("stale when its recorded writer is gone from this
# host, or when nothing in it changed for a day"). The second is right for a file rule: it decides from evidence
# about the temp's own writer, and where there is none (a writer on another host sharing the file system, whose pid
# means nothing here; an engine built without a run lock, saving into a directory no lock speaks for) it keeps the
# temp until age shows it dead, instead of deleting work in progress. Deleting too late costs disk space for a day;
# deleting too early destroys a live run's save. The age bound also covers a recorded pid that was reused by another
# process after the writer died. The checkpoints' rule is this rule with the run lock as the owner record (its
# holder writes every temp of the run, and `llm.artifacts.lock.stale_reason` checks exactly "gone from this host, or
# silent too long"), so it applies only where that lock is known.
def is_abandoned(path: PathLike, owner: Owner | None, *, now: float | None = None,
                 max_age: float = STALE_AFTER_S) -> bool:
    """Whether the temp file or directory `path`, written by `owner` (None: unknown), belongs to no live writer:
    nothing in it changed for `max_age` seconds, or its owner ran on this host and that pid is gone. A temp that
    changes while it is looked at is in use."""
    try:
        changed = last_change(path)
    except OSError:
        return False  # it is changing under us: someone is at work there
    if (time.time() if now is None else now) - changed > max_age:
        return True
    return owner is not None and owner.host == socket.gethostname() and not pid_running(owner.pid)


# ------------------------------------------------------------------------------------------- failed writes
def write_errno(exc: BaseException) -> int | None:
    """The operating system's error number behind a failed write, wherever the writer put it: an OSError along the
    exception's chain (torch.save reports a full disk as a RuntimeError about stream positions, with the OSError as
    its context) or "(os error N)" in the text of safetensors' errors. None when there is none."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        code = getattr(current, "errno", None)
        if isinstance(current, OSError) and code:
            return code
        match = _RUST_OS_ERROR.search(str(current))
        if match:
            return int(match.group(1))
        current = current.__cause__ or current.__context__
    return None


def write_failure_reason(exc: BaseException) -> str:
    """Why a write failed, in the operating system's words where it gave any ("No space left on device",
    "Permission denied", "Read-only file system"), else the last line of the error."""
    code = write_errno(exc)
    if code is not None:
        return os.strerror(code)
    lines = str(exc).strip().splitlines()
    return lines[-1] if lines else type(exc).__name__


def write_failure(exc: BaseException, path: PathLike) -> str:
    """'cannot write PATH: REASON' for a failed write (one line; REASON as `write_failure_reason`)."""
    return f"cannot write {os.fspath(path)}: {write_failure_reason(exc)}"


def is_write_error(exc: BaseException) -> bool:
    """Whether `exc` is how a failed write surfaces: an OSError, a RuntimeError (torch.save), or safetensors'
    own error type."""
    return isinstance(exc, (OSError, RuntimeError)) or "safetensor" in type(exc).__module__.lower()


def is_disk_full(exc: BaseException) -> bool:
    return write_errno(exc) == errno.ENOSPC
