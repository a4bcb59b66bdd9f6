"""Signals as job managers send them: SIGTERM to the whole process group (SLURM, Kubernetes, torchrun), with
data loader workers, and kill -9 at random points. Every run must save once, exit cleanly and resume bitwise.

Each run is a real `python -m llm.training.train` in its own session, so `os.killpg` reaches the training
process, its loader workers and (for spawn) the launcher, exactly as a job manager's signal does.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import CKPT, REPO, TINY_REGRESSION
from safetensors.torch import load_file

from llm.artifacts.checkpoint import list_checkpoints, verify_checkpoint

# Each test runs several real training processes (two-process jobs among them) to their end: the slow tier.
pytestmark = [pytest.mark.skipif(not hasattr(os, "killpg"), reason="process groups are POSIX"), pytest.mark.slow]

WORKERS = ["--data-num-workers", "2"]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def _start(cwd: Path, args: list[str], launcher: list[str] | None = None) -> subprocess.Popen:
    command = launcher or [sys.executable, "-m", "llm.training.train"]
    return subprocess.Popen([*command, *TINY_REGRESSION, *CKPT, *args], cwd=cwd, env=_env(), text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)


def _lines(run: Path) -> int:
    try:
        return (run / "metrics.jsonl").read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def _wait_for_lines(proc: subprocess.Popen, run: Path, count: int, timeout: float = 120.0) -> bool:
    """Wait until metrics.jsonl has `count` lines; False if the run ended first."""
    deadline = time.monotonic() + timeout
    while _lines(run) < count:
        if proc.poll() is not None:
            return False
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError("timed out waiting for the training process")
        time.sleep(0.02)
    return True


def _finish(proc: subprocess.Popen, timeout: float = 180.0) -> str:
    try:
        _, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    return stderr


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model.safetensors"))


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_group_sigterm_with_loader_workers_saves_once_exits_0_and_resumes_exactly(tmp_path):
    common = ["--training-max-steps", "150", *WORKERS]
    straight = _start(tmp_path, [*common, "--logging-log-dir", "straight"])
    run = tmp_path / "stopped"
    proc = _start(tmp_path, [*common, "--logging-log-dir", "stopped"])
    assert _wait_for_lines(proc, run, 4), _finish(proc)
    os.killpg(proc.pid, signal.SIGTERM)  # the training process and both loader workers, as SLURM does
    stderr = _finish(proc)
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr and "error" not in stderr.lower(), stderr
    assert stderr.count("saved checkpoint") == 1 and "(signal)" in stderr, stderr
    (step, path), = list_checkpoints(run / "checkpoints")
    assert verify_checkpoint(path)["step"] == step and 4 <= step < 150
    assert f"stopped by SIGTERM at step {step} of 140" in stderr  # 10 epochs of 14 steps
    resumed = _start(tmp_path, [*common, "--logging-log-dir", "stopped"])
    stderr = _finish(resumed)
    assert resumed.returncode == 0 and f"resumed from stopped/checkpoints/{path.name}" in stderr, stderr
    assert _finish(straight) is not None and straight.returncode == 0
    assert _same(_weights(tmp_path / "straight"), _weights(run))


@pytest.mark.parametrize("launcher", ["spawn", "torchrun"])
def test_group_sigterm_to_a_two_process_job_saves_once(tmp_path, launcher):
    run = tmp_path / "run"
    args = ["--training-max-steps", "3000", "--training-epochs", "1000", *WORKERS, "--logging-log-dir", "run"]
    if launcher == "spawn":
        proc = _start(tmp_path, [*args, "--distributed-nproc-per-node", "2"])
    else:
        # torchrun starts its workers in sessions of their own and forwards the signal to them.
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                    "--monitor-interval", "0.2", "-m", "llm.training.train"]
        proc = _start(tmp_path, args, launcher=torchrun)
    assert _wait_for_lines(proc, run, 3, timeout=240), _finish(proc)
    os.killpg(proc.pid, signal.SIGTERM)  # the launcher, both ranks and their loader workers
    stderr = _finish(proc)
    if launcher == "spawn":  # the launcher waits for its workers and exits with their status
        assert proc.returncode == 0, stderr
        assert "Traceback" not in stderr, stderr
    # (torchrun itself reports the signal it got and exits non-zero; its workers must still save once.)
    assert stderr.count("saved checkpoint") == 1, stderr
    (step, path), = list_checkpoints(run / "checkpoints")
    assert verify_checkpoint(path)["step"] == step >= 3
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".tmp")]
    assert f"stopped by SIGTERM at step {step} of 3000" in stderr


def test_a_loop_of_group_sigterms_and_kill_9s_ends_bitwise_equal_to_an_uninterrupted_run(tmp_path):
    common = ["--training-max-steps", "40", "--checkpoint-interval", "2", *WORKERS]
    straight = _start(tmp_path, [*common, "--logging-log-dir", "straight"])
    run, rng = tmp_path / "run", random.Random(12)
    interruptions, stderr = [], ""
    for attempt in range(8):
        before, sig = _lines(run), None
        proc = _start(tmp_path, [*common, "--logging-log-dir", "run"])
        if attempt < 3 and _wait_for_lines(proc, run, before + rng.randint(1, 8)):
            sig = signal.SIGTERM if attempt % 2 == 0 else signal.SIGKILL
            os.killpg(proc.pid, sig)
            interruptions.append(sig)
        stderr = _finish(proc)
        if sig != signal.SIGKILL:
            assert proc.returncode == 0, stderr
        if proc.returncode == 0 and "saved final weights" in stderr and "stopped by" not in stderr:
            break
        for _, path in list_checkpoints(run / "checkpoints"):
            verify_checkpoint(path)  # whatever was interrupted, every committed checkpoint is whole
    assert len(interruptions) >= 2, interruptions  # the run was really interrupted, both ways
    assert "Traceback" not in stderr, stderr
    _finish(straight)
    assert straight.returncode == 0
    assert _same(_weights(tmp_path / "straight"), _weights(run))
