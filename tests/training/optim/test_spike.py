"""Loss-spike recovery (`--training-spike-policy rollback`, llm/training/optim/spike.py), tested by poisoning a batch.

The poison is in the data (`helpers.poison_task`: the loss of the micro-batch at a data position is multiplied by a
large factor or by NaN), so a run that trains on that batch again meets it again: a run finishes only if the rollback
really skips the data. Exact resume after a rollback: interrupted runs, resumed, end with the uninterrupted run's
weights bitwise (CPU).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import CKPT, call_main, poison_task, read_metrics, tiny_engine
from safetensors.torch import load_file

from llm.artifacts.checkpoint import CheckpointError, list_checkpoints, load_trainer_state
from llm.training.core.callbacks import Callback
from llm.training.optim.spike import SpikeDetected, SpikeRecovery, SpikeRecoveryError
from llm.training.train import main as train_main

# 14 steps per epoch of the tiny regression run; a checkpoint every 4 steps; the spike judged after 3 losses.
ROLLBACK = ["--training-spike-policy", "rollback", "--training-spike-min-steps", "3", "--training-spike-window", "10",
            "--checkpoint-interval", "4", "--training-max-steps", "12"]
SPIKE_AT_7 = poison_task((0, 6), factor=1e3)  # data position 6 is the 7th step's batch


class Crash(Callback):
    """A crash after the `at_call`-th optimizer step the callbacks see (a rolled-back step is seen twice)."""

    def __init__(self, at_call: int) -> None:
        self.at_call, self.calls = at_call, 0

    def on_batch_end(self, logs=None) -> None:
        self.calls += 1
        if self.calls == self.at_call:
            raise RuntimeError(f"simulated crash at call {self.at_call}")


class Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def warnings_seen():
    handler = Warnings()
    logger = logging.getLogger("llm")
    logger.addHandler(handler)
    yield handler.lines
    logger.removeHandler(handler)


def train(tmp_path: Path, run: str, *flags: str, task: type = SPIKE_AT_7, extra: tuple = (), start: bool = True):
    return tiny_engine(tmp_path, *CKPT, *ROLLBACK, *flags, "--logging-log-dir", str(tmp_path / run),
                       task_class=task, extra_callbacks=extra, run=start)


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "model.safetensors"))


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs"


def losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["train/loss"]) for r in read_metrics(run_dir) if "train/loss" in r]


# -- the rollback -----------------------------------------------------------------------------------


def test_a_spike_rolls_back_skips_its_batch_logs_and_finishes(tmp_path, warnings_seen):
    engine = train(tmp_path, "run")
    assert engine.state.step == 12 and engine.spike.rollbacks == 1
    assert engine.spike.skipped == [[0, 6, 7]]  # epoch 0, micro-batch 6: the 7th step's data
    lines = [line for line in warnings_seen if line.startswith("spike:")]
    assert len(lines) == 1
    assert re.fullmatch(r"spike: a loss spike at step 7 \(loss \d+, \d+\.\d standard deviations up\); rolled back "
                        r"to step-00000004 \(step 4\), skipping epoch 0 micro-batch 6 \(rollback 1 of at most 3\)",
                        lines[0]), lines[0]
    records = read_metrics(tmp_path / "run")
    assert [r for r in records if "spike/rollbacks" in r] == [{"step": 4, "spike/rollbacks": 1, "spike/step": 7}]
    logged = losses(tmp_path / "run")
    # Steps 5 and 6 ran twice, on the same data from the same state (equal losses); the spiked step 7 was never
    # logged; after the rollback step 7 trains on micro-batch 7.
    assert [s for s, _ in logged] == [1, 2, 3, 4, 5, 6, 5, 6, 7, 8, 9, 10, 11, 12]
    assert logged[4] == logged[6] and logged[5] == logged[7]
    assert all(v < 100 for _, v in logged)
    # The skip list and the rollback count are in the checkpoints written after the rollback.
    state = load_trainer_state(tmp_path / "run" / "checkpoints" / "step-00000008" / "trainer_state_rank0.pt")
    assert state["spike"]["skipped"] == [[0, 6, 7]] and state["spike"]["rollbacks"] == 1
    assert all(torch.isfinite(p).all() for p in engine.unwrapped_model.parameters())


def test_without_the_policy_the_poisoned_run_still_fails_as_before(tmp_path):
    from llm.training.optim.nonfinite import NonFiniteLossError

    with pytest.raises(NonFiniteLossError, match="step 7"):
        tiny_engine(tmp_path, *CKPT, "--checkpoint-interval", "4", "--training-max-steps", "12",
                    task_class=poison_task((0, 6)), run=True)
    state = load_trainer_state(tmp_path / "run" / "checkpoints" / "step-00000004" / "trainer_state_rank0.pt")
    assert "spike" not in state  # off by default: the trainer state is today's


@pytest.mark.parametrize("optimizer,deferred", [("adamw", True), ("sgd", False)])
def test_a_nan_rolls_back_whether_checked_lazily_or_every_step(tmp_path, optimizer, deferred):
    engine = train(tmp_path, "run", "--training-optimizer", optimizer, "--training-log-interval", "5",
                   task=poison_task((0, 6)))
    assert engine.finite.deferred is deferred  # fused AdamW: no host read per step; SGD: the guard reads each step
    assert engine.state.step == 12 and engine.spike.rollbacks == 1 and engine.spike.skipped == [[0, 6, 7]]
    assert engine.state.skipped_steps == 0  # the NaN step is thrown away by the rollback, not skipped
    assert [r for r in read_metrics(tmp_path / "run") if "spike/step" in r][0]["spike/step"] == 7


def test_a_lazy_check_gives_the_same_run_as_a_check_every_step(tmp_path):
    """Log interval 5: the spike at step 7 is read at step 8 (a checkpoint is due), before that save."""
    train(tmp_path, "every", "--training-log-interval", "1")
    train(tmp_path, "lazy", "--training-log-interval", "5")
    assert_same_weights(weights(tmp_path / "every"), weights(tmp_path / "lazy"))
    steps = [s for s, _ in list_checkpoints(tmp_path / "lazy" / "checkpoints")]
    assert steps == [4, 8, 12]


def test_rollbacks_are_capped_and_the_checkpoints_kept(tmp_path):
    poisoned = poison_task((0, 5), (0, 6), (0, 7), factor=1e3)  # each rollback skips one, meets the next
    with pytest.raises(SpikeRecoveryError) as caught:
        train(tmp_path, "run", "--training-spike-max-rollbacks", "2", task=poisoned)
    assert str(caught.value).startswith("training.spike_max_rollbacks: a loss spike at step 6 (loss ")
    assert "after 2 rollback(s); stopping (the checkpoints are kept" in str(caught.value)
    assert "\n" not in str(caught.value)
    assert [s for s, _ in list_checkpoints(tmp_path / "run" / "checkpoints")] == [4]


def test_a_spike_before_the_first_checkpoint_stops_with_one_line(tmp_path):
    with pytest.raises(SpikeRecoveryError, match=r"^training.spike_policy=rollback: a loss spike at step 4 .*no "
                       r"checkpoint of this run to roll back to \(the first is saved at step 4\)"):
        train(tmp_path, "run", task=poison_task((0, 3), factor=1e3))
    assert list_checkpoints(tmp_path / "run" / "checkpoints") == []


def test_a_clean_run_never_rolls_back_and_matches_the_policy_off(tmp_path):
    clean = poison_task()
    engine = train(tmp_path, "on", task=clean)
    assert engine.spike.rollbacks == 0 and engine.spike.skipped == []
    tiny_engine(tmp_path, *CKPT, "--checkpoint-interval", "4", "--training-max-steps", "12", "--logging-log-dir",
                str(tmp_path / "off"), task_class=clean, run=True)
    assert_same_weights(weights(tmp_path / "on"), weights(tmp_path / "off"))


# -- exact resume after a rollback ----------------------------------------------------------------------


def test_resumes_after_a_rollback_end_bitwise_like_the_uninterrupted_run(tmp_path):
    """With the lr scaled at the rollback (0.5): the schedule's new peak is part of what a resume restores."""
    lr_scale = "0.5"
    flags = ("--training-spike-lr-scale", lr_scale)
    straight = train(tmp_path, "straight", *flags)
    assert straight.spike.rollbacks == 1
    # Crash after the rollback and after the next checkpoint (8): the resume starts from step 8 with the skip list.
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(tmp_path, "late", *flags, extra=(Crash(11),))  # calls: steps 1-6, 5-6 again, 7, 8, 9
    resumed = train(tmp_path, "late", *flags)
    assert resumed.spike.rollbacks == 1 and resumed.spike.skipped == [[0, 6, 7]]
    assert_same_weights(weights(tmp_path / "straight"), weights(tmp_path / "late"))
    # Crash after the rollback but before its next checkpoint: the resume starts from step 4 again, meets the
    # same spike, rolls back the same way and ends the same.
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(tmp_path, "early", *flags, extra=(Crash(9),))  # step 7 after the rollback
    train(tmp_path, "early", *flags)
    assert_same_weights(weights(tmp_path / "straight"), weights(tmp_path / "early"))
    lrs = [(r["step"], r["lr"]) for r in read_metrics(tmp_path / "straight") if "lr" in r]
    assert [s for s, _ in lrs] == [1, 2, 3, 4, 5, 6, 5, 6, 7, 8, 9, 10, 11, 12]
    for before, after in ((lrs[4], lrs[6]), (lrs[5], lrs[7])):  # steps 5 and 6, before and after the rollback
        assert after[1] == pytest.approx(before[1] * float(lr_scale), rel=1e-6)
    # The peak lr halved at the rollback, and kept by the resume.
    state = load_trainer_state(tmp_path / "late" / "checkpoints" / "step-00000012" / "trainer_state_rank0.pt")
    peak = straight.config.training.lr
    assert state["lr_schedule"]["target_lrs"] == [peak * 0.5] * len(state["lr_schedule"]["target_lrs"])


