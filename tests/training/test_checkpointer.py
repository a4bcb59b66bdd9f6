"""Checkpoint files: layout and manifest, checksums, keep-last and best, safe loading, weights_only state."""

from __future__ import annotations

import json
import os
import pickle
import random
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import CKPT, tiny_engine
from torch import nn

from llm.artifacts import checkpoint as ckpt
from llm.artifacts.checkpoint import CheckpointError
from llm.training.core.callbacks import Callback
from llm.training.core.engine import TrainingEngine


def train(tmp_path: Path, *args: str, extra: tuple[Callback, ...] = (), run: bool = True) -> TrainingEngine:
    """The tiny run with checkpoints in `tmp_path/run`, run to its end unless run=False."""
    return tiny_engine(tmp_path, *CKPT, *args, extra_callbacks=extra, run=run)


class Payload:
    """Unpickling this calls open(marker, 'w'): a stand-in for arbitrary code run by a crafted file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_rng_state_survives_weights_only_round_trip(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.standard_normal()  # leaves a cached gaussian in numpy's state
    path = tmp_path / "rng.pt"
    torch.save(ckpt.rng_state(), path)
    expected = (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist())
    ckpt.set_rng_state(torch.load(path, weights_only=True))
    assert (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist()) == expected


@pytest.mark.parametrize("scheduler", ["cosine", "plateau", "step", "exponential", "wsd", "linear", "none"])
def test_trainer_state_loads_with_weights_only(tmp_path, scheduler):
    engine = train(tmp_path, "--training-max-steps", "2", "--scheduler-type", scheduler, "--training-warmup", "1",
                   "--training-callbacks", "MetricsLogger", "LRSchedulerCallback", "ModelCheckpoint", "EarlyStopping")
    path = tmp_path / "run" / "checkpoints" / "step-00000002" / "trainer_state_rank0.pt"
    state = ckpt.load_trainer_state(path)
    assert state["state"]["step"] == 2 and state["optimizer"]["state"]
    engine.load_state_dict(state)  # what resume does, without touching any unsafe type


def test_layout_manifest_and_checksums(tmp_path):
    train(tmp_path, "--training-max-steps", "4", "--checkpoint-interval", "2", "--checkpoint-keep-last", "1")
    root = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-00000004"]  # keep_last=1 pruned step 2
    final = root / "step-00000004"
    assert sorted(p.name for p in final.iterdir()) == [
        "config.yaml", "manifest.json", "model.safetensors", "trainer_state_rank0.pt"
    ]
    manifest = ckpt.verify_checkpoint(final)
    assert manifest["step"] == 4 and manifest["world_size"] == 1
    assert set(manifest["files"]) == {"config.yaml", "model.safetensors", "trainer_state_rank0.pt"}
    weights = final / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum"):
        ckpt.verify_checkpoint(final)
    (final / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="incomplete"):
        ckpt.verify_checkpoint(final)


def test_keep_last_never_deletes_the_best(tmp_path):
    # With mode=max on a falling loss the first validation stays best, so it is older than the last 2.
    engine = train(tmp_path, "--training-max-steps", "10", "--checkpoint-interval", "2", "--checkpoint-keep-last", "2",
                   "--training-val-interval", "2", "--checkpoint-monitor", "val/loss", "--checkpoint-mode", "max")
    root = tmp_path / "run" / "checkpoints"
    cb = engine.checkpointer
    assert cb.best_step == 2
    assert [s for s, _ in ckpt.list_checkpoints(root)] == [2, 8, 10]
    best = json.loads((root / "best.json").read_text())
    assert best["dir"] == "step-00000002" and best["monitor"] == "val/loss"
    assert (root / "best").resolve() == (root / "step-00000002").resolve()


def test_best_follows_improvements(tmp_path):
    engine = train(tmp_path, "--training-max-steps", "6", "--training-val-interval", "3",
                   "--checkpoint-monitor", "val/loss", "--checkpoint-keep-last", "1")
    root = tmp_path / "run" / "checkpoints"
    cb = engine.checkpointer
    assert cb.best_step == 6  # saved for the validation at step 3, then replaced by step 6's
    assert json.loads((root / "best.json").read_text())["step"] == 6
    assert [s for s, _ in ckpt.list_checkpoints(root)] == [6]


def test_crafted_pickle_is_refused_and_never_runs(tmp_path):
    marker, control = tmp_path / "pwned", tmp_path / "control"
    path = tmp_path / "trainer_state_rank0.pt"
    torch.save({"state": Payload(str(marker))}, path)
    with pytest.raises(CheckpointError, match="refusing to load"):
        ckpt.load_trainer_state(path)
    assert not marker.exists()
    # The payload is live: an unrestricted unpickler does run it (so the refusal above is what protects).
    pickle.loads(pickle.dumps(Payload(str(control))))
    assert control.exists()


def test_unsafe_state_fails_at_save_time_and_keeps_the_previous_checkpoint(tmp_path):
    class NumpyState(Callback):
        def state_dict(self):
            return {"arr": np.zeros(3)} if self.engine.state.step > 2 else {}

    with pytest.raises(CheckpointError) as info:
        train(tmp_path, "--training-max-steps", "4", "--checkpoint-interval", "2", extra=(NumpyState(),))
    assert "callbacks.NumpyState.arr" in str(info.value) and "numpy.ndarray" in str(info.value)
    assert "step-00000002 is intact" in str(info.value)
    root = tmp_path / "run" / "checkpoints"
    assert [p.name for p in root.iterdir()] == ["step-00000002"]


def test_weight_mismatch_names_tensors_and_tied_weights_load(tmp_path):
    class Tied(nn.Module):
        def __init__(self, width: int) -> None:
            super().__init__()
            self.embed = nn.Embedding(10, width)
            self.out = nn.Linear(width, 10, bias=False)
            self.out.weight = self.embed.weight

    path = tmp_path / "w.safetensors"
    ckpt.save_weights(Tied(4), path)
    assert ckpt.weight_mismatches(Tied(4), path) == []
    ckpt.load_checkpoint_weights(Tied(4), path)
    problems = ckpt.weight_mismatches(Tied(6), path)
    assert problems and "[10, 4]" in problems[0] and "[10, 6]" in problems[0]
    with pytest.raises(CheckpointError, match="embed.weight"):
        ckpt.load_checkpoint_weights(Tied(6), path)


def test_every_file_of_a_run_is_readable_like_other_files(tmp_path):
    """safetensors creates files 0600; the framework's files follow the umask like the logs and config do."""
    previous = os.umask(0o022)
    try:
        train(tmp_path, "--training-max-steps", "2", "--checkpoint-interval", "1")
    finally:
        os.umask(previous)
    run = tmp_path / "run"
    files = [p for p in run.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"model.safetensors", "config.yaml", "manifest.json", "trainer_state_rank0.pt"}
    assert {str(p.relative_to(run)): stat.S_IMODE(p.stat().st_mode) for p in files} == {
        str(p.relative_to(run)): 0o644 for p in files
    }


