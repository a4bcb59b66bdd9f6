"""The `DataModule` contract and resumable, rank-sharded batching.

A data module owns everything about data: building caches once (`prepare_data`, rank 0 only),
creating data sets (`setup`), and handing out loaders. It also owns its *position* (epoch and
micro-batches consumed in it): the engine advances the position as it consumes batches, the
position is part of every checkpoint, and `train_dataloader()` starts from it, so a resumed run
never replays or skips a batch.

A position saved by N processes can be resumed by M (elastic resume): the saved state records the world size
and the per-rank batch size, so it converts to the number of samples of the epoch's permutation consumed so far
(`offset`), and the new ranks shard the rest of the permutation from there. Within the epoch no sample is seen
twice or skipped, except the tail that does not fill a global batch (dropped as always).

`ShardedBatchSampler` gives every rank a disjoint shard of one seeded permutation per epoch. The
union of the ranks' i-th batches is exactly the i-th batch a single process would draw with
`batch_size * world_size`, so a multi-process run sees the same global batches as a single one.

Loader worker processes survive the first SIGTERM/SIGINT (`StopSignalSafeLoader`): job managers (SLURM,
Kubernetes, torchrun) and a terminal's Ctrl-C signal the whole process group, and the training process answers
with a checkpoint at the next step boundary; a worker that died first would fail that save and the run's progress.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from llm.registry import register_data_module  # noqa: F401  (re-exported for plugins)


@dataclass
class DataPosition:
    epoch: int = 0
    batch: int = 0  # micro-batches of this epoch already consumed by this rank (counted from `offset`)
    offset: int = 0  # samples of the epoch's permutation consumed before `batch` counts (after an elastic resume)

    def samples(self, batch_size: int, world_size: int) -> int:
        """Samples of the epoch's permutation consumed by all ranks, each taking `batch_size` per micro-batch."""
        return self.offset + self.batch * batch_size * world_size


class ShardedBatchSampler:
    """Seeded per-epoch permutation, split across ranks, batched, started at a batch offset.

    Training (`drop_last=True`) drops the tail that does not fill a global batch so every rank
    takes the same number of steps. Evaluation (`shuffle=False, drop_last=False`) splits the data
    without padding, so nothing is counted twice; ranks may get one batch more or less.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        drop_last: bool = True,
        seed: int = 0,
        epoch: int = 0,
        start_batch: int = 0,
        start_sample: int = 0,
    ) -> None:
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.rank, self.world_size = rank, world_size
        self.shuffle, self.drop_last = shuffle, drop_last
        self.seed, self.epoch, self.start_batch = seed, epoch, start_batch
        self.start_sample = start_sample  # samples of the permutation consumed before (an elastic resume)

    def _indices(self) -> list[int]:
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed + 1_000_003 * self.epoch)
            order = torch.randperm(self.num_samples, generator=gen).tolist()
        else:
            order = list(range(self.num_samples))
        order = order[self.start_sample :]
        if self.drop_last:
            global_batch = self.batch_size * self.world_size
            order = order[: (len(order) // global_batch) * global_batch]
            # Rank r takes positions r, r+W, ... inside each global batch.
            return order[self.rank :: self.world_size]
        per_rank = math.ceil(len(order) / self.world_size)
        return order[self.rank * per_rank : (self.rank + 1) * per_rank]

    def __iter__(self) -> Iterator[list[int]]:
        indices = self._indices()
        for start in range(self.start_batch * self.batch_size, len(indices), self.batch_size):
            batch = indices[start : start + self.batch_size]
            if self.drop_last and len(batch) < self.batch_size:
                return
            yield batch

    def __len__(self) -> int:
        n = len(self._indices())
        total = n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)
        return max(0, total - self.start_batch)


_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _worker_stop_signal(signum: int, frame: Any) -> None:
    """A loader worker's first SIGTERM/SIGINT is the one sent to the whole process group: the main process saves
    and shuts its workers down itself. A second one (the main process ending a stuck worker, or the job manager
    insisting) takes the signal's default action."""
    for sig in _STOP_SIGNALS:  # the next one is a second one
        signal.signal(sig, signal.SIG_DFL if sig == signal.SIGTERM else signal.default_int_handler)