def test_a_resume_from_the_rolled_back_to_checkpoint_with_its_skip_list_matches(tmp_path):
    """The checkpoint of step 4 plus the skip list the rollback recorded gives the uninterrupted run's weights."""
    train(tmp_path, "straight")
    branch = train(tmp_path, "branch", "--checkpoint-resume", str(tmp_path / "straight" / "checkpoints" /
                                                                   "step-00000004"), start=False, task=poison_task())
    branch.setup()
    branch.spike.skipped = [[0, 6, 7]]  # what the rollback recorded; the data is clean here, so only the skip acts
    branch.setup = lambda: None  # run() sets up again otherwise
    branch.run()
    assert_same_weights(weights(tmp_path / "straight"), weights(tmp_path / "branch"))


def test_a_rollback_across_an_epoch_boundary_with_validation_checks_resumes_bitwise(tmp_path):
    """Checkpoint at step 12 (epoch 0 has 14 steps), spike at step 16 (epoch 1, micro-batch 1), validations every 3
    steps (each one checks first); the rollback replays the end of epoch 0 and skips the spiked data of epoch 1."""
    flags = ("--checkpoint-interval", "12", "--training-max-steps", "20", "--training-val-interval", "3",
             "--training-log-interval", "7", "--training-spike-skip-steps", "2")
    task = poison_task((1, 1), factor=1e3)
    straight = train(tmp_path, "straight", *flags, task=task)
    # skip-steps 2: the data of steps 15 and 16, both after the checkpoint (epoch 1, micro-batches 0 and 1).
    assert straight.spike.rollbacks == 1 and straight.spike.skipped == [[1, 0, 2]]
    assert straight.state.step == 20 and straight.state.epoch == 1
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(tmp_path, "resumed", *flags, task=task, extra=(Crash(18),))  # 15 calls, then steps 13, 14, 15 again
    train(tmp_path, "resumed", *flags, task=task)
    assert_same_weights(weights(tmp_path / "straight"), weights(tmp_path / "resumed"))


