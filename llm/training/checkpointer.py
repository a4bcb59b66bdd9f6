"""The engine's checkpoint service (`Checkpointer`) and its user-facing options (`ModelCheckpoint`).

Every run checkpoints and resumes, whatever its callback list: the engine builds a `Checkpointer` from
`config.checkpoint` (or from a `ModelCheckpoint` given as a callback) and calls it at the step boundaries.
The checkpointer never sees the engine: it is given the run's `RunContext` (place, counters, the stop field),
the `StatefulComponents` whose states make up each rank's trainer state, a weights strategy (weights.py: one
file, or FSDP shards) and the callback list it reports saves and loads to.

When it saves:
- every `checkpoint.interval` optimizer steps, at the boundary before the next step begins, so the
  checkpoint of step k holds everything step k caused (its validation, the epoch-end scheduler step);
- when a validation improves `checkpoint.monitor` (that checkpoint is marked best and never pruned);
- at the end of the run;
- on SIGTERM/SIGINT, right after the step that is running (all ranks agree), after which the run stops.
  Job managers signal the whole process group, and launchers such as torchrun forward the same signal again,
  so a repeat within `DUPLICATE_SIGNAL_S` is the same request; a later SIGINT (Ctrl-C pressed again) aborts
  without waiting for the save, a later SIGTERM is ignored (job managers escalate with SIGKILL).

Resume (`checkpoint.resume`, run by the engine after set-up): `auto` takes
the newest checkpoint of the run directory that verifies against its manifest and whose files are well formed
(`checkpoint.inspect_checkpoint`), skipping (with a warning naming each) any that are not; `PATH` takes that
checkpoint, or the newest in that run or checkpoints directory. The data module continues from its saved
position, so no batch is replayed. The resume rules (docs/checkpointing.md, "Resume rules"): a changed lr or run
length is applied to the schedule and logged; a changed task, optimizer or scheduler type is refused; another
world size remaps the data position; `none` or a branch from an older checkpoint into a run directory holding
later checkpoints is refused unless `checkpoint.overwrite`, and pruning never deletes another trajectory's
checkpoints.

In a multi-process run every rank writes its own trainer state into the shared temp directory; rank 0
writes the weights and config and, once all ranks report success, the manifest and the rename. A write
error on any rank (disk full, permissions) fails the save on every rank with one clear error naming the file
(`llm.fs.write_failure_reason`: "No space left on device" where that is the cause) and leaves the previous
checkpoint untouched.

With `checkpoint.async_save` (`--checkpoint-async`) the interval and best saves are staged into host memory at the
step boundary and written by a background thread (async_save.py), under the same protocol: the final and signal
saves, a rollback and the run's end wait for the pending write; a failed write fails the run at the next step
boundary; in a multi-process run each rank's thread reports to rank 0 through a marker file in the temp directory,
and rank 0's thread commits once every rank's files are written. Sharded weights (FSDP, tensor parallelism) are
staged shard by shard and written by the ranks' writer threads too, over a process group of their own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import signal
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import torch

from llm.artifacts import base_pin
from llm.artifacts import checkpoint as ckpt
from llm.artifacts.lock import live_holder
from llm.config import MODES, is_better, resume_tables
from llm.errors import ConfigError
from llm.fs import atomic_write, is_write_error, write_durable, write_failure_reason
from llm.training.async_save import BackgroundWriter, stage
from llm.training.observers.context import RunContext
from llm.training.observers.hooks import Callback, CallbackList
from llm.training.parallel.distributed import DeferredVote, all_agree, any_rank, broadcast_object
from llm.training.state import StatefulComponents

# The options are a `CheckpointConfig` (llm/training/core/config.py), typed `Any` here: config.py's validation imports
# the callbacks, and so this module, which therefore does not import config.py back, not even for the type checker.
CheckpointConfig = Any

_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# A stop signal repeated within this many seconds is the same request delivered twice (to the process group and
# again by a launcher that forwards it), not a user insisting.
DUPLICATE_SIGNAL_S = 2.0
_PLAIN = (str, bytes, bytearray, int, float, complex, bool, type(None), torch.Size, torch.dtype, torch.device)


def unsafe_entries(obj: Any, path: str = "state", limit: int = 3) -> list[str]:
    """Paths of values `torch.load(weights_only=True)` would refuse (so a bad state fails at save time)."""
    found: list[str] = []
    stack = [(path, obj)]
    while stack and len(found) < limit:
        where, value = stack.pop()
        if type(value) in (dict, OrderedDict, Counter):
            stack.extend((f"{where}.{key}", item) for key, item in value.items())
            stack.extend((f"{where}[key]", key) for key in value if not isinstance(key, (str, int)))
        elif type(value) in (list, tuple, set):
            stack.extend((f"{where}[{i}]", item) for i, item in enumerate(value))
        elif not isinstance(value, torch.Tensor) and type(value) not in _PLAIN:
            found.append(f"{where} ({type(value).__module__}.{type(value).__qualname__})")
    return found


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        out.update(_flatten(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


class _WriteFailed(Exception):
    """A checkpoint file could not be written: carries the file's path and the reason (see `writing_to`)."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


