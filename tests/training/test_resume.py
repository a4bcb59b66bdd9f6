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
from helpers import CKPT, Crash, make_config, read_metrics, tiny_engine
from safetensors.torch import load_file

from llm.artifacts.checkpoint import MANIFEST, CheckpointError, list_checkpoints, verify_checkpoint
from llm.training.core.callbacks import Callback
from llm.training.core.engine import TrainingEngine


class LogCapture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def train(tmp_path: Path, run: str, *args: str, extra: tuple[Callback, ...] = (),
          overwrite: bool = False, prepare: bool = True, start: bool = True) -> TrainingEngine:
    """The tiny run with checkpoints in `tmp_path/run`, run to its end unless start=False."""
    flags = [*CKPT, *args, "--logging-log-dir", str(tmp_path / run), *(["--checkpoint-overwrite"] if overwrite else [])]
    return tiny_engine(tmp_path, *flags, extra_callbacks=extra, prepare=prepare, run=start)


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
        pytest.param(["--training-optimizer", "muon"], id="muon"),  # Muon + AdamW in one composite optimizer
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
    with pytest.raises(CheckpointError, match="holds later checkpoints .*--checkpoint-overwrite"):
        train(tmp_path, "a", "--training-max-steps", "6", "--checkpoint-resume", "none")
    fresh = train(tmp_path, "a", "--training-max-steps", "6", "--checkpoint-resume", "none", extra=(StepProbe(),),
                  overwrite=True)
    assert fresh.find_callback(StepProbe).first_step == 1
    src = tmp_path / "a" / "checkpoints" / "step-00000003"
    other = train(tmp_path, "b", "--training-max-steps", "6", "--checkpoint-resume", str(src), extra=(StepProbe(),))
    assert other.find_callback(StepProbe).first_step == 4
    done = train(tmp_path, "a", "--training-max-steps", "6", extra=(StepProbe(),))
    assert done.find_callback(StepProbe).first_step is None  # a finished run resumes as finished


# -- resume rules (issue 12, item 5) and elastic data positions (item 11) ---------------------------------------

SCHEDULE = ["--scheduler-type", "cosine", "--training-warmup", "2", "--checkpoint-interval", "3"]


def lrs(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["lr"] for r in read_metrics(run_dir) if "lr" in r}


def test_longer_max_steps_extends_the_schedule_and_a_new_lr_scales_it(tmp_path):
    """The cosine was built for 6 steps; resumed to 12 it follows the 12-step curve (not lr 0 at its old end), and
    a doubled lr doubles it from the resume point on."""
    train(tmp_path, "straight", *SCHEDULE, "--training-max-steps", "12")
    train(tmp_path, "longer", *SCHEDULE, "--training-max-steps", "6")
    train(tmp_path, "longer", *SCHEDULE, "--training-max-steps", "12")
    train(tmp_path, "faster", *SCHEDULE, "--training-max-steps", "6")
    capture = LogCapture()
    logging.getLogger("llm").addHandler(capture)
    try:
        train(tmp_path, "faster", *SCHEDULE, "--training-max-steps", "12", "--training-lr", "0.004")
    finally:
        logging.getLogger("llm").removeHandler(capture)
    straight, longer, faster = lrs(tmp_path / "straight"), lrs(tmp_path / "longer"), lrs(tmp_path / "faster")
    assert min(straight[s] for s in range(7, 12)) > 0
    assert [longer[s] for s in range(7, 13)] == pytest.approx([straight[s] for s in range(7, 13)], rel=1e-12)
    peak = make_config(tmp_path)[0].training.lr
    assert [faster[s] for s in range(7, 13)] == pytest.approx([straight[s] * 0.004 / peak for s in range(7, 13)])
    assert any("training.lr" in m and "peak lr" in m for m in capture.messages)


def test_refused_resume_leaves_the_run_config_alone(tmp_path):
    from llm.training.train import train_worker

    config, task_class = make_config(tmp_path, *CKPT, "--training-max-steps", "2")
    train_worker(0, 1, config, task_class)
    saved = (tmp_path / "run" / "config.yaml").read_bytes()
    checkpoints = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    for flags, field in ((["--training-optimizer", "sgd"], "training.optimizer"),
                         (["--scheduler-type", "linear"], "training.scheduler_type")):
        config, task_class = make_config(tmp_path, *CKPT, "--training-max-steps", "4", *flags)
        with pytest.raises(CheckpointError, match=f"written with {field}=.* resume with --"):
            train_worker(0, 1, config, task_class)
        assert (tmp_path / "run" / "config.yaml").read_bytes() == saved
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == checkpoints


