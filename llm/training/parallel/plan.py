"""The parallel plan: how one run spreads its model over the processes, and everything that depends on it.

`ParallelPlan.from_config` reads the run's layout (`distributed.strategy` ddp/fsdp/hsdp, `distributed.shard_size`,
`distributed.expert_parallel`,
`distributed.tensor_parallel`, the world size, the device, `training.precision`); `plan.apply(model)` lays the model
out (the global batch for the model's balance statistics, its experts sharded over expert-parallel groups, or its
heads and MLP columns split over tensor-parallel groups, then DDP replicas or FSDP2 shards) and returns the module
the training step calls. From then on the engine asks the plan for whatever the layout changes:
which micro-batch synchronises gradients (`no_sync`), how they are finished and clipped (`finish_gradients`,
`clip_grad_norm`), when the model holds its full weights (`full_weights`), the optimizer state in its
layout-independent form (`optimizer_state_dict` / `load_optimizer_state_dict`), whether validation forwards are
collectives (`lockstep`, `lockstep_batches`); how weights are written is `llm.training.weights`' strategy.

With tensor parallelism (T > 1) the plan builds the run's one `DeviceMesh` (mesh.py: dp x tp, a tensor-parallel
group's ranks consecutive), splits the model over `mesh["tp"]` (tensor.py), and makes the data-parallel half over
`mesh["dp"]`: FSDP2 over the dp sub-mesh, or DDP's averaging done by the plan itself after the backward (DDP's
wrapper takes no DTensor parameters). The T ranks of a group read the same batch: the data module is given
`data_rank` / `data_parallel` rather than the process's rank and world size. Expert parallelism composes with it
(TP x EP, DDP or FSDP): the experts split over S data-parallel ranks of each tensor-parallel coordinate on a second
mesh (`build_expert_mesh`), DTensors of the whole experts, left out of the plan's DDP averaging and of FSDP's
sharding (the expert machinery reduces them); FSDP x EP without tensor parallelism does the same on a T = 1 mesh.

HSDP (`strategy="hsdp"`, without tensor parallelism: refused by the config check) is FSDP2 over a replicas x
`shard_size` mesh (fsdp.py, mesh.py `build_hsdp_mesh`): the same sharded module, state and checkpoints as fsdp, only
the mesh differs.

The plan sits above `distributed.py` (process group, collectives), `mesh.py`, `fsdp.py` (sharding), `tensor.py`
(tensor parallelism) and `expert.py` (the degree's checks); the model-side expert machinery is the model's own
(`llm.models.hooks.shard_experts`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from llm.models import hooks
from llm.training.parallel import tensor
from llm.training.parallel.expert import check_expert_parallel
from llm.training.parallel.fsdp import clip_grad_norm, is_fsdp, lockstep_batches, shard_model
from llm.training.parallel.mesh import MeshLayout, build_expert_mesh, build_mesh, check_hsdp, resolve_shard_size

SHARDED_STRATEGIES = ("fsdp", "hsdp")  # the strategies whose data parallelism is FSDP2 (hsdp: on a 2-D mesh)


def parallelize(model: nn.Module, strategy: str, world_size: int, device: torch.device, precision: str,
                keep_local: list[str] | None = None, shard_size: int = 0) -> nn.Module:
    """Wrap `model` for data parallelism: DDP (a replica per rank) or FSDP2 (sharded in place, see fsdp.py; hsdp:
    sharded over groups of `shard_size` ranks, replicated across them).

    `keep_local` names parameters that differ between ranks by design (expert-parallel experts): DDP neither
    broadcasts nor reduces them (the model's expert machinery does).

    Returns the module the training step calls. With FSDP that is `model` itself, converted in place, so
    `engine.unwrapped_model` and `engine.model` are the same object and hold DTensor parameters.
    """
    if world_size <= 1:
        return model
    if strategy in SHARDED_STRATEGIES:
        return shard_model(model, device, precision, shard_size=shard_size if strategy == "hsdp" else 0)
    ids = [device.index] if device.type == "cuda" else None
    if keep_local:
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, keep_local)
    return DistributedDataParallel(model, device_ids=ids)


class ParallelPlan:
    """One run's layout over `world_size` processes (this is process `rank`), applied to its model by `apply`."""

    def __init__(
        self,
        strategy: str = "ddp",
        world_size: int = 1,
        rank: int = 0,
        device: torch.device | None = None,
        precision: str = "fp32",
        expert_parallel: int = 1,
        model_config: Any = None,
        tensor_parallel: int = 1,
        shard_size: int = 0,
        sequence_parallel: bool = False,
    ) -> None:
        self.strategy, self.world_size, self.rank = strategy, world_size, rank
        self.device = device if device is not None else torch.device("cpu")
        self.precision, self.expert_parallel, self.model_config = precision, expert_parallel, model_config
        self.experts: Any = None  # the model's expert sharding (llm.models.hooks.shard_experts), when applied
        self.sharded = False  # the model's weights are DTensors (FSDP shards, tensor-parallel splits)
        self.layout = MeshLayout(world_size, tensor_parallel)
        # How many different batches one micro-step reads (the world size over the tensor-parallel degree); an
        # attribute, read by the engine's counters at every micro-batch.
        self.data_parallel = self.layout.data_parallel
        self.mesh: Any = None  # the run's DeviceMesh (dp x tp), built by `apply` under tensor parallelism
        # hsdp: the ranks each weight is sharded over (resolved: never 0); fsdp and ddp: 0
        check_hsdp(strategy, shard_size, world_size, tensor_parallel)
        self.shard_size = resolve_shard_size(shard_size, world_size) if strategy == "hsdp" else 0
        # Sequence and loss parallelism within the tensor-parallel groups (tensor.py); only with T > 1.
        self.sequence_parallel = sequence_parallel and self.layout.tensor_parallel > 1
        self._model_params: list[nn.Parameter] = []
        self._summed_params: list[nn.Parameter] = []

    @property
    def tensor_parallel(self) -> int:
        return self.layout.tensor_parallel

    @property
    def data_rank(self) -> int:
        """This process's data-parallel rank: the rank the data sampler shards by."""
        return self.layout.data_rank(self.rank)

    @classmethod
    def from_config(cls, config: Any, rank: int, world_size: int, device: torch.device) -> ParallelPlan:
        """The plan of a run's config (a task without a `distributed` section runs DDP replicas)."""
        dist_cfg = getattr(config, "distributed", None)
        strategy, tensor_parallel = getattr(dist_cfg, "strategy", "ddp"), getattr(dist_cfg, "tensor_parallel", 1)
        shard_size = getattr(dist_cfg, "shard_size", 0)
        if strategy == "hsdp":  # 0 = one node's processes: LOCAL_WORLD_SIZE (torchrun's, the CLI's spawn's)
            local = int(os.environ.get("LOCAL_WORLD_SIZE") or getattr(dist_cfg, "nproc_per_node", world_size))
            shard_size = resolve_shard_size(shard_size, local)
        return cls(
            strategy=strategy, world_size=world_size, rank=rank, device=device,
            precision=config.training.precision, expert_parallel=getattr(dist_cfg, "expert_parallel", 1),
            model_config=getattr(config, "model", None), tensor_parallel=tensor_parallel,
            shard_size=shard_size, sequence_parallel=getattr(dist_cfg, "sequence_parallel", False),
        )

    # -- set-up ---------------------------------------------------------------------------------
    def apply(self, model: nn.Module) -> nn.Module:
        """Lay `model` out (a collective when `world_size` > 1) and return the module the training step calls.

        FSDP converts `model` in place (it then holds DTensor shards, and its optimizer is built on them); expert
        parallelism replaces the expert weights of `model` by this rank's share.
        """
        if self.tensor_parallel > 1:
            return self._apply_tensor_parallel(model)
        if self.world_size > 1:  # the balance statistics of the model see the global batch
            hooks.set_data_parallel_group(model, torch.distributed.group.WORLD)
        keep_local: list[str] = []
        if self.expert_parallel > 1:
            check_expert_parallel(self.expert_parallel, self.world_size, self.model_config, self.strategy)
            if self.strategy == "fsdp":
                return self._apply_fsdp_experts(model)
            self.experts = hooks.shard_experts(model, self.expert_parallel, self.rank, self.world_size)
            keep_local = self.experts.expert_parameter_names(model)
        wrapped = parallelize(model, self.strategy, self.world_size, self.device, self.precision, keep_local,
                              self.shard_size)
        self.sharded = is_fsdp(model)
        return wrapped

    def _apply_fsdp_experts(self, model: nn.Module) -> nn.Module:
        """FSDP x EP: the experts split over expert-parallel groups (a `(W / S) x S x 1` mesh) and left out of FSDP2,
        which shards everything else over all W ranks; the experts become DTensors of the whole experts."""
        expert_mesh = build_expert_mesh(self.layout, self.expert_parallel, self.device)
        self.experts = hooks.shard_experts(model, self.expert_parallel, self.rank, self.world_size, expert_mesh)
        with self.experts.detached():  # FSDP shards (and broadcasts) the parameters it finds: not the experts
            shard_model(model, self.device, self.precision)
        self.experts.distribute()
        self.sharded = True
        return model

    def _apply_tensor_parallel(self, model: nn.Module) -> nn.Module:
        """Tensor parallelism over `mesh["tp"]`, then FSDP2 over `mesh["dp"]` or the plan's own DDP averaging."""
        # The ranks seed differently, so their fresh weights differ: every rank starts from rank 0's (as DDP does).
        with torch.no_grad():
            for value in [*model.parameters(), *model.buffers()]:
                torch.distributed.broadcast(value, src=0)
        self.mesh = build_mesh(self.layout, self.device)
        dp_group = self.mesh.get_group("dp") if self.data_parallel > 1 else None
        hooks.set_data_parallel_group(model, dp_group)  # the balance statistics: the dp ranks' batches
        if self.expert_parallel > 1:  # TP x EP: the experts split over S dp ranks of each tensor-parallel coordinate
            check_expert_parallel(self.expert_parallel, self.world_size, self.model_config, self.strategy)
            expert_mesh = build_expert_mesh(self.layout, self.expert_parallel, self.device)
            self.experts = hooks.shard_experts(model, self.expert_parallel, self.rank, self.world_size, expert_mesh)
        tensor.parallelize(model, self.mesh["tp"], sequence_parallel=self.sequence_parallel)
        if self.strategy == "fsdp" and self.data_parallel > 1:  # FSDP shards what it finds: not the experts
            with self.experts.detached() if self.experts is not None else contextlib.nullcontext():
                shard_model(model, self.device, self.precision, mesh=self.mesh["dp"])
        if self.experts is not None:
            self.experts.distribute()  # DTensors of the whole experts, Shard(0) over the expert-parallel group
        self.sharded = True
        # The DDP half's, in a fixed order; the experts' gradients are the expert machinery's (`finish_gradients`).
        experts = {id(p) for p in self.experts.expert_parameters()} if self.experts is not None else set()
        self._model_params = [p for p in model.parameters() if p.requires_grad and id(p) not in experts]
        self._summed_params = tensor.summed_parameters(model)  # QK-norm weights: partial sums over the group
        return model

    # -- the step -------------------------------------------------------------------------------
    def no_sync(self, model: nn.Module, last: bool) -> contextlib.AbstractContextManager:
        """The block of one micro-batch's forward and backward: DDP all-reduces gradients on the `last` only; under
        sequence parallelism the loss is vocabulary-parallel in it (`tensor.loss_parallel_block`)."""
        if self.sequence_parallel:
            return tensor.loss_parallel_block()
        if isinstance(model, DistributedDataParallel) and not last:
            return model.no_sync()
        return contextlib.nullcontext()

    def finish_gradients(self) -> None:
        """After the backward: gradients the wrapper does not reduce (sharded experts; under tensor parallelism with
        DDP, all of them: averaged over the data-parallel ranks) become the global batch's."""
        if self.sequence_parallel or self._summed_params:  # partial sums over the group (QK norms, sequence shards)
            tensor.sum_partial_gradients(self._model_params, self._summed_params, self.mesh.get_group("tp"))
        if self.tensor_parallel > 1 and self.strategy == "ddp" and self.data_parallel > 1:
            tensor.reduce_gradients(self._model_params, self.mesh.get_group("dp"), self.data_parallel)
        if self.experts is not None:
            self.experts.finish_gradients()

    def clip_grad_norm(self, params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
        """Clip `params`' gradients to the global norm `max_norm` (inf: measure only); returns the norm, the same
        plain scalar on every rank (sharded experts' norms span their group; FSDP's DTensor grads are combined)."""
        if self.tensor_parallel > 1:  # DTensor gradients, sharded experts among them (Shard(0) over "ep")
            return tensor.clip_grad_norm(params, max_norm)
        if self.experts is not None:  # under FSDP the other gradients are shards: their norm spans the ranks
            return self.experts.clip_grad_norm(params, max_norm, clip_grad_norm if self.sharded else None)
        return clip_grad_norm(params, max_norm)

    # -- weights and state ----------------------------------------------------------------------
    def full_weights(self, load: bool = False) -> contextlib.AbstractContextManager:
        """A block in which the model holds all its weights (sharded experts are gathered; a collective): around
        every write or read of whole-model weights; with `load`, each rank keeps its share of what was loaded."""
        return self.experts.full_experts(load) if self.experts is not None else contextlib.nullcontext()

    def optimizer_state_dict(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """`optimizer.state_dict()` in the layout-independent form (every expert's state; a collective)."""
        if self.experts is not None:
            return self.experts.full_optimizer_state(optimizer)
        return optimizer.state_dict()

    def load_optimizer_state_dict(self, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        """Load what `optimizer_state_dict` wrote (on any layout) into this rank's `optimizer`."""
        if self.experts is not None:
            state = self.experts.local_optimizer_state(optimizer, state)
        optimizer.load_state_dict(state)

    # -- validation -----------------------------------------------------------------------------
    @property
    def lockstep(self) -> bool:
        """Whether a forward is a collective (FSDP gathers weights, sharded experts exchange tokens), so that every
        rank must run as many as the others."""
        return self.sharded or self.experts is not None or self.tensor_parallel > 1

    def lockstep_batches(self, batches: Iterable[Any]) -> Iterator[tuple[Any, bool]]:
        """`(batch, real)` pairs: in lockstep, a rank out of batches runs throw-away forwards (real=False)."""
        if self.lockstep:
            return lockstep_batches(batches, self.device)
        return ((batch, True) for batch in batches)
