"""The regression task: a bidirectional TransformerBlock encoder fitting a sequence -> scalar map.

The target is standardized with the training split's mean and standard deviation: fitting raw house prices (mean
300, std 120) with the task's defaults ended at a val MAE of 289, worse than always predicting the mean, where the
standardized target reaches 36 in the same 140 steps (noise MAE 32). The statistics are buffers of
the model (`StandardizedTarget`), so they are saved with its weights in every checkpoint and the final
`model.safetensors`: the model's output is in the target's units wherever it is loaded, and a resumed run keeps the
statistics it started with. The loss is the MSE of the standardized target; `mse`, `mae` and `rmse` are in the
target's units (RMSE is the root of the mean MSE over a log window or the validation set, not a mean of roots).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

from llm.data.regression import NUM_FEATURES, RegressionDataModule, csv_columns
from llm.errors import ConfigError
from llm.registry import register_task
from llm.training.tasks.base_task import TrainingTask
from llm.training.tasks.encoders import SequenceEncoder


class StandardizedTarget(nn.Module):
    """The training target's mean and standard deviation, between the network's standardized output and the target's
    units. Buffers: saved and loaded with the weights, never trained. The arithmetic is fp32 whatever the autocast
    (bf16 would round a price of 400 to steps of 2)."""

    def __init__(self, mean: float = 0.0, std: float = 1.0) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(float(mean)))
        self.register_buffer("std", torch.tensor(float(std)))

    def standardize(self, y: torch.Tensor) -> torch.Tensor:
        return (y.float() - self.mean) / self.std

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Standardized values -> the target's units."""
        return z.float() * self.std + self.mean


class RegressionModel(SequenceEncoder):
    """A `SequenceEncoder` with one output whose forward returns the prediction in the target's units (B, 1)."""

    def __init__(self, model_config: Any, in_features: int, num_positions: int, target_mean: float = 0.0,
                 target_std: float = 1.0) -> None:
        super().__init__(model_config, output_size=1, in_features=in_features, num_positions=num_positions)
        self.target = StandardizedTarget(target_mean, target_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.target(super().forward(x))  # (B, 1)


def positions_for_seq_len(config: Any) -> int:
    """raised to data.seq_len + 1"""  # the reason the CLI's preset note gives; +1: the summary token
    return max(config.model.max_seq_len, config.data.seq_len + 1)


@register_task("regression")
class RegressionTask(TrainingTask):
    model_kind = "encoder"
    config_defaults = {
        "model": {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "max_seq_len": 64},
        "data": {"seq_len": 16, "num_samples": 4096, "val_fraction": 0.1},
        "training": {"lr": 2e-3, "epochs": 10, "batch_size": 32, "warmup": 20, "log_interval": 20,
                     # fp32, not `auto`: this model is too small for bf16 matmuls to pay for the casts around them
                     "precision": "fp32"},
    }
    # Fields derived from others unless the user set them (YAML or flag); the train CLI applies them.
    derived_defaults: ClassVar[dict[str, Callable[[Any], Any]]] = {"model.max_seq_len": positions_for_seq_len}
    data_module_class = RegressionDataModule

    @classmethod
    def validate_config(cls, config: Any) -> None:
        if config.data.seq_len >= config.model.max_seq_len:  # one position goes to the summary token
            raise ConfigError(
                f"data.seq_len: invalid value {config.data.seq_len}; "
                f"must be < model.max_seq_len={config.model.max_seq_len}"
            )
        path = config.data.path
        if not path or config.data.module:  # a user's data module owns its path and format
            return
        if not os.path.exists(path):
            raise ConfigError(f"data.path: invalid value {path!r}; no such file")
        # Before the extension: `/dev/zero` or a FIFO named x.csv is refused for what it is.
        columns = csv_columns(path, config.data.max_file_bytes)
        if not path.endswith(".csv"):
            raise ConfigError(f"data.path: invalid value {path!r}; the regression task reads a .csv file")
        # Every feature column is one position, and the summary token takes one more (SequenceEncoder).
        if columns - 1 >= config.model.max_seq_len:
            raise ConfigError(
                f"model.max_seq_len: {path!r} has {columns - 1} feature columns, a sequence of {columns} positions "
                f"with the summary token, over model.max_seq_len={config.model.max_seq_len}; "
                f"set --model-max-seq-len {columns} or more"
            )

    def build_data_module(self) -> Any:
        self.data_module = super().build_data_module()
        return self.data_module

    def build_model(self) -> nn.Module:
        # The training split's statistics once the data is set up (the engine sets it up first). Without them (a
        # model built to load weights into, or a user's data module that does not compute them) the defaults stand
        # in, and loading a checkpoint replaces them with the run's own.
        dm = getattr(self, "data_module", None)
        mean, std = getattr(dm, "target_mean", None), getattr(dm, "target_std", None)
        self.model = RegressionModel(
            self.config.model, in_features=1 if self.config.data.path else NUM_FEATURES,
            num_positions=self.config.model.max_seq_len,
            target_mean=0.0 if mean is None else mean, target_std=1.0 if std is None else std,
        )
        return self.model

    def build_criterion(self) -> nn.Module:
        return nn.MSELoss()

    def _target(self) -> StandardizedTarget | None:
        """The built model's target statistics (the step's `model` may be wrapped by DDP or torch.compile)."""
        return getattr(getattr(self, "model", None), "target", None)

    def train_step(self, batch: Any, model: nn.Module, criterion: nn.Module) -> tuple[torch.Tensor, dict]:
        x, y = batch
        pred = model(x).squeeze(-1)  # (B,) in the target's units
        target = self._target()
        loss = criterion(target.standardize(pred), target.standardize(y)) if target is not None else criterion(pred, y)
        error = pred.detach().float() - y.float()  # (B,)
        return loss, {"mse": error.square().mean(), "mae": error.abs().mean()}

    def reduce_metrics(self, metrics: dict[str, float], split: str) -> dict[str, float]:
        if "mse" in metrics:
            metrics = {**metrics, "rmse": math.sqrt(max(metrics["mse"], 0.0))}
        return metrics