def test_a_branch_is_refused_then_never_deletes_the_other_trajectory(tmp_path):
    common = ["--checkpoint-interval", "2", "--checkpoint-keep-last", "3"]
    train(tmp_path, "a", *common, "--training-max-steps", "6")
    root = tmp_path / "a" / "checkpoints"
    later = (root / "step-00000006" / MANIFEST).read_bytes()
    branch = ["--checkpoint-resume", str(root / "step-00000002"), "--training-max-steps", "5",
              "--checkpoint-interval", "1", "--checkpoint-keep-last", "1"]
    with pytest.raises(CheckpointError, match="branching from .*step-00000002.*step-00000004, step-00000006"):
        train(tmp_path, "a", *branch)
    engine = train(tmp_path, "a", *branch, extra=(StepProbe(),), overwrite=True)
    assert engine.find_callback(StepProbe).first_step == 3
    # Its own history is pruned to keep-last 1 (step 4 became its own when it saved over it); step 6 is not its own.
    assert [s for s, _ in list_checkpoints(root)] == [5, 6]
    assert (root / "step-00000006" / MANIFEST).read_bytes() == later


def test_a_finished_run_says_why_it_trains_nothing(tmp_path):
    train(tmp_path, "run", "--training-max-steps", "4")
    before = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file() and p.name != "train.log"}
    capture = LogCapture()
    logging.getLogger("llm").addHandler(capture)
    try:
        engine = train(tmp_path, "run", "--training-max-steps", "4", prepare=False, start=False)
        engine.run()
    finally:
        logging.getLogger("llm").removeHandler(capture)
    assert any(m.startswith("nothing to train: the checkpoint is at step 4 and training.max_steps=4") for m in
               capture.messages), capture.messages
    after = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file() and p.name != "train.log"}
    assert after == before


def _consume(world: int, batches: int, state: dict | None, batch_size: int = 8) -> tuple[list[int], dict]:
    """Samples drawn by `world` ranks taking `batches` micro-batches each (all when None) from `state`."""
    from types import SimpleNamespace

    from torch.utils.data import TensorDataset

    from llm.data.datamodule import DataModule

    seen, states = [], []
    for rank in range(world):
        dm = DataModule(SimpleNamespace(seed=5, data=SimpleNamespace(num_workers=0)))
        dm.rank, dm.world_size = rank, world
        if state is not None:
            dm.load_state_dict(state)
        loader = dm.make_loader(TensorDataset(torch.arange(100)), batch_size, train=True)
        for i, (batch,) in enumerate(loader):
            if i == batches:
                break
            seen += batch.tolist()
            dm.advance(1)
        states.append(dm.state_dict())
    return seen, states[0]


@pytest.mark.parametrize("before, after", [(2, 1), (1, 2), (2, 3)])
def test_another_world_size_sees_the_rest_of_the_epoch_once(before, after):
    first, state = _consume(before, 3, None)
    rest, _ = _consume(after, -1, state)
    seen = first + rest
    order = torch.randperm(100, generator=torch.Generator().manual_seed(5)).tolist()
    assert len(seen) == len(set(seen))  # nothing twice
    assert seen and sorted(seen) == sorted(order[: len(seen)])  # nothing skipped: a prefix of the permutation
    assert 100 - len(seen) < 8 * after  # only the tail that does not fill a global batch is dropped


def test_torchrun_restarts_keep_the_default_run_directory(monkeypatch):
    from llm.training.train import default_run_dir

    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-42")
    assert default_run_dir("lm") == default_run_dir("lm") == "runs/lm-job-42"
    assert default_run_dir("pkg.tasks:MyTask") == "runs/pkg.tasks_MyTask-job-42"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")  # torchrun's placeholder: not an id of this job
    assert default_run_dir("lm").startswith("runs/lm-2")


def test_a_runs_config_yaml_starts_a_new_run(tmp_path):
    """`--config runs/X/config.yaml` takes X's settings into a new run directory; X is only written to when named."""
    from helpers import run_cli

    train(tmp_path, "x", "--training-max-steps", "2")
    before = {p: p.read_bytes() for p in (tmp_path / "x").rglob("*") if p.is_file()}
    result = run_cli(["--config", "x/config.yaml", "--training-max-steps", "3"], cwd=tmp_path,
                     env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    assert {p: p.read_bytes() for p in (tmp_path / "x").rglob("*") if p.is_file()} == before
    new_runs = list((tmp_path / "runs").iterdir())
    assert len(new_runs) == 1 and (new_runs[0] / "model.safetensors").is_file()


def test_config_fields_newer_than_the_checkpoint_are_not_reported_as_changes():
    """A checkpoint written before a field existed: the field at its default is no change; set otherwise, it is."""
    from llm.training.checkpointer import config_changes

    saved = {"training": {"lr": 0.1}}
    defaults = {"training": {"lr": 0.001, "lora_rank": 0}}
    assert config_changes(saved, {"training": {"lr": 0.1, "lora_rank": 0}}, defaults) == []
    changed = config_changes(saved, {"training": {"lr": 0.1, "lora_rank": 8}}, defaults)
    assert changed == ["training.lora_rank: None -> 8"]
