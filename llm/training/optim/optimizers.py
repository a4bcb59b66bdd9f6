"""Optimizer registry and parameter grouping.

Weight decay applies only to matrices that are not embeddings: decaying norms, biases and
embedding rows hurts language models and is what GPT-style recipes avoid.

`muon`: `torch.optim.Muon` for the 2-D weight matrices of the hidden layers, AdamW for everything else, as one
`CompositeOptimizer` (composite_optimizer.py) so the schedule, clipping, GradScaler and checkpoints see one
optimizer. Which parameters are "hidden" (`split_muon_params`): those of the blocks a model lists in `fsdp_units()`
(every model of this package has it; for another model, every module between its first and last `nn.Linear`),
minus what Muon is not made for:
- embeddings and the output head (AdamW, as in the Muon paper: they are lookups / a classifier, not hidden maps);
- 1-D parameters (norm weights, biases) and routers (what a module names in `router_parameters()`, read through
  `llm.models.hooks`: the MoE router is a tiny E x H matrix whose softmax scale orthogonalisation would reset);
- the MoE experts' stacked 3-D weights: `torch.optim.Muon` orthogonalises 2-D matrices only, and a per-expert
  Newton-Schulz would be a hand-written Muon, so they train with AdamW (the dense MLP's matrices get Muon).
Muon's lr is `training.lr * training.muon_lr_scale` with torch's `adjust_lr_fn="match_rms_adamw"` (the update's RMS
is scaled to AdamW's, 0.2 * sqrt(max(fan_in, fan_out)) * lr), so both follow one schedule from one peak. The RMS
match alone (scale 1) trained the default lm far worse than AdamW; scales 2/4/8/16 measured 400-step val bpb
2.07 (4), 1.99 (8), 1.97 (16) against AdamW's 2.46, hence the default 8 (Keller Jordan's lr 0.02 at hidden 128 is
about 9). Weight decay is `training.weight_decay` on both (decoupled, lr * wd, as in AdamW).

Under FSDP or tensor parallelism (DTensor parameters) the Muon child is `ShardedMuon` (sharded_muon.py): each matrix
is still orthogonalised whole, so the algorithm does not change with the layout.

Issue 24's levers, all off by default: torch's own Muon options (`training.muon_momentum`, `muon_nesterov`,
`muon_ns_steps`, `muon_ns_coefficients`), Muon on the embedding tables too (`muon_embeddings`, without weight decay)
and the AdamW side's lr as a multiple of `training.lr` (`adamw_lr_scale`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from llm.errors import ConfigError
from llm.models.hooks import router_parameters
from llm.registry import OPTIMIZERS, register_optimizer
from llm.training.optim.composite import CompositeOptimizer
from llm.training.optim.sharded_muon import whole_matrix_muon

__all__ = ["OPTIMIZERS", "build_optimizer", "check_strategy", "describe_optimizer", "group_lrs", "muon_options",
           "param_groups", "split_muon_params"]

def check_strategy(optimizer: str, strategy: str) -> None:
    """Refuse an optimizer the parallel strategy would silently change (run by config validation, before any
    process starts or anything is written). Every strategy keeps every registered optimizer's algorithm today:
    Muon on sharded matrices orthogonalises them whole (sharded_muon.py)."""


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


def _hidden_param_ids(model: nn.Module) -> set[int]:
    """The hidden layers' parameters: those of the model's `fsdp_units()` (its blocks), else those owned by the
    modules strictly between its first and last `nn.Linear` (registration order: input projection first, head last)."""
    units = getattr(model, "fsdp_units", None)
    if callable(units):
        return {id(p) for unit in units() for p in unit.parameters()}
    modules = list(model.modules())
    linear = [i for i, m in enumerate(modules) if isinstance(m, nn.Linear)]
    between = modules[linear[0] + 1:linear[-1]] if len(linear) > 2 else []
    return {id(p) for m in between for p in m.parameters(recurse=False)}  # not a container holding the head


def split_muon_params(model: nn.Module, embeddings: bool = False) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(Muon's parameters, the rest): 2-D trainable matrices of the hidden layers, minus embeddings and MoE routers;
    with ``embeddings`` (`training.muon_embeddings`) the input embedding tables too (a tied output head with them).

    The rest is returned in `model.parameters()` order; a parameter shared by both (tied weights) counts once."""
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    excluded = set() if embeddings else set(embedding_ids)
    excluded |= {id(p) for p in router_parameters(model)}  # logits over choices: like a head, not a hidden map
    hidden = _hidden_param_ids(model) | (embedding_ids if embeddings else set())
    muon, rest, seen = [], [], set()
    for param in model.parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        is_muon = param.ndim == 2 and id(param) in hidden and id(param) not in excluded
        (muon if is_muon else rest).append(param)
    return muon, rest


