"""The regression task: a bidirectional TransformerBlock encoder fitting a sequence -> scalar map."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

from llm.data.regression import NUM_FEATURES, RegressionDataModule, csv_columns
from llm.errors import ConfigError

from .base_task import TrainingTask
from .encoders import SequenceEncoder


def positions_for_seq_len(config: Any) -> int:
    """raised to data.seq_len + 1"""  # the reason the CLI's preset note gives; +1: the summary token
    return max(config.model.max_seq_len, config.data.seq_len + 1)


class RegressionTask(TrainingTask):
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

    def build_model(self) -> nn.Module:
        return SequenceEncoder(
            self.config.model, output_size=1, in_features=1 if self.config.data.path else NUM_FEATURES,
            num_positions=self.config.model.max_seq_len,
        )

    def build_criterion(self) -> nn.Module:
        return nn.MSELoss()

    def train_step(self, batch: Any, model: nn.Module, criterion: nn.Module) -> tuple[torch.Tensor, dict]:
        x, y = batch
        pred = model(x).squeeze(-1)  # (B,)
        loss = criterion(pred, y)
        return loss, {"mae": (pred.detach() - y).abs().mean()}