def ignore_first_stop_signal(worker_id: int = 0) -> None:
    """`worker_init_fn` of a loader whose workers must outlive a process-group SIGTERM/SIGINT (see the module
    docstring); also usable by a data module that builds its own `DataLoader`. The signals were blocked while the
    worker was forked (`StopSignalSafeLoader`), so one that arrived meanwhile is handled here, not lost or fatal."""
    for sig in _STOP_SIGNALS:
        signal.signal(sig, _worker_stop_signal)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)


@contextlib.contextmanager
def _stop_signals_blocked() -> Iterator[None]:
    """Hold SIGTERM/SIGINT pending in this thread (and in the workers it forks) until they can handle them: torch
    gives a new worker a handler that exits on SIGTERM before `worker_init_fn` runs. The main process receives
    any signal held here as soon as the workers are started."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class StopSignalSafeLoader(DataLoader):
    """A `DataLoader` whose worker processes outlive the first SIGTERM/SIGINT (`ignore_first_stop_signal`)."""

    def __iter__(self) -> Iterator[Any]:
        if self.num_workers == 0:
            return super().__iter__()
        with _stop_signals_blocked():  # the workers start here
            return super().__iter__()


class DataModule:
    """Base class of data modules. Subclasses implement `setup` and the two loaders.

    `self.rank` / `self.world_size` are set by the engine before `setup`; subclasses that build
    loaders with `make_loader` get sharding and exact resume for free.

    A data module receives the values it uses. The built-in ones (`takes_data_section`) are built from the run's
    `data` section and plain values: `cls(data, batch_size=..., seed=..., run_dir=...)`. A module that reads the
    whole run config instead (`cls(config)`, as the user's guide's recipe 3 does with `self.config`) takes its
    loader options from it: `config.seed` and `config.data.num_workers`.
    """

    #: Built as `cls(data_section, batch_size=, seed=, run_dir=)` (True) or `cls(config)` (False).
    takes_data_section: ClassVar[bool] = False
    #: Set by the engine (`training.val_max_batches`, 0 = all): an evaluation loader of `make_loader` serves only the
    #: first `val_max_batches` global batches (`batch_size * world_size` samples each), split over the ranks, so N
    #: processes score the samples one process with the same global batch scores.
    val_max_batches: int = 0

    def __init__(self, config: Any = None, *, seed: int | None = None, num_workers: int | None = None) -> None:
        self.config = config  # the run's config, for a module built from it (None for the built-in ones)
        # Loader options: given, else those of the run config a module is built from (`config.seed`,
        # `config.data.num_workers`), else none.
        self.seed = seed if seed is not None else config.seed if config is not None else 0
        self.num_workers = (num_workers if num_workers is not None
                            else config.data.num_workers if config is not None else 0)
        self.rank = 0
        self.world_size = 1
        self.position = DataPosition()
        self._train_batch_size: int | None = None  # per-rank batch of the last training loader (make_loader)

    # -- lifecycle ------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Build caches or download; called once on rank 0 before any rank calls `setup`. Nothing is written into
        the run directory here: the engine sets the run up before that directory exists (see `save_tokenizer`)."""

    def setup(self, stage: str = "fit") -> None:
        """Create the data sets; called on every rank."""

    def train_dataloader(self) -> Iterable[Any]:
        raise NotImplementedError

    def val_dataloader(self) -> Iterable[Any] | None:
        return None

    def save_tokenizer(self, directory: str | os.PathLike) -> None:
        """Write what `directory` (a run directory) needs to decode this data's token ids; nothing by default. The
        engine calls it on rank 0 with the run's config.yaml, after set-up and the resume checks."""

    # -- position -------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        if epoch != self.position.epoch:
            self.position = DataPosition(epoch=epoch, batch=0)

    def advance(self, batches: int = 1) -> None:
        self.position.batch += batches

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {**asdict(self.position), "world_size": self.world_size}
        if self._train_batch_size is not None:  # what converts the position to samples on another world size
            state["batch_size"] = self._train_batch_size
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a saved position; one saved by another number of processes is remapped to samples consumed.
        Raises ValueError when it cannot be (a position without the batch size it was counted in)."""
        state = dict(state)
        world, batch_size = state.pop("world_size", None), state.pop("batch_size", None)
        position = DataPosition(**state)
        if world is not None and world != self.world_size and (position.batch or position.offset):
            if batch_size is None:
                raise ValueError(f"the data position was saved by {world} processes as batches of an unknown size, "
                                 f"so it cannot be remapped to {self.world_size}")
            consumed = position.samples(int(batch_size), int(world))
            position = DataPosition(epoch=position.epoch, batch=0, offset=consumed)
        self.position = position

    # -- helpers for subclasses -----------------------------------------------------------------
    def make_loader(
        self,
        dataset: Dataset,
        batch_size: int,
        *,
        train: bool,
        shuffle: bool | None = None,
        collate_fn: Any = None,
        num_workers: int | None = None,
    ) -> DataLoader:
        """A DataLoader over this rank's shard; training loaders start at `self.position`."""
        num_samples = len(dataset)  # type: ignore[arg-type]
        if train:
            self._train_batch_size = batch_size
        elif self.val_max_batches:  # a global cap: the first samples, whatever the number of ranks
            num_samples = min(num_samples, self.val_max_batches * batch_size * self.world_size)
        sampler = ShardedBatchSampler(
            num_samples,
            batch_size,
            rank=self.rank,
            world_size=self.world_size,
            shuffle=train if shuffle is None else shuffle,
            drop_last=train,
            seed=self.seed,
            epoch=self.position.epoch if train else 0,
            start_batch=self.position.batch if train else 0,
            start_sample=self.position.offset if train else 0,
        )
        if num_workers is None:
            num_workers = self.num_workers
        return StopSignalSafeLoader(
            dataset,
            batch_sampler=sampler,
            collate_fn=collate_fn,
            num_workers=num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=False,
            worker_init_fn=ignore_first_stop_signal if num_workers else None,
        )


