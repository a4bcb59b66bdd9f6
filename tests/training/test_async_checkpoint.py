"""Asynchronous checkpoints (`--checkpoint-async`): the same files and the same resume as synchronous saves, a write
failing in the background fails the run and leaves no step directory, a signal's save waits for the pending write,
and keep-N pruning never counts or deletes a checkpoint still being written."""

from __future__ import annotations

import builtins
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from helpers import CKPT, disk_filling_open, tiny_engine
from safetensors.torch import load_file

from llm.artifacts import checkpoint as ckpt
from llm.training.async_save import stage, stage_tensors
from llm.training.core.callbacks import Callback

ASYNC = ("--checkpoint-async",)


def run(workdir: Path, *flags: str, extra: tuple[Callback, ...] = ()):
    return tiny_engine(workdir, *CKPT, "--checkpoint-interval", "2", *flags, extra_callbacks=extra, run=True)


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def assert_bitwise(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def complete(run_dir: Path) -> list[int]:
    return [s for s, p in ckpt.list_checkpoints(run_dir / "checkpoints") if (p / ckpt.MANIFEST).is_file()]


@pytest.fixture(scope="module")
def sync_run(tmp_path_factory) -> Path:
    """The synchronous reference: 6 steps, a checkpoint every 2."""
    workdir = tmp_path_factory.mktemp("sync")
    run(workdir, "--training-max-steps", "6")
    return workdir / "run"


class Saves(Callback):
    """Records each reported save, and the complete checkpoints present when it is reported."""

    def __init__(self) -> None:
        self.saves: list[tuple[int, str, list[int]]] = []

    def on_save_checkpoint(self, logs=None) -> None:
        self.saves.append((logs["step"], logs["reason"], complete(self.context.run_dir)))


def test_stage_copies_and_keeps_tied_tensors_tied():
    shared = torch.ones(3)
    staged = stage_tensors({"a": shared, "b": shared, "c": torch.zeros(2)})
    assert staged["a"] is staged["b"] and staged["a"].data_ptr() != shared.data_ptr()
    state = {"window": [1.0], "t": torch.zeros(2)}
    copy = stage(state)
    state["window"].append(2.0), state["t"].add_(1)  # training goes on after the step
    assert copy == {"window": [1.0], "t": copy["t"]} and torch.equal(copy["t"], torch.zeros(2))


def test_async_checkpoints_equal_sync_ones_and_resume_bitwise(tmp_path, sync_run):
    saves = Saves()
    run(tmp_path, *ASYNC, "--training-max-steps", "4", extra=(saves,))
    assert [(s, r) for s, r, _ in saves.saves] == [(2, "interval"), (4, "final")]  # the final save is synchronous
    step4 = tmp_path / "run/checkpoints" / ckpt.step_dir_name(4)
    ckpt.inspect_checkpoint(step4)  # manifest and checksums, as written by the background thread
    sync_step4 = sync_run / "checkpoints" / ckpt.step_dir_name(4)
    assert_bitwise(weights(step4 / ckpt.WEIGHTS), weights(sync_step4 / ckpt.WEIGHTS))
    run(tmp_path, *ASYNC, "--training-max-steps", "6")  # resumes from the async step 4
    assert_bitwise(weights(tmp_path / "run/model.safetensors"), weights(sync_run / "model.safetensors"))


def test_a_background_write_failure_fails_the_run_and_leaves_no_step_dir(tmp_path, monkeypatch):
    def fails(path: str, mode: str) -> bool:  # the disk fills up while the writer thread writes a trainer state
        return "trainer_state" in path and "w" in mode and threading.current_thread().name == "llm-checkpoint-writer"

    monkeypatch.setattr(builtins, "open", disk_filling_open(fails))
    engine = tiny_engine(tmp_path, *CKPT, "--checkpoint-interval", "2", *ASYNC, "--training-max-steps", "6")
    with pytest.raises(ckpt.CheckpointError, match=r"trainer_state_rank0.pt: No space left on device") as info:
        engine.run()
    assert "\n" not in str(info.value)
    # Raised at the first step boundary after the write failed; at the latest the next save (step 4) waits for it.
    assert 2 <= engine.state.step <= 4
    assert os.listdir(tmp_path / "run/checkpoints") == []  # no step directory, no temp left behind


def test_sigterm_during_a_pending_write_saves_after_it_and_resumes(tmp_path, monkeypatch, sync_run):
    real_save = ckpt.save_trainer_state

    def slow_save(state, path):  # the background write of step 2 is still running when the signal comes
        if threading.current_thread().name == "llm-checkpoint-writer":
            time.sleep(0.3)
        real_save(state, path)

    class Term(Callback):
        def on_batch_end(self, logs=None) -> None:
            if logs["step"] == 3:
                os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(ckpt, "save_trainer_state", slow_save)
    saves = Saves()
    engine = run(tmp_path, *ASYNC, "--training-max-steps", "6", extra=(Term(), saves))
    assert engine.state.step == 3
    # The pending step-2 write was collected first, then the signal's (synchronous) save of step 3.
    assert [(s, r) for s, r, _ in saves.saves] == [(2, "interval"), (3, "signal")]
    assert complete(tmp_path / "run") == [2, 3]
    monkeypatch.setattr(ckpt, "save_trainer_state", real_save)
    run(tmp_path, *ASYNC, "--training-max-steps", "6")
    assert_bitwise(weights(tmp_path / "run/model.safetensors"), weights(sync_run / "model.safetensors"))


def test_keep_last_with_async_saves_counts_only_complete_checkpoints(tmp_path):
    saves = Saves()
    run(tmp_path, *ASYNC, "--checkpoint-interval", "1", "--checkpoint-keep-last", "2", "--training-max-steps", "5",
        extra=(saves,))
    # Each save is reported once its write is committed and pruned: the newest two, the one just written included.
    assert [(s, present) for s, _, present in saves.saves] == [
        (1, [1]), (2, [1, 2]), (3, [2, 3]), (4, [3, 4]), (5, [4, 5])]
    assert sorted(os.listdir(tmp_path / "run/checkpoints")) == ["step-00000004", "step-00000005"]


def _two_process_job(rank: int, port: int, root: str) -> None:
    """Rank `rank` of 2, for each strategy: a synchronous run of 6 steps, an asynchronous one stopped at 5 (steps 2
    and 4 written in the background, 5 by the final save), resumed to 6. Records the threads that wrote the shards."""
    from helpers import make_config

    from llm.training import weights as weights_module
    from llm.training.parallel import distributed as D
    from llm.training.train import build_engine, prepare_run_dir

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    D.init_process_group(rank, 2, "gloo", torch.device("cpu"), 1.0)
    writers: list[str] = []
    real_write = weights_module.write_shards

    def write_shards(*args, **kwargs):  # the shards' DCP write: which thread runs it
        writers.append(threading.current_thread().name)
        real_write(*args, **kwargs)

    weights_module.write_shards = write_shards
    try:
        for strategy in ("ddp", "fsdp"):
            for name, steps, extra in (("sync", "6", ()), ("async", "5", ASYNC), ("async", "6", ASYNC)):
                config, task = make_config(Path(root) / f"{strategy}-{name}", *CKPT,
                                           "--distributed-nproc-per-node", "2", "--distributed-strategy", strategy,
                                           "--training-batch-size", "8", "--checkpoint-interval", "2",
                                           "--training-scheduler-type", "constant", *extra,
                                           "--training-max-steps", steps)
                if rank == 0:
                    prepare_run_dir(config)
                D.barrier()
                build_engine(config, task, rank, 2).run()
                D.barrier()
    finally:
        D.destroy_process_group()
    (Path(root) / f"writers-{rank}.txt").write_text(",".join(writers))


@pytest.mark.slow
def test_two_processes_commit_once_every_rank_has_written_and_resume_bitwise(tmp_path):
    """Each rank's writer thread reports through a marker file; rank 0 commits a manifest covering both trainer
    states, and the async run resumed on 2 processes ends where the synchronous one does, with DDP (rank 0 writes
    the weights file in the background) and with FSDP (every rank's writer thread writes its shards, torch's
    distributed checkpoint over a process group of its own, while its training thread trains on)."""
    import torch.multiprocessing as mp

    from llm.training.parallel import distributed as D

    mp.spawn(_two_process_job, args=(D.free_port(), str(tmp_path)), nprocs=2, join=True)
    for strategy, weights_file in (("ddp", ckpt.WEIGHTS), ("fsdp", f"{ckpt.SHARDED_DIR}/.metadata")):
        run_dir = tmp_path / f"{strategy}-async" / "run"
        step4 = run_dir / "checkpoints" / ckpt.step_dir_name(4)
        assert {"trainer_state_rank0.pt", "trainer_state_rank1.pt", weights_file} <= set(
            ckpt.verify_checkpoint(step4)["files"])
        assert not [name for name in os.listdir(step4) if name.endswith(".tmp")]  # the ranks' markers are gone
        assert_bitwise(weights(run_dir / "model.safetensors"),
                       weights(tmp_path / f"{strategy}-sync" / "run" / "model.safetensors"))
    # The shards of steps 2 and 4 were written by each rank's writer thread, none on the training thread (the final
    # and synchronous saves write theirs with the training thread's collective, not through write_shards).
    for rank in range(2):
        assert (tmp_path / f"writers-{rank}.txt").read_text() == "llm-checkpoint-writer,llm-checkpoint-writer"