SPIKE_PLUGIN = """
from llm.registry import register_task
from llm.training.tasks.regression_task import RegressionTask


@register_task("spiky_regression")
class SpikyRegression(RegressionTask):
    \"\"\"Regression whose loss is multiplied by 1000 on micro-batch 3 of epoch 0, on the last rank only (a poisoned
    shard of one global batch).\"\"\"

    def train_step(self, batch, model, criterion):
        loss, metrics = super().train_step(batch, model, criterion)
        position, ctx = self.context.data_module.position, self.context
        poisoned = (position.epoch, position.batch) == (0, 3) and ctx.rank == ctx.world_size - 1
        return (loss * 1000.0 if poisoned else loss), metrics
"""


@pytest.mark.slow  # two 2-process and 1-process jobs in real processes
def test_two_processes_agree_on_the_spike_and_match_one_process(tmp_path):
    """Rank 1's shard of global batch 3 is poisoned: both ranks judge the mean loss, roll back together (one log
    line, from rank 0) and skip that global batch, ending where one process with the same global batch ends."""
    from helpers import REPO, TINY_REGRESSION, run_cli

    (tmp_path / "spike_plugin.py").write_text(SPIKE_PLUGIN)
    env = {"PYTHONPATH": f"{REPO}:{tmp_path}", "OMP_NUM_THREADS": "1"}
    common = [*TINY_REGRESSION, "--task", "spiky_regression", "--plugins", "spike_plugin", *CKPT,
              "--training-spike-policy", "rollback", "--training-spike-min-steps", "3", "--checkpoint-interval", "2",
              "--training-max-steps", "8"]
    runs = {"two": ["--training-batch-size", "8", "--distributed-nproc-per-node", "2"],
            "one": ["--training-batch-size", "16"]}
    for name, flags in runs.items():
        proc = run_cli([*common, *flags, "--logging-log-dir", name], cwd=tmp_path, env=env, timeout=400)
        assert proc.returncode == 0, proc.stderr[-3000:]
        lines = [line for line in proc.stderr.splitlines() if "spike:" in line]
        assert len(lines) == 1 and "a loss spike at step 4" in lines[0] and "(step 2)" in lines[0], lines
        assert "skipping epoch 0 micro-batch 3" in lines[0], lines[0]
    two, one = weights(tmp_path / "two"), weights(tmp_path / "one")
    worst = max((two[k] - one[k]).abs().max().item() for k in one)
    assert worst < 1e-5, f"final weights differ by {worst}"


