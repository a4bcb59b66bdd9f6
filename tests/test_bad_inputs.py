"""A battery of bad invocations of `python -m llm.training.train ...`.

Every one must exit with status 2, print one `error: ...` line naming the problem (no traceback),
and leave nothing half-made behind: no run directory for a config error, no checkpoint change for a
checkpoint error. Most cases call the CLI's `main(argv)` in this process (`helpers.call_main`: same exit status,
same stderr, warnings included), which saves a process start (~2 s of imports) per case; a case marked `process`
runs as a real process: one of each kind (so the real CLI is held to the same rules), the plugins that live in
the case's directory (`python -m` imports them from there, and they must not stay registered in this process),
and the run directory locked by this test process.
"""

from __future__ import annotations

import atexit
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path
from typing import Callable

import pytest
import torch
from helpers import REPO, TINY_REGRESSION, call_main, make_config

from llm.artifacts.lock import LockHolder

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
    process: bool = False  # run as a real `python -m` process (see the module docstring); plugin files imply it

    def __post_init__(self) -> None:
        self.process = self.process or any(name.endswith(".py") for name in self.files)


RESUME = [*CKPT_FLAGS, "--logging-log-dir", "run"]
CASES = [
    # Command line
    Case("unknown-flag", ["--training-lrr", "0.1"], "'--training-lrr' (did you mean '--training-lr'?)",
         process=True),
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
    Case("odd-head-dim", ["--model-hidden-size", "20", "--model-num-heads", "4"], "odd head dimension 5"),
    Case("hf-trainer-flag", ["--save-steps", "10"], "here it is '--checkpoint-interval'"),
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
         files={"d.csv": "a,b,y\n1,2,3\n4,x,6\n7,8,9\n"}, process=True),
    Case("batch-larger-than-data", ["--training-batch-size", "1000"], "training.batch_size", kind="data"),
    # Checkpoints
    Case("resume-not-a-checkpoint", [*RESUME, "--checkpoint-resume", "empty"], "no complete checkpoint in empty",
         kind="checkpoint", files={"empty/README": "nothing here\n"}),
    Case("resume-corrupt", [*RESUME, "--checkpoint-resume", "run/checkpoints/step-00000002"], "fails its checksum",
         kind="checkpoint", spoil=_flip_byte),
    Case("resume-other-shape", [*RESUME, "--model-hidden-size", "16"], "the model does not match", kind="checkpoint"),
    Case("resume-malicious-pickle", RESUME, "refusing to load", kind="checkpoint", spoil=_malicious, process=True),
    Case("resume-garbage-manifest", [*RESUME, "--checkpoint-resume", "run/checkpoints/step-00000002"],
         "manifest.json is unreadable", kind="checkpoint", spoil=_garbage_manifest),
    # Another world size resumes (elastic); a manifest claiming 2 processes must hold both trainer states.
    Case("resume-other-world-size", [*RESUME, "--checkpoint-resume", "run/checkpoints/step-00000002"],
         "has no trainer_state_rank1.pt", kind="checkpoint", spoil=_edit_manifest(world_size=2)),
    # The run directory is held by a live run (the lock names this test process, alive while the case runs).
    Case("run-dir-in-use", ["--logging-log-dir", "run"], "run is in use by pid",
         files={"run/.lock": LockHolder.this_process().to_json()}, process=True),
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


# Item 8: data that cannot hang or lie. Special files live in one temporary directory made at import (the case
# fixture writes only text files); removed when the session exits.
SPECIAL = Path(tempfile.mkdtemp(prefix="llm-bad-data-"))
atexit.register(shutil.rmtree, SPECIAL, True)
os.mkfifo(SPECIAL / "pipe.csv")
for _corpus in ("fifo_corpus", "loop_corpus"):
    (SPECIAL / _corpus / "sub").mkdir(parents=True)
    (SPECIAL / _corpus / "a.txt").write_text("some text to learn from\n" * 40)
os.mkfifo(SPECIAL / "fifo_corpus" / "sub" / "pipe.txt")
os.symlink("..", SPECIAL / "loop_corpus" / "sub" / "loop")
TINY_LM = ["--task", "lm", "--model-preset", "tiny", "--data-seq-len", "16", "--training-batch-size", "2",
           "--training-max-steps", "2", "--training-device", "cpu"]
CSV = {"d.csv": "a,b,y\n1,2,3\n4,5,6\n7,8,9\n"}


def _csv_with(row: str) -> dict[str, str]:
    return {"d.csv": f"a,b,y\n1,2,3\n{row}\n7,8,9\n"}


