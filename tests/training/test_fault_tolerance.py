"""Failures: non-finite losses (raise/skip), signals, kill -9 mid-save, disk full, crashes.

Each failure must leave a resumable run: the last complete checkpoint untouched and nothing that
looks complete but is not.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from helpers import CKPT, REPO, TINY_REGRESSION, make_config, nan_task, read_metrics, tiny_engine
from safetensors.torch import load_file

from llm.artifacts import checkpoint as ckpt
from llm.artifacts.checkpoint import CheckpointError, list_checkpoints, verify_checkpoint
from llm.training.core.callbacks import Callback, build_callbacks
from llm.training.core.engine import NonFiniteLossError, TrainingEngine
from llm.training.train import build_engine, prepare_run_dir


def train(tmp_path: Path, run: str, *args: str, task_class=None, extra=(), start: bool = True) -> TrainingEngine:
    """The tiny run with checkpoints in `tmp_path/run`, run to its end unless start=False."""
    flags = [*CKPT, *args, "--logging-log-dir", str(tmp_path / run)]
    return tiny_engine(tmp_path, *flags, task_class=task_class, extra_callbacks=extra, run=start)


def tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- non-finite losses ----------------------------------------------------------------------------


def test_nan_raise_stops_before_the_update_and_keeps_the_checkpoint(tmp_path):
    engine = train(tmp_path, "run", "--training-max-steps", "8", "--checkpoint-interval", "2", start=False)
    engine.task = nan_task(5)(engine.config)
    with pytest.raises(NonFiniteLossError, match="step 5"):
        engine.run()
    root = tmp_path / "run" / "checkpoints"
    assert [s for s, _ in list_checkpoints(root)] == [2, 4]
    assert not [p for p in root.iterdir() if p.name.startswith(".tmp")]
    verify_checkpoint(root / "step-00000004")
    # The NaN step's update was never applied: the live weights are still those of step 4.
    saved = load_file(str(root / "step-00000004" / "model.safetensors"))
    live = {k: v.detach() for k, v in engine.unwrapped_model.state_dict().items() if k in saved}
    assert same_weights(saved, live)


def test_nan_skip_drops_the_update_and_logs_it(tmp_path):
    engine = train(tmp_path, "run", "--training-max-steps", "8", "--training-nan-policy", "skip",
                   "--training-max-skipped-steps", "3", task_class=nan_task(3, 4))
    assert engine.state.step == 8 and engine.state.skipped_steps == 2
    records = [r for r in read_metrics(tmp_path / "run") if "train/skipped_steps" in r]
    assert [r["train/skipped_steps"] for r in records] == [0, 0, 1, 2, 2, 2, 2, 2]
    assert records[2]["train/loss"] is None  # the NaN is logged as null, not hidden
    assert all(torch.isfinite(p).all() for p in engine.unwrapped_model.parameters())


def test_nan_skip_stops_after_max_consecutive_skips(tmp_path):
    with pytest.raises(NonFiniteLossError, match="3 consecutive"):
        train(tmp_path, "run", "--training-max-steps", "10", "--training-nan-policy", "skip",
              "--training-max-skipped-steps", "3", task_class=nan_task(*range(4, 20)))


# -- signals --------------------------------------------------------------------------------------


class SendSignal(Callback):
    def __init__(self, at_step: int, signum: int) -> None:
        self.at_step, self.signum = at_step, signum

    def on_batch_end(self, logs=None) -> None:
        if self.engine.state.step == self.at_step:
            os.kill(os.getpid(), self.signum)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_stops_and_resumes_exactly(tmp_path, signum):
    common = ["--training-max-steps", "10"]
    train(tmp_path, "straight", *common)
    handler = signal.getsignal(signum)
    # SendSignal runs before ModelCheckpoint's on_batch_end, so the stop lands at the same step.
    config, task_class = make_config(tmp_path, *CKPT, *common, "--logging-log-dir", str(tmp_path / "stopped"))
    prepare_run_dir(config)
    callbacks = build_callbacks(config)
    callbacks.insert(-1, SendSignal(4, signum))
    engine = build_engine(config, task_class, callbacks=callbacks)
    engine.run()
    assert engine.state.step == 4 and engine.should_stop
    assert signal.getsignal(signum) is handler  # previous handler restored
    root = tmp_path / "stopped" / "checkpoints"
    assert [s for s, _ in list_checkpoints(root)] == [4]
    verify_checkpoint(root / "step-00000004")
    train(tmp_path, "stopped", *common)
    assert same_weights(load_file(str(tmp_path / "straight" / "model.safetensors")),
                        load_file(str(tmp_path / "stopped" / "model.safetensors")))


def test_a_signal_save_never_holds_a_refused_update(tmp_path):
    # Logging every 10 steps, the engine may find the NaN of step 3 only lazily; the save at step 4 must check.
    engine = train(tmp_path, "run", "--training-max-steps", "8", "--training-log-interval", "10", start=False)
    engine.task = nan_task(3)(engine.config)
    engine.callbacks.callbacks.insert(-1, SendSignal(4, signal.SIGTERM))
    with pytest.raises(NonFiniteLossError, match="step 3"):
        engine.run()
    root = tmp_path / "run" / "checkpoints"
    assert not root.exists() or not list(root.iterdir())  # no checkpoint, not even a temp directory


def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{tmp_path}", "OMP_NUM_THREADS": "1"}


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"process ended early: {proc.communicate()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for the training process")
        time.sleep(0.05)


@pytest.mark.slow  # a training run in a real process
def test_sigterm_to_a_real_process_saves_and_exits_cleanly(tmp_path):
    run = tmp_path / "run"
    args = [*TINY_REGRESSION, *CKPT, "--training-max-steps", "5000", "--training-epochs", "1000",
            "--logging-log-dir", str(run)]
    proc = subprocess.Popen([sys.executable, "-m", "llm.training.train", *args], cwd=tmp_path, env=_env(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run / "metrics.jsonl"
    _wait_for(lambda: metrics.exists() and metrics.read_text().count("\n") >= 3, proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr and "received SIGTERM" in stderr
    (step, path), = list_checkpoints(run / "checkpoints")
    assert verify_checkpoint(path)["step"] == step >= 3


# -- crashes mid-save and write errors -------------------------------------------------------------

SLOW_SAVE_PLUGIN = """
import os, time
from llm.artifacts import checkpoint

