"""Every recipe of docs/GUIDE_EXTENDING.md, executed: its code put where it says, its commands run.

The Chinese guide must carry exactly the same code blocks, so executing the English one covers both.
"""

from __future__ import annotations

import math
import shlex
import shutil
import subprocess
import sys

import pytest
import yaml
from helpers import REPO, read_metrics
from recipe_apply import apply_block, guide_blocks, merge

EN, ZH = REPO / "docs" / "GUIDE_EXTENDING.md", REPO / "docs" / "GUIDE_EXTENDING.zh-CN.md"
FAST = ["--training-log-interval", "1", "--data-num-samples", "512"]


def test_chinese_guide_has_the_same_code_blocks():
    assert guide_blocks(ZH) == guide_blocks(EN)


def test_merge_puts_methods_fields_and_imports_in_place():
    source = "import os\n\n\nclass A:\n    x: int = 1\n\n    def f(self):\n        return 1\n\n\nTABLE = {}\n"
    snippet = (
        "import sys\n\nclass A:\n    # ...\n    x: int = 2  # new\n    def g(self):\n        return 2\n\n"
        "TABLE = {1: 2}\n"
    )
    merged = merge(source, snippet)
    namespace: dict = {}
    exec(compile(merged, "merged", "exec"), namespace)
    assert "import sys" in merged and namespace["A"].x == 2 and namespace["A"]().f() == 1
    assert namespace["A"]().g() == 2 and namespace["TABLE"] == {1: 2}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A copy of the framework with every `apply` block of the guide applied, and a working directory."""
    root = tmp_path_factory.mktemp("guide")
    shutil.copytree(REPO / "llm", root / "llm", ignore=shutil.ignore_patterns("__pycache__"))
    work = root / "work"
    work.mkdir()
    runs = []
    for kind, target, code in guide_blocks(EN):
        if kind == "apply":
            apply_block(root, target, code)
        elif kind == "file":
            (work / target).write_text(code, encoding="utf-8")
        elif kind == "show":
            assert code in (REPO / target).read_text("utf-8"), f"the guide shows code that is not in {target}"
        elif kind == "run":
            runs.append(code.strip())
    return root, work, runs


def run_guide_command(workspace, command: str, name: str, *extra: str) -> subprocess.CompletedProcess:
    root, work, _ = workspace
    argv = shlex.split(command)
    assert argv[:3] == ["python", "-m", "llm.training.train"], command
    # One intra-op thread, as everywhere in the suite: these tiny runs gain nothing from more, and several of them
    # beside the other tests' processes oversubscribed a 2-core machine until they hit the timeout.
    env = {"PYTHONPATH": f"{root}:{work}", "PATH": "/usr/bin:/bin", "LLM_CACHE_DIR": str(root / "cache"),
           "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, *argv[1:], "--logging-log-dir", name, *extra], cwd=work, capture_output=True, text=True,
        timeout=300, env=env,
    )


def command(workspace, needle: str) -> str:
    matches = [c for c in workspace[2] if needle in c]
    assert len(matches) == 1, (needle, workspace[2])
    return matches[0]


def logged_lrs(run_dir) -> list[float]:
    return [m["lr"] for m in read_metrics(run_dir) if "lr" in m]


def assert_learned(run_dir) -> None:
    """The run trained (its mean train loss over the last quarter is below the first quarter's) and left a
    complete checkpoint and final weights."""
    losses = [m["train/loss"] for m in read_metrics(run_dir) if "train/loss" in m]
    window = max(1, len(losses) // 4)
    assert sum(losses[-window:]) / window < 0.9 * sum(losses[:window]) / window, losses
    checkpoints = sorted((run_dir / "checkpoints").glob("step-*/manifest.json"))
    assert checkpoints and (run_dir / "model.safetensors").is_file()


def test_recipe_1_exponential_scheduler_keeps_warmup(workspace):
    cmd = command(workspace, "--scheduler-type exponential")
    proc = run_guide_command(workspace, cmd, "r1", *FAST, "--training-max-steps", "5", "--training-warmup", "2",
                             "--training-gamma", "0.5")
    assert proc.returncode == 0, proc.stderr
    base = 2e-3  # the regression task's default lr
    expected = [base * 0.5, base, base, base * 0.5, base * 0.25]  # warmup, peak, then gamma per step
    assert logged_lrs(workspace[1] / "r1") == pytest.approx(expected)


@pytest.mark.slow  # a whole training run (60-120 steps) in a real process
def test_recipe_1_literal_command_learns(workspace):
    proc = run_guide_command(workspace, command(workspace, "--scheduler-type exponential"), "r1lit", *FAST,
                             "--training-max-steps", "120")
    assert proc.returncode == 0, proc.stderr
    assert_learned(workspace[1] / "r1lit")
    lrs = logged_lrs(workspace[1] / "r1lit")
    assert lrs[-1] == pytest.approx(2e-3 * 0.998 ** (120 - 20 - 1))  # 20 warmup steps, the peak, then gamma


def cosine(peak: float, floor: float, total: int, steps: int) -> list[float]:
    """The built-in cosine's lrs after warmup: from `peak` to `floor * peak` over `total` scheduler steps."""
    return [peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(t, total) / total))) for t in range(steps)]