@contextlib.contextmanager
def writing_to(path: Path) -> Iterator[None]:
    """Name `path` in the error of a write that fails inside (the writers' own errors often name no file)."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001  (filtered by is_write_error; anything else is re-raised as is)
        if not is_write_error(exc):
            raise
        raise _WriteFailed(path, write_failure_reason(exc)) from exc


def _failure(error: BaseException, tmp: Path) -> str:
    """'FILE: reason' of a failed checkpoint write (the file the writer named, else the temp directory)."""
    if isinstance(error, _WriteFailed):
        return f"{error.path}: {error.reason}"
    return f"{getattr(error, 'filename', None) or tmp}: {write_failure_reason(error)}"


# An asynchronous save in a multi-process run: each rank's writer thread leaves one of these in the temp directory
# when its files are written ("ok") or failed (the reason); rank 0's thread commits once every rank has one. They end
# in ".tmp", which the manifest never lists, and are removed before it is written.
def _marker(tmp: Path, rank: int) -> Path:
    return tmp / f".rank{rank}.written.tmp"


def _write_marker(tmp: Path, rank: int, failure: str | None) -> None:
    part = tmp / f".rank{rank}.partial.tmp"
    with open(part, "w", encoding="utf-8") as f:
        f.write("ok" if failure is None else failure)
    os.replace(part, _marker(tmp, rank))


def _await_markers(tmp: Path, world_size: int, timeout: float) -> str:
    """Rank 0's writer: wait for every other rank's marker; returns what failed ('' when all wrote their files)."""
    deadline = time.monotonic() + timeout
    failures = []
    for rank in range(1, world_size):
        marker = _marker(tmp, rank)
        while not marker.is_file():
            if time.monotonic() > deadline:
                return f"its files (rank {rank} reported nothing in {timeout:.0f} s)"
            time.sleep(0.005)
        text = marker.read_text(encoding="utf-8")
        marker.unlink()
        if text != "ok":
            failures.append(text)
    return "; ".join(failures)


def config_changes(saved: dict[str, Any], current: dict[str, Any], defaults: dict[str, Any] | None = None,
                   expected: tuple[str, ...] = ()) -> list[str]:
    """'key: old -> new' for every config value that differs, except those `expected` to change on resume (keys or
    "section." prefixes), and fields that the saved config predates and this run leaves at their `defaults`."""
    old, new, default = _flatten(saved), _flatten(current), _flatten(defaults or {})
    return [
        f"{key}: {old.get(key)!r} -> {new.get(key)!r}"
        for key in sorted(set(old) | set(new))
        if old.get(key) != new.get(key) and not (expected and key.startswith(expected))
        and not (key not in old and key in default and new.get(key) == default[key])
    ]


class ModelCheckpoint(Callback):
    """The user-facing options of the engine's checkpointer: interval, keep-last, resume, best-by-monitor.

    Checkpointing is an engine service: every run has a `Checkpointer` configured from `config.checkpoint`.
    Listing `ModelCheckpoint` in `training.callbacks`, or passing an instance to the engine, is optional and only
    sets these options: the instance's own values win over the config section. The options, their meaning and
    their defaults are the fields of `CheckpointConfig` (`config.checkpoint`), written there once, e.g.
    `ModelCheckpoint(interval=100, monitor="val/loss")`; the options not given are the config's.
    """

    def __init__(self, **options: Any) -> None:
        if options.get("mode", "min") not in MODES:
            raise ConfigError(f"checkpoint.mode: invalid value {options['mode']!r}; min or max")
        self.options = options

    def resolve(self, section: CheckpointConfig) -> CheckpointConfig:
        """The config section with this instance's options applied."""
        try:
            return dataclasses.replace(section, **self.options)
        except TypeError:
            names = ", ".join(f.name for f in dataclasses.fields(section))
            raise ConfigError(f"ModelCheckpoint: unknown option among {sorted(self.options)}; the options are "
                              f"{names}") from None


class WeightsStrategy(Protocol):
    """How the model's weights are written into and read from a checkpoint (weights.py has the strategies)."""

    #: Whether the checkpoint holds shards of the weights and of the optimizer state (restored with them).
    sharded: bool

    def save(self, directory: Path) -> None:
        """Write the weights into the checkpoint's (temporary) directory; every rank calls it."""

    def load(self, directory: Path, sharded: bool) -> None:
        """Load the weights of the checkpoint in `directory` (`sharded`: as its manifest says it was written)."""

    def save_final(self, path: Path, step: int) -> None:
        """Write the run's final weights file; every rank calls it."""


def _nothing() -> None:
    return None


