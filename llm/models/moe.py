"""Mixture-of-experts feed-forward layer: fp32 top-k router, dropless sort-based dispatch, grouped matmul.

Notable choices:
- Experts are stacked tensors (``w_gate_up`` (E, H, 2I), ``w_down`` (E, I, H)), so one grouped matmul runs all
  experts, and every expert is part of the same Parameter: an expert that receives no tokens still gets a
  (zero) gradient, and DDP never sees an unused parameter.
- Dispatch is dropless: token copies are sorted by expert, multiplied group by group, permuted back to token
  order and combined with their gates by one batched matmul. Activations move by gathers (forward and
  backward), never by a scatter-add.
- Group matmuls (``dispatch``, or ``LLM_MOE_DISPATCH`` for every layer built without one):
  ``"grouped_mm"``: ``torch._grouped_mm``. In torch 2.13 the CPU kernel takes fp32 and bf16 (CUDA: bf16 on
  sm80+), needs 16-byte aligned rows (hidden and intermediate sizes multiple of 4 in fp32, 8 in bf16), its
  backward rejects broadcast gradients (handled here), and its fake kernel (what torch.compile traces) takes bf16
  only. ``"loop"``: ``mm`` over contiguous slices with a hand-written backward; it reads the group sizes on the
  host, so under torch.compile it sits behind a deliberate graph break. ``"padded"``: each expert's rows padded
  to whole blocks of a static size, one ``bmm`` over the blocks with per-block weight copies; no host read and
  static shapes, so a model compiles as one graph, at the price of E*B extra rows (25% at 1024 rows per expert,
  more with fewer) and the weight copies.
  ``"auto"``: grouped_mm wherever it runs (no slower than the loop on a CPU), else the loop (faster than padded
  in eager and, on a CPU, compiled: benchmarks/RESULTS.md), except under torch.compile on an accelerator, where
  the sync-free padded path keeps the step free of host syncs and graph breaks (fp32 on CUDA, fp16, unaligned
  sizes, older GPUs).
- Losses: the Switch-Transformer load-balancing loss ``E * sum_e f_e * P_e`` (f_e = share of the N*k routed
  token copies that go to expert e, P_e = mean router probability; 1.0 when perfectly balanced; Mixtral's form
  is this times top_k) and the router z-loss ``mean(logsumexp(logits)^2)`` (ST-MoE). Each layer stores
  ``aux_loss_coef * balance + z_loss_coef * z`` of its last forward in ``aux_loss``; ``collect_aux_loss`` sums
  them over any module tree.
"""

from __future__ import annotations

import os
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llm.errors import invalid
from llm.models.config import ModelConfig
from llm.models.layers import MLP

Dispatch = Literal["auto", "grouped_mm", "loop", "padded"]
DISPATCHES: tuple[str, ...] = ("auto", "grouped_mm", "loop", "padded")
# Sets the dispatch of every MoE layer built without an explicit one (the engine's models included): a way to
# force a path for tests, benchmarks and workarounds without a code change.
DISPATCH_ENV = "LLM_MOE_DISPATCH"
BLOCK_ROWS_C = 64  # see block_rows


def default_dispatch() -> Dispatch:
    """The dispatch that ``LLM_MOE_DISPATCH`` names, ``"auto"`` when it is unset or empty."""
    value = os.environ.get(DISPATCH_ENV, "") or "auto"
    if value not in DISPATCHES:
        raise invalid(DISPATCH_ENV, value, f"expected one of {', '.join(DISPATCHES)}", DISPATCHES)
    return value  # type: ignore[return-value]  (checked above)


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


# The loop needs the group sizes as Python ints: a host sync that dynamo cannot trace (on CUDA also a stall). Under
# torch.compile it is a deliberate graph break, so the sync runs in eager code between two compiled graphs.
@torch.compiler.disable
def _loop_grouped_matmul(x: Tensor, w: Tensor, counts: Tensor) -> Tensor:
    return _LoopGroupedMatmul.apply(x, w, counts.tolist())  # (N, M)


