"""Metric accumulation without host syncs.

Per-step metrics stay on the device as running sums; they are moved to the host (one transfer)
and reduced across ranks (one collective) only when the engine logs. Means are weighted by the
number of samples each value covers, so ranks with uneven validation shards average correctly.
"""

from __future__ import annotations

from typing import Any

import torch

from llm.training.parallel.distributed import all_gather_object, all_reduce_sum, is_distributed


class MetricAccumulator:
    """Running weighted sums of scalar metrics (tensors or floats)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._tensor_sums: dict[str, torch.Tensor] = {}
        self._float_sums: dict[str, float] = {}
        self.weight = 0.0

    def add(self, metrics: dict[str, Any], weight: float = 1.0, count: bool = True) -> None:
        """Add `metrics` with `weight`; `count=False` adds values without adding to the total weight
        (for per-step values logged beside per-sample ones)."""
        for key, value in metrics.items():
            if isinstance(value, torch.Tensor):
                value = value.detach().float()
                if value.numel() != 1:
                    continue
                value = value.reshape(()) * weight
                prev = self._tensor_sums.get(key)
                self._tensor_sums[key] = value if prev is None else prev + value
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                self._float_sums[key] = self._float_sums.get(key, 0.0) + float(value) * weight
        if count:
            self.weight += weight

    def state_dict(self) -> dict[str, Any]:
        return {"tensor_sums": dict(self._tensor_sums), "float_sums": dict(self._float_sums), "weight": self.weight}

    def load_state_dict(self, state: dict[str, Any] | None, device: torch.device) -> None:
        """Restore `state_dict()` (None: empty), the tensor sums on `device`."""
        self.reset()
        if state:
            self._tensor_sums = {k: v.to(device) for k, v in state["tensor_sums"].items()}
            self._float_sums = dict(state["float_sums"])
            self.weight = float(state["weight"])

    @property
    def empty(self) -> bool:
        return self.weight == 0

    def compute(self, device: torch.device, reduce: bool = True, agree_keys: bool = False) -> dict[str, float]:
        """Weighted means, reduced across ranks when `reduce` (every rank must call it then).

        `agree_keys` first takes the union of the ranks' metric names (needed when a rank may
        have seen no batch, as in validation; training ranks always share their keys).
        """
        keys = sorted(set(self._tensor_sums) | set(self._float_sums))
        if reduce and agree_keys and is_distributed():
            # A rank with an empty validation shard has no keys; agree on the union first.
            keys = sorted({k for ks in all_gather_object(keys) for k in ks})
        values = []
        for key in keys:
            total = self._float_sums.get(key, 0.0)
            t = self._tensor_sums.get(key)
            values.append(t.to(device) + total if t is not None else torch.tensor(total, device=device))
        packed = torch.stack(values + [torch.tensor(float(self.weight), device=device)]) if values else None
        if packed is None:
            return {}
        if reduce:
            packed = all_reduce_sum(packed)
        host = packed.tolist()  # the one host sync
        weight = host[-1]
        return {key: (value / weight if weight else float("nan")) for key, value in zip(keys, host[:-1])}
