"""The expert-parallel degree (`distributed.expert_parallel` = S) a run may take: S divides the world and the
experts, the model has experts. Under DDP the experts are left out of its reduction; under FSDP2 out of its
sharding (each rank's share is its own, its gradient summed over the ranks holding the same experts). With tensor
parallelism (T) the experts are split over S data-parallel ranks of each tensor-parallel coordinate, so S must also
divide W / T (checked with the other tensor-parallel compositions, `tensor.check_composition`).

The machinery (sharding the experts, their gradients, norms, full weights and optimizer state) is the model's
(`llm.models.hooks.shard_experts`); the parallel plan (plan.py) applies it.
"""

from __future__ import annotations

from typing import Any

from llm.errors import ConfigError


def check_expert_parallel(size: int, world_size: int | None, model_config: Any, strategy: str) -> None:
    """Refuse a `distributed.expert_parallel` that the world size (None: not known yet), the model or the strategy
    cannot take (ddp and fsdp take it; hsdp's 2-D mesh has no expert dimension yet)."""
    if size == 1:
        return
    if size < 1:
        raise ConfigError(f"distributed.expert_parallel: {size} must be >= 1")
    if not model_config.use_moe:
        raise ConfigError(f"distributed.expert_parallel: {size} needs an MoE model (--model-use-moe)")
    if world_size is not None and world_size % size:
        raise ConfigError(f"distributed.expert_parallel: {size} must divide the number of processes ({world_size})")
    if strategy == "hsdp":
        raise ConfigError(f"distributed.expert_parallel: {size} is not combined with distributed.strategy=hsdp (yet); "
                          "use --distributed-strategy fsdp or ddp with --distributed-expert-parallel")
    if model_config.num_experts % size:
        raise ConfigError(
            f"distributed.expert_parallel: {size} must divide model.num_experts ({model_config.num_experts})"
        )
