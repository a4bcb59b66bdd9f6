"""A battery of bad invocations, each run as a user would: `python -m llm.training.train ...`.

Every one must exit with status 2, print one `error: ...` line naming the problem (no traceback),
and leave nothing half-made behind: no run directory for a config error, no checkpoint change for a
checkpoint error. The subprocesses run concurrently (each pays ~2 s of imports), so the module stays fast.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path
from typing import Callable

import pytest
import torch
from helpers import REPO, TINY_REGRESSION, make_config

from llm.training.core.runlock import LockHolder

# A valid run with a complete checkpoint at step 2; the checkpoint cases copy and spoil it.
CKPT_FLAGS = ["--training-callbacks", "MetricsLogger", "LRSchedulerCallback", "ModelCheckpoint",
              "--training-max-steps", "4"]
STATE = "run/checkpoints/step-00000002/trainer_state_rank0.pt"
MANIFEST = "run/checkpoints/step-00000002/manifest.json"


class Payload:
    """Unpickling this would create the file `marker`: stands in for arbitrary code in a crafted file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _flip_byte(case: Path) -> None:
    path = case / STATE
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _rehash(case: Path, name: str) -> None:
    manifest = json.loads((case / MANIFEST).read_text())
    data = (case / MANIFEST).parent.joinpath(name).read_bytes()
    manifest["files"][name] = {"sha256": sha256(data).hexdigest(), "bytes": len(data)}
    (case / MANIFEST).write_text(json.dumps(manifest))


def _malicious(case: Path) -> None:
    torch.save({"state": Payload(str(case / "pwned"))}, case / STATE)
    _rehash(case, "trainer_state_rank0.pt")  # a checksum cannot vouch for content: refusal must not rely on it


def _edit_manifest(**changes) -> Callable[[Path], None]:
    def edit(case: Path) -> None:
        manifest = json.loads((case / MANIFEST).read_text())
        manifest.update(changes)
        (case / MANIFEST).write_text(json.dumps(manifest))

    return edit


def _garbage_manifest(case: Path) -> None:
    (case / MANIFEST).write_text("{not json")


@dataclass
class Case:
    id: str
    args: list[str]
    expect: str  # text the error line must contain (the field or the problem)
    kind: str = "config"  # config: fails before any file is written | data | checkpoint
    files: dict[str, str] = field(default_factory=dict)
    spoil: Callable[[Path], None] | None = None  # checkpoint cases: how the copied run is damaged
    raw: bool = False  # args are the whole command line (otherwise they follow the tiny run's flags)


