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

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(type(opt).__name__ for opt in self.optimizers)})"

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()  # once: the children then step on the gradients it left
        for opt in self.optimizers:
            opt.step()
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