# torch.optim.Muon's own defaults, the `training.muon_*` fields' too: a config object without them (a hand-made
# namespace) gets torch's behaviour.
MUON_DEFAULTS: dict[str, Any] = {"muon_momentum": 0.95, "muon_nesterov": True, "muon_ns_steps": 5,
                                 "muon_ns_coefficients": [3.4445, -4.775, 2.0315], "muon_embeddings": False,
                                 "adamw_lr_scale": 1.0}


def _opt(cfg: Any, name: str) -> Any:
    return getattr(cfg, name, MUON_DEFAULTS[name])


def muon_options(cfg: Any) -> dict[str, Any]:
    """`torch.optim.Muon`'s keyword arguments from the run's `training` section: lr (`lr * muon_lr_scale`), weight
    decay, and its own options (`muon_momentum`, `muon_nesterov`, `muon_ns_steps`, `muon_ns_coefficients`)."""
    return {"lr": cfg.lr * cfg.muon_lr_scale, "weight_decay": cfg.weight_decay,
            "momentum": _opt(cfg, "muon_momentum"), "nesterov": _opt(cfg, "muon_nesterov"),
            "ns_steps": _opt(cfg, "muon_ns_steps"), "ns_coefficients": tuple(_opt(cfg, "muon_ns_coefficients")),
            "adjust_lr_fn": "match_rms_adamw"}


def _muon_groups(model: nn.Module, params: list[nn.Parameter]) -> list[dict[str, Any]]:
    """Muon's parameter groups: the hidden matrices, then embedding tables (no weight decay, as under AdamW)."""
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    hidden = [p for p in params if id(p) not in embedding_ids]
    tables = [p for p in params if id(p) in embedding_ids]
    return [g for g in ({"params": hidden}, {"params": tables, "weight_decay": 0.0}) if g["params"]]


@register_optimizer("muon")
def _muon(model: nn.Module, cfg: Any) -> torch.optim.Optimizer:
    muon_params, rest = split_muon_params(model, embeddings=_opt(cfg, "muon_embeddings"))
    if not muon_params:
        raise ConfigError(f"training.optimizer: 'muon' found no 2-D hidden-layer matrices in {type(model).__name__}")
    children = [torch.optim.Muon(_muon_groups(model, muon_params), **muon_options(cfg))]
    # AdamW first: the engine logs param_groups[0]'s lr, which is then training.lr (times adamw_lr_scale).
    if rest:
        groups = _grouped(model, rest, cfg.weight_decay)
        children.insert(0, _adamw([{**g, "lr": cfg.lr * _opt(cfg, "adamw_lr_scale")} for g in groups], cfg))
    # Orthogonalising a shard is not orthogonalising the matrix: over DTensor shards (FSDP, TP) Muon gathers them.
    return CompositeOptimizer([whole_matrix_muon(child) for child in children])


_muon.takes_model = True  # type: ignore[attr-defined]  # it splits the model's parameters itself


