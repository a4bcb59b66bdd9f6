"""What a training engine asks of any model, without knowing its layers: the per-step hooks and parameter roles.

A trainer calls these functions on the whole model (the unwrapped module: hooks walk its submodules); a module
takes part by defining the matching method, and a model without such modules makes every call a no-op. Today the
MoE layer (`llm.models.moe`) is the one participant; a trainer never names it.

Per-step protocol, in the order an optimizer step calls it:
- `begin_step(model)`: before the step's first micro-batch (module method ``begin_step()``);
- `aux_loss(model)`: after each forward, the auxiliary loss to add to the objective (``step_aux_loss()``, a
  tensor or None per module; summed in module order), None when no module has one;
- `step_metrics(model)`: after each forward, detached loss parts to log (``step_metrics()``, a dict per module;
  the values of one key are averaged over the modules that report it);
- `end_step(model, applied)`: after the optimizer step (``end_step(applied)``; `applied` False for an update the
  non-finite policy refused);
- `window_metrics(model, reduce)`: at a log step, statistics of the steps since the last one. Each module returns
  a tensor from ``take_window()``; the tensors of one module class are stacked in module order, summed over the
  ranks by one call of `reduce` (the trainer's collective: models know nothing of the run) and turned into
  metrics by the class's ``window_metrics(stacked)``;
- `set_data_parallel_group(model, group)`: once, before training, the process group whose ranks' batches make one
  global batch (``set_data_parallel_group(group)``).

Parameter roles: `router_parameters(model)` are the weights whose outputs are logits over choices (module method
``router_parameters()``, e.g. an MoE router); optimizers treat them like embeddings and heads, not as hidden maps.

Expert parallelism: `shard_experts(model, ...)` keeps this rank's share of every expert layer's experts and returns
the object that keeps them consistent (gradients, norms, full weights, optimizer state), see
`llm.models.moe.parallel`.

The participant lists are cached on the model (a dict entry per method, one module walk each), so a call costs a
lookup and a loop over the participants; swapping submodules after the first call needs `refresh_hooks(model)`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from llm.models.moe.parallel import ExpertParallel

_CACHE_ATTR = "_llm_model_hooks"


def refresh_hooks(model: nn.Module) -> None:
    """Forget the cached participants of `model` (after swapping submodules; wrapping needs no refresh)."""
    model.__dict__.pop(_CACHE_ATTR, None)


def participants(model: nn.Module, method: str) -> list[nn.Module]:
    """The modules of `model` (itself included, in `modules()` order) that define `method`; cached on `model`."""
    cache = model.__dict__.get(_CACHE_ATTR)
    if cache is None:
        cache = model.__dict__[_CACHE_ATTR] = {}  # bypass nn.Module.__setattr__: not a submodule
    found = cache.get(method)
    if found is None:
        found = cache[method] = [m for m in model.modules() if callable(getattr(type(m), method, None))]
    return found


# ------------------------------------------------------------------------------------------------- the step
def begin_step(model: nn.Module) -> None:
    """Open an optimizer step in every participating module."""
    for module in participants(model, "begin_step"):
        module.begin_step()


def end_step(model: nn.Module, applied: bool = True) -> None:
    """Close the optimizer step; `applied` is False when the update was refused."""
    for module in participants(model, "end_step"):
        module.end_step(applied)


def aux_loss(model: nn.Module) -> Tensor | None:
    """The sum of the last forward's auxiliary losses (coefficients applied), in module order; None if none."""
    losses = [loss for loss in (m.step_aux_loss() for m in participants(model, "step_aux_loss")) if loss is not None]
    if not losses:
        return None
    total = losses[0]
    for loss in losses[1:]:
        total = total + loss
    return total


def step_metrics(model: nn.Module) -> dict[str, Tensor]:
    """The last forward's loss parts to log (detached), each averaged over the modules that report it."""
    modules = participants(model, "step_metrics")
    if not modules:
        return {}
    parts: dict[str, list[Tensor]] = {}
    for module in modules:
        for key, value in module.step_metrics().items():
            parts.setdefault(key, []).append(value)
    return {key: torch.stack(values).mean() for key, values in parts.items()}


def window_metrics(model: nn.Module, reduce: Callable[[Tensor], Tensor]) -> dict[str, Any]:
    """Metrics of the window since the last call, from every rank's statistics (`reduce` sums a tensor over the
    ranks, in place or not); starts a fresh window. One `reduce` per participating module class."""
    modules = participants(model, "take_window")
    if not modules:
        return {}
    by_class: dict[type, list[Tensor]] = {}
    for module in modules:
        by_class.setdefault(type(module), []).append(module.take_window())
    logs: dict[str, Any] = {}
    for cls, windows in by_class.items():
        logs.update(cls.window_metrics(reduce(torch.stack(windows))))
    return logs


def set_data_parallel_group(model: nn.Module, group: Any) -> None:
    """Make the ranks of `group` (a process group; None: this process alone) one global batch."""
    for module in participants(model, "set_data_parallel_group"):
        module.set_data_parallel_group(group)


# ------------------------------------------------------------------------------------------ parameter roles
def router_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters whose outputs are logits over choices (routers), in module order."""
    return [p for module in participants(model, "router_parameters") for p in module.router_parameters()]


# ------------------------------------------------------------------------------------------- expert layout
def shard_experts(model: nn.Module, size: int, rank: int, world_size: int, mesh: Any = None) -> ExpertParallel:
    """Split the experts of every expert layer of `model` over groups of `size` consecutive ranks (collective:
    every rank calls it), or over the "ep" dimension of the DeviceMesh `mesh` (its "ep_replicate" dimension: the
    ranks holding the same experts), and return the `ExpertParallel` that keeps them consistent (see its module)."""
    from llm.models.moe.parallel import ExpertParallel

    experts = ExpertParallel(size, rank, world_size, mesh)
    experts.shard(model)
    return experts
