"""Resume: N steps straight == k steps + crash + resume to N, bitwise on CPU (weights and logged losses).

Covers a dense model, a dense model with dropout (RNG restore), an MoE model and gradient accumulation
across an epoch boundary; corrupt and incomplete checkpoints are skipped in favour of the previous one;
a checkpoint of another model shape is refused naming the tensors.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch
from helpers import make_config, read_metrics
from safetensors.torch import load_file

from llm.training.core.callbacks import Callback, build_callbacks
from llm.training.core.checkpoint import MANIFEST, CheckpointError, list_checkpoints, verify_checkpoint
from llm.training.core.engine import TrainingEngine
from llm.training.train import prepare_run_dir

CKPT = ["--training-callbacks", "MetricsLogger", "LRSchedulerCallback", "ModelCheckpoint"]


class Crash(Callback):
    """Simulates a crash (an exception) after optimizer step `at_step`."""

    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_batch_end(self, logs=None) -> None:
        if self.engine.state.step == self.at_step:
            raise RuntimeError(f"simulated crash at step {self.at_step}")


class LogCapture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def train(tmp_path: Path, run: str, *args: str, extra: tuple[Callback, ...] = ()) -> TrainingEngine:
    config, task_class = make_config(tmp_path, *CKPT, *args, "--logging-log-dir", str(tmp_path / run))
    prepare_run_dir(config)
    task = task_class(config)
    callbacks = build_callbacks(config) + list(extra)
    engine = TrainingEngine(config, task, 0, 1, data_module=task.build_data_module(), callbacks=callbacks)
    engine.run()
    return engine


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "model.safetensors"))


def losses_by_step(run_dir: Path) -> dict[int, list[float]]:
    out: dict[int, list[float]] = {}
    for record in read_metrics(run_dir):
        if "train/loss" in record:
            out.setdefault(record["step"], []).append(record["train/loss"])
    return out


def assert_same_run(tmp_path: Path, straight: str, resumed: str) -> None:
    a, b = final_weights(tmp_path / straight), final_weights(tmp_path / resumed)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs after resume"
    la, lb = losses_by_step(tmp_path / straight), losses_by_step(tmp_path / resumed)
    assert la.keys() == lb.keys()
    for step, values in lb.items():
        # The crashed attempt and the resumed one both logged some steps: every record must agree.
        assert set(values) == set(la[step]), f"train/loss differs at step {step}"


@pytest.mark.parametrize(
    "flags",
    [
        pytest.param([], id="dense"),
        pytest.param(["--model-dropout", "0.1"], id="dense-dropout"),
        pytest.param(["--model-use-moe", "--model-num-experts", "4", "--model-top-k", "2"], id="moe"),
        # 14 batches per epoch / 2 = 7 steps: the resume point (step 8) is in the second epoch.
        pytest.param(["--training-grad-accum-steps", "2", "--training-log-interval", "3"], id="grad-accum"),
    ],
)
def test_resume_is_bitwise_identical(tmp_path, flags):
    common = ["--training-max-steps", "12", "--checkpoint-interval", "4", "--training-val-interval", "5", *flags]
    train(tmp_path, "straight", *common)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(tmp_path, "resumed", *common, extra=(Crash(10),))
    assert [s for s, _ in list_checkpoints(tmp_path / "resumed" / "checkpoints")] == [4, 8]
    engine = train(tmp_path, "resumed", *common)
    assert engine.state.step == 12
    assert_same_run(tmp_path, "straight", "resumed")


def test_corrupt_and_incomplete_checkpoints_fall_back(tmp_path):
    common = ["--training-max-steps", "12", "--checkpoint-interval", "4"]
    train(tmp_path, "straight", *common)
    with pytest.raises(RuntimeError):
        train(tmp_path, "resumed", *common, extra=(Crash(11),))
    root = tmp_path / "resumed" / "checkpoints"
    # Newest: a flipped byte in the trainer state. Next: the manifest is missing (never committed).
    state = root / "step-00000008" / "trainer_state_rank0.pt"
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0xFF
    state.write_bytes(bytes(data))
    shutil.copytree(root / "step-00000004", root / "step-00000006")
    (root / "step-00000006" / MANIFEST).unlink()
    capture = LogCapture()
    logging.getLogger("llm").addHandler(capture)
    try:
        engine = train(tmp_path, "resumed", *common, extra=(StepProbe(),))
    finally:
        logging.getLogger("llm").removeHandler(capture)
    skipped = [m for m in capture.messages if m.startswith("skipping checkpoint")]
    assert len(skipped) == 2
    assert "step-00000008" in skipped[0] and "checksum" in skipped[0]
    assert "step-00000006" in skipped[1] and MANIFEST in skipped[1]
    assert engine.find_callback(StepProbe).first_step == 5  # resumed from step-00000004
    verify_checkpoint(root / "step-00000008")  # rewritten by the resumed run
    assert_same_run(tmp_path, "straight", "resumed")


class StepProbe(Callback):
    """Records the step the run starts from."""

    first_step: int | None = None

    def on_batch_start(self, logs=None) -> None:
        if self.first_step is None:
            self.first_step = self.engine.state.step + 1


def test_stale_temp_dir_from_a_kill_is_ignored_and_removed(tmp_path):
    common = ["--training-max-steps", "8", "--checkpoint-interval", "4"]
    with pytest.raises(RuntimeError):
        train(tmp_path, "run", *common, extra=(Crash(6),))
    root = tmp_path / "run" / "checkpoints"
    partial = root / ".tmp-step-00000006"
    shutil.copytree(root / "step-00000004", partial)  # a save killed before its manifest and rename
    (partial / MANIFEST).unlink()
    engine = train(tmp_path, "run", *common, extra=(StepProbe(),))
    assert engine.find_callback(StepProbe).first_step == 5
    assert not partial.exists()
    assert [s for s, _ in list_checkpoints(root)] == [4, 8]


def test_resume_with_another_model_shape_names_the_tensors(tmp_path):
    train(tmp_path, "run", "--training-max-steps", "2")
    with pytest.raises(CheckpointError) as info:
        train(tmp_path, "run", "--training-max-steps", "4", "--model-hidden-size", "16")
    message = str(info.value)
    assert "does not match" in message and "embed.weight" in message and "[32, 8]" in message


def test_resume_none_and_explicit_path(tmp_path):
    train(tmp_path, "a", "--training-max-steps", "6", "--checkpoint-interval", "3")
    fresh = train(tmp_path, "a", "--training-max-steps", "6", "--checkpoint-resume", "none", extra=(StepProbe(),))
    assert fresh.find_callback(StepProbe).first_step == 1
    src = tmp_path / "a" / "checkpoints" / "step-00000003"
    other = train(tmp_path, "b", "--training-max-steps", "6", "--checkpoint-resume", str(src), extra=(StepProbe(),))
    assert other.find_callback(StepProbe).first_step == 4
    done = train(tmp_path, "a", "--training-max-steps", "6", extra=(StepProbe(),))
    assert done.find_callback(StepProbe).first_step is None  # a finished run resumes as finished


@pytest.mark.slow
def test_two_process_gloo_save_and_resume(tmp_path):
    """Every rank writes its own trainer state; resuming 2 processes matches an uninterrupted 2-process run.

    A constant schedule makes `--training-max-steps 6` then 12 the same trajectory as 12 straight.
    """
    from helpers import TINY_REGRESSION, run_cli

    flags = [*TINY_REGRESSION, *CKPT, "--distributed-nproc-per-node", "2", "--scheduler-type", "constant",
             "--training-batch-size", "8", "--checkpoint-interval", "3"]
    env = {"OMP_NUM_THREADS": "1"}
    for run, steps in (("straight", "12"), ("resumed", "6"), ("resumed", "12")):
        result = run_cli([*flags, "--training-max-steps", steps, "--logging-log-dir", str(tmp_path / run)],
                         cwd=tmp_path, env=env, timeout=180)
        assert result.returncode == 0, result.stderr
    assert "resumed from" in result.stderr and "step-00000006" in result.stderr
    final = tmp_path / "resumed" / "checkpoints" / "step-00000012"
    assert set(verify_checkpoint(final)["files"]) >= {"trainer_state_rank0.pt", "trainer_state_rank1.pt"}
    assert_same_run(tmp_path, "straight", "resumed")
