"""Mixture-of-Experts: the layer and its balance objective (`layer`), the expert matmul kernels (`kernels`), the
expert-parallel token exchange (`exchange`) and the sharding of a model's experts over ranks (`parallel`). The names a
model uses are re-exported here; a trainer reaches the layers only through `llm.models.hooks`."""

from llm.models.moe.layer import (
    BALANCES,
    DISPATCH_ENV,
    DISPATCHES,
    MoELayer,
    default_dispatch,
    moe_layers,
    routing_metrics,
)

__all__ = [
    "BALANCES", "DISPATCHES", "DISPATCH_ENV", "MoELayer", "default_dispatch", "moe_layers",
    "routing_metrics",
]
