"""Data for the regression task: a seeded synthetic sequence-regression problem, or a CSV file.

Synthetic: each sample is a sequence of `seq_len` feature vectors (8 features); the target mixes
a per-position nonlinearity with terms that depend on the first and last positions, so a model
must attend across the sequence and know positions to fit it. CSV: numeric columns with a header row; the last
column is the target and every other column is one position of a length-(columns-1) sequence.
"""

from __future__ import annotations

import csv
from typing import Any

import torch
from torch.utils.data import TensorDataset

from llm.errors import ConfigError

from .datamodule import TensorDataModule

NUM_FEATURES = 8


def synthetic_regression(num_samples: int, seq_len: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x: (N, T, F), y: (N,)) with unit-variance targets and a little noise."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_samples, seq_len, NUM_FEATURES, generator=gen)
    w, u, v = (torch.randn(NUM_FEATURES, generator=gen) / NUM_FEATURES**0.5 for _ in range(3))
    # A per-position nonlinearity plus terms that depend on where a feature sits in the sequence.
    y = torch.tanh(x @ w).mean(dim=1) * 3.0 + x[:, 0] @ u - 0.5 * torch.relu(x[:, -1] @ v)  # (N,)
    y = y + 0.05 * torch.randn(num_samples, generator=gen)
    return x, (y - y.mean()) / y.std()


def read_csv(path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(x: (N, C-1, 1), y: (N,)) from a numeric CSV with a header row."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"data.path: cannot read {path!r}: {exc}") from None
    if len(rows) < 3 or len(rows[0]) < 2:
        raise ConfigError(f"data.path: {path!r} needs a header and at least 2 rows of >= 2 numeric columns")
    values = []
    for line, row in enumerate(rows[1:], start=2):
        try:
            values.append([float(cell) for cell in row])
        except ValueError:
            raise ConfigError(f"data.path: {path!r} line {line} has a non-numeric value: {row!r}") from None
        if len(row) != len(rows[0]):
            raise ConfigError(f"data.path: {path!r} line {line} has {len(row)} columns, the header has {len(rows[0])}")
    table = torch.tensor(values)
    x = table[:, :-1]
    x = (x - x.mean(0)) / x.std(0).clamp_min(1e-8)
    return x.unsqueeze(-1), table[:, -1]


class RegressionDataModule(TensorDataModule):
    """Train/validation split of the synthetic problem or a CSV; batches are (x, y)."""

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None

    @property
    def num_features(self) -> int:
        return 1 if self.config.data.path else NUM_FEATURES

    def setup(self, stage: str = "fit") -> None:
        data = self.config.data
        if data.path:
            x, y = read_csv(data.path)
        else:
            x, y = synthetic_regression(data.num_samples, data.seq_len, self.config.seed)
        self.split(x, y)
