"""Optimizer registry and parameter grouping.

Weight decay applies only to matrices that are not embeddings: decaying norms, biases and
embedding rows hurts language models and is what GPT-style recipes avoid.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from llm.registry import OPTIMIZERS, register_optimizer

__all__ = ["OPTIMIZERS", "build_optimizer", "param_groups"]


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Split trainable parameters into a decayed group and a no-decay group."""
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay, seen = [], [], set()
    for param in model.parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        (decay if param.ndim >= 2 and id(param) not in embedding_ids else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def _fused_ok(groups: list[dict[str, Any]]) -> bool:
    params = [p for g in groups for p in g["params"]]
    # Fused kernels need floating params all on one supported device type.
    return bool(params) and all(p.is_floating_point() for p in params) and len({p.device.type for p in params}) == 1


@register_optimizer("adamw")
def _adamw(groups: list[dict[str, Any]], cfg: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), fused=_fused_ok(groups) or None)


@register_optimizer("adam")
def _adam(groups: list[dict[str, Any]], cfg: Any) -> torch.optim.Optimizer:
    return torch.optim.Adam(groups, lr=cfg.lr, betas=tuple(cfg.betas), fused=_fused_ok(groups) or None)


@register_optimizer("sgd")
def _sgd(groups: list[dict[str, Any]], cfg: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)


def build_optimizer(model: nn.Module, cfg: Any) -> torch.optim.Optimizer:
    """Build `cfg.optimizer` (a registered name, or `module:Class` taking (params, lr=...))."""
    factory = OPTIMIZERS.get(cfg.optimizer)
    groups = param_groups(model, cfg.weight_decay)
    if isinstance(factory, type) and issubclass(factory, torch.optim.Optimizer):
        return factory(groups, lr=cfg.lr)
    return factory(groups, cfg)
