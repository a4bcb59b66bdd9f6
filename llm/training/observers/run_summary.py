"""What a run says when it starts: where it writes, on what, how big the model and data are, and its schedule.

Warnings name settings that cannot do what the user likely meant (warmup longer than the run).
"""

from __future__ import annotations

import torch

from llm.models.flops import active_parameters, num_parameters
from llm.models.lora import describe as describe_adapters
from llm.training.observers.context import RunContext
from llm.training.optim.optimizers import describe_optimizer


def _count(n: float) -> str:
    return f"{n:,.0f}"


def parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(total, active per token): active leaves out lookup-only embeddings and scales routed experts by top_k / E
    (the N of the FLOPs formula)."""
    return num_parameters(model), int(active_parameters(model))


def schedule_summary(run: RunContext) -> str:
    cfg = run.config.training
    kind = type(run.lr_schedule.scheduler).__name__ if run.lr_schedule.scheduler is not None else "constant"
    interval = "per epoch" if cfg.scheduler_interval == "epoch" else "per step"
    epochs = f" ({run.total_steps / run.steps_per_epoch:.3g} epochs)" if run.steps_per_epoch else ""
    return (f"{cfg.scheduler_type} ({kind}, stepped {interval}), peak lr {cfg.lr:g}, warmup {cfg.warmup} steps, "
            f"{run.total_steps} steps{epochs}")


def data_summary(run: RunContext) -> str:
    cfg, dm = run.config.training, run.data_module
    # The ranks of a tensor-parallel group read the same batch: the global batch counts data-parallel ranks.
    tp = getattr(getattr(run.config, "distributed", None), "tensor_parallel", 1)
    dp, ranks = run.world_size // tp, "processes" if tp == 1 else f"data-parallel ranks of {tp} processes"
    per_step = cfg.batch_size * cfg.grad_accum_steps * dp
    parts = [f"{run.steps_per_epoch} steps per epoch of {per_step} samples "
             f"({cfg.batch_size} x {cfg.grad_accum_steps} accumulation x {dp} {ranks})"]
    for split in ("train", "val"):
        dataset = getattr(dm, f"{split}_set", None)
        try:
            parts.append(f"{split} {len(dataset):,} samples")
        except TypeError:
            continue
    return "; ".join(parts)


def announce_run(run: RunContext) -> None:
    """Log the run's set-up on rank 0 (also into train.log), with warnings for settings that defeat themselves."""
    if not run.is_global_zero:
        return
    log, cfg = run.logger, run.config.training
    total, active = parameter_counts(run.model)
    active_text = f" ({_count(active)} active per token)"
    log.info("run directory: %s", run.run_dir)
    log.info("device: %s x %d process(es), precision %s%s", run.device, run.world_size, cfg.precision,
             ", compiled" if cfg.compile else "")
    log.info("model: %s, %s parameters%s", type(run.model).__name__, _count(total), active_text)
    adapters = describe_adapters(run.model)
    if adapters:  # a LoRA run: what trains, and where the adapters sit
        log.info("%s", adapters)
    log.info("data: %s", data_summary(run))
    log.info("optimizer: %s", describe_optimizer(run.lr_schedule.optimizer))
    log.info("schedule: %s", schedule_summary(run))
    if cfg.warmup > run.total_steps:
        log.warning("training.warmup: %d warmup steps exceed the run's %d steps, so the lr never reaches its peak "
                    "%g (lower --training-warmup or raise --training-max-steps)", cfg.warmup, run.total_steps,
                    cfg.lr)
    for note in getattr(run.config, "notes", []):
        log.info("%s", note)
    if run.state.step:
        log.info("continuing at step %d of %d", run.state.step, run.total_steps)
