"""`CompositeOptimizer`: several torch optimizers, each over its own parameters, seen by the engine as one.

Why one object: the engine, the LR schedule, GradScaler and the checkpoint all take a single
`torch.optim.Optimizer`. Muon, for one, only updates 2-D hidden matrices and needs AdamW beside it for the rest.

How it stays one optimizer for them:
- `param_groups` is the list of the children's own group dicts (the same objects, not copies), so a scheduler
  that writes `group["lr"]` drives every child, and `zero_grad` / `GradScaler.unscale_` see every parameter.
- `state` is a live read-only view of the children's states (they own and write them).
- `state_dict()` has the standard flat layout (`state` keyed by parameter index across all groups in order,
  `param_groups` with those indices), which the checkpoint validation and torch tooling expect;
  `load_state_dict` splits it back by the children's group counts, so a resume continues bit for bit.
- It can refuse an update on the device, as fused Adam does with GradScaler's `found_inf` (the engine's non-finite
  check without a host sync, nonfinite.py): children that take `found_inf` get it; for the others (Muon) the
  composite keeps a copy of their parameters and state tensors and puts it back where `found_inf` is set, with
  `torch.where`, so nothing is read on the host. Offered only when every child that cannot take `found_inf` keeps
  its state in tensors (the copy is one more set of those children's parameters and buffers, per step).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from itertools import chain
from typing import Any

import torch
from torch.optim import Optimizer

__all__ = ["CompositeOptimizer"]


class _StateView(Mapping):
    """Parameter -> state across the children (their parameters are disjoint)."""

    def __init__(self, optimizers: Sequence[Optimizer]) -> None:
        self._optimizers = optimizers

    def __getitem__(self, param: torch.Tensor) -> Any:
        for opt in self._optimizers:
            if param in opt.state:
                return opt.state[param]
        raise KeyError(param)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return chain.from_iterable(opt.state for opt in self._optimizers)

    def __len__(self) -> int:
        return sum(len(opt.state) for opt in self._optimizers)


class CompositeOptimizer(Optimizer):
    """Steps each child optimizer in turn; its `param_groups` are the children's groups, in order."""

    def __init__(self, optimizers: Sequence[Optimizer]) -> None:
        if not optimizers:
            raise ValueError("CompositeOptimizer needs at least one optimizer")
        params = [p for opt in optimizers for group in opt.param_groups for p in group["params"]]
        if len({id(p) for p in params}) != len(params):
            raise ValueError("CompositeOptimizer: a parameter belongs to more than one child optimizer")
        # The base class sets up hooks and profiling; its own group and state are then replaced by the children's.
        super().__init__(params, {})
        self.optimizers = list(optimizers)
        self.param_groups = [group for opt in self.optimizers for group in opt.param_groups]
        self.state = _StateView(self.optimizers)  # type: ignore[assignment]
        # Refusing on the device: fused children read `found_inf`, children whose state is all tensors (Muon) are
        # restored with `torch.where`; a composite of Muon alone (LoRA adapters: nothing left for AdamW) is one.
        self._step_supports_amp_scaling = any(_takes_found_inf(opt) or _restorable(opt) for opt in self.optimizers)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(type(opt).__name__ for opt in self.optimizers)})"

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()  # once: the children then step on the gradients it left
        # Set by GradScaler (with `grad_scale` when the gradients are still scaled) or the engine's non-finite check.
        found_inf, grad_scale = getattr(self, "found_inf", None), getattr(self, "grad_scale", None)
        for opt in self.optimizers:
            if found_inf is None:
                opt.step()
            elif _takes_found_inf(opt):
                opt.found_inf, opt.grad_scale = found_inf, grad_scale
                try:
                    opt.step()
                finally:
                    del opt.found_inf, opt.grad_scale
            else:
                if grad_scale is not None:  # what the fused children do themselves
                    grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
                    torch._foreach_div_(grads, grad_scale)
                _step_unless(opt, found_inf)
        return loss

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if getattr(self, "optimizers", None) is None:  # the base class's __init__ adding the placeholder group
            super().add_param_group(param_group)
            return
        raise TypeError("CompositeOptimizer: add the parameter group to one of its child optimizers")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a `state_dict()` of a composite of the same children (in the same order)."""
        groups, state = state_dict["param_groups"], state_dict["state"]
        counts = [len(opt.param_groups) for opt in self.optimizers]
        if len(groups) != sum(counts):
            raise ValueError(
                f"the saved optimizer state has {len(groups)} parameter groups and this optimizer {sum(counts)} "
                f"({self!r}: {counts})"
            )
        start = 0
        for opt, count in zip(self.optimizers, counts):
            mine = groups[start:start + count]
            ids = {i for group in mine for i in group["params"]}
            # Indices stay global: a child maps saved to live parameters by position within its groups.
            opt.load_state_dict({"state": {i: s for i, s in state.items() if i in ids}, "param_groups": mine})
            start += count
        # The children's load rebuilt their group dicts; share the new ones again.
        self.param_groups = [group for opt in self.optimizers for group in opt.param_groups]


def _restorable(opt: Optimizer) -> bool:
    """Whether `_step_unless` can undo a step of `opt` on the device: every piece of its state is a tensor."""
    return isinstance(opt, getattr(torch.optim, "Muon", ()))


def _takes_found_inf(opt: Optimizer) -> bool:
    """Whether `opt.step()` honours a `found_inf` attribute itself (fused Adam/AdamW/SGD/Adagrad)."""
    return bool(getattr(opt, "_step_supports_amp_scaling", False))


@torch.no_grad()
def _step_unless(opt: Optimizer, found_inf: torch.Tensor) -> None:
    """`opt.step()`, then the parameters and state tensors it had before wherever `found_inf` is non-zero (no sync)."""
    params = [p for group in opt.param_groups for p in group["params"] if p.grad is not None]
    before = [p.detach().clone() for p in params]
    state_before = {id(p): {k: v.clone() for k, v in opt.state[p].items() if torch.is_tensor(v)}
                    for p in params if p in opt.state}
    opt.step()
    refused = found_inf > 0
    for p, old in zip(params, before):
        _local(p).copy_(torch.where(refused, _local(old), _local(p)))  # DTensors (ShardedMuon): each rank its shard
        saved = state_before.get(id(p), {})
        for key, value in opt.state[p].items():
            if torch.is_tensor(value):
                # State the step created starts at zero (Muon's momentum, Adam's moments and step count): a refused
                # first step leaves it as freshly made.
                old_value = saved.get(key, torch.zeros_like(value))
                _local(value).copy_(torch.where(refused, _local(old_value), _local(value)))


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (a view under no_grad), else the tensor: `found_inf` is a plain tensor."""
    return tensor.to_local() if type(tensor).__name__ == "DTensor" else tensor
