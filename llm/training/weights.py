"""How a run's model weights are written and read: the checkpointer's weights strategies.

- `FileWeights`: one safetensors file written by rank 0 (one process, or DDP replicas). A model split over ranks
  in some other way (expert parallelism) supplies `full_weights`, a block in which the model holds all of its
  weights (a collective, entered by every rank), around every write and read.
- `ShardedWeights`: FSDP; every rank writes its shards of the weights and the optimizer state (torch's
  distributed checkpoint), so a sharded checkpoint restores the optimizer too.

The engine picks the strategy (`build_weights`); the checkpointer only calls `save`, `load` and `save_final`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from llm.artifacts import checkpoint as ckpt
from llm.models.lora import exportable
from llm.training.async_save import StagedModel, stage_tensors
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
    """FSDP: every rank's shards of the weights and of the optimizer state."""

    sharded = True

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer

    def save(self, directory: Path) -> None:
        with writing_to(directory / ckpt.SHARDED_DIR):  # a collective
            save_sharded(self.model, self.optimizer, directory / ckpt.SHARDED_DIR)

    def stage(self, directory: Path) -> Callable[[], None]:
        """An asynchronous save's first half: the shards are written now, on the training thread (a collective of
        torch's distributed checkpoint); the trainer states, the hashing and the commit still go to the background."""
        self.save(directory)
        return lambda: None

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
