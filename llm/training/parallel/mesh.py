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
