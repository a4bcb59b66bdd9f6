"""The `DataModule` contract and resumable, rank-sharded batching.

A data module owns everything about data: building caches once (`prepare_data`, rank 0 only),
creating data sets (`setup`), and handing out loaders. It also owns its *position* (epoch and
micro-batches consumed in it): the engine advances the position as it consumes batches, the
position is part of every checkpoint, and `train_dataloader()` starts from it, so a resumed run
never replays or skips a batch.

`ShardedBatchSampler` gives every rank a disjoint shard of one seeded permutation per epoch. The
union of the ranks' i-th batches is exactly the i-th batch a single process would draw with
`batch_size * world_size`, so a multi-process run sees the same global batches as a single one.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from llm.registry import register_data_module  # noqa: F401  (re-exported for plugins)


@dataclass
class DataPosition:
    epoch: int = 0
    batch: int = 0  # micro-batches of this epoch already consumed by this rank


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
    ) -> None:
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.rank, self.world_size = rank, world_size
        self.shuffle, self.drop_last = shuffle, drop_last
        self.seed, self.epoch, self.start_batch = seed, epoch, start_batch

    def _indices(self) -> list[int]:
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed + 1_000_003 * self.epoch)
            order = torch.randperm(self.num_samples, generator=gen).tolist()
        else:
            order = list(range(self.num_samples))
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


class DataModule:
    """Base class of data modules. Subclasses implement `setup` and the two loaders.

    `self.rank` / `self.world_size` are set by the engine before `setup`; subclasses that build
    loaders with `make_loader` get sharding and exact resume for free.
    """

    def __init__(self, config: Any) -> None:
        self.config = config
        self.rank = 0
        self.world_size = 1
        self.position = DataPosition()

    # -- lifecycle ------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Build caches or download; called once on rank 0 before any rank calls `setup`."""

    def setup(self, stage: str = "fit") -> None:
        """Create the data sets; called on every rank."""

    def train_dataloader(self) -> Iterable[Any]:
        raise NotImplementedError

    def val_dataloader(self) -> Iterable[Any] | None:
        return None

    # -- position -------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        if epoch != self.position.epoch:
            self.position = DataPosition(epoch=epoch, batch=0)

    def advance(self, batches: int = 1) -> None:
        self.position.batch += batches

    def state_dict(self) -> dict[str, Any]:
        return asdict(self.position)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = DataPosition(**state)

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
        sampler = ShardedBatchSampler(
            len(dataset),  # type: ignore[arg-type]
            batch_size,
            rank=self.rank,
            world_size=self.world_size,
            shuffle=train if shuffle is None else shuffle,
            drop_last=train,
            seed=int(getattr(self.config, "seed", 0)),
            epoch=self.position.epoch if train else 0,
            start_batch=self.position.batch if train else 0,
        )
        if num_workers is None:
            num_workers = int(getattr(getattr(self.config, "data", None), "num_workers", 0))
        return DataLoader(
            dataset,
            batch_sampler=sampler,
            collate_fn=collate_fn,
            num_workers=num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=False,
        )


class TensorDataModule(DataModule):
    """A data module over in-memory tensors: `split(x, y)` in `setup` makes a seeded train/validation split
    (`data.val_fraction`, at least one validation sample); the loaders are the standard sharded ones."""

    def split(self, x: torch.Tensor, y: torch.Tensor) -> None:
        num_val = max(1, int(len(x) * self.config.data.val_fraction))
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(self.config.seed))
        val, train = order[:num_val], order[num_val:]
        self.train_set, self.val_set = TensorDataset(x[train], y[train]), TensorDataset(x[val], y[val])

    def train_dataloader(self) -> DataLoader:
        return self.make_loader(self.train_set, self.config.training.batch_size, train=True)

    def val_dataloader(self) -> DataLoader:
        return self.make_loader(self.val_set, self.config.training.batch_size, train=False)