def grouped_matmul(x: Tensor, w: Tensor, counts: Tensor, offsets: Tensor, use_grouped_mm: bool) -> Tensor:
    """Rows of ``x`` (N, K), sorted by group with ``counts`` (E,) rows per group, times ``w[e]`` (K, M) each.

    ``offsets`` (E,) int32 are the cumulative row counts (grouped_mm's ``offs``). Returns (N, M).
    """
    if use_grouped_mm:
        out = torch._grouped_mm(x, w, offs=offsets)  # (N, M)
        if out.requires_grad:  # the CPU backward rejects broadcast (stride-0) gradients such as `out.sum()`'s
            out.register_hook(lambda g: g.contiguous())
        return out
    return _loop_grouped_matmul(x, w, counts)


class BlockLayout(NamedTuple):
    """Expert-sorted rows placed in blocks of ``block`` rows, each block owned by one expert (``"padded"`` path).

    Each expert's rows fill whole blocks, its last one padded. The block size and the number of blocks are bounds
    computed from shapes alone, so nothing is read back to the host and torch.compile sees static shapes.
    """

    block: int  # B, rows per block
    block_expert: Tensor  # (NB,) expert of each block; unused trailing blocks repeat the last expert
    row_of_slot: Tensor  # (NB*B,) sorted row copied into each slot; a padding slot repeats a real row, never read
    slot_of_row: Tensor  # (R,) slot of each sorted row