RESUME = [*CKPT_FLAGS, "--logging-log-dir", "run"]
CASES = [
    # Command line
    Case("unknown-flag", ["--training-lrr", "0.1"], "'--training-lrr' (did you mean '--training-lr'?)"),
    Case("not-a-float", ["--training-lr", "abc"], "--training-lr"),
    Case("stray-argument", ["regression", *TINY_REGRESSION], "unexpected argument 'regression'", raw=True),
    Case("unknown-logger", ["--logging-loggers", "console", "tensorbord"], "did you mean 'tensorboard'"),
    Case("logger-package-missing", ["--logging-loggers", "+wandb"], "needs the wandb package"),
    Case("unknown-task", ["--task", "regresion"], "did you mean 'regression'"),
    Case("task-module-missing", ["--task", "no_such_pkg.tasks:MyTask"], "no_such_pkg"),
    Case("plugin-missing", ["--plugins", "no_such_plugin"], "plugins"),
    # Values
    Case("negative-lr", ["--training-lr", "-1"], "training.lr"),
    Case("top-k-over-experts", ["--model-use-moe", "--model-num-experts", "2", "--model-top-k", "3"], "model.top_k"),
    Case("heads-do-not-divide", ["--model-hidden-size", "30", "--model-num-heads", "4"], "model.hidden_size"),
    Case("unknown-callback", ["--training-callbacks", "ModelCheckpoints"], "did you mean 'ModelCheckpoint'"),
    Case("unknown-optimizer", ["--training-optimizer", "adamx"], "training.optimizer"),
    Case("bad-precision", ["--training-precision", "fp8"], "training.precision"),
    Case("fp16-on-cpu", ["--training-precision", "fp16", "--training-device", "cpu"], "training.precision"),
    Case("bad-nan-policy", ["--training-nan-policy", "ignore"], "training.nan_policy"),
    Case("one-beta", ["--training-betas", "0.9"], "training.betas"),
    Case("bad-backend", ["--distributed-backend", "mpi"], "distributed.backend"),
    Case("keep-last-zero", ["--checkpoint-keep-last", "0"], "checkpoint.keep_last"),
    Case("bad-checkpoint-mode", ["--checkpoint-mode", "best"], "checkpoint.mode"),
    Case("monitor-not-validation", ["--checkpoint-monitor", "train/loss"], "checkpoint.monitor"),
    Case("resume-missing-path", ["--checkpoint-resume", "nowhere/step-00000001"], "checkpoint.resume"),
    # YAML
    Case("yaml-missing", ["--config", "missing.yaml"], "config: file not found"),
    Case("yaml-syntax", ["--config", "c.yaml"], "not valid YAML", files={"c.yaml": "training: [lr: 1\n"}),
    Case("yaml-unknown-key", ["--config", "c.yaml"], "training.lrr", files={"c.yaml": "training:\n  lrr: 0.1\n"}),
    Case("yaml-wrong-type", ["--config", "c.yaml"], "training.batch_size",
         files={"c.yaml": "training:\n  batch_size: big\n"}),
    Case("yaml-not-a-mapping", ["--config", "c.yaml"], "mapping", files={"c.yaml": "- a\n- b\n"}),
    # Data
    Case("data-path-missing", ["--data-path", "missing.csv"], "data.path"),
    Case("data-not-csv", ["--data-path", "d.txt"], "data.path", files={"d.txt": "1,2\n3,4\n"}),
    Case("csv-non-numeric", ["--data-path", "d.csv"], "line 3 has a non-numeric value", kind="data",
         files={"d.csv": "a,b,y\n1,2,3\n4,x,6\n7,8,9\n"}),
    Case("batch-larger-than-data", ["--training-batch-size", "1000"], "training.batch_size", kind="data"),
    # Checkpoints
    Case("resume-not-a-checkpoint", [*RESUME, "--checkpoint-resume", "empty"], "no complete checkpoint in empty",
         kind="checkpoint", files={"empty/README": "nothing here\n"}),
    Case("resume-corrupt", [*RESUME, "--checkpoint-resume", "run/checkpoints/step-00000002"], "fails its checksum",
         kind="checkpoint", spoil=_flip_byte),
    Case("resume-other-shape", [*RESUME, "--model-hidden-size", "16"], "the model does not match", kind="checkpoint"),
    Case("resume-malicious-pickle", RESUME, "refusing to load", kind="checkpoint", spoil=_malicious),
    Case("resume-garbage-manifest", [*RESUME, "--checkpoint-resume", "run/checkpoints/step-00000002"],
         "manifest.json is unreadable", kind="checkpoint", spoil=_garbage_manifest),
    Case("resume-other-world-size", RESUME, "written by 2 processes", kind="checkpoint",
         spoil=_edit_manifest(world_size=2)),
    # The run directory is held by a live run (the lock names this test process, alive while the case runs).
    Case("run-dir-in-use", ["--logging-log-dir", "run"], "run is in use by pid",
         files={"run/.lock": LockHolder.this_process().to_json()}),
]


# Checkpoint files are untrusted (issue 12). Named explicitly, a malformed checkpoint is an error, never a fallback.
CKPT_DIR = "run/checkpoints/step-00000002"


def _escape_manifest(case: Path) -> None:
    (case / "outside.txt").write_text("not part of the checkpoint\n")
    manifest = json.loads((case / MANIFEST).read_text())
    data = (case / "outside.txt").read_bytes()
    manifest["files"]["../../../outside.txt"] = {"sha256": sha256(data).hexdigest(), "bytes": len(data)}
    (case / MANIFEST).write_text(json.dumps(manifest))


def _malformed_state(case: Path) -> None:
    state = torch.load(case / STATE, weights_only=True)
    del state["rng"]
    torch.save(state, case / STATE)
    _rehash(case, "trainer_state_rank0.pt")