CASES += [
    Case("csv-is-a-device", ["--data-path", "/dev/zero"], "not a regular file (a character device)"),
    Case("csv-is-a-fifo", ["--data-path", str(SPECIAL / "pipe.csv")], "pipe.csv' is not a regular file (a FIFO)"),
    Case("csv-is-a-directory", ["--data-path", "dir.csv"], "not a regular file (a directory)",
         files={"dir.csv/x": "1\n"}),
    Case("csv-over-size-cap", ["--data-path", "d.csv", "--data-max-file-bytes", "8"], "over data.max_file_bytes=8",
         files=CSV),
    Case("csv-negative-size-cap", ["--data-path", "d.csv", "--data-max-file-bytes", "-1"], "data.max_file_bytes",
         files=CSV),
    Case("csv-wider-than-positions", ["--data-path", "w.csv", "--model-max-seq-len", "16"], "model.max_seq_len",
         files={"w.csv": ",".join(f"c{i}" for i in range(40)) + "\n" + ",".join(["1"] * 40) + "\n"}),
    Case("classification-with-data-path", ["--task", "classification", "--data-path", "d.csv",
                                           "--training-device", "cpu"], "reads no data path", files=CSV, raw=True),
    Case("csv-nan-cell", ["--data-path", "d.csv"], "line 3 column 'b' is 'nan', not a finite number", kind="data",
         files=_csv_with("4,nan,6")),
    Case("csv-overflowing-cell", ["--data-path", "d.csv"], "line 3 column 'a' is '1e400'", kind="data",
         files=_csv_with("1e400,5,6")),
    Case("csv-infinite-target", ["--data-path", "d.csv"], "line 3 column 'y' is '-inf'", kind="data",
         files=_csv_with("4,5,-inf")),
    Case("csv-huge-target", ["--data-path", "d.csv"], "rescale the target column", kind="data",
         files=_csv_with("4,5,1e30")),
    Case("csv-row-too-wide", ["--data-path", "d.csv"], "line 3 has 4 columns, the header has 3", kind="data",
         files=_csv_with("4,5,6,7")),
    Case("csv-row-too-narrow", ["--data-path", "d.csv"], "line 3 has 2 columns, the header has 3", kind="data",
         files=_csv_with("4,5")),
    Case("lm-data-is-a-device", [*TINY_LM, "--data-path", "/dev/zero"], "a character device", kind="data", raw=True),
    Case("lm-fifo-in-corpus", [*TINY_LM, "--data-path", str(SPECIAL / "fifo_corpus")], "pipe.txt' is not a regular",
         kind="data", raw=True),
    Case("lm-fifo-in-glob", [*TINY_LM, "--data-path", str(SPECIAL / "fifo_corpus" / "**" / "*.txt")], "a FIFO",
         kind="data", raw=True),
    Case("lm-directory-loop", [*TINY_LM, "--data-path", str(SPECIAL / "loop_corpus")], "is a directory loop",
         kind="data", raw=True),
    Case("lm-file-over-size-cap", [*TINY_LM, "--data-path", "corpus", "--data-max-file-bytes", "100"],
         "over data.max_file_bytes=100", kind="data", raw=True, files={"corpus/a.txt": "text\n" * 100}),
]


# Resume rules (issue 12, item 5): what a resume cannot carry over is refused before anything is written.
def _later_checkpoint(case: Path) -> None:
    """A later checkpoint of the run (step 3), so that a branch from step 2 or a fresh start would overwrite it."""
    root = case / "run" / "checkpoints"
    shutil.copytree(root / "step-00000002", root / "step-00000003")


CASES += [
    Case("resume-other-optimizer", [*RESUME, "--training-optimizer", "sgd"], "training.optimizer='adamw'",
         kind="checkpoint"),
    Case("resume-other-scheduler", [*RESUME, "--scheduler-type", "step"], "training.scheduler_type",
         kind="checkpoint"),
    Case("resume-none-over-checkpoints", [*RESUME, "--checkpoint-resume", "none"], "--checkpoint-overwrite",
         kind="checkpoint"),
    Case("resume-branch-over-later", [*RESUME, "--checkpoint-resume", CKPT_DIR],
         "holds later checkpoints (step-00000003)", kind="checkpoint", spoil=_later_checkpoint),
]


# Items 7 and 9 (issue 12): every value checked before anything is written; registries and plugins.
def _billion_laughs() -> str:
    """Nine lines of aliases to aliases (< 500 bytes) that stand for a billion strings."""
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"{n}: &{n} [{','.join([f'*{p}'] * 9)}]" for p, n in zip("abcdefgh", "bcdefghi")]
    return "\n".join(lines) + "\n"


def _plugin(module: str, source: str) -> dict[str, str]:
    # A regular file named __pycache__ keeps Python from writing bytecode next to the plugin, so that the case's
    # "nothing written" check still holds.
    return {f"{module}.py": source, "__pycache__": ""}