_write_manifest = checkpoint.write_manifest

def write_manifest(ckpt_dir, step, *args, **kwargs):
    # Every other file of the checkpoint is written by now: hang here until killed.
    if step == int(os.environ["SLOW_SAVE_STEP"]):
        open(os.environ["SLOW_SAVE_MARKER"], "w").close()
        time.sleep(600)
    return _write_manifest(ckpt_dir, step, *args, **kwargs)

checkpoint.write_manifest = write_manifest
"""


@pytest.mark.slow  # a training run in a real process
def test_kill_9_during_a_save_leaves_a_resumable_run(tmp_path):
    (tmp_path / "slow_save.py").write_text(textwrap.dedent(SLOW_SAVE_PLUGIN))
    common = ["--training-max-steps", "12", "--checkpoint-interval", "4"]
    marker, run = tmp_path / "saving", tmp_path / "killed"
    env = {**_env(tmp_path), "SLOW_SAVE_STEP": "8", "SLOW_SAVE_MARKER": str(marker)}
    args = [*TINY_REGRESSION, *CKPT, *common, "--logging-log-dir", str(run), "--plugins", "slow_save"]
    proc = subprocess.Popen([sys.executable, "-m", "llm.training.train", *args], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for(marker.exists, proc)
    proc.kill()
    proc.wait(timeout=30)
    root = run / "checkpoints"
    assert (root / ".tmp-step-00000008" / "model.safetensors").exists()  # killed mid-write
    assert [s for s, _ in list_checkpoints(root)] == [4]
    train(tmp_path, "straight", *common)
    engine = train(tmp_path, "killed", *common)
    assert engine.state.step == 12
    assert not (root / ".tmp-step-00000008").exists()
    assert same_weights(load_file(str(tmp_path / "straight" / "model.safetensors")),
                        load_file(str(run / "model.safetensors")))


def test_disk_full_is_one_clear_error_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    real_save, calls = ckpt.save_trainer_state, []

    def save_then_fill_the_disk(state, path):
        calls.append(path)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real_save(state, path)

    monkeypatch.setattr(ckpt, "save_trainer_state", save_then_fill_the_disk)
    with pytest.raises(CheckpointError) as info:
        train(tmp_path, "run", "--training-max-steps", "6", "--checkpoint-interval", "2")
    message = str(info.value)
    assert "No space left on device" in message and "step-00000002 is intact" in message
    assert "\n" not in message
    root = tmp_path / "run" / "checkpoints"
    assert [p.name for p in root.iterdir()] == ["step-00000002"]
    verify_checkpoint(root / "step-00000002")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_checkpoint_dir_is_one_clear_error(tmp_path):
    root = tmp_path / "run" / "checkpoints"
    root.mkdir(parents=True)
    root.chmod(0o555)
    try:
        with pytest.raises(CheckpointError, match="Permission denied"):
            train(tmp_path, "run", "--training-max-steps", "2")
    finally:
        root.chmod(0o755)


CRASH_TASK = """
from llm.training.tasks.regression_task import RegressionTask

