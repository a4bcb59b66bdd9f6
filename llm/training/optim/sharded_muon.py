"""`ShardedMuon`: `torch.optim.Muon` for parameters that are DTensor shards (FSDP2, tensor parallelism, both).

Muon orthogonalises each hidden matrix's momentum-smoothed gradient (Newton-Schulz); orthogonalising a shard is not
orthogonalising the matrix, so under sharding the update of each matrix is computed whole:

1. the momentum buffer stays a DTensor with the parameter's placements, and the momentum and Nesterov steps (both
   elementwise) run on the local shards, exactly as on the whole tensor;
2. the momentum-updated matrix is gathered (`full_tensor()`: any mesh, any placement);
3. one *owner* rank per matrix (round-robin over the mesh's ranks, in parameter order) orthogonalises it with
   torch's own Newton-Schulz (`torch.optim._muon._zeropower_via_newtonschulz`: bf16, as torch's Muon does) and
   broadcasts the bf16 result to the mesh's ranks (asynchronously, one bucket of one matrix per owner at a time);
   Under HSDP the owners are the ranks of this rank's replica (`_owner_mesh`): each replica orthogonalises its own
   copy, the same computation on the same inputs, and the broadcast stays inside the replica's node;
4. each rank takes its shard of the result (a local slice, no communication) and applies torch's Muon update to its
   shard: decoupled weight decay, then `- adjusted_lr * O` with torch's `_adjust_lr` on the matrix's global shape.

Exactness: every rank's shard of O is a slice of the very tensor one process would compute from the same whole
matrix, and steps 1 and 4 are elementwise, so given the same gradients the weights equal DDP + `torch.optim.Muon`
bit for bit (the test holds FSDP + Muon to DDP + Muon). The owner scheme divides the Newton-Schulz compute by the
mesh size for one extra bf16 broadcast per matrix (half the bytes of the fp32 gather).

Parameters that are plain tensors (replicated, DDP) are updated locally as `torch.optim.Muon` does. The state is
torch's (`momentum_buffer` per parameter), as DTensors where the parameter is one, so `torch.distributed.checkpoint`
saves it sharded and loads it into any layout, and a plain `torch.optim.Muon` reads it in one process.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch.optim._muon import _adjust_lr, _zeropower_via_newtonschulz

__all__ = ["ShardedMuon", "is_dtensor", "whole_matrix_muon"]


def is_dtensor(tensor: Any) -> bool:
    """Whether `tensor` is a `torch.distributed.tensor.DTensor` (without importing it where distributed is absent)."""
    return type(tensor).__name__ == "DTensor"


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (sharing its storage under no_grad), else the tensor itself."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


REPLICATE_DIM = "dp_replicate"  # HSDP's replica dimension (llm.training.parallel.mesh.HSDP_DIMS)


def _owner_mesh(mesh: Any) -> Any:
    """The ranks that share one matrix's orthogonalisation: the whole mesh, except under HSDP, where each replica
    (this rank's slice of the mesh without its `dp_replicate` dimension) does its own. The replicas hold the same
    momentum-updated matrices (their gradients come out of one all-reduce), so each computes the same result, and no
    bf16 broadcast crosses replicas (nodes)."""
    names = mesh.mesh_dim_names or ()
    if REPLICATE_DIM not in names or mesh.ndim == 1:
        return mesh
    return mesh[tuple(name for name in names if name != REPLICATE_DIM)]


class _MeshGroup:
    """The process group spanning every rank of a device mesh (a broadcast reaches all holders of a matrix)."""

    def __init__(self, mesh: Any) -> None:
        self.ranks: list[int] = mesh.mesh.flatten().tolist()
        if len(self.ranks) == dist.get_world_size():
            self.group = None  # the default group: no new communicator
        elif mesh.ndim == 1:
            self.group = mesh.get_group()
        else:
            self.group = mesh._flatten().get_group()


class ShardedMuon(torch.optim.Muon):
    """`torch.optim.Muon` (same arguments, same state) whose DTensor matrices are orthogonalised whole by an owner
    rank; see the module docstring. Every rank of the parameters' meshes must call `step` (it is a collective)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._groups: dict[int, _MeshGroup] = {}

    def _mesh_group(self, mesh: Any) -> _MeshGroup:
        key = id(mesh)
        if key not in self._groups:
            self._groups[key] = _MeshGroup(_owner_mesh(mesh))
        return self._groups[key]

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, weight_decay, momentum = group["lr"], group["weight_decay"], group["momentum"]
            ns = (group["ns_coefficients"], group["ns_steps"], group["eps"])
            params, updates = [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if torch.is_complex(p) or p.grad.is_sparse:
                    raise RuntimeError("Muon does not support complex parameters or sparse gradients")
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
                grad, buf = _local(p.grad), _local(state["momentum_buffer"])
                buf.lerp_(grad, 1 - momentum)  # torch's Muon, on the shard: elementwise, so exactly the whole's
                update = grad.lerp(buf, momentum) if group["nesterov"] else buf
                params.append(p)
                updates.append(update)
            orthogonal = self._orthogonalise(params, updates, ns)
            for p, ortho in zip(params, orthogonal):
                adjusted_lr = _adjust_lr(lr, group["adjust_lr_fn"], p.shape)  # a DTensor's shape is the global one
                local = _local(p)
                local.mul_(1 - lr * weight_decay)
                local.add_(ortho, alpha=-adjusted_lr)
        return loss

    def _orthogonalise(self, params: list[torch.Tensor], updates: list[torch.Tensor],
                       ns: tuple[Any, int, float]) -> list[torch.Tensor]:
        """Newton-Schulz of each whole matrix; returns each rank's shard of it (the local shape of `updates[i]`)."""
        out: list[torch.Tensor | None] = [None] * len(params)
        by_mesh: dict[int, list[int]] = {}
        for i, p in enumerate(params):
            if is_dtensor(p):
                by_mesh.setdefault(id(p.device_mesh), []).append(i)
            else:
                out[i] = _zeropower_via_newtonschulz(updates[i], *ns)
        for indices in by_mesh.values():
            mesh = params[indices[0]].device_mesh
            group = self._mesh_group(mesh)
            size = len(group.ranks)
            for start in range(0, len(indices), size):  # one bucket: at most one matrix per owner
                bucket = indices[start:start + size]
                for i, ortho in zip(bucket, self._bucket(params, updates, bucket, group, ns)):
                    out[i] = ortho
        return out  # type: ignore[return-value]

    def _bucket(self, params: list[torch.Tensor], updates: list[torch.Tensor], bucket: list[int],
                group: _MeshGroup, ns: tuple[Any, int, float]) -> list[torch.Tensor]:
        """Gather, orthogonalise on each matrix's owner (its position in the bucket), broadcast, slice."""
        from torch.distributed.tensor import DTensor, Replicate

        me = dist.get_rank()
        fulls, works = [], []
        for slot, i in enumerate(bucket):
            p = params[i]
            whole = DTensor.from_local(updates[i], p.device_mesh, p.placements, shape=p.shape,
                                       stride=p.stride()).full_tensor()
            owner = group.ranks[slot]
            if me == owner:
                result = _zeropower_via_newtonschulz(whole, *ns).contiguous()
            else:
                result = torch.empty(p.shape, dtype=torch.bfloat16, device=whole.device)
            if result.dtype != torch.bfloat16:  # torch's Newton-Schulz returns bf16; receivers allocated that
                raise RuntimeError(f"Muon's orthogonalisation returned {result.dtype}, expected bfloat16")
            works.append(dist.broadcast(result, src=owner, group=group.group, async_op=True))
            fulls.append(result)
        shards = []
        for slot, i in enumerate(bucket):
            works[slot].wait()
            p = params[i]
            replicated = DTensor.from_local(fulls[slot], p.device_mesh, [Replicate()] * p.device_mesh.ndim,
                                            run_check=False)
            shards.append(replicated.redistribute(p.device_mesh, p.placements).to_local())  # a local slice
        return shards


def whole_matrix_muon(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """`optimizer` itself, unless it is a plain `torch.optim.Muon` holding DTensor parameters: then a `ShardedMuon`
    over the same parameter groups and defaults (whatever options they carry), so the algorithm stays Muon's."""
    if type(optimizer) is not torch.optim.Muon:
        return optimizer
    if not any(is_dtensor(p) for group in optimizer.param_groups for p in group["params"]):
        return optimizer
    return ShardedMuon([dict(group) for group in optimizer.param_groups], **optimizer.defaults)