# -- detection (unit) ---------------------------------------------------------------------------------------


def monitor(eager: bool = False, scaler: object = None, world_size: int = 1, **overrides) -> SpikeRecovery:
    cfg = SimpleNamespace(**{**dict(spike_policy="rollback", spike_window=5, spike_zscore=6.0, spike_min_steps=3,
                                    spike_skip_steps=1, spike_lr_scale=1.0, spike_max_rollbacks=3,
                                    grad_accum_steps=1, log_interval=1), **overrides})
    context = SimpleNamespace(device=torch.device("cpu"), lr_schedule=None, world_size=world_size,
                              state=SimpleNamespace(step=0), data_module=SimpleNamespace(position=SimpleNamespace(
                                  epoch=0, batch=1)))
    guard = SimpleNamespace(deferred=not eager, scaler=scaler)
    return SpikeRecovery(cfg, context, checkpointer=None, guard=guard)


def feed(m: SpikeRecovery, values: list[float], grad_norm: float | None = 1.0) -> None:
    for value in values:
        m.observe(torch.tensor(value), None if grad_norm is None else torch.tensor(grad_norm))
        m.context.state.step += 1


def test_the_z_score_judges_only_after_min_steps_and_marks_the_first_spike():
    m = monitor()
    feed(m, [100.0, 1.0, 1.1])  # a high first loss is not judged (fewer than 3 in the window)
    m.check()
    feed(m, [1.05, 0.9])  # normal noise (the window is 100, 1, 1.1: its std is large)
    m.check()
    m = monitor()
    feed(m, [1.0, 1.1, 0.9, 1.05, 50.0, 80.0])
    with pytest.raises(SpikeDetected) as caught:
        m.check()
    assert caught.value.step == 5 and caught.value.loss == 50.0 and caught.value.zscore > 6  # the first one
    assert caught.value.describe().startswith("a loss spike at step 5 (loss 50, ")


def test_a_flat_curve_is_not_a_spike_below_one_percent_of_its_mean():
    m = monitor()
    feed(m, [2.0, 2.0, 2.0, 2.0, 2.1])  # +5%: std floored at 1% of the mean gives z = 5 < 6
    m.check()
    m = monitor()
    feed(m, [2.0, 2.0, 2.0, 2.0, 2.2])  # +10%: z = 10
    with pytest.raises(SpikeDetected) as caught:
        m.check()
    assert caught.value.zscore == pytest.approx(10, rel=1e-4)


