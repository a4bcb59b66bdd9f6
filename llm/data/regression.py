"""Data for the regression task: a seeded synthetic sequence-regression problem, or a CSV file.

Synthetic: each sample is a sequence of `seq_len` feature vectors (8 features); the target mixes
a per-position nonlinearity with terms that depend on the first and last positions, so a model
must attend across the sequence and know positions to fit it. CSV: numeric columns with a header row; the last
column is the target and every other column is one position of a length-(columns-1) sequence.

A CSV is checked cell by cell rather than trusted, and refused with its file and line number: an empty file, a
first row of numbers where the header belongs, fewer than 2 columns or 2 data rows, a row not as wide as the header
(blank lines skipped), a cell that is not a finite number (`nan`, `inf` and `1e400`, which parses as inf: they
would otherwise surface as a non-finite loss blamed on the step, or as a run that "succeeds" at loss inf), and a
target so large that its square overflows fp32 (the MSE in target units). Features are standardized in float64
over the whole file (they are inputs, and any finite value is usable); the target is standardized by the task
with the mean and standard deviation of the training split only (`target_stats`), which the model keeps with its
weights, so that the validation split, never seen to fit them, measures what the model learned in target units.
`csv_columns` reads just the header, cheaply, for the task's config check (the sequence must fit the model's
positions before anything is written).
"""

from __future__ import annotations

import csv
import io
import math
from typing import Any

import torch
from torch.utils.data import TensorDataset

from llm.data.datamodule import TensorDataModule
from llm.data.sources import DEFAULT_MAX_FILE_BYTES, read_regular
from llm.errors import ConfigError

NUM_FEATURES = 8
# Largest |target|: its square (the MSE) must stay well inside float32 (max ~3.4e38), with room for a batch sum.
MAX_TARGET = 1e18


def synthetic_regression(num_samples: int, seq_len: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x: (N, T, F), y: (N,)) with unit-variance targets and a little noise."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_samples, seq_len, NUM_FEATURES, generator=gen)
    w, u, v = (torch.randn(NUM_FEATURES, generator=gen) / NUM_FEATURES**0.5 for _ in range(3))
    # A per-position nonlinearity plus terms that depend on where a feature sits in the sequence.
    y = torch.tanh(x @ w).mean(dim=1) * 3.0 + x[:, 0] @ u - 0.5 * torch.relu(x[:, -1] @ v)  # (N,)
    y = y + 0.05 * torch.randn(num_samples, generator=gen)
    return x, (y - y.mean()) / y.std()


def _rows(path: str, max_file_bytes: int, head_only: bool = False) -> list[list[str]]:
    data = read_regular(path, "data.path", max_file_bytes, prefix=1 << 20 if head_only else 0)
    if head_only:
        data = data.split(b"\n", 1)[0]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"data.path: {path!r} is not UTF-8 text (bad byte at offset {exc.start})") from None
    try:
        return list(csv.reader(io.StringIO(text, newline="")))
    except csv.Error as exc:
        raise ConfigError(f"data.path: {path!r} is not a readable CSV: {exc}") from None


def csv_columns(path: str, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES) -> int:
    """Columns of the CSV's header row (refusing what `read_csv` would refuse about the file itself)."""
    rows = _rows(path, max_file_bytes, head_only=True)
    return len(rows[0]) if rows else 0


def _cell(path: str, line: int, column: str, cell: str) -> float:
    try:
        value = float(cell)
    except ValueError:
        raise ConfigError(f"data.path: {path!r} line {line} has a non-numeric value in column {column!r}: "
                          f"{cell[:40]!r}") from None
    if not math.isfinite(value):
        raise ConfigError(f"data.path: {path!r} line {line} column {column!r} is {cell[:40]!r}, not a finite number; "
                          "fill or drop the row")
    return value


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def _check_shape(path: str, numbered: list[tuple[int, list[str]]]) -> None:
    """The file as a whole: a header naming >= 2 columns, then >= 2 data rows (the cells are checked by `read_csv`)."""
    if not numbered:
        raise ConfigError(f"data.path: {path!r} line 1: the file is empty; it needs a header row, then at least 2 "
                          "rows of numbers")
    line, header = numbered[0]
    if len(header) < 2:
        raise ConfigError(f"data.path: {path!r} line {line} has {len(header)} column; it needs at least 2 (the "
                          "features, then the target last)")
    if all(_is_number(cell) for cell in header):
        raise ConfigError(f"data.path: {path!r} line {line} is numbers ({','.join(header)[:40]!r}), not a header; the "
                          "first row must name the columns")
    if len(numbered) < 3:
        raise ConfigError(f"data.path: {path!r} line {numbered[-1][0]}: {len(numbered) - 1} data rows after the "
                          "header; it needs at least 2 (one to train on, one to validate)")


def read_csv(path: str, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES) -> tuple[torch.Tensor, torch.Tensor]:
    """(x: (N, C-1, 1), y: (N,)) from a numeric CSV with a header row; see the module docstring for the checks."""
    rows = _rows(path, max_file_bytes)
    numbered = [(line, row) for line, row in enumerate(rows, start=1) if any(cell.strip() for cell in row)]
    _check_shape(path, numbered)
    header = numbered[0][1]
    values = []
    for line, row in numbered[1:]:
        if len(row) != len(header):
            raise ConfigError(f"data.path: {path!r} line {line} has {len(row)} columns, the header has {len(header)}")
        values.append([_cell(path, line, name, cell) for name, cell in zip(header, row)])
        if abs(values[-1][-1]) > MAX_TARGET:
            raise ConfigError(f"data.path: {path!r} line {line}: target {values[-1][-1]:g} is beyond +-{MAX_TARGET:g}, "
                              "too large for an fp32 squared error; rescale the target column")
    table = torch.tensor(values, dtype=torch.float64)
    x = table[:, :-1]
    x = (x - x.mean(0)) / x.std(0).clamp_min(1e-8)
    if not torch.isfinite(x).all():  # only values near the float64 limit get here (their sum overflows)
        raise ConfigError(f"data.path: {path!r} has feature values too large to standardize; rescale them")
    return x.float().unsqueeze(-1), table[:, -1].float()


def target_stats(y: torch.Tensor) -> tuple[float, float]:
    """Mean and standard deviation of targets `y`, in float64; a constant target (or a single one) has std 1, so
    standardizing it only centres it."""
    y = y.double()
    mean, std = y.mean().item(), y.std(correction=0).item()
    return mean, std if std > 0 else 1.0


class RegressionDataModule(TensorDataModule):
    """Train/validation split of the synthetic problem or a CSV; batches are (x, y), y in the target's units.
    After `setup`, `target_mean`/`target_std` are those of the training split (the task standardizes with them)."""

    def __init__(self, data: Any, *, batch_size: int, seed: int = 0, run_dir: str = "") -> None:
        super().__init__(data, batch_size=batch_size, seed=seed, run_dir=run_dir)
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None
        self.target_mean: float | None = None
        self.target_std: float | None = None

    def setup(self, stage: str = "fit") -> None:
        data = self.data
        if data.path:
            x, y = read_csv(data.path, data.max_file_bytes)
        else:
            x, y = synthetic_regression(data.num_samples, data.seq_len, self.seed)
        self.split(x, y)
        assert self.train_set is not None
        self.target_mean, self.target_std = target_stats(self.train_set.tensors[1])  # never the validation split
