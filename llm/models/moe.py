"""Mixture-of-experts feed-forward layer: fp32 top-k router, dropless sort-based dispatch, grouped matmul.

Notable choices:
- Experts are stacked tensors (``w_gate_up`` (E, H, 2I), ``w_down`` (E, I, H)), so one grouped matmul runs all
  experts, and every expert is part of the same Parameter: an expert that receives no tokens still gets a
  (zero) gradient, and DDP never sees an unused parameter.
- Dispatch is dropless: token copies are sorted by expert, multiplied group by group, permuted back to token
  order and combined with their gates by one batched matmul. All activation movement is gathers (forward and
  backward); no scatter-add.
- Group matmuls: ``torch._grouped_mm`` where it runs, else a loop of ``mm`` over contiguous slices with a
  hand-written backward. In torch 2.13 the CPU kernel takes fp32 and bf16 (CUDA: bf16 on sm80+), needs 16-byte
  aligned rows (hidden and intermediate sizes multiple of 4 in fp32, 8 in bf16), and its backward rejects
  broadcast gradients (handled here). It is no slower than the loop on a CPU (``benchmarks/bench_model.py
  --sections dispatch``; numbers in benchmarks/RESULTS.md), so ``dispatch="auto"`` uses it wherever it runs
  and falls back to the loop elsewhere (unaligned sizes, fp16, older GPUs).
- Losses: the Switch-Transformer load-balancing loss ``E * sum_e f_e * P_e`` (f_e = share of the N*k routed
  token copies that go to expert e, P_e = mean router probability; 1.0 when perfectly balanced; Mixtral's form
  is this times top_k) and the router z-loss ``mean(logsumexp(logits)^2)`` (ST-MoE). Each layer stores
  ``aux_loss_coef * balance + z_loss_coef * z`` of its last forward in ``aux_loss``; ``collect_aux_loss`` sums
  them over any module tree.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llm.models.config import ModelConfig
from llm.models.layers import MLP

Dispatch = Literal["auto", "grouped_mm", "loop"]


# --------------------------------------------------------------------------------------------- grouped matmul
def grouped_mm_supported(x: Tensor, out_features: int) -> bool:
    """Whether ``torch._grouped_mm`` runs ``x`` (N, K) @ (E, K, ``out_features``) in ``x``'s dtype on its device."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    # Both kernels require 16-byte aligned row strides of both operands and of the output.
    if (x.shape[-1] * x.element_size()) % 16 or (out_features * x.element_size()) % 16:
        return False
    if x.device.type == "cpu":
        return x.dtype in (torch.float32, torch.bfloat16)
    if x.device.type == "cuda":
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device)[0] >= 8
    return False


