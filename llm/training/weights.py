"""How a run's model weights are written and read: the checkpointer's weights strategies.

- `FileWeights`: one safetensors file written by rank 0 (one process, or DDP replicas). A model split over ranks
  in some other way (expert parallelism) supplies `full_weights`, a block in which the model holds all of its
  weights (a collective, entered by every rank), around every write and read.
- `ShardedWeights`: FSDP or tensor parallelism; every rank writes its shards of the weights and the optimizer state
  (torch's distributed checkpoint), so a sharded checkpoint restores the optimizer too. An asynchronous save stages
  the shards in host memory and writes them in the checkpointer's background thread, over a process group of its own.

The engine picks the strategy (`build_weights`); the checkpointer only calls `save`, `load` and `save_final`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llm.artifacts import checkpoint as ckpt
from llm.artifacts.sharded import tied_groups, write_shards
from llm.models.lora import exportable
from llm.training.async_save import StagedModel, stage, stage_tensors
from llm.training.checkpointer import writing_to
from llm.training.parallel.fsdp import load_sharded, save_full_weights, save_sharded

FullWeights = Callable[..., contextlib.AbstractContextManager]


def _whole(load: bool = False) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


def load_shards(model: nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
    """Read a sharded checkpoint's weights and optimizer state into `model` and `optimizer` (any world size)."""
    try:
        load_sharded(model, optimizer, directory / ckpt.SHARDED_DIR)
    except (OSError, RuntimeError, ValueError, KeyError) as exc:
        raise ckpt.CheckpointError(f"checkpoint: cannot load the shards in {directory}: {exc}") from None


class FileWeights:
    """The whole model in one `model.safetensors`, written by rank 0."""

    sharded = False

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, is_writer: bool,
                 full_weights: FullWeights = _whole) -> None:
        self.model, self.optimizer, self.is_writer, self.full_weights = model, optimizer, is_writer, full_weights

    def save(self, directory: Path) -> None:
        """Write the weights into a checkpoint's directory (every rank calls it)."""
        with self.full_weights():  # first: a rank that fails a write below must not skip the gather's collective
            if self.is_writer:
                with writing_to(directory / ckpt.WEIGHTS):
                    ckpt.save_checkpoint_weights(self.model, directory / ckpt.WEIGHTS)

    def stage(self, directory: Path) -> Callable[[], None]:
        """An asynchronous save's first half (every rank calls it; the gather is a collective): the weights copied
        to host memory now; the call returned writes them into `directory` (in the background thread)."""
        with self.full_weights():
            staged = stage_tensors(self.model.state_dict()) if self.is_writer else None

        def write() -> None:
            if staged is not None:
                with writing_to(directory / ckpt.WEIGHTS):
                    ckpt.save_checkpoint_weights(StagedModel(staged), directory / ckpt.WEIGHTS)

        return write

    def load(self, directory: Path, sharded: bool) -> None:
        """Load a checkpoint's weights; `sharded`: an FSDP checkpoint, read into this process's whole model."""
        if sharded:
            load_shards(self.model, self.optimizer, directory)
            return
        with self.full_weights(load=True):  # each rank keeps its share of what loads
            ckpt.load_checkpoint_weights(self.model, directory / ckpt.WEIGHTS)

    def save_final(self, path: Path, step: int) -> None:
        """The run's final `model.safetensors` (LoRA merged), recording the step it was taken at."""
        with self.full_weights():
            if self.is_writer:
                ckpt.save_weights(exportable(self.model), path, step)


class ShardedWeights:
    """FSDP or tensor parallelism: every rank's shards of the weights and of the optimizer state."""

    sharded = True

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer
        self._writer_group: Any = None  # the asynchronous writes' process group, made at the first one

    def save(self, directory: Path) -> None:
        with writing_to(directory / ckpt.SHARDED_DIR):  # a collective
            save_sharded(self.model, self.optimizer, directory / ckpt.SHARDED_DIR)

    def stage(self, directory: Path) -> Callable[[], None]:
        """An asynchronous save's first half (every rank calls it, at the same step): this rank's shards of the
        weights and optimizer state copied to host memory now; the call returned writes them (torch's distributed
        checkpoint, in the background thread) into `directory`.

        The write's plan exchange and commit are collectives, run by every rank's writer thread while the training
        threads run theirs: they go over a gloo group of their own (created here once, by every rank; gloo also moves
        the plans of a CUDA run through host memory), which the training thread never uses."""
        import torch.distributed as dist
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        staged = stage({"model": model_state, "optimizer": optim_state})  # DTensors keep their mesh and placements
        groups = tied_groups(self.model)
        if self._writer_group is None:
            self._writer_group = dist.new_group(backend="gloo")
        group = self._writer_group

        def write() -> None:
            with writing_to(directory / ckpt.SHARDED_DIR):
                write_shards(staged, directory / ckpt.SHARDED_DIR, groups, group)

        return write

    def load(self, directory: Path, sharded: bool) -> None:
        load_shards(self.model, self.optimizer, directory)  # the checkpointer refuses unsharded ones before

    def save_final(self, path: Path, step: int) -> None:
        save_full_weights(self.model, path, step)  # a collective: every rank's shards, gathered on rank 0


def build_weights(model: nn.Module, optimizer: torch.optim.Optimizer, is_writer: bool, sharded: bool,
                  full_weights: FullWeights = _whole) -> FileWeights | ShardedWeights:
    """The strategy for `model` as the parallel plan laid it out: `sharded` (FSDP's DTensor shards) or a whole model
    on each rank, whose `full_weights` block gathers what the layout split."""
    if sharded:
        return ShardedWeights(model, optimizer)
    return FileWeights(model, optimizer, is_writer, full_weights)
