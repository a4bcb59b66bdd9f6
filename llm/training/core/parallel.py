"""Wrapping the model for data parallelism: DDP replicas or FSDP2 shards, chosen by `distributed.strategy`.

It sits above both `distributed.py` (process group, collectives) and `fsdp.py` (sharding), which therefore need
not import each other's callers: the engine imports `parallelize` from here.
"""

from __future__ import annotations

import torch
from torch import nn

from .fsdp import shard_model


def parallelize(model: nn.Module, strategy: str, world_size: int, device: torch.device, precision: str) -> nn.Module:
    """Wrap `model` for data parallelism: DDP (a replica per rank) or FSDP2 (sharded in place, see fsdp.py).

    Returns the module the training step calls. With FSDP that is `model` itself, converted in place, so
    `engine.unwrapped_model` and `engine.model` are the same object and hold DTensor parameters.
    """
    if world_size <= 1:
        return model
    if strategy == "fsdp":
        return shard_model(model, device, precision)
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)
