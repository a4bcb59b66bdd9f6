"""`TrainingTask`: the base class every task extends (the user's guide, recipe 3).

The engine calls, in order: `build_data_module`, `build_model`, `build_optimizer`,
`build_scheduler`, `build_criterion`, then `train_step`/`validation_step` per batch. Defaults are
sensible for most tasks: AdamW without decay on norms, biases and embeddings, and the configured
scheduler. Warmup is not the task's business: the engine composes it with whatever
`build_scheduler` returns, so an override (as in recipe 1) keeps it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn, optim
from torch.optim.lr_scheduler import LRScheduler

from llm.data.datamodule import DataModule
from llm.registry import DATA_MODULES
from llm.training.core.optimizers import build_optimizer
from llm.training.core.schedulers import build_scheduler


class TrainingTask:
    """Base task. Subclasses implement at least `build_model`, `build_criterion` and `train_step`."""

    #: Task defaults, applied over the dataclass defaults and under YAML and CLI values:
    #: `{"model": {"hidden_size": 64}, "training": {"lr": 3e-4}}`.
    config_defaults: ClassVar[dict[str, dict[str, Any]]] = {}
    #: Fields derived from others unless the user set them (YAML or flag): {"section.field": rule(config)}; the
    #: rule's docstring is the reason the run's start notes (e.g. the lm task raises model.max_seq_len to
    #: data.seq_len). A derived value belongs here, never in `config_defaults`, where it would stay pinned.
    derived_defaults: ClassVar[dict[str, Callable[[Any], Any]]] = {}
    #: The data module used when `data.module` is not set.
    data_module_class: ClassVar[type[DataModule] | None] = None

    def __init__(self, config: Any) -> None:
        self.config = config
        # Set by the engine before `build_scheduler`, so schedules can span the whole run.
        self.total_steps = 0
        self.steps_per_epoch = 0
        self.engine: Any = None  # the engine running this task (set in its set-up)

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        """Publish extra values through the engine's metrics channel (see `TrainingEngine.log`)."""
        if self.engine is not None:
            self.engine.log(metrics, step)

    @classmethod
    def validate_config(cls, config: Any) -> None:
        """Task-specific checks; raise `ConfigError` naming the field. Runs before any work."""

    # -- builders -------------------------------------------------------------------------------
    def build_data_module(self) -> DataModule:
        if self.config.data.module:
            return DATA_MODULES.get(self.config.data.module)(self.config)
        if self.data_module_class is None:
            raise NotImplementedError(f"{type(self).__name__} has no data_module_class; override build_data_module")
        return self.data_module_class(self.config)

    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def build_optimizer(self, model: nn.Module) -> optim.Optimizer:
        return build_optimizer(model, self.config.training)

    def build_scheduler(self, optimizer: optim.Optimizer) -> LRScheduler | None:
        return build_scheduler(optimizer, self.config.training, self.scheduler_horizon())

    def build_criterion(self) -> nn.Module:
        raise NotImplementedError

    def scheduler_horizon(self) -> int:
        """Scheduler intervals after warmup: optimizer steps, or epochs with `scheduler_interval=epoch`."""
        cfg = self.config.training
        if cfg.scheduler_interval == "epoch":
            return cfg.epochs
        return max(1, self.total_steps - cfg.warmup)

    # -- steps ----------------------------------------------------------------------------------
    def train_step(self, batch: Any, model: nn.Module, criterion: nn.Module) -> tuple[torch.Tensor, dict[str, Any]]:
        """Return the loss to minimise and metrics (floats or tensors; tensors avoid a host sync)."""
        raise NotImplementedError

    def validation_step(
        self, batch: Any, model: nn.Module, criterion: nn.Module
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """Defaults to `train_step` (the engine runs it under `torch.no_grad()` in eval mode)."""
        return self.train_step(batch, model, criterion)

    def reduce_metrics(self, metrics: dict[str, float], split: str) -> dict[str, float]:
        """Add metrics derived from the means the engine reduced over a log window or a validation (`split` is
        'train' or 'val'): e.g. perplexity is exp of the mean loss, not the mean of per-batch perplexities."""
        return metrics
