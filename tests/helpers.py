"""Helpers shared by the test modules (importable as `helpers`: tests/ is on pytest's pythonpath)."""

from __future__ import annotations

import builtins
import contextlib
import errno
import io
import json
import logging
import os
import subprocess
import sys
import traceback
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
import torch

from llm.training.core.callbacks import Callback

REPO = Path(__file__).resolve().parents[1]

# Tiny regression run used across the suite: a couple of seconds end to end.
TINY_REGRESSION = [
    "--task", "regression",
    "--model-hidden-size", "32", "--model-num-layers", "1", "--model-num-heads", "4",
    "--data-num-samples", "256", "--data-seq-len", "8",
    "--training-batch-size", "16", "--training-log-interval", "1",
    "--training-callbacks", "MetricsLogger", "LRSchedulerCallback",
    # The suite's numerical comparisons mean the CPU (one device for both sides); the GPU tier is tests/gpu.
    "--training-device", "cpu",
]
# The tiny run's callbacks plus checkpoints, as flags (a later --training-callbacks replaces the whole list).
CKPT = ["--training-callbacks", "MetricsLogger", "LRSchedulerCallback", "ModelCheckpoint"]



def run_cli(args: list[str], cwd: Path, module: str = "llm.training.train", timeout: float = 300,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run `python -m <module> args` as a user would; returns the completed process."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env
    )


