"""scikit-learn's bundled 8x8 digits images (1,797 samples, no download) as pixel-token sequences.

Each image becomes 64 tokens whose ids are the pixel intensities 0..16, so a plain token model
classifies it; batches are (tokens: (B, 64) long, labels: (B,) long).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import TensorDataset

from .datamodule import DataModule

NUM_LEVELS = 17  # pixel intensities 0..16
NUM_CLASSES = 10


class DigitsDataModule(DataModule):
    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None

    def setup(self, stage: str = "fit") -> None:
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = torch.as_tensor(digits.data, dtype=torch.long)  # (N, 64)
        y = torch.as_tensor(digits.target, dtype=torch.long)  # (N,)
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(self.config.seed))
        num_val = max(1, int(len(x) * self.config.data.val_fraction))
        val, train = order[:num_val], order[num_val:]
        self.train_set, self.val_set = TensorDataset(x[train], y[train]), TensorDataset(x[val], y[val])

    def train_dataloader(self):
        return self.make_loader(self.train_set, self.config.training.batch_size, train=True)

    def val_dataloader(self):
        return self.make_loader(self.val_set, self.config.training.batch_size, train=False)