class Checkpointer:
    """The engine's checkpoint service: atomic saves of the whole run state, retention, best, signals, resume.

    The engine calls `start` once, `before_step` / `after_step` around every optimizer step, `after_validation`
    after each validation, `finish` at the end (the final save) and `abort` when the run fails. `before_save`
    runs before a state is captured (the engine refuses there a run holding a refused update).
    """

    def __init__(self, options: CheckpointConfig, context: RunContext, components: StatefulComponents,
                 weights: WeightsStrategy, callbacks: CallbackList,
                 before_save: Callable[[], None] = _nothing) -> None:
        self.options, self.context, self.components, self.weights = options, context, components, weights
        self.callbacks, self.before_save = callbacks, before_save
        self.best_value: float | None = None
        self.best_step: int | None = None
        self.last_save_seconds = 0.0  # wall time of the latest save (the pause it added to training)
        self._pending: str | None = None  # why a save is due at the next step boundary
        self._candidate: tuple[int, float] | None = None  # (step, value) of a validation that beat the best
        self._last_saved_step = -1
        self._signal: int | None = None
        self._signal_time = 0.0  # time.monotonic() of the first stop signal
        self._stopped_by: str | None = None  # the signal that stopped the run (on any rank), once acted on
        self._previous_handlers: dict[int, Any] = {}
        self._vote = DeferredVote(context.device)  # the ranks' agreement on a stop signal, a step late
        self._resume_rng: dict[str, Any] | None = None
        self._warned_monitor = False
        self._removals: list[threading.Thread] = []
        # Checkpoints of another trajectory in this run directory (a branch or `resume=none` with
        # `checkpoint.overwrite`): never pruned, until this run saves the same step over one of them.
        self._foreign: set[str] = set()
        # checkpoint.async_save: the background write in flight (one at a time); a synchronous run has none.
        self._writer = BackgroundWriter() if getattr(options, "async_save", False) else None

    @property
    def root(self) -> Path:
        return self.context.run_dir / ckpt.CHECKPOINTS_DIR

    @property
    def stop_signal(self) -> int | None:
        """The signal that asked the run to stop, if any."""
        return self._signal

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"best_value": self.best_value, "best_step": self.best_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_value, self.best_step = state.get("best_value"), state.get("best_step")

    # -- the engine's calls -----------------------------------------------------------------------
    def start(self) -> None:
        # A temp directory is only known to be stale when no other live run holds the run directory's lock (an
        # engine built without train_worker takes no lock, but must not delete a running save of one that did).
        holder = live_holder(self.context.run_dir) if self.context.is_global_zero else None
        if holder is not None:
            self.context.logger.warning("not removing temp checkpoints in %s: the run directory is in use by %s",
                                        self.root, holder.describe())
        elif self.context.is_global_zero:
            for path in ckpt.remove_stale_temps(self.root):
                self.context.logger.warning("removed %s, left by an interrupted save", path)
        self._install_signal_handlers()

    def before_step(self) -> None:
        if self._resume_rng is not None:
            # Re-applied here because creating the data iterator after the load draws from the RNG.
            ckpt.set_rng_state(self._resume_rng)
            self._resume_rng = None
        if self._writer is not None and self._writer.done:  # one attribute read while a write runs
            self._collect_write()  # reports the save, or raises its error: the run fails at this step
        if self._pending is not None:
            self.save(self._pending)

    def after_step(self) -> None:
        """Save and ask the engine to stop after a signal (all ranks agree); else note an interval save as due."""
        run = self.context
        step = run.step
        stop = self._signal is not None
        if run.world_size > 1:
            # Every rank stops at the same step: the one after the step whose vote saw a signal on any rank (the
            # vote is read a step late, so the loop never waits for the device to read it).
            stop = self._vote.cast(stop)
        if stop:
            name = signal.Signals(self._signal).name if self._signal is not None else "a signal on another rank"
            run.logger.warning("received %s: saving a checkpoint at step %d and stopping", name, step)
            self._stopped_by = name
            self.save("signal")
            run.should_stop = True  # the run's control field: the engine stops after this step
        elif self.options.interval and step % self.options.interval == 0:
            self._pending = self._pending or "interval"

    def after_validation(self, logs: dict[str, Any]) -> None:
        if not self.options.monitor or not logs:
            return
        if self.options.monitor not in logs:
            if not self._warned_monitor and self.context.is_global_zero:
                names = ", ".join(k for k in logs if k.startswith("val/"))
                self.context.logger.warning("checkpoint.monitor %r is not a validation metric (%s)",
                                            self.options.monitor, names)
            self._warned_monitor = True
            return
        value, step = float(logs[self.options.monitor]), int(logs.get("step", self.context.step))
        if not self._improves(value):
            return
        self._candidate = (step, value)
        if step == self._last_saved_step:
            self._collect_write()  # an asynchronous write of that step commits (and marks its best) first
            self._take_candidate(step)  # that checkpoint already holds these weights
            if self.context.is_global_zero:
                try:
                    self._write_best_marker()
                except OSError as exc:
                    self.context.logger.warning("could not mark the best checkpoint: %s", exc)
        else:
            self._pending = "best"

    def stop_agreed(self) -> bool:
        """Whether the run stops for a signal, agreed by every rank: once, at the loop's end (one collective), so
        that every rank skips, or runs, the final validation alike."""
        local = self._signal is not None or self._stopped_by is not None
        if self.context.world_size == 1:
            return local
        return any_rank(self._vote.collect() or local, self.context.device)

    def finish(self) -> None:
        """The final save (unless this step is saved already); then restore the signal handlers."""
        try:
            run = self.context
            if run.world_size > 1:
                self._vote.collect()  # no reduction left in flight past the run's end
            self._collect_write()  # the pending write ends (or fails the run) before the final save
            if self._last_saved_step != run.step:
                self.save("final")
            name = self._stopped_by or (signal.Signals(self._signal).name if self._signal is not None else None)
            if name is not None and run.is_global_zero:
                step, total = run.step, run.total_steps
                if step < total:
                    run.logger.info("stopped by %s at step %d of %d; resume with the same --logging-log-dir "
                                    "(checkpoint.resume=auto)", name, step, total)
                else:  # the signal came during the last step's validation or the final save: nothing is left to do
                    run.logger.info("received %s after the last step; the run is complete", name)
        finally:
            self.abort()

    def abort(self) -> None:
        self._restore_signal_handlers()
        if self._writer is not None and self._writer.pending:  # the run failed: let the write end, report it
            try:
                self._collect_write()
            except Exception as exc:  # noqa: BLE001  (the run's own error is the one raised)
                self.context.logger.error("%s", exc)
        self._join_removals()

    # -- best -----------------------------------------------------------------------------------
    def _improves(self, value: float) -> bool:
        if math.isnan(value):
            return False
        return is_better(value, self.best_value, self.options.mode)

    def _take_candidate(self, step: int) -> bool:
        if self._candidate is None or self._candidate[0] != step:
            return False
        self.best_step, self.best_value = step, self._candidate[1]
        self._candidate = None
        return True

    def _write_best_marker(self, best_step: int | None = None, best_value: Any = None) -> None:
        """`checkpoints/best.json` names the best checkpoint; `checkpoints/best` links to it where possible."""
        if best_step is None:
            best_step, best_value = self.best_step, self.best_value
        name = ckpt.step_dir_name(best_step)
        info = {"step": best_step, "dir": name, "monitor": self.options.monitor, "mode": self.options.mode,
                "value": best_value}
        atomic_write(self.root / "best.json", json.dumps(info, indent=1))  # via best.json.tmp
        link, tmp_link = self.root / "best", self.root / ".best.tmp"
        try:
            tmp_link.unlink(missing_ok=True)
            tmp_link.symlink_to(name, target_is_directory=True)
            tmp_link.replace(link)
        except OSError:
            pass  # best.json is the record; the link is a convenience

    # -- saving ---------------------------------------------------------------------------------
    def save(self, reason: str = "manual") -> Path:
        """Write the checkpoint of the current step (every rank must call this). Returns its path.

        With `checkpoint.async_save`, interval and best saves return once the state is staged and the write runs in
        the background; every save first waits for the one in flight."""
        self._collect_write()
        if self._writer is not None and reason in ("interval", "best"):
            return self._save_async(reason)
        run, start = self.context, time.perf_counter()
        step = run.step
        self._pending = None
        is_best = self._take_candidate(step)
        # Captured before anything is written: the engine refuses here if a (lazily checked) step was non-finite.
        self.before_save()
        state = self.components.state_dict()
        final, tmp = self.root / ckpt.step_dir_name(step), self.root / f"{ckpt.TMP_PREFIX}{ckpt.step_dir_name(step)}"
        self._collective_io(lambda: self._prepare_temp(tmp), tmp, "create")
        unsafe = unsafe_entries(state)
        refusal = ckpt.CheckpointError(
            f"checkpoint: the trainer state holds values that cannot be loaded safely: {', '.join(unsafe)}; "
            "state_dict() must return tensors and plain Python data"
        ) if unsafe else None
        # Every rank takes part in each phase, even one that already knows it failed (collectives match).
        self._collective_io(lambda: self._write_files(tmp, state), tmp, "write", refusal)
        self._collective_io(lambda: self._commit(tmp, final, step, is_best), tmp, "commit")
        self._last_saved_step = step
        self.last_save_seconds = time.perf_counter() - start
        run.logger.info("saved checkpoint %s (%s) in %.3f s", final, reason, self.last_save_seconds)
        self.callbacks.on_save_checkpoint({"step": step, "path": str(final), "reason": reason,
                                           "seconds": self.last_save_seconds})
        return final

    def _collective_io(self, action: Any, tmp: Path, what: str, error: Exception | None = None) -> None:
        """Run one phase of a save on every rank; if it fails anywhere, clean up and fail everywhere."""
        if error is None:
            try:
                action()
            except Exception as exc:  # noqa: BLE001  (e.g. safetensors' own error type for a failed write)
                if not (isinstance(exc, _WriteFailed) or is_write_error(exc)):
                    raise
                error = exc
        if all_agree(error is None, self.context.device):
            return
        if self.context.is_global_zero:
            shutil.rmtree(tmp, ignore_errors=True)
        latest = [p.name for _, p in ckpt.list_checkpoints(self.root) if (p / ckpt.MANIFEST).is_file()]
        kept = f"; the previous checkpoint {latest[-1]} is intact" if latest else ""
        if isinstance(error, ckpt.CheckpointError):
            raise ckpt.CheckpointError(f"{error}{kept}")
        if error is None:
            raise ckpt.CheckpointError(f"checkpoint: another rank failed to {what} {tmp}{kept}")
        raise ckpt.CheckpointError(f"checkpoint: cannot {what} {_failure(error, tmp)}{kept}") from None

    def _prepare_temp(self, tmp: Path) -> None:
        if self.context.is_global_zero:
            shutil.rmtree(tmp, ignore_errors=True)  # left by a crash during an earlier save of this step
            tmp.mkdir(parents=True)

    def _write_files(self, tmp: Path, state: dict[str, Any]) -> None:
        run = self.context
        # First: a rank that fails a write below must not skip the weights' collectives (FSDP shards, a gather).
        self.weights.save(tmp)
        if self.weights.sharded:  # the optimizer state is in the shards
            state = {**state, "optimizer": None}
        with writing_to(tmp / ckpt.trainer_state_name(run.rank)):
            ckpt.save_trainer_state(state, tmp / ckpt.trainer_state_name(run.rank))
        if run.is_global_zero:
            with writing_to(tmp / ckpt.CONFIG):
                write_durable(tmp / ckpt.CONFIG, run.config.to_yaml().encode())

    def _commit(self, tmp: Path, final: Path, step: int, is_best: bool, extra: dict[str, Any] | None = None,
                best: tuple[int | None, Any] | None = None) -> None:
        """Rank 0: the manifest, the rename, then the best marker and pruning. `extra` and `best` (the manifest's
        extra fields, the best step and value) are given by an asynchronous save, which took them at its step."""
        if not self.context.is_global_zero:
            return
        extra = self._manifest_extra(is_best) if extra is None else extra
        best_step, best_value = (self.best_step, self.best_value) if best is None else best
        with writing_to(tmp / ckpt.MANIFEST):
            ckpt.write_manifest(tmp, step, self.context.world_size, extra)
        ckpt.commit_checkpoint(tmp, final)
        # The checkpoint is safe now: failures below cost tidiness, not the save.
        try:
            if is_best:
                self._write_best_marker(best_step, best_value)
            protect = {ckpt.step_dir_name(best_step)} if best_step is not None else set()
            self._foreign.discard(final.name)
            for path in ckpt.prune_checkpoints(self.root, self.options.keep_last, step, protect, self._remove_later,
                                               foreign=self._foreign):
                self.context.logger.debug("deleted old checkpoint %s", path)
        except OSError as exc:
            self.context.logger.warning("checkpoint %s saved, but pruning or marking the best failed: %s", final, exc)

    def _manifest_extra(self, is_best: bool) -> dict[str, Any]:
        return {"task": self.context.config.task, "reason": "best" if is_best else "checkpoint",
                **base_pin.record(getattr(self.weights, "model", None))}  # adapters saved without their base name it

    # -- asynchronous saves (checkpoint.async_save; async_save.py) --------------------------------------------------
    def _save_async(self, reason: str) -> Path:
        """Stage the state of this step in host memory (the pause training sees) and start its write in the
        background. The temp directory is created and the weights staged collectively, as in a synchronous save."""
        run, start = self.context, time.perf_counter()
        step = run.step
        self._pending = None
        is_best = self._take_candidate(step)
        self.before_save()
        final, tmp = self.root / ckpt.step_dir_name(step), self.root / f"{ckpt.TMP_PREFIX}{ckpt.step_dir_name(step)}"
        self._collective_io(lambda: self._prepare_temp(tmp), tmp, "create")
        state = stage(self.components.state_dict())
        unsafe = unsafe_entries(state)
        if unsafe:
            self._collective_io(_nothing, tmp, "write", ckpt.CheckpointError(
                f"checkpoint: the trainer state holds values that cannot be loaded safely: {', '.join(unsafe)}; "
                "state_dict() must return tensors and plain Python data"))
        staged: list[Callable[[], None]] = []
        self._collective_io(lambda: staged.append(self.weights.stage(tmp)), tmp, "write")
        if self.weights.sharded:  # the optimizer state is in the shards
            state = {**state, "optimizer": None}
        config = run.config.to_yaml() if run.is_global_zero else ""
        extra = self._manifest_extra(is_best) if run.is_global_zero else {}
        best = (self.best_step, self.best_value)
        self._last_saved_step = step
        staging = time.perf_counter() - start

        def write() -> None:
            self._write_in_background(tmp, final, step, state, staged[0], config, extra, is_best, best)

        self._writer.submit(write, (final, reason, start, staging))
        return final

    def _write_in_background(self, tmp: Path, final: Path, step: int, state: dict[str, Any],
                             write_weights: Callable[[], None], config: str, extra: dict[str, Any], is_best: bool,
                             best: tuple[int | None, Any]) -> None:
        """The writer thread's half of an asynchronous save: this rank's files, then (rank 0, once every rank's
        files are written) the manifest, the rename and pruning. Raises a one-line CheckpointError on failure,
        after removing the temp directory (rank 0)."""
        run = self.context
        error: Exception | None = None
        try:
            write_weights()
            with writing_to(tmp / ckpt.trainer_state_name(run.rank)):
                ckpt.save_trainer_state(state, tmp / ckpt.trainer_state_name(run.rank))
            if run.is_global_zero:
                with writing_to(tmp / ckpt.CONFIG):
                    write_durable(tmp / ckpt.CONFIG, config.encode())
        except Exception as exc:  # noqa: BLE001  (reported below with the file and the reason)
            if not (isinstance(exc, _WriteFailed) or is_write_error(exc)):
                raise
            error = exc
        if run.world_size > 1:
            if not run.is_global_zero:
                _write_marker(tmp, run.rank, None if error is None else _failure(error, tmp))
                if error is not None:
                    raise ckpt.CheckpointError(f"checkpoint: cannot write {_failure(error, tmp)}") from None
                return
            failed = _await_markers(tmp, run.world_size, self._marker_timeout())
            if error is None and failed:
                raise self._discard(tmp, ckpt.CheckpointError(f"checkpoint: another rank failed to write {failed}"))
        if error is not None:
            raise self._discard(tmp, ckpt.CheckpointError(f"checkpoint: cannot write {_failure(error, tmp)}"))
        try:
            self._commit(tmp, final, step, is_best, extra, best)
        except Exception as exc:  # noqa: BLE001
            if not (isinstance(exc, _WriteFailed) or is_write_error(exc)):
                raise
            raise self._discard(tmp, ckpt.CheckpointError(f"checkpoint: cannot commit {_failure(exc, tmp)}")) from None

    def _discard(self, tmp: Path, error: ckpt.CheckpointError) -> ckpt.CheckpointError:
        """Remove a failed save's temp directory (rank 0); the error, naming the checkpoint that is kept."""
        shutil.rmtree(tmp, ignore_errors=True)
        latest = [p.name for _, p in ckpt.list_checkpoints(self.root) if (p / ckpt.MANIFEST).is_file()]
        kept = f"; the previous checkpoint {latest[-1]} is intact" if latest else ""
        return ckpt.CheckpointError(f"{error}{kept}")

    def _marker_timeout(self) -> float:
        distributed = getattr(self.context.config, "distributed", None)
        return 60.0 * float(getattr(distributed, "timeout_minutes", 10.0))

    def _collect_write(self) -> None:
        """Wait for the pending asynchronous write, if any, and report it (log line, `on_save_checkpoint`); its
        failure is raised here, on the training thread."""
        if self._writer is None or not self._writer.pending:
            return
        final, reason, start, staging = self._writer.label
        self._writer.wait()
        self.last_save_seconds = staging
        self.context.logger.info("saved checkpoint %s (%s, async) in %.3f s (training paused %.3f s to stage it)",
                                 final, reason, time.perf_counter() - start, staging)
        self.callbacks.on_save_checkpoint({"step": ckpt.checkpoint_step(final), "path": str(final), "reason": reason,
                                           "seconds": staging})

    def _remove_later(self, path: Path) -> None:
        """Delete a renamed-away old checkpoint in the background: training need not wait for it."""
        thread = threading.Thread(target=shutil.rmtree, args=(path,), kwargs={"ignore_errors": True}, daemon=True)
        thread.start()
        self._removals = [t for t in self._removals if t.is_alive()] + [thread]

    def _join_removals(self) -> None:
        for thread in self._removals:
            thread.join()
        self._removals.clear()

    # -- resuming -------------------------------------------------------------------------------
    def maybe_resume(self) -> Path | None:
        """Load the checkpoint `checkpoint.resume` selects, if any (called by the engine after set-up)."""
        run = self.context
        choice: Any = None
        if run.is_global_zero:
            try:
                choice = None if self.options.resume == "none" else self._select_checkpoint()
                self._check_branch(Path(choice) if choice else None)
                if choice:
                    self._check_config(Path(choice))
                    model = getattr(self.weights, "model", None)  # adapters saved without their base: the same base
                    base_pin.check(ckpt.read_manifest(Path(choice)), model, Path(choice), self.context.logger.warning)
            except ckpt.CheckpointError as exc:
                choice = exc
        choice = broadcast_object(choice)
        if isinstance(choice, Exception):  # the same class on every rank (UnsafeCheckpointError stays one)
            raise (type(choice) if isinstance(choice, ckpt.CheckpointError) else ckpt.CheckpointError)(str(choice))
        if choice is None:
            if self.options.resume == "none":
                return None
            if self.options.resume != "auto":
                raise ckpt.CheckpointError(f"checkpoint.resume: no complete checkpoint in {self.options.resume}")
            return None
        path = Path(choice)
        self._load_everywhere(path)
        run.logger.info("resumed from %s at step %d", path, run.step)
        self.callbacks.on_load_checkpoint({"step": run.step, "path": str(path)})
        return path

    def roll_back(self, before: int) -> Path | None:
        """Load the newest checkpoint of this run, of a step before `before`, that verifies (the loss-spike
        rollback, optim/spike.py): the resume path, applied to a run under way. None when there is none."""
        run = self.context
        self._collect_write()  # the checkpoint to roll back to may be the one being written
        choice: Any = None
        if run.is_global_zero:

            def own(path: Path) -> None:
                if path.name in self._foreign or ckpt.checkpoint_step(path) >= before:
                    raise ckpt.CheckpointError(f"checkpoint: {path} is not of this run before step {before}")
                self._check_candidate(path)

            try:
                found = ckpt.find_latest_checkpoint(self.root, run.logger.warning, check=own)
                choice = str(found) if found is not None else None
            except ckpt.CheckpointError as exc:
                choice = exc
        choice = broadcast_object(choice)
        if isinstance(choice, Exception):
            raise (type(choice) if isinstance(choice, ckpt.CheckpointError) else ckpt.CheckpointError)(str(choice))
        if choice is None:
            return None
        path = Path(choice)
        self._load_everywhere(path)
        self._pending, self._candidate = None, None  # saves that fell due on the steps thrown away
        self.callbacks.on_load_checkpoint({"step": run.step, "path": str(path)})
        return path

    def _load_everywhere(self, path: Path) -> None:
        """Load `path` on every rank; a failure on any rank fails all of them alike."""
        error: Exception | None = None
        try:
            self._load(path)
        except ckpt.CheckpointError as exc:
            error = exc
        if not all_agree(error is None, self.context.device):
            raise error or ckpt.CheckpointError(f"checkpoint: another rank failed to load {path}")

    def _select_checkpoint(self) -> str | None:
        """The checkpoint to resume from (rank 0 decides for all). Candidates are checked by `_check_candidate`:
        under `auto` each one that fails is skipped with a warning; a checkpoint named explicitly must pass."""
        warn = self.context.logger.warning
        if self.options.resume == "auto":
            found = ckpt.find_latest_checkpoint(self.root, warn, check=self._check_candidate)
            if found is None and ckpt.list_checkpoints(self.root):
                warn(f"no complete checkpoint in {self.root}; starting from step 0")
            return str(found) if found else None
        path = Path(self.options.resume)
        if (path / ckpt.MANIFEST).exists() or ckpt.checkpoint_step(path) is not None:
            self._check_candidate(path)  # an explicitly named checkpoint must be sound: no fallback
            return str(path)
        root = path / ckpt.CHECKPOINTS_DIR if (path / ckpt.CHECKPOINTS_DIR).is_dir() else path
        found = ckpt.find_latest_checkpoint(root, warn, check=self._check_candidate)
        if found is None:
            raise ckpt.CheckpointError(f"checkpoint.resume: no complete checkpoint in {self.options.resume}")
        return str(found)

    def _check_candidate(self, path: Path) -> None:
        """Checksums, then the layout of every file the ranks of this run will read (manifest, trainer states,
        weights header or shard metadata, config), without loading tensor data: a malformed checkpoint is
        skipped before it is chosen, not found broken halfway through loading it."""
        saved_world = ckpt.read_manifest(path)["world_size"]  # every saved rank's state, for a world-size change
        ckpt.inspect_checkpoint(path, range(max(saved_world, self.context.world_size)))

    def _load(self, path: Path) -> None:
        run = self.context
        manifest = ckpt.read_manifest(path)
        saved_world = manifest["world_size"]
        # Elastic resume: a rank the checkpoint was not written with starts from rank 0's state (DDP replicas
        # share the optimizer state; FSDP's lives in the shards, which DCP reshards) with its own RNG.
        source = run.rank if run.rank < saved_world else 0
        for rank in range(saved_world):  # only files the manifest vouches for are read
            name = ckpt.trainer_state_name(rank)
            if name not in manifest["files"]:
                raise ckpt.CheckpointError(f"checkpoint: {path} has no {name} in its {ckpt.MANIFEST}")
        sharded = self._load_weights(path, manifest)
        state = ckpt.load_trainer_state(path / ckpt.trainer_state_name(source))
        if saved_world != run.world_size:
            state = self._remap_world(path, state, saved_world, own=source == run.rank)
        try:
            # A sharded checkpoint's optimizer state was restored from the shards.
            self.components.load_state_dict(state, skip=("optimizer",) if sharded else ())
        except (KeyError, ValueError, TypeError, RuntimeError, AttributeError, IndexError, OverflowError) as exc:
            raise ckpt.CheckpointError(
                f"checkpoint: cannot restore the trainer state from {path} ({type(exc).__name__}: {exc}); "
                "was it written with a different optimizer or task?"
            ) from None
        self._resume_rng = state.get("rng")
        self._last_saved_step = run.step

    def _remap_world(self, path: Path, state: dict[str, Any], saved_world: int, own: bool) -> dict[str, Any]:
        """A trainer state of `saved_world` processes, for this rank of a run with another world size."""
        run, data = self.context, state["data"]
        # The data module counts in data-parallel ranks (the processes over the tensor-parallel degree).
        if not isinstance(data.get("world_size"), int) or "batch_size" not in data:
            raise ckpt.CheckpointError(
                f"checkpoint: {path} was written by {saved_world} processes and this run has {run.world_size}, "
                f"and the data position of {type(self.components['data']).__name__} cannot be remapped (it does not "
                f"record the world size and batch size it was counted in); resume with "
                f"--distributed-nproc-per-node {saved_world}"
            )
        state = dict(state)
        if not own:  # this rank did not exist: keep its own seeded RNG and start its metric window empty
            state["rng"], state["meter"] = ckpt.rng_state(), None
        if run.is_global_zero:
            consumed = data.get("offset", 0) + data["batch"] * data["batch_size"] * data["world_size"]
            run.logger.warning("resuming a checkpoint of %d process(es) on %d: the data position is remapped to "
                               "sample %d of epoch %d", saved_world, run.world_size, consumed, data["epoch"])
        return state

    def _check_branch(self, choice: Path | None) -> None:
        """Refuse to start (`resume=none`) or branch (an older checkpoint, or another run's) into a run directory
        that holds later checkpoints, unless `checkpoint.overwrite`; with it, note the other trajectory's
        checkpoints so that pruning leaves them alone."""
        if self.options.resume == "auto" or choice is None and self.options.resume != "none":
            return
        start = -1 if choice is None else ckpt.read_manifest(choice)["step"]
        own = choice is not None and choice.parent.resolve() == self.root.resolve()
        existing = [(s, p) for s, p in ckpt.list_checkpoints(self.root) if (p / ckpt.MANIFEST).is_file()]
        later = [p.name for s, p in existing if s > start]
        foreign = {p.name for s, p in existing if s > start or not own}
        if later and not self.options.overwrite:
            what = "starting from step 0" if choice is None else f"branching from {choice}"
            raise ckpt.CheckpointError(
                f"checkpoint.resume: {what} into {self.context.run_dir}, which holds later checkpoints "
                f"({', '.join(later[-3:])}), would overwrite them; use another --logging-log-dir, "
                "--checkpoint-resume auto to continue them, or --checkpoint-overwrite"
            )
        self._foreign = foreign

    def _check_config(self, path: Path) -> None:
        """Refuse a resume whose config changes what the saved state is made for; log the changes it applies."""
        if not (path / ckpt.CONFIG).is_file():
            return
        try:
            saved = ckpt.read_checkpoint_config(path / ckpt.CONFIG)
        except ckpt.UnsafeCheckpointError:
            raise
        except ckpt.CheckpointError:  # checked by inspect_checkpoint before; nothing to compare against
            return
        old, new = _flatten(saved), _flatten(self.context.config.to_dict())
        # The policies are declared beside the config's fields (`on_resume`); a saved state that cannot carry over
        # is also refused by its own component (e.g. the schedule records its scheduler class).
        expected, applied, refused = resume_tables(type(self.context.config))
        for key, flag in refused.items():
            if key in old and old[key] != new.get(key):
                raise ckpt.CheckpointError(
                    f"checkpoint: {path} was written with {key}={old[key]!r} and this run has {new.get(key)!r}; its "
                    f"saved state does not carry over: resume with {flag} {old[key]}, or start a new run in another "
                    "--logging-log-dir"
                )
        for key, what in applied.items():
            if key in old and old[key] != new.get(key):
                self.context.logger.warning("resuming with %s: %r -> %r; applied to %s", key, old[key], new.get(key),
                                            what)
        self._warn_config_changes(path, expected)

    def _load_weights(self, path: Path, manifest: dict[str, Any]) -> bool:
        """Load the weights (and, for FSDP, the optimizer shards); returns whether the checkpoint is sharded.

        The strategy check reads only the manifest, so every rank decides alike before the collective load.
        """
        run = self.context
        sharded, fsdp_run = ckpt.SHARDED_METADATA in manifest["files"], self.weights.sharded
        # One process runs FSDP unsharded; DCP still reads the shards of any world size into its plain model.
        if sharded != fsdp_run and not (sharded and run.world_size == 1):
            # Shards come from FSDP or tensor parallelism (--distributed-tensor-parallel), which both read them.
            why = ("was written sharded (distributed.strategy=fsdp or tensor parallelism) and this run uses ddp; "
                   "resume with --distributed-strategy fsdp" if sharded else
                   "holds whole weights (distributed.strategy=ddp) and this run shards them (fsdp or tensor "
                   "parallelism); resume with --distributed-strategy ddp --distributed-tensor-parallel 1")
            raise ckpt.CheckpointError(f"checkpoint: {path} {why}")
        self.weights.load(path, sharded)
        return sharded

    def _warn_config_changes(self, path: Path, expected: tuple[str, ...]) -> None:
        if not self.context.is_global_zero or not (path / ckpt.CONFIG).is_file():
            return
        try:
            saved = ckpt.read_checkpoint_config(path / ckpt.CONFIG)
        except ckpt.CheckpointError:  # only a warning depends on it; the checkpoint's soundness was checked before
            return
        training = saved.get("training")
        if isinstance(training, dict) and isinstance(training.get("activation_checkpointing"), bool):
            # written when the field was a switch: false/true are the modes none/full, not a change
            training["activation_checkpointing"] = "full" if training["activation_checkpointing"] else "none"
        config = self.context.config
        try:  # the defaults of this run's config class: fields the saved config predates and this run leaves alone
            defaults = type(config)().to_dict()
        except (TypeError, AttributeError):
            defaults = {}
        changes = config_changes(saved, config.to_dict(), defaults, expected)
        if changes:
            self.context.logger.warning("resuming with a changed config (the run may not match an uninterrupted "
                                        "one): %s", "; ".join(changes))

    # -- signals --------------------------------------------------------------------------------
    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for sig in _SIGNALS:
            self._previous_handlers[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handle_signal)

    def _restore_signal_handlers(self) -> None:
        for sig, handler in self._previous_handlers.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous_handlers.clear()

    def _handle_signal(self, signum: int, frame: Any) -> None:
        now = time.monotonic()
        if self._signal is None:
            self._signal, self._signal_time = signum, now  # acted on at the next step boundary (after_step)
            return
        if now - self._signal_time < DUPLICATE_SIGNAL_S or signum != signal.SIGINT:
            # The group's signal forwarded again by a launcher (torchrun does), or a job manager repeating its
            # SIGTERM: the save under way is what it asks for. Job managers escalate with SIGKILL, not a signal.
            return
        # Ctrl-C pressed again: the user does not want to wait for the step and the save to end.
        self._restore_signal_handlers()
        raise KeyboardInterrupt