@pytest.mark.parametrize("kind", ["cosine", "linear", "wsd", "constant"])
def test_recipe_1_pasted_override_keeps_every_schedule_over_the_run(workspace, kind):
    # The pasted RegressionTask.build_scheduler builds `exponential` itself and hands every other name to the
    # framework, whose schedules span the run's steps (the original guide's CosineAnnealingLR(T_max=epochs),
    # stepped per optimizer step, swung with a 20-step period; its `else: None` left linear/wsd/constant flat).
    name = f"r1{kind}"
    proc = run_guide_command(workspace, f"python -m llm.training.train --task regression --scheduler-type {kind}",
                             name, *FAST, "--training-max-steps", "12", "--training-warmup", "2")
    assert proc.returncode == 0, proc.stderr
    assert "returned no scheduler" not in proc.stderr
    lrs, peak = logged_lrs(workspace[1] / name), 2e-3  # the regression task's default lr
    assert len(lrs) == 12 and lrs[:2] == pytest.approx([peak / 2, peak])  # warmup, then the peak
    after = lrs[2:]  # the schedule's 10 steps after warmup
    assert all(b <= a for a, b in zip(lrs[1:], lrs[2:])), lrs  # never climbs back
    if kind == "constant":
        assert after == pytest.approx([peak] * 10)
    else:  # it decays over the run, not over 10 "epochs" of steps
        assert after[-1] <= 0.5 * peak, lrs
    if kind in ("cosine", "linear"):
        assert all(b < a for a, b in zip(after, after[1:])), lrs
    if kind == "cosine":
        floor = yaml.safe_load((workspace[1] / name / "config.yaml").read_text())["training"]["min_lr_ratio"]
        assert after == pytest.approx(cosine(peak, floor, 10, 10), rel=1e-6)


def test_recipe_1_registered_scheduler_from_a_plugin(workspace):
    proc = run_guide_command(workspace, command(workspace, "inverse_sqrt"), "r1p", *FAST,
                             "--training-max-steps", "4", "--training-warmup", "2")
    assert proc.returncode == 0, proc.stderr
    base = 5e-3  # the classification task's default lr
    assert logged_lrs(workspace[1] / "r1p")[2:] == pytest.approx([base, base / math.sqrt(2)])


@pytest.mark.slow  # a whole training run (60-120 steps) in a real process
def test_recipe_2_welcome_callback_and_the_configured_schedule(workspace):
    # The literal command lists no LRSchedulerCallback, ProgressBar or ModelCheckpoint: the engine owns those.
    proc = run_guide_command(workspace, command(workspace, "WelcomeMessage"), "r2", *FAST, "--training-max-steps",
                             "120")
    assert proc.returncode == 0, proc.stderr
    assert "Welcome to the training session!" in proc.stderr and "Training finished. Goodbye!" in proc.stderr
    lrs, peak, warmup = logged_lrs(workspace[1] / "r2"), 2e-3, 20  # the regression task's defaults
    assert lrs[:warmup] == pytest.approx([peak * (i + 1) / warmup for i in range(warmup)])  # warmup to the peak
    # Then the configured cosine (recipe 1's RegressionTask hands it to the framework) over the run's 100 steps
    # after warmup, stepped after every optimizer step from the peak on.
    floor = yaml.safe_load((workspace[1] / "r2" / "config.yaml").read_text())["training"]["min_lr_ratio"]
    assert lrs[warmup:] == pytest.approx(cosine(peak, floor, 120 - warmup, len(lrs) - warmup), rel=1e-6)
    assert_learned(workspace[1] / "r2")


@pytest.mark.slow  # a whole training run (60-120 steps) in a real process
def test_recipe_2_pasted_callback_default_keeps_the_services(workspace):
    # Recipe 2 replaced TrainingConfig.callbacks' default (no ProgressBar, no ModelCheckpoint): a run with the
    # defaults still follows its schedule, checkpoints and reports progress.
    proc = run_guide_command(workspace, "python -m llm.training.train --task regression", "r2d", *FAST,
                             "--training-max-steps", "120")
    assert proc.returncode == 0, proc.stderr
    saved = yaml.safe_load((workspace[1] / "r2d" / "config.yaml").read_text())
    assert saved["training"]["callbacks"] == ["MetricsLogger", "TensorBoardLogger", "LRSchedulerCallback"]
    assert "step 120/120 (100%" in proc.stderr
    assert_learned(workspace[1] / "r2d")


@pytest.mark.slow  # a whole training run (60-120 steps) in a real process
def test_recipe_3_new_task_trains(workspace):
    proc = run_guide_command(workspace, command(workspace, "--task majority"), "r3", "--training-max-steps", "60",
                             "--training-val-interval", "60")
    assert proc.returncode == 0, proc.stderr
    vals = [m for m in read_metrics(workspace[1] / "r3") if "val/accuracy" in m]
    assert vals[-1]["val/accuracy"] > 0.8
    assert_learned(workspace[1] / "r3")


@pytest.mark.slow  # a whole training run in a real process
# The guide's hidden-512 MoE model (config.yaml) learns within 20 steps; the flags' default-width one needs 60 (and
# costs a sixth as much per step).
@pytest.mark.parametrize(("needle", "steps"), [("--config config.yaml", "20"), ("--model-use-moe", "60")])
def test_recipe_4_moe_layers_present(workspace, needle, steps):
    name = "r4" + str(len(needle))
    proc = run_guide_command(workspace, command(workspace, needle), name, *FAST, "--training-max-steps", steps)
    assert proc.returncode == 0, proc.stderr
    run = workspace[1] / name
    assert_learned(run)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"]["use_moe"] is True and saved["model"]["num_experts"] == 8 and saved["model"]["top_k"] == 2
    from safetensors import safe_open

    with safe_open(str(run / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert any(k.endswith("mlp.w_down") for k in keys) and any(k.endswith("mlp.gate.weight") for k in keys), keys
