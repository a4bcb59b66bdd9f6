"""Activation recomputation modes of a transformer block (`training.activation_checkpointing`), as a registry.

- `none`: every activation the backward needs is stored.
- `full`: the block stores only its inputs; its whole forward runs again in backward (non-reentrant
  `torch.utils.checkpoint`). Least memory, roughly one more forward per step.
- `selective`: torch's selective activation checkpointing (`create_selective_checkpoint_contexts`) with a policy that
  stores the outputs of the expensive ops (matrix multiplies, attention kernels) and recomputes the cheap ones in
  backward: norms, activations, rotary, softmax-free elementwise work. Most of the recompute time of `full` is in
  the matmuls, so `selective` buys part of the memory back at a fraction of the time.

Each mode maps to a checkpoint context factory (`None`: plain checkpointing); `register_mode` adds one. The model
owns the hook: `TransformerBlock.forward` calls `run_block` with its mode. The boolean spellings of the old switch
(`true`/`false`, YAML booleans, `True`/`False` set on a block) mean `full`/`none`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from llm.errors import invalid

_aten = torch.ops.aten


def _ops(*names: str) -> frozenset[Any]:
    """The aten overloads of these names that this torch build has (attention kernels differ by build)."""
    found = []
    for name in names:
        packet, _, overload = name.partition(".")
        op = getattr(_aten, packet, None)
        if op is not None and hasattr(op, overload or "default"):
            found.append(getattr(op, overload or "default"))
    return frozenset(found)


# What `selective` keeps: the outputs of the ops whose recomputation costs real FLOPs.
SAVED_OPS = _ops(
    "mm", "addmm", "bmm", "baddbmm", "_scaled_mm", "linear",
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu",
)


def _keep_matmuls(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_contexts() -> tuple[Any, Any]:
    return create_selective_checkpoint_contexts(_keep_matmuls)


ContextFactory = Callable[[], tuple[Any, Any]]
# mode -> checkpoint context factory (None: plain checkpointing of the whole block). `none` never reaches it.
MODES: dict[str, ContextFactory | None] = {"full": None, "selective": _selective_contexts}
_BOOLEANS = {"true": "full", "false": "none"}


def register_mode(name: str, contexts: ContextFactory | None) -> None:
    """Add a recomputation mode: `contexts` returns the (forward, recompute) context pair
    `torch.utils.checkpoint.checkpoint(context_fn=...)` takes, e.g. from `create_selective_checkpoint_contexts`."""
    MODES[name] = contexts


def mode_names() -> list[str]:
    return ["none", *MODES]


def parse_mode(value: Any, field: str = "training.activation_checkpointing") -> str:
    """The mode `value` names: a mode, or a boolean spelling of the old switch. Anything else is a one-line
    ConfigError naming `field`."""
    if isinstance(value, bool):
        return "full" if value else "none"
    if isinstance(value, str):
        name = _BOOLEANS.get(value.strip().lower(), value.strip().lower())
        if name in mode_names():
            return name
    raise invalid(field, value, f"one of {', '.join(mode_names())} (or true/false)", mode_names())


def run_block(forward: Callable[..., torch.Tensor], mode: Any, *args: Any) -> torch.Tensor:
    """`forward(*args)` under recomputation mode `mode` (a mode name, or True for `full`)."""
    contexts = MODES["full" if mode is True else mode]
    if contexts is None:
        return checkpoint(forward, *args, use_reentrant=False)
    return checkpoint(forward, *args, use_reentrant=False, context_fn=contexts)