def block_rows(rows: int, num_experts: int) -> int:
    """Block size B of the padded path for ``rows`` sorted rows over ``num_experts`` experts (static shapes only).

    A static bound has to cover every routing, so the padded path always computes R + E*B rows and makes
    NB = ceil(R/B) + E per-block weight copies: extra rows grow with B, copies with R/B, and their sum is smallest
    near B = sqrt(c * R / E). c = ``BLOCK_ROWS_C`` (64) was the best of a sweep on a CPU (8 experts with 1024 rows
    each: B = 256; 64 experts with 512: B = 184, flat from 128 to 256). Multiple of 8, at most R/E.
    """
    per_expert = -(-rows // num_experts)
    # sym_* rather than math.isqrt/min/max: with dynamic shapes `rows` is symbolic, and these trace without a guard.
    root = torch.sym_int(torch.sym_sqrt(BLOCK_ROWS_C * per_expert))
    return torch.sym_max(1, torch.sym_min(per_expert, 8 * -(-root // 8)))


def block_layout(sorted_experts: Tensor, counts: Tensor, block: int | None = None) -> BlockLayout:
    """Layout of R rows sorted by expert (``sorted_experts`` (R,), ``counts`` (E,)) in blocks of ``block`` rows.

    NB = ceil(R / B) + E blocks (each expert's last block may be partial) hold any routing; B defaults to
    :func:`block_rows`.
    """
    R, E = sorted_experts.shape[0], counts.shape[0]
    block = block or block_rows(R, E)
    num_blocks = -(-R // block) + E
    blocks = (counts + block - 1) // block  # (E,) blocks each expert fills
    block_end = blocks.cumsum(0)  # (E,)
    block_start = block_end - blocks  # (E,) first block of each expert
    row_start = counts.cumsum(0) - counts  # (E,) first sorted row of each expert
    device = counts.device
    block_ids = torch.arange(num_blocks, device=device)
    block_expert = torch.searchsorted(block_end, block_ids, right=True).clamp_(max=E - 1)  # (NB,)
    rows = torch.arange(R, device=device)
    slot_of_row = (block_start * block - row_start).index_select(0, sorted_experts) + rows  # (R,)
    slots = torch.arange(num_blocks * block, device=device)
    slot_expert = block_expert.repeat_interleave(block)  # (NB*B,)
    row_of_slot = (row_start - block_start * block).index_select(0, slot_expert) + slots
    return BlockLayout(block, block_expert, row_of_slot.clamp_(0, torch.sym_max(R - 1, 0)), slot_of_row)


class _BlockMatmul(torch.autograd.Function):
    """``x`` (NB*B, K) as NB blocks of B rows, block b times ``w[block_expert[b]]`` (K, M): one ``bmm``.

    The weights gathered per block ((NB, K, M), a few copies of the expert weights) exist only during one call:
    the backward gathers them again rather than autograd keeping them, and folds the per-block weight gradients
    into (E, K, M) with one ``index_add_`` (zero for an expert without tokens).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, w: Tensor, block_expert: Tensor) -> Tensor:
        ctx.save_for_backward(x, w, block_expert)
        blocks = x.view(block_expert.shape[0], -1, x.shape[-1])  # (NB, B, K)
        return torch.bmm(blocks, w.index_select(0, block_expert)).view(x.shape[0], -1)  # (NB*B, M)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        x, w, block_expert = ctx.saved_tensors
        nb = block_expert.shape[0]
        g = grad.reshape(nb, -1, grad.shape[-1])  # (NB, B, M)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.bmm(g, w.index_select(0, block_expert).transpose(1, 2)).view(x.shape)  # (NB*B, K)
        if ctx.needs_input_grad[1]:
            per_block = torch.bmm(x.view(nb, -1, x.shape[-1]).transpose(1, 2), g)  # (NB, K, M)
            grad_w = torch.zeros_like(w).index_add_(0, block_expert, per_block)  # (E, K, M)
        return grad_x, grad_w, None


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
        if torch.compiler.is_compiling():
            # Dynamo cannot trace `out=` into strided halves; a compiler fuses the concatenation away anyway.
            return torch.cat([torch.ops.aten.silu_backward(grad * u, g), grad * F.silu(g)], dim=-1)
        grad_h = torch.empty_like(h)  # (N, 2I)
        tmp = F.silu(g)
        torch.mul(grad, tmp, out=grad_h[:, g.shape[-1] :])  # d/du = silu(g)
        torch.mul(grad, u, out=tmp)
        torch.ops.aten.silu_backward.grad_input(tmp, g, grad_input=grad_h[:, : g.shape[-1]])  # d/dg
        return grad_h


class _DispatchRows(torch.autograd.Function):
    """``x[token]``: rows of ``x`` (N, H) copied to the expert-ordered rows, each token to its k copies' rows.

    ``row_of_copy`` (N*k,) is the row of each copy (copy c = token c // k). The backward gathers by it and sums
    the k copies, instead of the scatter-add (``index_put`` with accumulate) that plain indexing would run.
    Rows that belong to no copy (padding) get no gradient.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, token: Tensor, row_of_copy: Tensor, k: int) -> Tensor:
        ctx.save_for_backward(row_of_copy)
        ctx.k = k
        return x.index_select(0, token)  # (R, H)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
        (row_of_copy,) = ctx.saved_tensors
        return grad.index_select(0, row_of_copy).view(-1, ctx.k, grad.shape[-1]).sum(1), None, None, None  # (N, H)


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


class _SelectRows(torch.autograd.Function):
    """``x[index]`` for distinct rows ``index`` of a padded ``x``; backward copies into zeros (unique: no adds)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, index: Tensor) -> Tensor:
        ctx.save_for_backward(index)
        ctx.rows = x.shape[0]
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (index,) = ctx.saved_tensors
        return grad.new_zeros(ctx.rows, grad.shape[-1]).index_copy_(0, index, grad), None


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
        dispatch: Dispatch | None = None,
    ) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        dispatch = default_dispatch() if dispatch is None else dispatch
        if dispatch not in DISPATCHES:
            raise ValueError(f"dispatch must be one of {DISPATCHES}, got {dispatch!r}")
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
    def from_config(cls, config: ModelConfig, dispatch: Dispatch | None = None) -> MoELayer:
        """The MoE layer of one block of a ``config`` model (expert width: ``moe_intermediate_size``, resolved).

        ``dispatch`` None: what ``LLM_MOE_DISPATCH`` names, else ``"auto"``.
        """
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
        if self.dispatch in ("loop", "padded"):
            return False
        # The down projection's input rows are I wide; they need the same alignment as x's rows.
        aligned = (self.intermediate_size * x.element_size()) % 16 == 0
        supported = aligned and grouped_mm_supported(x, 2 * self.intermediate_size)
        # torch 2.13's meta (fake-tensor) kernel of _grouped_mm takes bf16 only, so under torch.compile an fp32
        # model would fail to trace; it takes a fallback instead (`_path`).
        supported = supported and not (torch.compiler.is_compiling() and x.dtype != torch.bfloat16)
        if self.dispatch == "grouped_mm" and not supported:
            raise RuntimeError(
                f"torch._grouped_mm does not support {x.dtype} on {x.device.type} with hidden_size "
                f"{self.hidden_size} and intermediate_size {self.intermediate_size} (rows must be 16-byte aligned)"
            )
        return supported

    def _path(self, x: Tensor) -> Literal["grouped_mm", "loop", "padded"]:
        """The expert-matmul path for ``x`` (already in the compute dtype) under ``self.dispatch``.

        Where grouped_mm cannot run, "auto" takes the loop, except when compiling for an accelerator: there the
        loop's host reads would stall the device and split the graph twice per layer, so the sync-free padded
        blocks run instead, in one graph. On a CPU a host read costs nothing and the padded path's extra rows and
        weight copies made a compiled layer 1.7x slower (benchmarks/RESULTS.md, MoE fallback).
        """
        if self.dispatch in ("loop", "padded"):
            return self.dispatch  # type: ignore[return-value]
        if self._use_grouped_mm(x):
            return "grouped_mm"
        return "padded" if torch.compiler.is_compiling() and x.device.type != "cpu" else "loop"

    def experts_forward(self, x: Tensor, gates: Tensor, experts: Tensor, counts: Tensor) -> Tensor:
        """Dropless expert computation for ``x`` (N, H) routed to ``experts`` (N, k) with ``gates`` (N, k)."""
        N, H = x.shape
        k = self.top_k
        if N == 0:
            # No tokens at all: keep every expert weight in the graph so DDP still reduces its (zero) gradient.
            return x.new_zeros(0, H) + 0.0 * (self.w_gate_up.sum() + self.w_down.sum())
        order = experts.reshape(-1).argsort(stable=True)  # (N*k,) token copies grouped by expert
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)  # (N*k,) sorted slot of each copy
        token = order // k  # (N*k,) token of each sorted copy
        # Autocast does not reach grouped_mm, bmm on gathered weights or the loop's mm(out=...): cast as it would
        # for a Linear.
        device_type = x.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
        w_gate_up, w_down = self.w_gate_up.to(dtype), self.w_down.to(dtype)
        x_in = x.to(dtype)
        path = self._path(x_in)
        if path == "padded":
            layout = block_layout(experts.reshape(-1).index_select(0, order), counts)
            row_of_copy = layout.slot_of_row.index_select(0, inverse)  # (N*k,) padded row of each copy
            x_rows = _DispatchRows.apply(x_in, token.index_select(0, layout.row_of_slot), row_of_copy, k)  # (NB*B, H)
            h = _BlockMatmul.apply(x_rows, w_gate_up, layout.block_expert)  # (NB*B, 2I)
            y = _BlockMatmul.apply(_SwiGLU.apply(h), w_down, layout.block_expert)  # (NB*B, H)
            y = _SelectRows.apply(y, row_of_copy)  # (N*k, H) in token order
        else:
            offsets = counts.cumsum(0).to(torch.int32)  # (E,)
            use_gmm = path == "grouped_mm"
            x_sorted = _DispatchRows.apply(x_in, token, inverse, k)  # (N*k, H)
            h = grouped_matmul(x_sorted, w_gate_up, counts, offsets, use_gmm)  # (N*k, 2I)
            y = grouped_matmul(_SwiGLU.apply(h), w_down, counts, offsets, use_gmm)  # (N*k, H)
            y = _PermuteRows.apply(y, inverse, order)  # (N*k, H) back in token order
        # Weighted sum over the k experts as a batched (1, k) @ (k, H) product: no scatter-add needed.
        return torch.bmm(gates.to(y.dtype).unsqueeze(1), y.view(N, k, H)).squeeze(1).to(x.dtype)  # (N, H)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, H)
        logits, gates, experts = self.route(x)
        flat = experts.reshape(-1)
        # Not bincount: its output length depends on the data, which breaks the graph under torch.compile.
        counts = torch.zeros(self.num_experts, dtype=torch.long, device=x.device).scatter_add_(
            0, flat, torch.ones_like(flat)
        )  # (E,)
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
