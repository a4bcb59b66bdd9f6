"""The classification task: digits images as patch sequences through a TransformerBlock encoder."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from llm.data.digits import NUM_CLASSES, NUM_PATCHES, PATCH_FEATURES, DigitsDataModule
from llm.errors import ConfigError
from llm.registry import register_task
from llm.training.tasks.base_task import TrainingTask
from llm.training.tasks.encoders import SequenceEncoder


@register_task("classification")
class ClassificationTask(TrainingTask):
    model_kind = "encoder"
    config_defaults = {
        "model": {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "max_seq_len": 64},
        "data": {"val_fraction": 0.2},
        "training": {"lr": 5e-3, "epochs": 6, "batch_size": 32, "warmup": 20, "log_interval": 20,
                     # fp32, not `auto`: this model is too small for bf16 matmuls to pay for the casts around them
                     "precision": "fp32"},
    }
    data_module_class = DigitsDataModule

    @classmethod
    def validate_config(cls, config: Any) -> None:
        # The digits module reads no file: a path given to it would be ignored without a word.
        if config.data.path and not config.data.module:
            raise ConfigError(
                f"data.path: the classification task trains on scikit-learn's bundled digits and reads no data path "
                f"(got {config.data.path[:200]!r}); drop it, or set data.module to a data module that reads it"
            )

    def build_model(self) -> nn.Module:
        return SequenceEncoder(
            self.config.model, output_size=NUM_CLASSES, in_features=PATCH_FEATURES, num_positions=NUM_PATCHES
        )

    def build_criterion(self) -> nn.Module:
        return nn.CrossEntropyLoss()

    def train_step(self, batch: Any, model: nn.Module, criterion: nn.Module) -> tuple[torch.Tensor, dict]:
        images, labels = batch
        outputs = model(images)  # (B, classes)
        loss = criterion(outputs, labels)
        accuracy = (outputs.detach().argmax(dim=1) == labels).float().mean()
        return loss, {"accuracy": accuracy}