class _LoopGroupedMatmul(torch.autograd.Function):
    """Per-group ``torch.mm`` into slices of one output, forward and backward.

    Autograd through ``w[e]`` slices would give each expert its own full-size zero gradient and sum E of them
    (quadratic in E); here the weight gradient is one tensor written slice by slice, zero for empty groups.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, w: Tensor, counts: list[int]) -> Tensor:
        ctx.save_for_backward(x, w)
        ctx.counts = counts
        out = x.new_empty(x.shape[0], w.shape[-1])  # (N, M)
        for e, (x_e, out_e) in enumerate(zip(x.split(counts), out.split(counts))):
            if x_e.shape[0]:
                torch.mm(x_e, w[e], out=out_e)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        x, w = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(w) if ctx.needs_input_grad[1] else None
        start = 0
        for e, n in enumerate(ctx.counts):
            if n:
                x_e, g_e = x.narrow(0, start, n), grad.narrow(0, start, n)
                if grad_x is not None:
                    torch.mm(g_e, w[e].T, out=grad_x.narrow(0, start, n))
                if grad_w is not None:
                    torch.mm(x_e.T, g_e, out=grad_w[e])
            start += n
        return grad_x, grad_w, None


def grouped_matmul(x: Tensor, w: Tensor, counts: Tensor, offsets: Tensor, use_grouped_mm: bool) -> Tensor:
    """Rows of ``x`` (N, K), sorted by group with ``counts`` (E,) rows per group, times ``w[e]`` (K, M) each.

    ``offsets`` (E,) int32 are the cumulative row counts (grouped_mm's ``offs``). Returns (N, M).
    """
    if use_grouped_mm:
        out = torch._grouped_mm(x, w, offs=offsets)  # (N, M)
        if out.requires_grad:  # the CPU backward rejects broadcast (stride-0) gradients such as `out.sum()`'s
            out.register_hook(lambda g: g.contiguous())
        return out
    return _LoopGroupedMatmul.apply(x, w, counts.tolist())  # (N, M)


class _SwiGLU(torch.autograd.Function):
    """``silu(h[:, :I]) * h[:, I:]`` for the fused gate/up output ``h`` (N, 2I), saving only ``h``.

    Plain autograd also keeps silu's output alive until backward (an extra (N, I) per MoE layer), allocates separate
    gradients for gate, up and silu, then concatenates them; here the two halves of the gradient are written
    straight into one (N, 2I) buffer with a single (N, I) temporary.
    """

    @staticmethod
    def forward(ctx: Any, h: Tensor) -> Tensor:
        ctx.save_for_backward(h)
        g, u = h.chunk(2, dim=-1)  # (N, I) each
        return F.silu(g).mul_(u)  # (N, I)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (h,) = ctx.saved_tensors
        g, u = h.chunk(2, dim=-1)
        grad_h = torch.empty_like(h)  # (N, 2I)
        tmp = F.silu(g)
        torch.mul(grad, tmp, out=grad_h[:, g.shape[-1] :])  # d/du = silu(g)
        torch.mul(grad, u, out=tmp)
        torch.ops.aten.silu_backward.grad_input(tmp, g, grad_input=grad_h[:, : g.shape[-1]])  # d/dg
        return grad_h


class _DispatchRows(torch.autograd.Function):
    """``x[order // k]``: each token copied k times into expert-sorted order.

    Its backward is a gather by the inverse permutation plus a sum over the k copies, instead of the
    scatter-add (``index_put`` with accumulate) that plain indexing would run.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, order: Tensor, inverse: Tensor, k: int) -> Tensor:
        ctx.save_for_backward(inverse)
        ctx.k = k
        return x.index_select(0, order // k)  # (N*k, H)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse).view(-1, ctx.k, grad.shape[-1]).sum(1), None, None, None  # (N, H)


class _PermuteRows(torch.autograd.Function):
    """``x[index]`` for a permutation ``index``; backward gathers by ``inverse`` rather than scattering."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, index: Tensor, inverse: Tensor) -> Tensor:
        ctx.save_for_backward(inverse)
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


# -------------------------------------------------------------------------------------------------------- layer
class MoELayer(nn.Module):
    """Top-k routed SwiGLU experts, plus ``num_shared_experts`` always-on experts fused into one dense MLP.

    After each forward: ``aux_loss`` (scalar, coefficients applied) and ``tokens_per_expert`` (E,) long, detached.
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        intermediate_size: int,
        num_shared_experts: int = 0,
        aux_loss_coef: float = 0.01,
        z_loss_coef: float = 0.001,
        norm_topk_prob: bool = True,
        dispatch: Dispatch = "auto",
    ) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        self.hidden_size = hidden_size
        self.num_experts = num_experts
        self.top_k = top_k
        self.intermediate_size = intermediate_size
        self.aux_loss_coef = aux_loss_coef
        self.z_loss_coef = z_loss_coef
        self.norm_topk_prob = norm_topk_prob  # Mixtral renormalizes the k gates to sum to 1
        self.dispatch = dispatch
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)  # router; HF name `block_sparse_moe.gate`
        self.w_gate_up = nn.Parameter(torch.empty(num_experts, hidden_size, 2 * intermediate_size))
        self.w_down = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))
        self.shared_experts = MLP(hidden_size, num_shared_experts * intermediate_size) if num_shared_experts else None
        # Plain attributes, not buffers: DDP would broadcast buffers from rank 0 and hide per-rank load.
        self.aux_loss: Tensor | None = None
        self.tokens_per_expert: Tensor = torch.zeros(num_experts, dtype=torch.long)
        nn.init.normal_(self.gate.weight, std=0.02)
        nn.init.normal_(self.w_gate_up, std=0.02)
        nn.init.normal_(self.w_down, std=0.02)

    @classmethod
    def from_config(cls, config: ModelConfig, dispatch: Dispatch = "auto") -> MoELayer:
        """The MoE layer of one block of a ``config`` model (expert width: ``moe_intermediate_size``, resolved)."""
        c = config.resolved()
        return cls(
            c.hidden_size, c.num_experts, c.top_k, c.moe_intermediate_size,  # type: ignore[arg-type]  (resolved)
            num_shared_experts=c.num_shared_experts, aux_loss_coef=c.moe_aux_loss_coef, z_loss_coef=c.moe_z_loss_coef,
            dispatch=dispatch,
        )

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, top_k={self.top_k}, hidden={self.hidden_size}, "
            f"intermediate={self.intermediate_size}, dispatch={self.dispatch}"
        )

    # ------------------------------------------------------------------------------------------------ routing
    def route(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Router on ``x`` (N, H): returns logits (N, E) fp32, gates (N, k) fp32, expert ids (N, k)."""
        # fp32 router: in bf16, near-equal logits round to ties and top-k choices flip on tiny input changes.
        logits = F.linear(x.float(), self.gate.weight.float())  # (N, E)
        probs = logits.softmax(dim=-1)  # (N, E)
        gates, experts = probs.topk(self.top_k, dim=-1)  # (N, k) each
        if self.norm_topk_prob:
            gates = gates / gates.sum(dim=-1, keepdim=True)
        return logits, gates, experts

    def losses(self, logits: Tensor, experts: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
        """Load-balancing loss and router z-loss (both unscaled) from logits (N, E), ids (N, k), counts (E,)."""
        n_copies = max(experts.numel(), 1)
        fraction = counts.to(logits.dtype) / n_copies  # (E,) f_e, no gradient (as in Switch)
        mean_prob = logits.softmax(dim=-1).mean(dim=0)  # (E,) P_e
        balance = self.num_experts * (fraction * mean_prob).sum()
        z_loss = torch.logsumexp(logits, dim=-1).square().mean()
        return balance, z_loss

    # ---------------------------------------------------------------------------------------------- dispatch
    def _use_grouped_mm(self, x: Tensor) -> bool:
        if self.dispatch == "loop":
            return False
        # The down projection's input rows are I wide; they need the same alignment as x's rows.
        aligned = (self.intermediate_size * x.element_size()) % 16 == 0
        supported = aligned and grouped_mm_supported(x, 2 * self.intermediate_size)
        # torch 2.13's meta (fake-tensor) kernel of _grouped_mm takes bf16 only, so under torch.compile an fp32
        # model would fail to trace; the loop traces (with a graph break at the per-expert counts).
        supported = supported and not (torch.compiler.is_compiling() and x.dtype != torch.bfloat16)
        if self.dispatch == "grouped_mm" and not supported:
            raise RuntimeError(
                f"torch._grouped_mm does not support {x.dtype} on {x.device.type} with hidden_size "
                f"{self.hidden_size} and intermediate_size {self.intermediate_size} (rows must be 16-byte aligned)"
            )
        return supported

    def experts_forward(self, x: Tensor, gates: Tensor, experts: Tensor, counts: Tensor) -> Tensor:
        """Dropless expert computation for ``x`` (N, H) routed to ``experts`` (N, k) with ``gates`` (N, k)."""
        N, H = x.shape
        order = experts.reshape(-1).argsort(stable=True)  # (N*k,) token copies grouped by expert
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)  # (N*k,) sorted slot of each copy
        offsets = counts.cumsum(0).to(torch.int32)  # (E,)
        # Autocast does not reach grouped_mm or the loop's mm(out=...): cast as it would for a Linear.
        device_type = x.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
        w_gate_up, w_down = self.w_gate_up.to(dtype), self.w_down.to(dtype)
        x_in = x.to(dtype)
        use_gmm = self._use_grouped_mm(x_in)
        x_sorted = _DispatchRows.apply(x_in, order, inverse, self.top_k)  # (N*k, H)
        h = grouped_matmul(x_sorted, w_gate_up, counts, offsets, use_gmm)  # (N*k, 2I)
        y = grouped_matmul(_SwiGLU.apply(h), w_down, counts, offsets, use_gmm)  # (N*k, H)
        y = _PermuteRows.apply(y, inverse, order).view(N, self.top_k, H)  # (N, k, H) back in token order
        # Weighted sum over the k experts as a batched (1, k) @ (k, H) product: no scatter-add needed.
        out = torch.bmm(gates.to(y.dtype).unsqueeze(1), y).squeeze(1).to(x.dtype)  # (N, H)
        if N == 0:
            # No tokens at all: keep every expert weight in the graph so DDP still reduces its (zero) gradient.
            out = out + 0.0 * (self.w_gate_up.sum() + self.w_down.sum())
        return out

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, H)
        logits, gates, experts = self.route(x)
        counts = torch.bincount(experts.reshape(-1), minlength=self.num_experts)  # (E,)
        balance, z_loss = self.losses(logits, experts, counts)
        self.aux_loss = self.aux_loss_coef * balance + self.z_loss_coef * z_loss
        self.tokens_per_expert = counts.detach()
        out = self.experts_forward(x, gates, experts, counts)  # (N, H)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out.view(shape)


# ------------------------------------------------------------------------------------------------- aux losses
_CACHE_ATTR = "_llm_moe_layers"


def moe_layers(module: nn.Module, refresh: bool = False) -> list[MoELayer]:
    """All MoELayers inside ``module`` (itself included), cached on the module after the first walk.

    Pass ``refresh=True`` after swapping submodules; wrapping (DDP, torch.compile) needs no refresh.
    """
    cached = module.__dict__.get(_CACHE_ATTR)
    if cached is None or refresh:
        cached = [m for m in module.modules() if isinstance(m, MoELayer)]
        module.__dict__[_CACHE_ATTR] = cached  # bypass nn.Module.__setattr__: not a submodule list
    return cached


def collect_aux_loss(module: nn.Module) -> Tensor | None:
    """Sum of the last forward's auxiliary losses of every MoE layer in ``module``; None if it has none."""
    losses = [m.aux_loss for m in moe_layers(module) if m.aux_loss is not None]
    if not losses:
        return None
    total = losses[0]
    for loss in losses[1:]:
        total = total + loss
    return total