def _yaml_payload(case: Path) -> None:
    (case / CKPT_DIR / "config.yaml").write_text(
        f"!!python/object/apply:builtins.open [{json.dumps(str(case / 'pwned'))}, w]\n")
    _rehash(case, "config.yaml")


def _pickle_as_weights(case: Path) -> None:
    (case / CKPT_DIR / "model.safetensors").write_bytes(pickle.dumps(Payload(str(case / "pwned"))))
    _rehash(case, "model.safetensors")


CASES += [
    Case("resume-manifest-escape", [*RESUME, "--checkpoint-resume", CKPT_DIR], "not a path inside the checkpoint",
         kind="checkpoint", spoil=_escape_manifest),
    Case("resume-manifest-format", [*RESUME, "--checkpoint-resume", CKPT_DIR], "has format 99", kind="checkpoint",
         spoil=_edit_manifest(format=99)),
    Case("resume-malformed-state", [*RESUME, "--checkpoint-resume", CKPT_DIR], "is not a valid trainer state",
         kind="checkpoint", spoil=_malformed_state),
    Case("resume-payload-config", [*RESUME, "--checkpoint-resume", CKPT_DIR], "YAML tags that build Python objects",
         kind="checkpoint", spoil=_yaml_payload),
    Case("resume-pickle-as-weights", [*RESUME, "--checkpoint-resume", CKPT_DIR], "cannot read", kind="checkpoint",
         spoil=_pickle_as_weights),
]

def _snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _launch(case: Case, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    args = case.args if case.raw else [*TINY_REGRESSION, *case.args]
    return subprocess.run([sys.executable, "-m", "llm.training.train", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, Path, dict[str, bytes]]]:
    """Prepare every case's working directory, run all cases at once, return (result, cwd, files before)."""
    from llm.training.train import train_worker

    base = tmp_path_factory.mktemp("bad-inputs")
    config, task_class = make_config(base, *CKPT_FLAGS, "--checkpoint-interval", "2",
                                     "--checkpoint-keep-last", "2")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_worker(0, 1, config, task_class)
    finally:
        torch.set_num_threads(threads)
    shutil.rmtree(base / "run" / "checkpoints" / "step-00000004")  # resume from step 2 to step 4
    prepared = {}
    for case in CASES:
        cwd = base / case.id
        cwd.mkdir()
        if case.kind == "checkpoint" and case.id != "resume-not-a-checkpoint":
            shutil.copytree(base / "run", cwd / "run")
            if case.spoil is not None:
                case.spoil(cwd)
        for name, text in case.files.items():
            (cwd / name).parent.mkdir(parents=True, exist_ok=True)
            (cwd / name).write_text(text)
        prepared[case.id] = (cwd, _snapshot(cwd))
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {case.id: pool.submit(_launch, case, prepared[case.id][0]) for case in CASES}
        return {cid: (future.result(), *prepared[cid]) for cid, future in futures.items()}


def test_there_are_at_least_25_distinct_cases():
    assert len(CASES) >= 25 and len({c.id for c in CASES}) == len(CASES)
    assert len({tuple(c.args) + tuple(c.files.items()) + (c.spoil,) for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_clear_error(case: Case, outcomes):
    result, cwd, before = outcomes[case.id]
    stderr = result.stderr
    assert result.returncode == 2, stderr
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], stderr
    assert case.expect in errors[0], errors[0]
    after = _snapshot(cwd)
    leftovers = [name for name in after if ".tmp" in name]
    assert not leftovers, stderr
    if case.kind == "config":
        assert len(lines) == 1, stderr  # nothing else was started, so nothing else was said
        assert after == before  # no run directory, no file touched
    elif case.kind == "data":
        runs = {Path(name).parts[0] for name in after if name not in before}
        assert runs <= {"runs"}
        assert not [n for n in after if n not in before and Path(n).name not in ("config.yaml", "train.log")]
    else:
        changed = {n for n in set(after) | set(before) if "checkpoints" in n and after.get(n) != before.get(n)}
        assert not changed, stderr
    assert not (cwd / "pwned").exists()
