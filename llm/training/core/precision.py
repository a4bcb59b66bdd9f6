"""Numeric precision of a run: the one map from `training.precision` names to torch dtypes, and autocast."""

from __future__ import annotations

import contextlib

import torch

PRECISION_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype matrix multiplies run in under `precision` (fp32 for unknown names)."""
    return PRECISION_DTYPES.get(precision, torch.float32)


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast for bf16/fp16 on `device`; nothing for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=PRECISION_DTYPES[precision])
