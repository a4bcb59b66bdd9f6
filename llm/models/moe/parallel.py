"""Expert parallelism (a trainer's degree S): each MoE layer's experts split over S ranks, and what keeps them right.

The world of W ranks is cut into W/S expert-parallel groups of S consecutive ranks ({0..S-1}, {S..2S-1}, ...). In a
group, rank i holds experts i*E/S .. (i+1)*E/S - 1 of every MoE layer and tokens travel to their experts' ranks and
back by all-to-all (`llm.models.moe.exchange`). Everything else is data parallel over all W ranks as before (the
trainer's DDP must leave the expert weights, `expert_parameter_names`, out of its reduction).

Gradients: rank r's expert gradient is the sum over its group's ranks s of d(loss_s)/d(expert), since the tokens of
every rank of the group reached its experts; the objective of the run is the mean of the W ranks' losses. So after
the backward, `finish_gradients` sums expert gradients over the ranks that hold the same experts (the W/S
"expert replicas", one per group) and divides by W: exactly the gradient of one process with the global batch.
Gradient clipping takes the norm over all experts of the group (`clip_grad_norm`).

State: anything written outside the step sees full experts. `full_experts()` gathers every expert onto every rank
for the duration of a `with` block (checkpoint weights, the run's model.safetensors, exports), and with
`load=True` slices what was loaded back to this rank's share, so a checkpoint has the same format with and without
expert parallelism and resumes on any expert-parallel degree. The optimizer state is gathered and sliced the same
way (`full_optimizer_state` / `local_optimizer_state`). The gather holds a full copy of the experts on every rank
while it runs: a checkpoint of a model whose experts do not fit one host's memory would need sharded (DCP) files.

On a device mesh (`mesh`, for a trainer that lays the rest of the model out as DTensors, e.g. tensor parallelism):
the groups are the mesh's dimension "ep" (the S ranks that split the experts) and "ep_replicate" (the ranks that
hold the same experts), every other dimension holds copies (each tensor-parallel rank of a group computes the same
experts on the same tokens and exchanges with its peers of the same tensor-parallel coordinate). After the trainer
has made the rest of the model DTensors, `distribute()` makes each rank's share a DTensor of the whole (E, ...)
weight, `Shard(0)` over "ep": checkpoints (torch's distributed checkpoint), full-state gathers and gradient norms
then see the whole experts through the DTensor machinery, and `full_experts` / the optimizer-state methods have
nothing to do. Gradients are summed over "ep_replicate" and divided by the number of different batches (`batches`).
A sharding wrapper that must not take the experts (FSDP2 shards whatever parameters it finds) is applied inside
`detached()`, a block in which the expert weights are out of the model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from llm.models.moe.exchange import ExpertShard
from llm.models.moe.layer import MoELayer, moe_layers

EXPERT_WEIGHTS = ("w_gate_up", "w_down")
EP_DIM, REPLICA_DIM = "ep", "ep_replicate"  # the dimensions of a device mesh (`ExpertParallel(mesh=...)`)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's local tensor, or the tensor itself."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if to_local is not None else tensor


class ExpertParallel:
    """The expert-parallel layout of this rank and the collectives that keep experts consistent."""

    def __init__(self, size: int, rank: int, world_size: int, mesh: Any = None) -> None:
        self.size, self.rank, self.world_size, self.mesh = size, rank, world_size, mesh
        self.distributed = False  # the expert weights are DTensors of the whole experts (`distribute`)
        self.layers: list[MoELayer] = []
        if mesh is not None:
            self.group, self.replica_group = mesh.get_group(EP_DIM), mesh.get_group(REPLICA_DIM)
            self.ep_rank, self.replicas = mesh.get_local_rank(EP_DIM), mesh.size(mesh.mesh_dim_names.index(REPLICA_DIM))
            self.batches = size * self.replicas  # other dimensions (tensor parallel) hold copies of one batch
            return
        self.replicas, self.batches = world_size // size, world_size
        # Every rank creates every group, in the same order (new_group is collective over the world).
        self.group = self.replica_group = None
        for start in range(0, world_size, size):
            group = dist.new_group(list(range(start, start + size)))
            if start <= rank < start + size:
                self.group = group
        for offset in range(size):
            group = dist.new_group(list(range(offset, world_size, size)))
            if rank % size == offset:
                self.replica_group = group
        self.ep_rank = rank % size

    # -- sharding -------------------------------------------------------------------------------
    def shard(self, model: nn.Module) -> None:
        """Keep this rank's experts of every MoE layer, taken from rank 0's initialisation."""
        self.layers = moe_layers(model)
        for layer in self.layers:
            shard = ExpertShard(self.group, self.ep_rank, self.size, layer.num_experts)
            for name in EXPERT_WEIGHTS:
                full = getattr(layer, name).data
                dist.broadcast(full, src=0)  # every rank starts from the same experts, as DDP does for the rest
                setattr(layer, name, nn.Parameter(full[shard.first:shard.first + shard.local].clone()))
            layer.ep = shard

    def distribute(self) -> None:
        """On a mesh: make each expert weight (this rank's share, plain or a DTensor of copies on a sub-mesh, as
        the trainer left it) a DTensor of the whole (E, ...) weight, `Shard(0)` over "ep" and copies elsewhere.
        Call it before the optimizer is built (the parameters are new objects). The layer computes on the local
        share: its hooks swap the DTensors for their local tensors around each forward (autograd gives the DTensor
        its gradient), unless an earlier hook (tensor parallelism's) has swapped them already."""
        from torch.distributed.tensor import DTensor, Replicate, Shard

        placements = [Shard(0) if dim == EP_DIM else Replicate() for dim in self.mesh.mesh_dim_names]
        for layer in self.layers:
            for name in EXPERT_WEIGHTS:
                param = layer._parameters[name]
                local = _local(param.data)
                shape = (layer.num_experts, *local.shape[1:])
                whole = DTensor.from_local(local, self.mesh, placements, run_check=False, shape=shape,
                                           stride=torch.empty(shape, device="meta").stride())
                layer._parameters[name] = nn.Parameter(whole, requires_grad=param.requires_grad)
            layer.register_forward_pre_hook(_swap_in_local)
            layer.register_forward_hook(_swap_back, always_call=True)
        self.distributed = True

    @contextlib.contextmanager
    def detached(self) -> Iterator[None]:
        """A block in which the expert weights are not parameters of the model (for a wrapper that would take them
        as its own); they are back, the same objects, after it."""
        taken = [(layer, name, layer._parameters.pop(name)) for layer in self.layers for name in EXPERT_WEIGHTS]
        try:
            yield
        finally:
            for layer, name, param in taken:
                layer._parameters[name] = param

    def expert_parameters(self) -> list[nn.Parameter]:
        return [getattr(layer, name) for layer in self.layers for name in EXPERT_WEIGHTS]

    @staticmethod
    def expert_parameter_names(model: nn.Module) -> list[str]:
        """Qualified names of the expert weights of `model` (for DDP to leave alone)."""
        return [f"{prefix}.{name}" if prefix else name
                for prefix, module in model.named_modules() if isinstance(module, MoELayer)
                for name in EXPERT_WEIGHTS]

    # -- gradients ------------------------------------------------------------------------------
    def finish_gradients(self) -> None:
        """Turn each rank's expert gradients into the global batch's (see the module docstring)."""
        for param in self.expert_parameters():
            if param.grad is None:  # one process would give these experts a zero gradient, not none
                param.grad = torch.zeros_like(param)
            grad = _local(param.grad)
            if self.replicas > 1:
                dist.all_reduce(grad, group=self.replica_group)
            grad.div_(self.batches)

    def clip_grad_norm(self, params: list[torch.Tensor], max_norm: float,
                       shared_norm: Callable[[list[torch.Tensor], float], torch.Tensor] | None = None) -> torch.Tensor:
        """`clip_grad_norm_` over all parameters with the expert norms of the whole group; returns the norm.

        `shared_norm(params, inf)` measures the other parameters' norm where their gradients are sharded (FSDP's
        DTensors); without it they are whole on every rank (DDP replicas)."""
        experts = {id(p) for p in self.expert_parameters()}
        shared = [p.grad for p in params if id(p) not in experts and p.grad is not None]
        local = [_local(p.grad) for p in params if id(p) in experts and p.grad is not None]
        zero = torch.zeros((), device=params[0].device)
        if shared_norm is not None:
            shared_sq = shared_norm([p for p in params if id(p) not in experts], float("inf")).float().square()
            shared = [_local(g) for g in shared]
        else:
            shared_sq = torch.stack([g.float().square().sum() for g in shared]).sum() if shared else zero
        expert_sq = torch.stack([g.float().square().sum() for g in local]).sum() if local else zero.clone()
        dist.all_reduce(expert_sq, group=self.group)
        norm = (shared_sq + expert_sq).sqrt()
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        if max_norm != float("inf"):
            torch._foreach_mul_([g for g in shared + local], coef)
        return norm

    # -- state ----------------------------------------------------------------------------------
    def _gather(self, local: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(local) for _ in range(self.size)]
        dist.all_gather(parts, local.contiguous(), group=self.group)
        return torch.cat(parts)

    def _slice(self, full: torch.Tensor, layer: MoELayer) -> torch.Tensor:
        local = layer.num_experts // self.size
        return full[self.ep_rank * local:(self.ep_rank + 1) * local].clone()

    @contextlib.contextmanager
    def full_experts(self, load: bool = False) -> Iterator[None]:
        """Inside the block the expert weights are full (E, ...) on every rank (a collective on entry); after it,
        this rank's share again: of what was loaded into them if `load`, else unchanged. DTensor experts
        (`distribute`) are whole to every reader already: nothing to do."""
        if self.distributed:
            yield
            return
        saved = []
        for layer in self.layers:
            for name in EXPERT_WEIGHTS:
                param = getattr(layer, name)
                saved.append((layer, param, param.data))
                param.data = self._gather(param.data)
        try:
            yield
        finally:
            for layer, param, local in saved:
                param.data = self._slice(param.data, layer) if load else local

    def _expert_state_slots(self, optimizer: torch.optim.Optimizer) -> dict[int, MoELayer]:
        """Optimizer state index (as in `state_dict()`) of each expert weight -> its layer."""
        owner = {id(getattr(layer, name)): layer for layer in self.layers for name in EXPERT_WEIGHTS}
        params = [p for group in optimizer.param_groups for p in group["params"]]
        return {i: owner[id(p)] for i, p in enumerate(params) if id(p) in owner}

    def full_optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """`optimizer.state_dict()` with every expert's state (a collective): the same on every degree."""
        state = optimizer.state_dict()
        if self.distributed:  # DTensor state: whole to its readers
            return state
        slots = self._expert_state_slots(optimizer)
        per_param = dict(state["state"])
        for index in sorted(slots):  # the same order on every rank: the collectives pair up
            entry = per_param.get(index)
            if entry is None:
                continue
            local_shape = (slots[index].num_experts // self.size,)
            per_param[index] = {
                key: self._gather(value) if torch.is_tensor(value) and value.dim() and
                value.shape[0] == local_shape[0] else value
                for key, value in entry.items()
            }
        return {**state, "state": per_param}

    def local_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> dict[str, Any]:
        """A full optimizer state (`full_optimizer_state`, or a run without expert parallelism) for this rank."""
        if self.distributed:
            return state
        slots = self._expert_state_slots(optimizer)
        per_param = dict(state["state"])
        for index, layer in slots.items():
            entry = per_param.get(index)
            if entry is None:
                continue
            per_param[index] = {
                key: self._slice(value, layer) if torch.is_tensor(value) and value.dim() and
                value.shape[0] == layer.num_experts else value
                for key, value in entry.items()
            }
        return {**state, "state": per_param}


def _swap_in_local(layer: nn.Module, args: Any) -> None:
    """Before the forward: DTensor expert weights as their local tensors (autograd flows back into the DTensor)."""
    saved = []
    for name in EXPERT_WEIGHTS:
        param = layer._parameters[name]
        if hasattr(param, "to_local"):  # a DTensor
            saved.append((name, param))
            layer._parameters[name] = param.to_local()
    layer._ep_saved = saved


def _swap_back(layer: nn.Module, args: Any, output: Any) -> None:
    for name, param in getattr(layer, "_ep_saved", None) or ():
        layer._parameters[name] = param
    layer._ep_saved = None