def _taking(kind: str, name: str, base: str) -> dict[str, str]:
    """A plugin that registers a built-in's name without override=True."""
    module, _, cls = base.rpartition(".")
    return _plugin("dup", f"from {module} import {cls}\nfrom llm.registry import register_{kind}\n"
                          f"register_{kind}({name!r}, type('Mine', ({cls},), {{}}))\n")


def _yaml(text: str) -> dict[str, str]:
    return {"c.yaml": text}


LONG_VALUE = "x" * 2**20  # 1 MiB: the error line quotes a short head and tail of it
CASES += [
    # Numbers: finite, within 64 bits, in range.
    Case("lr-yaml-inf", ["--config", "c.yaml"], "training.lr: invalid value inf; must be a finite number",
         files=_yaml("training:\n  lr: .inf\n")),
    Case("lr-flag-nan", ["--training-lr", "nan"], "training.lr: invalid value nan; must be a finite number"),
    Case("grad-clip-inf", ["--training-grad-clip", "inf"], "training.grad_clip: invalid value inf"),
    Case("beta-inf", ["--training-betas", "0.9", "inf"], "training.betas: invalid value [0.9, inf]"),
    Case("rope-theta-nan", ["--config", "c.yaml"], "model.rope_theta: invalid value nan",
         files=_yaml("model:\n  rope_theta: .nan\n")),
    Case("seed-exponent-text", ["--config", "c.yaml"], "seed: expected int, got '1e23' (str)",
         files=_yaml("seed: 1e23\n")),
    Case("seed-float", ["--config", "c.yaml"], "seed: expected int, got 1e+23 (float)",
         files=_yaml("seed: 1.0e+23\n")),
    Case("seed-over-64-bits", ["--seed", str(2**64)], "seed: invalid value 18446744073709551616; must fit in 64 bits"),
    Case("seed-negative", ["--seed", "-1"], "seed: invalid value -1; an integer in [0, 2**63)"),
    Case("warmup-over-64-bits", ["--config", "c.yaml"], "training.warmup: invalid value 99999999999999999999999",
         files=_yaml("training:\n  warmup: 99999999999999999999999\n")),  # a field the tiny run's flags leave alone
    Case("momentum-negative", ["--training-momentum", "-0.5"],
         "training.momentum: invalid value -0.5; must be in [0, 1)"),
    Case("momentum-one", ["--training-momentum", "1"], "training.momentum"),
    Case("plateau-factor-over-one", ["--training-plateau-factor", "2"], "training.plateau_factor"),
    Case("plateau-patience-negative", ["--training-plateau-patience", "-1"], "training.plateau_patience"),
    Case("early-stopping-patience-zero", ["--training-early-stopping-patience", "0"],
         "training.early_stopping_patience"),
    Case("early-stopping-delta-negative", ["--training-early-stopping-min-delta", "-1"],
         "training.early_stopping_min_delta"),
    Case("timeout-inf", ["--distributed-timeout-minutes", "inf"], "distributed.timeout_minutes: invalid value inf"),
    Case("timeout-overflows", ["--distributed-timeout-minutes", "1e12"], "at most 525600 (a year)"),
    Case("device-not-visible", ["--training-device", "cuda:99"], "training.device: invalid value 'cuda:99'"),
    # The run directory must be creatable before a worker starts.
    Case("log-dir-under-a-file", ["--logging-log-dir", "f/run"], "cannot be created: ", files={"f": "x\n"}),
    Case("log-dir-is-a-file", ["--logging-log-dir", "f"], "logging.log_dir: invalid value 'f'; exists and is not a",
         files={"f": "x\n"}),
    Case("log-dir-name-too-long", ["--logging-log-dir", "n" * 300], "longer than 255 bytes"),
    # YAML: no aliases, no repeated keys, bounded, values cut short in the message.
    Case("yaml-alias-bomb", ["--config", "c.yaml"], "line 2: YAML aliases are not accepted (*a)",
         files=_yaml(_billion_laughs())),
    Case("yaml-merge-key", ["--config", "c.yaml"], "line 3: YAML aliases are not accepted (*b)",
         files=_yaml("base: &b {lr: 0.1}\ntraining:\n  <<: *b\n")),
    Case("yaml-duplicate-key", ["--config", "c.yaml"], "line 3: duplicate key 'lr'",
         files=_yaml("training:\n  lr: 0.1\n  lr: 0.2\n")),
    Case("yaml-nested-too-deeply", ["--config", "c.yaml"], "is nested too deeply",
         files=_yaml("[" * 20000 + "]" * 20000)),
    Case("yaml-integer-too-long", ["--config", "c.yaml"], "holds a value that cannot be read",
         files=_yaml("seed: " + "9" * 5000 + "\n")),
    Case("yaml-is-a-device", ["--config", "/dev/zero"], "config: '/dev/zero' is not a regular file"),
    Case("yaml-plugins-empty", ["--config", "c.yaml"], "plugins: '' is not a module name",
         files=_yaml("plugins: ['']\n")),
    Case("yaml-1mb-value", ["--config", "c.yaml"], "training.optimizer: unknown optimizer 'xxx",
         files=_yaml(f"training:\n  optimizer: {LONG_VALUE}\n"), process=True),
    # Plugins: names checked, failures named, a taken name refused.
    Case("plugin-empty-name", ["--plugins", ""], "plugins: '' is not a module name"),
    Case("plugin-name-with-space", ["--plugins", "a b"], "plugins: 'a b' is not a module name"),
    Case("plugin-file-name", ["--plugins", "my_plugin.py"], "(did you mean 'my_plugin'?"),
    Case("plugin-twice", ["--plugins", "collections", "collections"], "plugins: duplicate plugins ['collections']"),
    Case("plugin-raises-on-import", ["--plugins", "boom"], "plugins: importing 'boom' failed: RuntimeError: boom (",
         files=_plugin("boom", "raise RuntimeError('boom')\n")),
    Case("task-module-raises-on-import", ["--task", "boom:Task"], "task: importing 'boom' failed: RuntimeError",
         files=_plugin("boom", "raise RuntimeError('boom')\n")),
    Case("plugin-takes-task-regression", ["--plugins", "dup"],
         "plugins: importing 'dup': dup:Mine registers task 'regression', which is already registered by "
         "llm.training.tasks.regression_task:RegressionTask",
         files=_taking("task", "regression", "llm.training.tasks.base_task.TrainingTask")),
    Case("plugin-takes-task-lm", ["--plugins", "dup"], "registers task 'lm', which is already registered",
         files=_taking("task", "lm", "llm.training.tasks.base_task.TrainingTask")),
    Case("plugin-takes-callback", ["--plugins", "dup"], "registers callback 'MetricsLogger', which is already",
         files=_taking("callback", "MetricsLogger", "llm.training.core.callbacks.Callback")),
    Case("plugin-takes-scheduler", ["--plugins", "dup"], "registers scheduler 'cosine', which is already",
         files=_taking("scheduler", "cosine", "builtins.object")),
    Case("plugin-takes-optimizer", ["--plugins", "dup"], "registers optimizer 'adamw', which is already",
         files=_taking("optimizer", "adamw", "builtins.object")),
]