class CrashTask(RegressionTask):
    calls = 0

    def train_step(self, batch, model, criterion):
        CrashTask.calls += 1
        if CrashTask.calls == 3:
            raise RuntimeError("boom in train_step")
        return super().train_step(batch, model, criterion)
"""


def test_a_crash_flushes_logs_keeps_checkpoints_and_exits_non_zero(tmp_path):
    (tmp_path / "crash_task.py").write_text(textwrap.dedent(CRASH_TASK))
    run = tmp_path / "run"
    args = [*TINY_REGRESSION, *CKPT, "--task", "crash_task:CrashTask", "--training-max-steps", "6",
            "--checkpoint-interval", "1", "--logging-log-dir", str(run)]
    proc = subprocess.run([sys.executable, "-m", "llm.training.train", *args], cwd=tmp_path, env=_env(tmp_path),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "boom in train_step" in proc.stderr
    assert [r["step"] for r in read_metrics(run) if "train/loss" in r] == [1, 2]
    assert [s for s, _ in list_checkpoints(run / "checkpoints")] == [1, 2]
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".tmp")]


# -- disk full: every write failure is one line naming the file ------------------------------------


def _disk_full(path) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as the writers raise it: no file name


def test_disk_full_at_the_final_weights_keeps_the_resumable_checkpoint(tmp_path, monkeypatch):
    def fail(model, path, step=None):
        Path(str(path) + ".tmp").write_bytes(b"partial")  # what a writer leaves when the disk fills mid-file
        raise _disk_full(path)

    monkeypatch.setattr(ckpt, "save_weights", fail)
    with pytest.raises(CheckpointError) as info:
        train(tmp_path, "run", "--training-max-steps", "6")
    message, run = str(info.value), tmp_path / "run"
    assert "\n" not in message
    assert f"cannot write {run / 'model.safetensors'}: No space left on device" in message
    assert "step-00000006 is complete" in message
    verify_checkpoint(run / "checkpoints" / "step-00000006")  # written first, so the run is not lost
    assert not (run / "model.safetensors").exists() and not (run / "model.safetensors.tmp").exists()


def test_disk_full_inside_torch_save_names_the_file_and_the_cause(tmp_path, monkeypatch):
    # torch.save reports a full disk as a RuntimeError about stream positions; the OSError is its context.
    def fail(state, path):
        try:
            raise _disk_full(path)
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598") from None

    monkeypatch.setattr(ckpt, "save_trainer_state", fail)
    with pytest.raises(CheckpointError) as info:
        train(tmp_path, "run", "--training-max-steps", "2")
    assert "trainer_state_rank0.pt: No space left on device" in str(info.value)


def test_write_failure_reason_finds_the_os_error():
    from llm.fs import write_failure, write_failure_reason

    try:
        try:
            raise _disk_full("x")
        except OSError as exc:
            raise RuntimeError("unexpected pos 704 vs 598") from exc
    except RuntimeError as wrapped:
        assert write_failure_reason(wrapped) == "No space left on device"
    rust = Exception("Error while serializing: I/O error: No space left on device (os error 28)")
    assert write_failure(rust, "/r/w.safetensors") == "cannot write /r/w.safetensors: No space left on device"
    assert write_failure_reason(RuntimeError("first\nlast line")) == "last line"


class _FillingFile:
    """An unbuffered file whose disk fills after `room` more bytes: a short write, then ENOSPC."""

    def __init__(self, path: Path, room: int) -> None:
        self.raw, self.room = open(path, "ab", buffering=0), room  # noqa: SIM115

    def fileno(self) -> int:
        return self.raw.fileno()

    def write(self, data) -> int:
        if self.room <= 0:
            raise _disk_full(None)
        written = self.raw.write(bytes(data[: self.room]))
        self.room -= written
        return written

    def close(self) -> None:
        self.raw.close()


def test_metrics_jsonl_never_ends_in_a_partial_line(tmp_path):
    import logging

    from llm.errors import UserError
    from llm.training.observers.sinks import MetricsLogger

    engine = type("E", (), {"run_dir": tmp_path, "logger": logging.getLogger("llm")})()
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo')  # killed mid-write
    sink = MetricsLogger()
    sink.open(engine)  # the partial line of the earlier process is cut
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1, "loss": 1.0}\n'
    sink.write({"step": 2, "loss": 0.5})
    sink._file.close()
    sink._file = _FillingFile(tmp_path / "metrics.jsonl", room=10)
    with pytest.raises(UserError) as info:
        sink.write({"step": 3, "loss": 0.25})
    assert str(info.value) == f"logging: cannot write {tmp_path / 'metrics.jsonl'}: No space left on device"
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.5}\n'
    sink.write({"step": 4, "loss": 0.1})  # refused quietly after the failure: the run is ending with its error
    sink.close()
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}]
