"""Numeric precision of a run: the one map from `training.precision` names to torch dtypes, autocast, and what
`auto` resolves to.

`auto` (the default) is bf16 autocast where the device runs bf16 matrix multiplies fast, fp32 elsewhere: CUDA
devices that support bf16 (Ampere and newer), and CPUs with AVX512-BF16 or AMX tiles (detected through torch's
CPU capability checks). It never picks fp16, which needs loss scaling. The resolved value is what the run's
config.yaml records, and the run's first lines say why it was chosen.

`fp8` is float8 training with torchao (`torchao.float8.convert_to_float8_training`): the model's linear layers
whose dimensions are multiples of 16 (all but the LM head) run their matmuls in float8 with dynamic tensorwise
scaling, inside bf16 autocast for everything else; the weights and optimizer state stay as they were. It needs a CUDA
GPU of compute capability 8.9 or newer (Ada, Hopper, Blackwell) and torchao installed; anywhere else the config is
refused with one line (`float8_refusal`). `auto` never picks it.
"""

from __future__ import annotations

import contextlib
import importlib.util

import torch
from torch import nn

# fp8: the dtype of everything that is not a float8 matmul (autocast, the MFU peak's dtype).
PRECISION_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
                                            "fp8": torch.bfloat16}
FLOAT8_MIN_CAPABILITY = (8, 9)  # float8 tensor cores: Ada (8.9), Hopper (9.0) and newer
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


def float8_refusal(device: str) -> str:
    """Why float8 training cannot run on `device` (a `training.device` value: auto, cpu, cuda, cuda:N), or ''."""
    if device in ("cpu", "mps") or not torch.cuda.is_available():
        where = device if device in ("cpu", "mps") else "cpu (no CUDA device is visible)"
        return f"float8 training needs a CUDA GPU of compute capability >= 8.9 (Ada, Hopper); this run's device is " \
               f"{where}; use bf16 or fp32"
    index = int(device.partition(":")[2] or 0) if device.startswith("cuda") else 0
    capability = torch.cuda.get_device_capability(index)
    if capability < FLOAT8_MIN_CAPABILITY:
        return f"float8 training needs compute capability >= 8.9 (Ada, Hopper); {torch.cuda.get_device_name(index)} " \
               f"has {capability[0]}.{capability[1]}; use bf16"
    if importlib.util.find_spec("torchao") is None:
        return "float8 training needs torchao, which is not installed (pip install torchao); or use bf16"
    return ""


def float8_eligible(module: nn.Module, fqn: str) -> bool:
    """The linear layers float8 converts: dimensions multiples of 16 (the float8 matmul's rule), not the LM head
    (its precision matters most for the loss, as in torchtitan)."""
    return isinstance(module, nn.Linear) and module.in_features % 16 == 0 and module.out_features % 16 == 0 \
        and not fqn.endswith("lm_head")


def prepare_for_precision(model: nn.Module, precision: str) -> nn.Module:
    """The model as `precision` trains it: under fp8 its eligible linear layers become torchao's float8 linears
    (in place; the parameter names and the checkpoint format do not change). Other precisions: as it is."""
    if precision != "fp8":
        return model
    from torchao.float8 import convert_to_float8_training  # checked importable by the config's validation

    return convert_to_float8_training(model, module_filter_fn=float8_eligible)