def call_main(main: Callable[[list[str]], int | None], args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Call a CLI's `main(argv)` in this process as `python -m <module> args` would run it in `cwd`.

    Returns what `run_cli` returns: the exit status and the text of stdout and stderr, where stderr also holds what
    the real process would have printed there: the warnings Python shows by default (every one of them, so a check
    for "one line and nothing else" stays as strict) and the traceback of an exception that escapes `main`. Saves
    the ~2 s of interpreter and torch start-up a subprocess pays. Things only a real process shows (C++ warnings
    written to fd 2, a crash at exit, `python -m` putting `cwd` on sys.path for plugins) need `run_cli`.
    """
    out, err = io.StringIO(), io.StringIO()
    llm_logger = logging.getLogger("llm")
    saved_logger = (list(llm_logger.handlers), llm_logger.level, llm_logger.propagate)
    # A fresh process has no handlers on it: one an earlier in-process run left (a console handler writing to
    # whatever sys.stderr is now) would otherwise add its lines to this call's stderr.
    llm_logger.handlers[:] = []
    llm_logger.setLevel(logging.NOTSET)
    llm_logger.propagate = True
    old_cwd = os.getcwd()
    os.chdir(cwd)
    try:
        with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(out), \
                contextlib.redirect_stderr(err):
            # The interpreter's default filters (what `python -m` shows), but every occurrence rather than once.
            warnings.resetwarnings()
            warnings.simplefilter("always")
            for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
                warnings.filterwarnings("ignore", category=category)
            try:
                status = main(list(args))
            except SystemExit as exc:
                status = exc.code
                if status is not None and not isinstance(status, int):
                    print(status, file=sys.stderr)  # what the interpreter does with sys.exit("message")
                    status = 1
            except Exception:  # noqa: BLE001  (the real process would die with this traceback)
                traceback.print_exc()
                status = 1
    finally:
        os.chdir(old_cwd)
        # A run sets up the "llm" logger (a file handler into the run directory); leave it as it was.
        for handler in llm_logger.handlers:
            if handler not in saved_logger[0]:
                handler.close()
        llm_logger.handlers[:] = saved_logger[0]
        llm_logger.setLevel(saved_logger[1])
        llm_logger.propagate = saved_logger[2]
    shown = "".join(warnings.formatwarning(w.message, w.category, w.filename, w.lineno, w.line) for w in caught)
    return subprocess.CompletedProcess(["main", *args], status or 0, out.getvalue(), shown + err.getvalue())


def read_metrics(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def make_config(tmp_path: Path, *args: str, base: list[str] | None = None):
    """(config, task_class) resolved exactly as the CLI would, with the run dir under tmp_path."""
    from llm.training.train import parse_config

    argv = [*(TINY_REGRESSION if base is None else base), "--logging-log-dir", str(tmp_path / "run"), *args]
    config, task_class, _ = parse_config(argv)
    return config, task_class


def tiny_engine(workdir: Path, *flags: str, base: list[str] | None = None, task_class: type | None = None,
                callbacks: Iterable[Any] | None = None, extra_callbacks: Iterable[Any] = (), prepare: bool = True,
                run: bool = False) -> Any:
    """A `TrainingEngine` built the way `train_worker` builds one (`llm.training.train.build_engine`), from the tiny
    run's flags (`TINY_REGRESSION`, or `base`) plus `flags`; the run directory is `workdir/run` unless the flags
    name another (`--logging-log-dir`).

    task_class replaces the configured task; callbacks replace the configured callbacks and extra_callbacks come
    after them; prepare creates the run directory first, as the CLI does; run also runs the engine. Tests get it
    bound to their tmp_path as the `make_engine` fixture (conftest.py); module fixtures call it directly.
    """
    from llm.training.core.callbacks import build_callbacks
    from llm.training.train import build_engine, prepare_run_dir

    config, configured_task = make_config(workdir, *flags, base=base)
    if prepare:
        prepare_run_dir(config)
    chosen = build_callbacks(config) if callbacks is None else list(callbacks)
    engine = build_engine(config, task_class or configured_task, callbacks=[*chosen, *extra_callbacks])
    if run:
        engine.run()
    return engine


def nan_task(*steps: int) -> type:
    """A regression task whose loss is NaN at the optimizer steps `steps` (1-based; no accumulation)."""
    from llm.training.tasks.regression_task import RegressionTask

    class NaNTask(RegressionTask):
        nan_steps = frozenset(steps)

        def __init__(self, config: Any) -> None:
            super().__init__(config)
            self.calls = 0

        def train_step(self, batch: Any, model: Any, criterion: Any) -> Any:
            loss, metrics = super().train_step(batch, model, criterion)
            self.calls += 1
            return (loss * float("nan") if self.calls in self.nan_steps else loss), metrics

    return NaNTask


def poison_task(*positions: tuple[int, int], factor: float = float("nan")) -> type:
    """A regression task whose loss is multiplied by `factor` (NaN, or a large number for a loss spike) on the
    micro-batches at the data positions `positions`, (epoch, micro-batch index) of the data module: the poison is in
    the data, so a run that trains on that batch again meets it again, and one that skips it does not."""
    from llm.training.tasks.regression_task import RegressionTask

    class PoisonTask(RegressionTask):
        poisoned = frozenset(positions)

        def train_step(self, batch: Any, model: Any, criterion: Any) -> Any:
            loss, metrics = super().train_step(batch, model, criterion)
            position = self.context.data_module.position  # the engine advances it after the step
            return (loss * factor if (position.epoch, position.batch) in self.poisoned else loss), metrics

    return PoisonTask


def disk_filling_open(fails: Callable[[str, str], bool]) -> Callable[..., Any]:
    """A stand-in for `open` (monkeypatch it over `builtins.open`): a file for which `fails(path, mode)` holds
    takes half of its first write and then raises ENOSPC, as a disk filling up mid-file does."""
    real_open = builtins.open

    class HalfWritten:
        def __init__(self, f: Any) -> None:
            self.f = f

        def write(self, data: Any) -> int:
            self.f.write(data[: len(data) // 2])
            self.f.flush()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __enter__(self) -> HalfWritten:
            return self

        def __exit__(self, *exc: object) -> None:
            self.f.close()

    def half_open(path: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        f = real_open(path, mode, *args, **kwargs)
        return HalfWritten(f) if fails(str(path), mode) else f

    return half_open


class Crash(Callback):
    """Simulates a crash (an exception) after optimizer step `at_step`."""

    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_batch_end(self, logs=None) -> None:
        if self.engine.state.step == self.at_step:
            raise RuntimeError(f"simulated crash at step {self.at_step}")


# The GPU tier (tests/gpu/): its device (`LLM_GPU_TIER_DEVICE=cpu` is a dry run of the same code on the CPU) and the
# marks every module of it carries (skipped without CUDA unless the device is the CPU).
GPU_TIER_DEVICE = os.environ.get("LLM_GPU_TIER_DEVICE", "cuda")
GPU_TIER_ON_CUDA = GPU_TIER_DEVICE.startswith("cuda")
GPU_TIER_MARKS = [
    pytest.mark.gpu,
    pytest.mark.skipif(GPU_TIER_ON_CUDA and not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def gpu_lm_args(tmp_path: Path, device: str, *extra: str, hidden: int = 64, batch: int = 8) -> list[str]:
    """The GPU tier's small lm run (tests/gpu/): a generated code corpus, 2 layers of 4 heads (2 KV heads)."""
    corpus = tmp_path / "corpus.txt"
    if not corpus.exists():
        tmp_path.mkdir(parents=True, exist_ok=True)
        corpus.write_text("".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(800)), "utf-8")
    return ["--task", "lm", "--data-path", str(corpus), "--data-cache-dir", str(tmp_path / "cache"),
            "--data-seq-len", "64", "--model-max-seq-len", "64", "--model-hidden-size", str(hidden),
            "--model-num-layers", "2", "--model-num-heads", "4", "--model-num-kv-heads", "2", "--training-batch-size",
            str(batch), "--training-log-interval", "1", "--training-val-max-batches", "2", "--training-device", device,
            "--training-callbacks", "MetricsLogger", *extra]

