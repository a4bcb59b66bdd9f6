"""LoRA on an MoE layer's stacked expert weights (``w_gate_up`` (E, H, 2I), ``w_down`` (E, I, H)).

peft adapts `nn.Linear` modules; an MoE layer keeps its experts as stacked `nn.Parameter`s so one grouped matmul
runs them all. peft's own answer (``target_parameters``) swaps the parameter through ``torch.nn.utils.parametrize``
and takes neither dropout nor DoRA; the parametrization also hides the parameter from FSDP2's sharding. So the
stacked adapter is written here, as a submodule of the MoE layer that the layer asks for its weights
(`MoELayer.expert_weight`): expert e's weight becomes ``W_e + scale * A_e @ B_e`` with ``A`` (E, in, r) random and
``B`` (E, r, out) zero, one low-rank pair per expert, so the adapted layer computes exactly what the base did until
it trains. The adapted weight is formed densely each forward (one batched matmul of the ranks, the size of the
weight): the grouped expert kernels then run unchanged, at the cost of one weight-sized temporary per target.

Variants, as peft defines them for `nn.Linear`: ``rslora`` scales by ``alpha / sqrt(r)`` instead of ``alpha / r``;
``dora`` (weight-decomposed LoRA) rescales each output column of each expert's adapted weight to a learned
magnitude, ``m * (W + dW) / ||W + dW||`` with the norm over the input dimension and not differentiated (as peft
and the DoRA paper do), ``m`` starting at the base's norms.

Every tensor is named with ``lora_`` (``mlp.lora_w_gate_up.lora_A``), which is how `llm.models.lora` tells an
adapter from the base (trainable, saved in adapters-only checkpoints). `ExpertLoRA.formula` also
merges for export.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

EXPERT_TARGETS = ("w_gate_up", "w_down")  # the stacked parameters of llm.models.moe.layer.MoELayer
PREFIX = "lora_"  # submodule name of the adapter of parameter P: lora_P


def scaling(alpha: float, rank: int, variant: str) -> float:
    """The factor on ``A @ B``: ``alpha / r``, or ``alpha / sqrt(r)`` for rsLoRA (peft's rule)."""
    return alpha / math.sqrt(rank) if variant == "rslora" else alpha / rank


class ExpertLoRA(nn.Module):
    """A rank-``rank`` adapter per expert for one stacked weight (E, in, out); ``forward(W)`` is the adapted weight."""

    def __init__(self, weight: Tensor, rank: int, alpha: float, variant: str = "lora") -> None:
        super().__init__()
        experts, fan_in, fan_out = weight.shape
        self.rank, self.alpha, self.variant = rank, alpha, variant
        self.enabled = True  # off inside llm.models.lora.disabled: the layer computes with its base weight
        self.scale = scaling(alpha, rank, variant)
        factory = {"device": weight.device, "dtype": torch.float32 if weight.is_floating_point() else None}
        self.lora_A = nn.Parameter(torch.empty(experts, fan_in, rank, **factory))
        self.lora_B = nn.Parameter(torch.zeros(experts, rank, fan_out, **factory))
        # Each expert's A as peft's nn.Linear A (kaiming-uniform, a=sqrt(5)): bound 1/sqrt(fan_in).
        bound = 1.0 / math.sqrt(fan_in)
        with torch.no_grad():
            self.lora_A.uniform_(-bound, bound)
        self.lora_magnitude = nn.Parameter(self.norms(weight.detach().float())) if variant == "dora" else None

    def extra_repr(self) -> str:
        return f"experts={self.lora_A.shape[0]}, rank={self.rank}, alpha={self.alpha:g}, variant={self.variant}"

    @staticmethod
    def norms(weight: Tensor) -> Tensor:
        """Each expert's per-output-column norm over the input dimension: (E, 1, out)."""
        return torch.linalg.vector_norm(weight, dim=1, keepdim=True)

    def formula(self, weight: Tensor, a: Tensor, b: Tensor, magnitude: Tensor | None) -> Tensor:
        """The adapted weight from these tensors (the module's own, or copies of them gathered elsewhere): summed in
        fp32, returned in ``weight``'s dtype."""
        adapted = weight.float() + torch.bmm(a.float(), b.float()) * self.scale
        if magnitude is not None:
            adapted = adapted * (magnitude.float() / self.norms(adapted).detach())
        return adapted.to(weight.dtype)

    def forward(self, weight: Tensor) -> Tensor:
        """The adapted weight for ``weight`` (E, in, out); the weight itself while disabled."""
        if not self.enabled:
            return weight
        return self.formula(weight, self.lora_A, self.lora_B, self.lora_magnitude)

    @torch.no_grad()
    def reset_magnitude(self, weight: Tensor) -> None:
        """DoRA: restart the magnitudes at the norms of the adapted ``weight`` (after the base was replaced, so that
        the adapted layer again computes the base's function while ``B`` is zero)."""
        if self.lora_magnitude is not None:
            self.lora_magnitude.copy_(self.norms(weight.float() + torch.bmm(self.lora_A, self.lora_B) * self.scale))


def expert_parameter_names(module: nn.Module) -> list[str]:
    """Qualified names (``layers.0.mlp.w_gate_up``) of the stacked expert weights in ``module`` that can be adapted."""
    return [f"{name}.{p}" if name else p for name, m in module.named_modules()
            for p in EXPERT_TARGETS if callable(getattr(m, "expert_weight", None)) and p in m._parameters]


def attach(model: nn.Module, targets: list[str], rank: int, alpha: float, variant: str) -> list[str]:
    """Add an `ExpertLoRA` for each stacked expert weight whose name ends with a target; returns the adapted names."""
    done = []
    for name, module in list(model.named_modules()):
        if not callable(getattr(module, "expert_weight", None)):
            continue
        for target in targets:
            if target in module._parameters:
                module.add_module(PREFIX + target, ExpertLoRA(module._parameters[target], rank, alpha, variant))
                done.append(f"{name}.{target}" if name else target)
    return done


def expert_adapters(model: nn.Module) -> dict[str, tuple[nn.Module, str, ExpertLoRA]]:
    """``{qualified weight name: (owning layer, parameter name, adapter)}`` for every attached `ExpertLoRA`."""
    found = {}
    for name, module in model.named_modules():
        for target in EXPERT_TARGETS:
            adapter = module._modules.get(PREFIX + target)
            if isinstance(adapter, ExpertLoRA):
                found[f"{name}.{target}" if name else target] = (module, target, adapter)
    return found
