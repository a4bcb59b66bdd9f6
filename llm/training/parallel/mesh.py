"""The run's device mesh: W processes as a (data parallel) x (tensor parallel) grid.

Rank r sits at `(r // T, r % T)` of a `dp x tp` grid (T = `distributed.tensor_parallel`, dp = W / T): the T ranks
of a tensor-parallel group are consecutive, so with torchrun's rank order they share a node and its fast links (NVLink),
and data parallelism (DDP's all-reduce or FSDP's all-gather/reduce-scatter) runs across groups. The ranks of one
tensor-parallel group read the same batch; the data sampler is given the data-parallel coordinates (`data_rank`,
`data_parallel`), so the global batch is batch size x dp x accumulation.

`MeshLayout` is the arithmetic (no process group needed, so config checks and tests use it); `build_mesh` makes the
one `DeviceMesh` of the run (a collective) from which the plan takes its sub-meshes (`mesh["dp"]`, `mesh["tp"]`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llm.errors import ConfigError

DIMS = ("dp", "tp")  # the mesh's dimension names, outermost first


@dataclass(frozen=True)
class MeshLayout:
    """`world_size` processes as `data_parallel` x `tensor_parallel`."""

    world_size: int = 1
    tensor_parallel: int = 1

    def __post_init__(self) -> None:
        check_tensor_parallel_degree(self.tensor_parallel, self.world_size)

    @property
    def data_parallel(self) -> int:
        """Data-parallel degree: how many different batches one step reads."""
        return self.world_size // self.tensor_parallel

    def data_rank(self, rank: int) -> int:
        """Which data-parallel replica `rank` belongs to (the rank the data sampler sees)."""
        return rank // self.tensor_parallel

    def tensor_rank(self, rank: int) -> int:
        """`rank`'s place in its tensor-parallel group."""
        return rank % self.tensor_parallel


def check_tensor_parallel_degree(size: int, world_size: int | None) -> None:
    """Refuse a `distributed.tensor_parallel` that is not >= 1 or does not divide the number of processes (None:
    not known yet)."""
    if size < 1:
        raise ConfigError(f"distributed.tensor_parallel: {size} must be >= 1")
    if world_size is not None and world_size % size:
        raise ConfigError(
            f"distributed.tensor_parallel: {size} must divide the number of processes ({world_size}); "
            "--distributed-tensor-parallel must divide --distributed-nproc-per-node (or torchrun's --nnodes x "
            "--nproc-per-node)"
        )


def build_mesh(layout: MeshLayout, device: torch.device) -> torch.distributed.device_mesh.DeviceMesh:
    """The run's `dp x tp` DeviceMesh over every process (a collective: it creates the sub-meshes' groups)."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (layout.data_parallel, layout.tensor_parallel), mesh_dim_names=DIMS)


# Expert parallelism composed with tensor parallelism or FSDP (T = 1): the data-parallel dimension cut into groups of
# S consecutive data-parallel ranks that split the experts ("ep"), across which the same experts repeat
# ("ep_replicate").
EXPERT_DIMS = ("ep_replicate", "ep", "tp")


def build_expert_mesh(layout: MeshLayout, expert_parallel: int,
                      device: torch.device) -> torch.distributed.device_mesh.DeviceMesh:
    """A second DeviceMesh over every process for the experts, `(dp / S) x S x tp` (a collective): rank r keeps its
    `dp x tp` coordinates (`(r // T) = replica * S + ep rank`, `r % T`), so an expert-parallel group is S ranks of
    one tensor-parallel coordinate in consecutive tensor-parallel groups."""
    from torch.distributed.device_mesh import init_device_mesh

    if layout.data_parallel % expert_parallel:
        raise ConfigError(f"distributed.expert_parallel: {expert_parallel} must divide the data-parallel degree "
                          f"{layout.data_parallel} (processes / --distributed-tensor-parallel)")
    shape = (layout.data_parallel // expert_parallel, expert_parallel, layout.tensor_parallel)
    return init_device_mesh(device.type, shape, mesh_dim_names=EXPERT_DIMS)


# ---------------------------------------------------------------------------------------------
# HSDP: `distributed.strategy=hsdp`, FSDP2 shards inside groups of `distributed.shard_size` ranks and replicates
# across the groups (docs/scale-out.md, "HSDP"). Rank r sits at (r // S, r % S) of a replicas x S grid, so a shard
# group's ranks are consecutive: with torchrun's rank order, one node (its weights' all-gathers and reduce-scatters
# on NVLink); only the all-reduce of each rank's 1/S gradient shard crosses nodes.
# ---------------------------------------------------------------------------------------------

HSDP_DIMS = ("dp_replicate", "dp_shard")  # the mesh's dimension names under hsdp, outermost first


def resolve_shard_size(shard_size: int, local_world_size: int) -> int:
    """`distributed.shard_size`, with 0 meaning the processes of one node (`local_world_size`)."""
    return shard_size if shard_size else max(1, local_world_size)


def check_hsdp(strategy: str, shard_size: int, world_size: int | None, tensor_parallel: int = 1,
               local_world_size: int | None = None) -> None:
    """Refuse a `distributed.shard_size` that is negative or set without `distributed.strategy=hsdp`, hsdp with
    tensor parallelism, and (once the world size is known: not None) hsdp with one process or a shard size that does
    not divide the number of processes (`local_world_size`: a node's processes, for the default; None: all)."""
    if shard_size < 0:
        raise ConfigError(f"distributed.shard_size: {shard_size} must be >= 1 (or 0: the processes of one node)")
    if shard_size and strategy != "hsdp":
        raise ConfigError(f"distributed.shard_size: {shard_size} applies to --distributed-strategy hsdp only, not "
                          f"{strategy!r}; drop --distributed-shard-size or use --distributed-strategy hsdp")
    if strategy != "hsdp":
        return
    if tensor_parallel > 1:
        # The tensor-parallel gradient norm (tensor.py) reduces over one mesh dimension or all of them; HSDP x TP
        # shards over two of three (dp_shard, tp). Refused rather than counted wrong.
        raise ConfigError(f"distributed.strategy: hsdp is not combined with --distributed-tensor-parallel "
                          f"{tensor_parallel} (yet); use --distributed-strategy fsdp with it, or "
                          "--distributed-tensor-parallel 1 with hsdp")
    if world_size is None:
        return
    if world_size == 1:
        raise ConfigError("distributed.strategy: hsdp needs more than one process (--distributed-nproc-per-node, "
                          "or torchrun's --nnodes x --nproc-per-node); use ddp for one")
    size = resolve_shard_size(shard_size, local_world_size or world_size)
    if world_size % size:
        default = "" if shard_size else " (0: the processes of one node)"
        raise ConfigError(f"distributed.shard_size: {size}{default} must divide the {world_size} processes; set "
                          "--distributed-shard-size to a divisor")


def build_hsdp_mesh(world_size: int, shard_size: int, device: torch.device) -> torch.distributed.device_mesh.DeviceMesh:
    """The run's (world_size / shard_size) replicas x shard_size DeviceMesh (a collective)."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (world_size // shard_size, shard_size), mesh_dim_names=HSDP_DIMS)