class SectionDataModule(DataModule):
    """A data module built from the run's `data` section (`data`: any object with its fields, e.g. `DataConfig`)
    and the plain values it needs of the rest: the per-rank `batch_size`, the `seed`, and the `run_dir` ("" = none;
    it does not exist during set-up: the engine writes the tokenizer there with `save_tokenizer`)."""

    takes_data_section = True

    def __init__(self, data: Any, *, batch_size: int, seed: int = 0, run_dir: str = "") -> None:
        super().__init__(seed=seed, num_workers=data.num_workers)
        self.data, self.batch_size, self.run_dir = data, batch_size, run_dir


class TensorDataModule(SectionDataModule):
    """A data module over in-memory tensors: `split(x, y)` in `setup` makes a seeded train/validation split
    (`data.val_fraction`, at least one validation sample); the loaders are the standard sharded ones."""

    def split(self, x: torch.Tensor, y: torch.Tensor) -> None:
        num_val = max(1, int(len(x) * self.data.val_fraction))
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(self.seed))
        val, train = order[:num_val], order[num_val:]
        self.train_set, self.val_set = TensorDataset(x[train], y[train]), TensorDataset(x[val], y[val])

    def train_dataloader(self) -> DataLoader:
        return self.make_loader(self.train_set, self.batch_size, train=True)

    def val_dataloader(self) -> DataLoader:
        return self.make_loader(self.val_set, self.batch_size, train=False)
