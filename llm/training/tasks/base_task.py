"""`TrainingTask`: the base class every task extends (the user's guide, recipe 3).

The engine calls, in order: `build_data_module`, `build_model`, `build_optimizer`,
`build_scheduler`, `build_criterion`, then `train_step`/`validation_step` per batch. Defaults are
sensible for most tasks: AdamW without decay on norms, biases and embeddings, and the configured
scheduler. Warmup is not the task's business: the engine composes it with whatever
`build_scheduler` returns, so an override (as in recipe 1) keeps it.

LoRA is not a task's business either: the engine passes what `build_model` returns through `adapt_model`, which
injects LoRA adapters (`llm.models.lora`) when `training.lora_rank > 0`, so any task that builds a `DecoderModel`
fine-tunes with adapters without code of its own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn, optim
from torch.optim.lr_scheduler import LRScheduler

from llm.data.datamodule import DataModule
from llm.models.lora import apply_lora, is_adapted
from llm.registry import DATA_MODULES
from llm.training.observers.context import RunContext
from llm.training.optim.optimizers import build_optimizer
from llm.training.optim.schedulers import build_scheduler


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
    #: What `build_model` returns: "decoder" (a `DecoderModel`, which `llm.generate`, `llm.export` and
    #: `--model-init-from` read back) or "encoder" (a model with its own head, e.g. the regression task's).
    model_kind: ClassVar[str] = "decoder"

    def __init__(self, config: Any) -> None:
        self.config = config
        # The run this task is part of (`RunContext`: rank, counters, `log`), set by the engine at the start of its
        # set-up; None while the task is used on its own.
        self.context: RunContext | None = None

    @property
    def total_steps(self) -> int:
        """Optimizer steps of the whole run (known before `build_scheduler`, so schedules can span it); 0 until the
        engine has planned the run."""
        return self.context.total_steps if self.context is not None else 0

    @property
    def steps_per_epoch(self) -> int:
        return self.context.steps_per_epoch if self.context is not None else 0

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        """Publish extra values through the engine's metrics channel (see `TrainingEngine.log`)."""
        if self.context is not None:
            self.context.log(metrics, step)

    @classmethod
    def resolved_values(cls, config: Any) -> dict[str, Any]:
        """Values this task decides from the config being resolved, whatever the user set: {"section.field": value}
        (the lm task's `model.vocab_size` follows its tokenizer). The resolution applies them before
        `validate_config`; this reads the config and never writes it. Unlike `derived_defaults`, a rule here may
        refuse a user's value (raise `ConfigError`)."""
        return {}

    @classmethod
    def validate_config(cls, config: Any) -> None:
        """Task-specific checks; raise `ConfigError` naming the field. Runs before any work, on the config with the
        task's `resolved_values` applied; it reads the config (which is frozen once resolution ends)."""

    # -- builders -------------------------------------------------------------------------------
    def build_data_module(self) -> DataModule:
        """`data.module` when set, else `data_module_class`, given the values it uses: the built-in modules
        (`takes_data_section`) the data section, the per-rank batch size, the seed and the run directory; a module
        that reads the whole config (the user's guide, recipe 3) the config."""
        c = self.config
        cls = DATA_MODULES.get(c.data.module) if c.data.module else self.data_module_class
        if cls is None:
            raise NotImplementedError(f"{type(self).__name__} has no data_module_class; override build_data_module")
        if getattr(cls, "takes_data_section", False):
            return cls(c.data, batch_size=c.training.batch_size, seed=c.seed, run_dir=c.logging.log_dir)
        return cls(c)

    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def adapt_model(self, model: nn.Module) -> nn.Module:
        """Called by the engine on what `build_model` returns: LoRA adapters when `training.lora_rank > 0` (a model
        adapted already is returned as it is). Checkpoints then hold only the
        adapters when the base is rebuilt from `model.init_from`, and every tensor otherwise."""
        t = self.config.training
        if getattr(t, "lora_rank", 0) <= 0 or is_adapted(model):
            return model
        return apply_lora(
            model, rank=t.lora_rank, alpha=t.lora_alpha, dropout=t.lora_dropout, targets=t.lora_targets,
            adapters_only=bool(getattr(self.config.model, "init_from", "")),
            variant=getattr(t, "lora_variant", "lora"), quantize=getattr(t, "lora_quantize", "none"),
        )

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
