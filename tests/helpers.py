"""Helpers shared by the test modules (importable as `helpers`: tests/ is on pytest's pythonpath)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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



def run_cli(args: list[str], cwd: Path, module: str = "llm.training.train", timeout: float = 300,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run `python -m <module> args` as a user would; returns the completed process."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env
    )


def read_metrics(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def make_config(tmp_path: Path, *args: str, base: list[str] | None = None):
    """(config, task_class) resolved exactly as the CLI would, with the run dir under tmp_path."""
    from llm.training.train import parse_config

    argv = [*(TINY_REGRESSION if base is None else base), "--logging-log-dir", str(tmp_path / "run"), *args]
    config, task_class, _ = parse_config(argv)
    return config, task_class
