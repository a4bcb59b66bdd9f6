"""Expert parallelism inside an MoE layer: each rank of an expert-parallel group holds E/S of the experts.

A layer with ``layer.ep`` set (an :class:`ExpertShard`, installed by ``llm.models.moe.parallel``) keeps
routing over all E experts, but its ``w_gate_up``/``w_down`` hold only the experts ``first .. first + E/S - 1``.
One forward, for this rank's N tokens:

1. route locally; sort the N*k token copies by expert, which also groups them by the rank that owns the expert
   (experts are dealt out in contiguous blocks);
2. exchange the per-expert counts (an all-to-all of S*E/S integers), then read the split sizes on the host;
3. all-to-all the rows (variable split sizes, dropless): this rank receives, from every rank, the copies routed to
   its own experts, grouped by source rank, then by expert;
4. regroup them by local expert, run the grouped matmuls, and undo it all in reverse: regroup by source rank,
   all-to-all back, unsort, combine with the gates.

The all-to-alls are autograd functions whose backward is the opposite exchange, so every rank runs the same
collectives in the same order in the backward too. A rank that receives no rows still takes part in every
exchange (zero-length splits) and its experts still enter the graph, so they get a (zero) gradient, as they would
in one process. The split sizes are a host sync per layer: the price of dropless exchange with variable sizes
(torch.compile treats this function as a graph break).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from llm.models.moe.kernels import _DispatchRows, _PermuteRows, _SwiGLU, grouped_matmul


@dataclass(frozen=True)
class ExpertShard:
    """This rank's place in its expert-parallel group: experts ``first .. first + local - 1`` of ``num_experts``."""

    group: Any  # the process group of the S ranks that split the experts between them
    rank: int  # this rank's index in `group`
    size: int  # S
    num_experts: int  # E, over the whole group

    @property
    def local(self) -> int:
        return self.num_experts // self.size

    @property
    def first(self) -> int:
        return self.rank * self.local

    def experts_forward(self, layer: Any, x: Tensor, gates: Tensor, experts: Tensor, counts: Tensor) -> Tensor:
        """The MoE layer's expert computation under this sharding (see :func:`ep_experts_forward`)."""
        return ep_experts_forward(layer, x, gates, experts, counts)


def _wire_dtype(dtype: torch.dtype, group: Any) -> torch.dtype:
    """gloo has no bfloat16/float16 all-to-all: half-precision rows travel as fp32 there (exact both ways)."""
    if dtype in (torch.bfloat16, torch.float16) and dist.get_backend(group) == "gloo":
        return torch.float32
    return dtype


class _AllToAll(torch.autograd.Function):
    """Rows of ``x``, ``send[i]`` of them for rank i, exchanged for ``recv[i]`` rows from rank i; backward reverses."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, recv: list[int], send: list[int], group: Any) -> Tensor:
        ctx.recv, ctx.send, ctx.group = recv, send, group
        return _exchange(x, recv, send, group)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
        return _exchange(grad, ctx.send, ctx.recv, ctx.group), None, None, None


def _exchange(x: Tensor, recv: list[int], send: list[int], group: Any) -> Tensor:
    wire = _wire_dtype(x.dtype, group)
    out = x.new_empty(sum(recv), *x.shape[1:], dtype=wire)
    dist.all_to_all_single(out, x.to(wire).contiguous(), recv, send, group=group)
    return out.to(x.dtype)


@torch.compiler.disable
def ep_experts_forward(layer: Any, x: Tensor, gates: Tensor, experts: Tensor, counts: Tensor) -> Tensor:
    """The expert computation of ``layer`` for this rank's tokens ``x`` (N, H) with expert parallelism.

    ``experts``/``gates`` (N, k) are global expert ids and their gates, ``counts`` (E,) this rank's copies per
    expert. Returns (N, H), as ``MoELayer.experts_forward`` does without expert parallelism.
    """
    shard: ExpertShard = layer.ep
    N, H = x.shape
    k, S, local = layer.top_k, shard.size, shard.local
    device_type = x.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
    w_gate_up, w_down = layer.w_gate_up.to(dtype), layer.w_down.to(dtype)
    x_in = x.to(dtype)

    order = experts.reshape(-1).argsort(stable=True)  # (N*k,) copies by expert, so by owning rank
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    x_sorted = _DispatchRows.apply(x_in, order // k, inverse, k)  # (N*k, H)

    # recv_counts[s, e]: copies that rank s routes to this rank's local expert e.
    recv_counts = torch.empty_like(counts)
    dist.all_to_all_single(recv_counts, counts.contiguous(), group=shard.group)
    recv_counts = recv_counts.view(S, local)
    sizes = torch.cat([counts.view(S, local).sum(1), recv_counts.sum(1)]).tolist()  # one host read for both
    send, recv = sizes[:S], sizes[S:]

    x_recv = _AllToAll.apply(x_sorted, recv, send, shard.group)  # (R, H): by source rank, then local expert
    expert_of_row = torch.arange(local, device=x.device).repeat(S).repeat_interleave(recv_counts.reshape(-1))
    by_expert = expert_of_row.argsort(stable=True)  # (R,)
    back = torch.empty_like(by_expert)
    back[by_expert] = torch.arange(by_expert.numel(), device=by_expert.device)
    local_counts = recv_counts.sum(0)  # (local,)
    x_local = _PermuteRows.apply(x_recv, by_expert, back)  # (R, H) grouped by local expert

    path = layer._path(x_local) if x_local.shape[0] else "loop"
    offsets = local_counts.cumsum(0).to(torch.int32)
    use_gmm = path == "grouped_mm"
    h = grouped_matmul(x_local, w_gate_up, local_counts, offsets, use_gmm)  # (R, 2I)
    y = grouped_matmul(_SwiGLU.apply(h), w_down, local_counts, offsets, use_gmm)  # (R, H)

    y = _PermuteRows.apply(y, back, by_expert)  # (R, H) by source rank again
    y = _AllToAll.apply(y, send, recv, shard.group)  # (N*k, H) this rank's copies, sorted by expert
    y = _PermuteRows.apply(y, inverse, order)  # (N*k, H) in token order
    return torch.bmm(gates.to(y.dtype).unsqueeze(1), y.view(N, k, H)).squeeze(1).to(x.dtype)  # (N, H)
