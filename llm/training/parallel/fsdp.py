"""FSDP2 for models that do not fit one device: sharding, full-weight export and sharded checkpoints.

`shard_model` applies `torch.distributed.fsdp.fully_shard` to each of the model's `fsdp_units()` (a
`DecoderModel`'s or `SequenceEncoder`'s blocks; any model may define the method) and then to the root
(embeddings, final norm, head). Each rank keeps 1/N of the weights, gradients and optimizer state
as DTensor shards; a block's full weights exist only while it runs (all-gathered before its forward and
backward, freed after) and gradients are reduce-scattered. `training.precision=bf16` becomes the
mixed-precision policy: bf16 copies for compute, fp32 gradient reduction, fp32 master weights.

HSDP (`distributed.strategy=hsdp`, `shard_size` S < N) is the same `fully_shard` on a 2-D (replicas x S) mesh
(mesh.py `build_hsdp_mesh`): each weight is sharded over the S ranks of a group (a node) and every group holds the
same shards, so the all-gathers and reduce-scatters stay inside a group and only the all-reduce of each rank's 1/S
gradient shard crosses groups. The parameters are DTensors placed (Replicate, Shard(0)); everything below (the
gradient norm, full weights, DCP checkpoints, `ShardedMuon`) reads their placements, so it serves both.

Under FSDP anything that reads the weights outside the training step is a collective, so every rank
calls it:
- `save_full_weights` gathers a full state dict to rank 0's CPU, which writes one ordinary safetensors
  file (`RUN/model.safetensors` looks the same as with DDP);
- `lockstep_batches` keeps validation in step: a rank whose shard has fewer batches runs throw-away
  forwards so that every all-gather has all its participants;
- `save_sharded` / `load_sharded` write and read a `torch.distributed.checkpoint` directory (one file
  per rank plus `.metadata`), which consolidate.py turns into one safetensors file in one process.

The bytes on disk (safetensors writes, safe DCP readers) are `llm.artifacts.sharded`'s.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from llm.artifacts.checkpoint import load_shard_metadata
from llm.artifacts.sharded import (
    TIED_FILE,
    plain_errors,
    safe_load_planner,
    shard_reader,
    tied_groups,
    write_safetensors,
)
from llm.errors import UserError
from llm.models import lora
from llm.training.parallel.distributed import all_gather_object, any_rank, broadcast_object
from llm.training.parallel.mesh import build_hsdp_mesh

_END = object()


# ---------------------------------------------------------------------------------------------
# Sharding
# ---------------------------------------------------------------------------------------------


def is_fsdp(model: nn.Module | None) -> bool:
    """True for a module converted by `fully_shard` (also behind a `torch.compile` wrapper)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(getattr(model, "_orig_mod", model), FSDPModule)


def fsdp_units(model: nn.Module) -> list[nn.Module]:
    """The submodules `model.fsdp_units()` names (its blocks), each sharded and gathered on its own; [] if none.

    The model says what its units are, so this module never imports a concrete model class.
    """
    units = getattr(model, "fsdp_units", None)
    if not callable(units):
        return []
    found = list(units())
    owned = {id(m) for m in model.modules()}
    stray = [type(m).__name__ for m in found if id(m) not in owned or m is model]
    if stray:
        raise ValueError(f"{type(model).__name__}.fsdp_units() must return proper submodules, got {stray}")
    return found


