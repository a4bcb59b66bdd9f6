"""Mixture-of-Experts: the layer and its balance objective (`layer`), the expert matmul kernels (`kernels`) and
the expert-parallel token exchange (`exchange`). The names a model or a trainer uses are re-exported here."""

from llm.models.moe.layer import (
    BALANCES,
    DISPATCH_ENV,
    DISPATCHES,
    MoELayer,
    begin_step,
    collect_aux_loss,
    default_dispatch,
    end_step,
    moe_layers,
    router_losses,
    routing_metrics,
    routing_window,
    set_balance_group,
)

__all__ = [
    "BALANCES", "DISPATCHES", "DISPATCH_ENV", "MoELayer", "begin_step", "collect_aux_loss", "default_dispatch",
    "end_step", "moe_layers", "router_losses", "routing_metrics", "routing_window", "set_balance_group",
]
