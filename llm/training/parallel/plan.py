"""Wrapping the model for data parallelism: DDP replicas or FSDP2 shards, chosen by `distributed.strategy`.

It sits above both `distributed.py` (process group, collectives) and `fsdp.py` (sharding), which therefore need
not import each other's callers: the engine imports `parallelize` from here.
"""

from __future__ import annotations

import torch
from torch import nn

from llm.training.parallel.fsdp import shard_model


def parallelize(model: nn.Module, strategy: str, world_size: int, device: torch.device, precision: str,
                keep_local: list[str] | None = None) -> nn.Module:
    """Wrap `model` for data parallelism: DDP (a replica per rank) or FSDP2 (sharded in place, see fsdp.py).

    `keep_local` names parameters that differ between ranks by design (expert-parallel experts): DDP neither
    broadcasts nor reduces them (expert_parallel.py does).

    Returns the module the training step calls. With FSDP that is `model` itself, converted in place, so
    `engine.unwrapped_model` and `engine.model` are the same object and hold DTensor parameters.
    """
    if world_size <= 1:
        return model
    if strategy == "fsdp":
        return shard_model(model, device, precision)
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    if keep_local:
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, keep_local)
    return DistributedDataParallel(model, device_ids=ids)