def shard_model(model: nn.Module, device: torch.device, precision: str, mesh: Any = None,
                shard_size: int = 0) -> nn.Module:
    """Shard `model` in place across the default process group, or over `mesh` (the data-parallel dimension(s) of the
    parallel plan's device mesh, whose caller has made the ranks' weights equal); returns it (now an `FSDPModule`).

    Without `mesh`, a `shard_size` S below the world size makes it HSDP: sharded within groups of S consecutive
    ranks, replicated across the groups."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if precision == "fp16":
        raise UserError(
            "training.precision: fp16 is not supported with distributed.strategy=fsdp or hsdp (its loss scaler would "
            "need sharded gradients); use bf16, which needs no scaler"
        )
    if mesh is None:
        # Ranks seed differently (dropout must differ), so their fresh weights differ; DDP broadcasts rank 0's
        # at construction, fully_shard does not: each rank would keep its shard of a different model.
        with torch.no_grad():
            for tensor in [*model.parameters(), *model.buffers()]:
                dist.broadcast(tensor, src=0)
        world = dist.get_world_size()
        if 0 < shard_size < world:
            mesh = build_hsdp_mesh(world, shard_size, device)
        else:
            mesh = init_device_mesh(device.type, (world,))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if precision == "bf16" \
        else MixedPrecisionPolicy()
    units = fsdp_units(model)
    if not units:
        logging.getLogger("llm").warning(
            "distributed.strategy=fsdp: %s names no fsdp_units(); it is sharded as one unit, so its full "
            "weights are gathered for the whole forward", type(model).__name__,
        )
    for unit in units:
        fully_shard(unit, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """`clip_grad_norm_` that also takes FSDP's DTensor gradients; returns the total norm as a plain tensor.

    With DTensors the norm comes back as a DTensor (the shards' norms combined across ranks); the engine's
    finite check and metric reduction want an ordinary scalar, identical on every rank. Under HSDP the norm is
    reduced over the shard dimension only: the replicas hold the same gradient shards, which are not counted twice.
    """
    from torch.distributed.tensor import DTensor

    norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


# ---------------------------------------------------------------------------------------------
# Full weights (the run's model.safetensors)
# ---------------------------------------------------------------------------------------------


def save_full_weights(model: nn.Module, path: str | os.PathLike, step: int | None = None) -> None:
    """Gather the full weights to rank 0's CPU and write them there as one safetensors file (a collective).

    A LoRA model's file holds the plain model with its adapters merged, as under DDP: every tensor (the base too,
    also of an adapters-only model) is gathered, and rank 0 merges them (`llm.models.lora.merge_state`)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    groups = tied_groups(model)
    adapted = lora.is_adapted(model)
    with lora.full_state(model) if adapted else contextlib.nullcontext():
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() == 0:
        write_safetensors(lora.merge_state(model, state) if adapted else state, Path(path), groups, step)


# ---------------------------------------------------------------------------------------------
# Validation in lockstep
# ---------------------------------------------------------------------------------------------


def lockstep_batches(batches: Iterable[Any], device: torch.device) -> Iterator[tuple[Any, bool]]:
    """Yield `(batch, real)` until every rank is out of batches; `real=False` marks a throw-away repeat.

    Validation shards may differ by a batch (they are split without padding so nothing counts twice), but
    an FSDP forward all-gathers weights, so a rank that stopped early would leave the others waiting. One
    small all-reduce per batch decides whether anyone still has data. A rank with no batch at all borrows
    the first batch of the lowest rank that has one.
    """
    it, last, first = iter(batches), None, True
    while True:
        batch = next(it, _END)
        real = batch is not _END
        if not any_rank(real, device):
            return
        if first and any_rank(not real, device):
            src = all_gather_object(real).index(True)
            last = broadcast_object(batch if real else None, src=src)
        first = False
        if real:
            last = batch
        yield (batch if real else last), real


# ---------------------------------------------------------------------------------------------
# Sharded checkpoints
# ---------------------------------------------------------------------------------------------


def save_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, directory: str | os.PathLike) -> None:
    """Write model and optimizer shards as a `torch.distributed.checkpoint` directory (a collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    directory = Path(directory)
    model_state, optim_state = get_state_dict(model, optimizer)
    with plain_errors("saving the shards"):
        dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(directory))
    groups = tied_groups(model)
    if groups and dist.get_rank() == 0:
        (directory / TIED_FILE).write_text(json.dumps(groups), encoding="utf-8")


def load_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, directory: str | os.PathLike) -> None:
    """Read what `save_sharded` wrote into the sharded `model` and `optimizer` (a collective).

    DCP reshards on load, so the shards need not match this run's world size. Nothing in the directory can run
    code (`shard_reader`, `safe_load_planner`); a crafted or malformed file is a CheckpointError on every rank.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    # Read (and check) the metadata here first: inside dcp.load a refusal would come back folded into DCP's own
    # error text. Every rank reads it, as dcp.load does.
    load_shard_metadata(Path(directory) / ".metadata")
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    with plain_errors("loading the shards"):
        dcp.load(state, storage_reader=shard_reader(directory), planner=safe_load_planner())
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
