"""Numeric precision of a run: the one map from `training.precision` names to torch dtypes, autocast, and what
`auto` resolves to.

`auto` (the default) is bf16 autocast where the device runs bf16 matrix multiplies fast, fp32 elsewhere: CUDA
devices that support bf16 (Ampere and newer), and CPUs with AVX512-BF16 or AMX tiles (detected through torch's
CPU capability checks). It never picks fp16, which needs loss scaling. The resolved value is what the run's
config.yaml records, and the run's first lines say why it was chosen.
"""

from __future__ import annotations

import contextlib

import torch

PRECISION_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PRECISIONS = ("auto", *PRECISION_DTYPES)


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU has bf16 matrix instructions (AVX512-BF16 or AMX tiles)."""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check() for check in checks if check is not None)


def resolve_precision(precision: str, device: torch.device) -> tuple[str, str]:
    """(precision, why) for `training.precision` on `device`; a value other than `auto` is returned as given."""
    if precision != "auto":
        return precision, "as configured"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if torch.cuda.is_bf16_supported():
            return "bf16", f"auto: {name} runs bf16 matmuls on its tensor cores"
        return "fp32", f"auto: {name} has no fast bf16"
    if device.type == "cpu" and cpu_has_fast_bf16():
        return "bf16", "auto: this CPU has AVX512-BF16/AMX bf16 matmul instructions"
    return "fp32", f"auto: no fast bf16 on this {device.type}"


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype matrix multiplies run in under `precision` (fp32 for unknown names)."""
    return PRECISION_DTYPES.get(precision, torch.float32)


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast for bf16/fp16 on `device`; nothing for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=PRECISION_DTYPES[precision])
