"""Two gloo processes held to one process where the framework claims they agree (issue 22, "exact where it claims").

- The stop-signal agreement reads nothing per step: a signal on one rank stops both at the same later step, after
  one checkpoint of that step, with no tensor read in the steps before.
- `training.val_max_batches` caps the global batch count: 2 processes score the samples 1 process scores.
- Under the lm defaults (Muon, bf16) 2 processes follow 1 process within the bound docs/scale-out.md documents.

Each test spawns 2 processes running the engine in-process (`build_engine`, as `train_worker` does) and a
1-process reference; tiny models, a few steps.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from helpers import CKPT, TINY_REGRESSION, make_config, read_metrics
from torch.utils._python_dispatch import TorchDispatchMode

from llm.artifacts.checkpoint import list_checkpoints, verify_checkpoint
from llm.training.core.callbacks import Callback
from llm.training.parallel import distributed as D
from llm.training.train import build_engine, prepare_run_dir

pytestmark = pytest.mark.slow  # two-process jobs


class TensorReads(TorchDispatchMode):
    """Counts reads of tensor values into Python (`.item()`, `bool()`, `int()`, `float()`, `.tolist()`)."""

    SCALAR_OPS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default)

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.SCALAR_OPS:
            self.count += 1
        return func(*args, **(kwargs or {}))


class PerStep(Callback):
    """Reads per step (from the previous step's end to this one's: the previous step's stop vote included); raises
    a stop signal on `signal_rank` at `signal_step`, as the signal handler does."""

    def __init__(self, engine, counter: TensorReads, signal_rank: int, signal_step: int) -> None:
        self.run, self.counter, self.signal_rank, self.signal_step = engine, counter, signal_rank, signal_step
        self.per_step: dict[int, int] = {}
        self._last = 0

    def on_batch_end(self, logs=None) -> None:
        step = self.run.state.step
        self.per_step[step] = self.counter.count - self._last
        self._last = self.counter.count
        if self.run.rank == self.signal_rank and step == self.signal_step:
            self.run.checkpointer._handle_signal(signal.SIGTERM, None)


def _engine(out: Path, flags: list[str], rank: int, world: int):
    config, task = make_config(out, *flags)
    if rank == 0:
        prepare_run_dir(config)
    D.barrier()
    return build_engine(config, task, rank, world)


def _job(rank: int, world: int, port: int, out: str, flags: list[str], what: str) -> None:
    """One rank (or the single process): runs `what` and writes its result to out/result-<rank>.json."""
    torch.set_num_threads(1)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        D.init_process_group(rank, world, "gloo", torch.device("cpu"), 1.0)
    try:
        engine = _engine(Path(out), flags, rank, world)
        result: dict = {}
        if what == "validate":
            engine.setup()
            result["val_loss"] = float(engine.validate()["val/loss"])
        elif what == "signal":
            engine.setup()
            engine.setup = lambda: None  # set-up may read what it likes; the loop may not
            counter = TensorReads()
            recorder = PerStep(engine, counter, signal_rank=world - 1, signal_step=3)
            engine.callbacks.callbacks.append(recorder)
            with counter:
                engine.run()
            result = {"per_step": recorder.per_step, "step": engine.state.step}
        else:  # train: the run's losses and final weights
            engine.run()
            if rank == 0:
                weights = {k: v.float() for k, v in engine.unwrapped_model.state_dict().items()}
                torch.save(weights, Path(out) / "weights.pt")
        (Path(out) / f"result-{rank}.json").write_text(json.dumps(result))
        # Both ranks done before either tears gloo down: a rank that destroys its group while the peer still
        # finishes the last collective's transfers sometimes aborts at exit (a run's final save ends with one too)
        D.barrier()
    finally:
        D.destroy_process_group()


def run(out: Path, flags: list[str], what: str, world: int) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    if world == 1:
        _job(0, 1, 0, str(out), flags, what)
    else:
        try:
            mp.spawn(_job, args=(world, D.free_port(), str(out), flags, what), nprocs=world, join=True)
        except mp.ProcessExitedException as exc:
            # Known, not yet understood: under load a rank of these in-process jobs sometimes aborts while the
            # interpreter exits ("terminate called without an active exception"), after its work is done. The
            # results are still checked; an abort before every rank wrote its result still fails.
            if exc.signal_name != "SIGABRT" or not all((out / f"result-{r}.json").exists() for r in range(world)):
                raise
    return [json.loads((out / f"result-{r}.json").read_text()) for r in range(world)]


# -- the stop-signal agreement ------------------------------------------------------------------------------------
def test_a_signal_on_one_rank_stops_both_at_the_next_step_without_a_read_per_step(tmp_path):
    flags = [*TINY_REGRESSION, *CKPT, "--training-max-steps", "8", "--training-log-interval", "100",
             "--training-val-interval", "0", "--training-precision", "fp32"]
    ranks = run(tmp_path / "two", flags, "signal", 2)
    for r in ranks:
        # Rank 1 was signalled at step 3: its vote is read at step 4, where both ranks stop.
        assert r["step"] == 4
        assert [r["per_step"][str(s)] for s in (2, 3, 4)] == [0, 0, 0], r["per_step"]
    (step, path), = list_checkpoints(tmp_path / "two" / "run" / "checkpoints")
    assert step == 4 and verify_checkpoint(path)["step"] == 4  # one checkpoint, of the step both stopped at
    one, = run(tmp_path / "one", flags, "signal", 1)
    assert one["step"] == 3  # one process acts on its own signal at once


# -- the validation cap ---------------------------------------------------------------------------------------------
def test_val_max_batches_caps_the_global_batches(tmp_path):
    # Capped per rank (as it was), 2 x 3 batches of 4 would be samples 0-11 and 32-43; one process scores 0-23.
    flags = [*TINY_REGRESSION, "--data-val-fraction", "0.25", "--training-val-max-batches", "3"]
    # The same global batch of 8: one process of 8, two of 4.
    one, = run(tmp_path / "one", [*flags, "--training-batch-size", "8"], "validate", 1)
    two = run(tmp_path / "two", [*flags, "--training-batch-size", "4"], "validate", 2)
    assert two[0]["val_loss"] == two[1]["val_loss"]
    assert two[0]["val_loss"] == pytest.approx(one["val_loss"], rel=1e-6, abs=1e-7)


# -- N processes and one under the lm defaults ----------------------------------------------------------------------
# The bound docs/scale-out.md documents ("N processes and one process") for the lm defaults (Muon, bf16) on this
# tiny model, 2 processes x 8 vs 1 x 16: largest train/loss difference of any step, final val/loss difference, and
# largest weight difference. Measured (CPU, 20 steps): 4.1e-4, 3.0e-4, 6.0e-3; the bound leaves room for other CPUs.
LM_DEFAULTS_BOUND = {"train_loss": 2e-3, "val_loss": 2e-3, "weights": 3e-2}


def lm_flags(root: Path, steps: int, *extra: str) -> list[str]:
    """The tiny lm run of the measurement (lm defaults: Muon; bf16 set explicitly, as `auto` is on a GPU)."""
    corpus = root / "corpus.txt"
    if not corpus.exists():
        root.mkdir(parents=True, exist_ok=True)
        corpus.write_text("".join(f"def f{i}(x):\n    return x * {i} + {i % 7}  # line {i}\n" for i in range(1500)),
                          encoding="utf-8")
    return ["--task", "lm", "--data-path", str(corpus), "--data-cache-dir", str(root / "cache"), "--data-seq-len",
            "32", "--model-max-seq-len", "32", "--model-hidden-size", "64", "--model-num-layers", "2",
            "--model-num-heads", "2", "--training-max-steps", str(steps), "--training-warmup", "2",
            "--training-log-interval", "1", "--training-val-max-batches", "4", "--training-val-interval", "0",
            "--training-device", "cpu", "--training-callbacks", "MetricsLogger", "--logging-loggers", "jsonl",
            "--training-precision", "bf16", *extra]


def differences(root: Path, steps: int, *extra: str) -> dict[str, float]:
    """(train loss, final val loss, weights) differences of 2 processes x 8 from 1 process x 16."""
    runs = {}
    for world, batch in ((1, "16"), (2, "8")):
        out = root / f"world{world}"
        run(out, lm_flags(root, steps, "--training-batch-size", batch, *extra), "train", world)
        records = read_metrics(out / "run")
        runs[world] = ([r["train/loss"] for r in records if "train/loss" in r],
                       [r["val/loss"] for r in records if "val/loss" in r][-1], torch.load(out / "weights.pt"))
    (loss1, val1, w1), (loss2, val2, w2) = runs[1], runs[2]
    assert len(loss1) == len(loss2) == steps
    return {"train_loss": max(abs(a - b) for a, b in zip(loss1, loss2)), "val_loss": abs(val1 - val2),
            "weights": max((w1[k] - w2[k]).abs().max().item() for k in w1)}


def test_lm_defaults_two_processes_follow_one_within_the_documented_bound(tmp_path):
    """Muon orthogonalises in bf16 (torch's Newton-Schulz), so the last bits of the DDP-averaged gradient, which
    differ from one process's sum, change the update by bf16 steps: equal within a bound, not bit for bit."""
    diff = differences(tmp_path, 10)
    assert all(diff[k] <= LM_DEFAULTS_BOUND[k] for k in diff), diff
