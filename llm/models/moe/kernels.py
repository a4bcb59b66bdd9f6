"""The MoE layer's kernels: grouped matmuls (grouped_mm, a per-group loop, padded blocks) and the row movements
around them, each an autograd function that gathers in both directions instead of scattering.

``llm.models.moe`` (the layer) and ``llm.models.moe.exchange`` (expert parallelism) build on these; the notes on
each dispatch path are in ``llm.models.moe``'s docstring.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

BLOCK_ROWS_C = 64  # see block_rows


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
# `torch._disable_dynamo` is `torch.compiler.disable` with the import of torch._dynamo put off to the first call
# (torch.optim marks its own methods with it): `@torch.compiler.disable` imported dynamo with this module, 1.2 s of
# every `llm` command's start-up, also those that never train (--help, a config error, generate, export).
@torch._disable_dynamo
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