@pytest.mark.parametrize("loss,grad_norm,scaler,bad", [
    (float("nan"), 1.0, None, True), (float("inf"), 1.0, None, True), (1.0, float("inf"), None, True),
    (1.0, float("inf"), object(), False),  # fp16: an infinite gradient norm is the GradScaler's business
    (float("nan"), 1.0, object(), True),
])
def test_non_finite_values_are_judged_from_the_first_step(loss, grad_norm, scaler, bad):
    m = monitor(scaler=scaler)
    feed(m, [loss], grad_norm)
    if bad:
        with pytest.raises(SpikeDetected) as caught:
            m.check()
        assert caught.value.describe() == "a non-finite loss or gradient norm at step 1"
    else:
        m.check()


def test_the_eager_mode_raises_at_the_step_itself():
    m = monitor(eager=True)
    with pytest.raises(SpikeDetected):
        feed(m, [float("nan")])


def test_the_policy_off_does_nothing():
    m = monitor(eager=True, spike_policy="off")
    feed(m, [float("nan"), 1e9])
    m.check()
    assert m._seen == 0 and int(m._bad_step) == 0


def test_the_window_and_skip_list_round_trip_and_refuse_another_world_size_ahead():
    m = monitor()
    feed(m, [1.0, 1.1, 0.9, 1.05, 0.95, 1.02])
    m.rollbacks, m.skipped = 1, [[0, 6, 7]]
    state = m.state_dict()
    fresh = monitor()
    fresh.load_state_dict(state)
    assert torch.equal(fresh._losses, m._losses) and fresh._seen == 6
    assert fresh.rollbacks == 1 and fresh.skipped == [[0, 6, 7]]
    assert fresh._to_skip(0, 6) == 1 and fresh._to_skip(0, 5) == 0 and fresh._to_skip(1, 6) == 0
    smaller = monitor(spike_window=3)
    smaller.load_state_dict(state)  # another window: the newest losses, oldest first
    assert smaller._losses.tolist() == pytest.approx([1.05, 0.95, 1.02]) and smaller._seen == 3
    with pytest.raises(CheckpointError, match="resume with --distributed-nproc-per-node 1"):
        monitor(world_size=2).load_state_dict(state)  # the window at micro-batch 6 is ahead of position 0
    passed = {**state, "position": [1, 0]}
    monitor(world_size=2).load_state_dict(passed)  # all windows passed: nothing to remap


# -- configuration --------------------------------------------------------------------------------------


@pytest.mark.parametrize("flags,expected", [
    (["--training-spike-policy", "restart"], "error: training.spike_policy: invalid value 'restart'; off or rollback"),
    (["--training-spike-window", "-1"], "error: training.spike_window: invalid value -1; must be >= 2"),
    (["--training-spike-window", "1"], "error: training.spike_window: invalid value 1; must be >= 2"),
    (["--training-spike-min-steps", "60"], "error: training.spike_min_steps: invalid value 60; must be >= 2 and <= "
                                           "training.spike_window=50"),
    (["--training-spike-min-steps", "1"], "error: training.spike_min_steps: invalid value 1;"),
    (["--training-spike-zscore", "0"], "error: training.spike_zscore: invalid value 0.0; must be > 0"),
    (["--training-spike-zscore", "-3"], "error: training.spike_zscore: invalid value -3.0; must be > 0"),
    (["--training-spike-zscore", "nan"], "error: training.spike_zscore: invalid value nan; must be a finite number"),
    (["--training-spike-skip-steps", "0"], "error: training.spike_skip_steps: invalid value 0; must be >= 1"),
    (["--training-spike-lr-scale", "0"], "error: training.spike_lr_scale: invalid value 0.0; must be in (0, 1]"),
    (["--training-spike-lr-scale", "2"], "error: training.spike_lr_scale: invalid value 2.0; must be in (0, 1]"),
    (["--training-spike-max-rollbacks", "0"], "error: training.spike_max_rollbacks: invalid value 0; must be >= 1"),
    (["--training-spike-policy", "rollback"], "error: checkpoint.interval: invalid value 0; must be >= 1 with "
                                              "training.spike_policy=rollback"),
])
def test_bad_spike_settings_are_one_line_and_write_nothing(tmp_path, flags, expected):
    from helpers import TINY_REGRESSION

    result = call_main(train_main, [*TINY_REGRESSION, "--logging-log-dir", str(tmp_path / "run"), *flags], tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(expected), result.stderr
    assert not (tmp_path / "run").exists()