def _snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _launch(case: Case, cwd: Path) -> subprocess.CompletedProcess:
    args = case.args if case.raw else [*TINY_REGRESSION, *case.args]
    if not case.process:
        from llm.training.train import main

        return call_main(main, args, cwd)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "llm.training.train", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, Path, dict[str, bytes]]]:
    """Prepare every case's working directory, run all cases, return (result, cwd, files before)."""
    from llm.training.train import train_worker

    base = tmp_path_factory.mktemp("bad-inputs")
    config, task_class = make_config(base, *CKPT_FLAGS, "--checkpoint-interval", "2",
                                     "--checkpoint-keep-last", "2")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_worker(0, 1, config, task_class)
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
        # The real processes run in the background while this thread calls main() for the other cases in turn.
        with ThreadPoolExecutor(max_workers=2) as pool:
            futures = {case.id: pool.submit(_launch, case, prepared[case.id][0]) for case in CASES if case.process}
            results = {case.id: _launch(case, prepared[case.id][0]) for case in CASES if not case.process}
            results.update({cid: future.result() for cid, future in futures.items()})
    finally:
        torch.set_num_threads(threads)
    return {case.id: (results[case.id], *prepared[case.id]) for case in CASES}


def test_there_are_at_least_25_distinct_cases():
    assert len(CASES) >= 25 and len({c.id for c in CASES}) == len(CASES)
    # Each kind of failure is also met by the real CLI process, not only by main() in this one.
    assert {c.kind for c in CASES if c.process} == {"config", "data", "checkpoint"}
    assert len({tuple(c.args) + tuple(c.files.items()) + (c.spoil,) for c in CASES}) == len(CASES)


@pytest.mark.timeout(1500)  # the first case waits for the module fixture to run them all
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


def test_a_huge_value_gives_a_short_error_line(outcomes):
    result = outcomes["yaml-1mb-value"][0]
    [line] = result.stderr.strip().splitlines()
    assert len(line) < 600 and "chars]..." in line  # the value's head and tail, and how much was cut