class Position:
    """A data position: the smallest stateful component."""

    def __init__(self) -> None:
        self.batch = 0

    def state_dict(self) -> dict:
        return {"batch": self.batch}

    def load_state_dict(self, state: dict) -> None:
        self.batch = state["batch"]


def checkpointer_without_engine(run_dir: Path, seed: int, resume: str = "auto"):
    """A `Checkpointer` assembled from its parts: a run context, the trainer state's components, a weights
    strategy. No engine exists anywhere."""
    from llm.training.checkpointer import Checkpointer
    from llm.training.core.config import CheckpointConfig, Config
    from llm.training.observers.context import RunContext
    from llm.training.observers.hooks import CallbackList
    from llm.training.state import StateFns, StatefulComponents, TrainState
    from llm.training.weights import FileWeights

    torch.manual_seed(seed)
    model = nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    counters, position, callbacks = TrainState(), Position(), CallbackList([])
    context = RunContext(Config(), rank=0, world_size=1, device=torch.device("cpu"), run_dir=run_dir,
                         state=counters, log=lambda metrics, step=None: None)
    components = StatefulComponents()
    components.register("state", counters)
    components.register("optimizer", optimizer)
    components.register("lr_schedule", StateFns(lambda: {"steps": counters.step}, lambda state: None))
    components.register("data", position)
    components.register("callbacks", callbacks)
    components.register("rng", StateFns(ckpt.rng_state, ckpt.set_rng_state))
    checkpointer = Checkpointer(CheckpointConfig(resume=resume), context, components,
                                FileWeights(model, optimizer, is_writer=True), callbacks)
    components.register("checkpointer", checkpointer)
    return checkpointer, model, optimizer, counters, position


def test_checkpointer_saves_and_restores_components_without_an_engine(tmp_path):
    checkpointer, model, optimizer, counters, position = checkpointer_without_engine(tmp_path, seed=0)
    for _ in range(3):
        model(torch.randn(2, 4)).square().sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    counters.step, counters.epoch, position.batch = 3, 1, 7
    checkpointer.best_value, checkpointer.best_step = 0.5, 3
    saved = checkpointer.save("manual")
    assert saved == tmp_path / "checkpoints" / "step-00000003"
    state = ckpt.load_trainer_state(saved / "trainer_state_rank0.pt")  # the format's own check passes
    assert list(state) == ["state", "optimizer", "lr_schedule", "data", "callbacks", "rng", "checkpointer"]

    fresh, model2, optimizer2, counters2, position2 = checkpointer_without_engine(tmp_path, seed=1)
    assert not torch.equal(model2.weight, model.weight)
    assert fresh.maybe_resume() == saved
    assert torch.equal(model2.weight, model.weight) and torch.equal(model2.bias, model.bias)
    moments = [optimizer2.state[p]["exp_avg"] for p in model2.parameters()]
    assert all(torch.equal(a, optimizer.state[p]["exp_avg"]) for a, p in zip(moments, model.parameters()))
    assert (counters2.step, counters2.epoch, position2.batch) == (3, 1, 7)
    assert (fresh.best_value, fresh.best_step) == (0.5, 3)


def test_trainer_state_entries_are_the_formats():
    from llm.training.state import StatefulComponents

    components = StatefulComponents()
    with pytest.raises(ValueError, match="not an entry of the trainer state"):
        components.register("schedule", Position())
    components.register("data", Position())
    with pytest.raises(RuntimeError, match="no component for state, optimizer"):
        components.state_dict()  # a state the format would refuse is never written