def _grouped(model: nn.Module, params: list[nn.Parameter], weight_decay: float) -> list[dict[str, Any]]:
    """`param_groups` restricted to `params`."""
    keep = {id(p) for p in params}
    groups = [{**g, "params": [p for p in g["params"] if id(p) in keep]} for g in param_groups(model, weight_decay)]
    return [g for g in groups if g["params"]]


@register_optimizer("sgd")
def _sgd(groups: list[dict[str, Any]], cfg: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)


def build_optimizer(model: nn.Module, cfg: Any) -> torch.optim.Optimizer:
    """Build `cfg.optimizer` (a registered name, or `module:Class` taking (params, lr=...)).

    A registered factory is called as `factory(param_groups, cfg)`, or as `factory(model, cfg)` when it has
    `takes_model = True` (it chooses the parameters itself, as muon does)."""
    factory = OPTIMIZERS.get(cfg.optimizer)
    if getattr(factory, "takes_model", False):
        return factory(model, cfg)
    groups = param_groups(model, cfg.weight_decay)
    if isinstance(factory, type) and issubclass(factory, torch.optim.Optimizer):
        return factory(groups, lr=cfg.lr)
    return factory(groups, cfg)


# -- what the logs call the optimizer and its groups ------------------------------------------------------------------
# What a child of a composite optimizer is for, when the split is ours (the muon factory above); any other child
# holds "the rest".
_ROLES = {"muon": "hidden matrices"}


def _parts(optimizer: torch.optim.Optimizer) -> list[torch.optim.Optimizer]:
    return list(optimizer.optimizers) if isinstance(optimizer, CompositeOptimizer) else [optimizer]


def _kind(optimizer: torch.optim.Optimizer) -> str:
    if isinstance(optimizer, torch.optim.Muon):
        return "muon"  # ShardedMuon (FSDP/TP) is Muon: the same names in the logs on every layout
    return type(optimizer).__name__.lower()  # adamw, muon, sgd, ... (a user's class: its own name)


def describe_optimizer(optimizer: torch.optim.Optimizer) -> str:
    """One line for the run's start: `muon (hidden matrices, 1,024 params) + adamw (rest, 96 params)` (`hidden
    matrices, embeddings` under `training.muon_embeddings`)."""
    parts = _parts(optimizer)
    # The composite keeps AdamW first (the logged `lr` is its first group's); the line names the split's owner first.
    parts.sort(key=lambda part: _kind(part) not in _ROLES)
    text = []
    for part in parts:
        count = sum(p.numel() for group in part.param_groups for p in group["params"])
        role = _ROLES.get(_kind(part), "rest")
        role += ", embeddings" if _kind(part) == "muon" and len(part.param_groups) > 1 else ""  # _muon_groups
        role = role + ", " if len(parts) > 1 else ""
        text.append(f"{_kind(part)} ({role}{count:,} params)")
    return " + ".join(text)


def group_lrs(optimizer: torch.optim.Optimizer, lrs: list[float] | None = None) -> dict[str, float]:
    """The lr of each parameter group (`lrs`, in `optimizer.param_groups` order; default: the current ones), keyed
    by optimizer kind (`adamw`, `muon`, ...).

    The groups of one kind share their key while they share their lr (AdamW's decayed and undecayed groups do);
    where they differ each gets its own, `adamw.0`, `adamw.1` (the group's index within that kind), so no value is
    ever a stand-in for another."""
    values = iter([float(g["lr"]) for g in optimizer.param_groups] if lrs is None else lrs)
    by_kind: dict[str, list[float]] = {}
    for part in _parts(optimizer):
        by_kind.setdefault(_kind(part), []).extend(next(values) for _ in part.param_groups)
    named: dict[str, float] = {}
    for kind, kind_lrs in by_kind.items():
        if len(set(kind_lrs)) == 1:
            named[kind] = kind_lrs[0]
        else:
            named.update({f"{kind}.{i}": lr for i, lr in enumerate(kind_lrs)})
    return named
