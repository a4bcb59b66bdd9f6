"""scikit-learn's bundled 8x8 digits images (1,797 samples, no download) as patch sequences.

Each image becomes 16 patches of 2x2 pixels (ViT-style, scaled to [0, 1]), so a sequence model
classifies it; batches are (patches: (B, 16, 4) float, labels: (B,) long).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import TensorDataset

from llm.data.datamodule import TensorDataModule

NUM_CLASSES = 10
PATCH = 2
NUM_PATCHES = (8 // PATCH) ** 2
PATCH_FEATURES = PATCH * PATCH


def to_patches(images: torch.Tensor) -> torch.Tensor:
    """(N, 64) pixels 0..16 -> (N, 16, 4) patches in [0, 1], row-major patch order."""
    x = images.float().reshape(-1, 8 // PATCH, PATCH, 8 // PATCH, PATCH) / 16.0  # (N, 4, 2, 4, 2)
    return x.permute(0, 1, 3, 2, 4).reshape(-1, NUM_PATCHES, PATCH_FEATURES)


class DigitsDataModule(TensorDataModule):
    def __init__(self, data: Any, *, batch_size: int, seed: int = 0, run_dir: str = "") -> None:
        super().__init__(data, batch_size=batch_size, seed=seed, run_dir=run_dir)
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None

    def setup(self, stage: str = "fit") -> None:
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = to_patches(torch.as_tensor(digits.data))  # (N, 16, 4)
        y = torch.as_tensor(digits.target, dtype=torch.long)  # (N,)
        self.split(x, y)
