"""`TrainingEngine`: turns a task, a data module and callbacks into a training run.

The step loop (`_fit`, `_train_epoch`, `_optimizer_step`) is deliberately short; everything else
is a helper with one job. The engine owns the model wrapping (device, DDP, compile, precision),
the optimizer step (accumulation, clipping, non-finite policy) and metric reduction; tasks own
what a batch means and callbacks own side effects.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .callbacks import Callback, CallbackList, build_callbacks
from .distributed import all_agree, all_reduce_sum, barrier, is_distributed, parallelize, resolve_device
from .errors import UserError
from .fsdp import clip_grad_norm, is_fsdp, lockstep_batches, save_full_weights
from .metrics import MetricAccumulator
from .schedulers import LRSchedule

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class NonFiniteLossError(UserError):
    """Raised by the `raise` policy when a step produces a non-finite loss or gradient norm."""


@dataclass
class TrainState:
    """Counters that make up the run's position (saved in every checkpoint)."""

    step: int = 0  # optimizer steps taken
    epoch: int = 0
    samples_seen: int = 0
    tokens_seen: int = 0
    skipped_steps: int = 0  # total updates dropped by the non-finite policy
    consecutive_skips: int = 0
    last_val_step: int = -1


def move_to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: move_to_device(v, device) for k, v in batch.items()}
    return batch


def _first_tensor(batch: Any) -> torch.Tensor | None:
    if isinstance(batch, torch.Tensor):
        return batch
    items = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else []
    for item in items:
        found = _first_tensor(item)
        if found is not None:
            return found
    return None


def batch_size_and_tokens(batch: Any) -> tuple[int, int]:
    """Samples in a batch (leading dim of its first tensor) and tokens (if that tensor is integer)."""
    first = _first_tensor(batch)
    if first is None or first.ndim == 0:
        return 1, 0
    tokens = first.numel() if not first.is_floating_point() else 0
    return int(first.shape[0]), int(tokens)


def compile_backend() -> str:
    """The `torch.compile` backend of `training.compile`: inductor. `LLM_COMPILE_BACKEND` overrides it (tests use
    aot_eager: the same graph capture and AOT autograd, without minutes of C++ code generation on a CPU)."""
    return os.environ.get("LLM_COMPILE_BACKEND", "inductor")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class TrainingEngine:
    """Runs `task` with `data_module` and `callbacks` on process `rank` of `world_size`."""

    def __init__(
        self,
        config: Any,
        task: Any,
        rank: int = 0,
        world_size: int = 1,
        data_module: Any = None,
        callbacks: list[Callback] | None = None,
    ) -> None:
        self.config, self.task = config, task
        self.rank, self.world_size = rank, world_size
        self.device = resolve_device(config.training.device, int(os.environ.get("LOCAL_RANK", rank)))
        self.logger = logging.getLogger("llm")
        self.data_module = data_module if data_module is not None else task.build_data_module()
        self.callbacks = CallbackList(callbacks if callbacks is not None else build_callbacks(config))
        self.run_dir = Path(config.logging.log_dir or ".")
        self.state = TrainState()
        self.should_stop = False  # the control field callbacks set to end the run
        self.model: nn.Module | None = None
        self.unwrapped_model: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.lr_schedule: LRSchedule | None = None
        self.criterion: Any = None
        self.scaler: torch.amp.GradScaler | None = None
        self.checkpointer: Any = None  # set by checkpointing (see checkpoint.py)
        self.total_steps = 0
        self.steps_per_epoch = 0
        self.last_val_logs: dict[str, Any] = {}
        self._meter = MetricAccumulator()
        self._deferred_finite = False  # see _setup_finite_check
        self._first_bad_step: torch.Tensor | None = None
        self._window_start = time.perf_counter()
        self._window = {"samples": 0, "tokens": 0}

    # -- properties -----------------------------------------------------------------------------
    @property
    def is_global_zero(self) -> bool:
        return self.rank == 0

    def find_callback(self, key: str | type) -> Callback | None:
        return self.callbacks.find(key)

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"]) if self.optimizer else 0.0

    # -- set-up ---------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.config.training
        seed_everything(self.config.seed + self.rank)
        self._setup_data()
        model = self.task.build_model().to(self.device)
        if cfg.activation_checkpointing:
            self._enable_activation_checkpointing(model)
        self.unwrapped_model = model
        # Data parallelism: DDP replicas or FSDP shards (distributed.parallelize, fsdp.py). FSDP converts the
        # module in place, so there `unwrapped_model` holds the DTensor shards and the optimizer is built on them.
        strategy = getattr(getattr(self.config, "distributed", None), "strategy", "ddp")
        model = parallelize(model, strategy, self.world_size, self.device, cfg.precision)
        if cfg.compile:
            model = torch.compile(model, backend=compile_backend())
        self.model = model
        self.optimizer = self.task.build_optimizer(self.unwrapped_model)
        self._plan_steps()
        scheduler = self.task.build_scheduler(self.optimizer)
        if scheduler is None and cfg.scheduler_type not in ("constant", "none"):
            # A task's own build_scheduler may not know every registered name (the guide's else-branch).
            self.logger.warning(
                "%s.build_scheduler returned no scheduler for training.scheduler_type=%r; the lr stays constant",
                type(self.task).__name__, cfg.scheduler_type,
            )
        self.lr_schedule = LRSchedule(
            self.optimizer, scheduler, warmup=cfg.warmup, interval=cfg.scheduler_interval, monitor=cfg.plateau_monitor
        )
        self.criterion = self.task.build_criterion()
        if isinstance(self.criterion, nn.Module):
            self.criterion = self.criterion.to(self.device)
        if cfg.precision == "fp16":
            self.scaler = torch.amp.GradScaler(self.device.type)
        from llm.models.moe import collect_aux_loss

        self._collect_aux_loss = collect_aux_loss
        self._setup_finite_check()
        self.callbacks.set_engine(self)

    def _setup_data(self) -> None:
        dm = self.data_module
        dm.rank, dm.world_size = self.rank, self.world_size
        if self.is_global_zero:
            dm.prepare_data()
        barrier()
        dm.setup("fit")

    def _plan_steps(self) -> None:
        cfg = self.config.training
        loader = self.data_module.train_dataloader()
        try:
            batches = len(loader)
        except TypeError:
            batches = -1  # an iterable without a length: bounded by max_steps only
        self.steps_per_epoch = max(batches, 0) // cfg.grad_accum_steps
        if self.steps_per_epoch == 0 and batches >= 0:  # 0 batches too: an epoch would never end a step
            raise UserError(
                f"training.batch_size: {cfg.batch_size} x grad_accum_steps {cfg.grad_accum_steps} x world size "
                f"{self.world_size} is more than the {batches} training batches available per epoch"
            )
        by_epochs = self.steps_per_epoch * cfg.epochs if self.steps_per_epoch else 0
        self.total_steps = min(s for s in (cfg.max_steps, by_epochs) if s) if (cfg.max_steps or by_epochs) else 0
        if not self.total_steps:
            raise UserError("training.max_steps: the data loader has no length; set --training-max-steps")
        self.task.total_steps, self.task.steps_per_epoch = self.total_steps, self.steps_per_epoch

    def _enable_activation_checkpointing(self, model: nn.Module) -> None:
        flagged = [m for m in model.modules() if hasattr(m, "activation_checkpointing")]
        if not flagged:
            raise UserError("training.activation_checkpointing: this task's model has no checkpointable blocks")
        for module in flagged:
            module.activation_checkpointing = True

    # -- the run --------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Set up, train, validate, save; returns the last validation logs."""
        self.setup()
        try:
            if self.checkpointer is not None:
                self.checkpointer.maybe_resume(self)
            self.callbacks.on_train_start({"step": self.state.step, "total_steps": self.total_steps})
            self._fit()
            self._save_final()
            self.callbacks.on_train_end({"step": self.state.step, **self.last_val_logs})
        except BaseException as exc:
            self.callbacks.on_exception({"step": self.state.step, "exception": exc})
            raise
        return self.last_val_logs

    def _done(self) -> bool:
        return self.should_stop or self.state.step >= self.total_steps

    def _fit(self) -> None:
        while not self._done():
            self.data_module.set_epoch(self.state.epoch)
            self.callbacks.on_epoch_start({"epoch": self.state.epoch, "step": self.state.step})
            if not self._train_epoch():
                break  # stopped mid-epoch: no epoch-end events for a partial epoch
            if self.state.last_val_step != self.state.step:
                self.validate()
            self.callbacks.on_epoch_end({"epoch": self.state.epoch, "step": self.state.step, **self.last_val_logs})
            self.state.epoch += 1
        if self.state.last_val_step != self.state.step:
            self.validate()  # the run ends with a validation of its final weights

    def _train_epoch(self) -> bool:
        """Train until the epoch's data runs out (True) or the run must stop (False)."""
        accum, val_every = self.config.training.grad_accum_steps, self.config.training.val_interval
        batches: Iterator[Any] = iter(self.data_module.train_dataloader())
        while not self._done():
            micro = list(islice(batches, accum))
            if len(micro) < accum:
                return True
            self.callbacks.on_batch_start({"step": self.state.step, "epoch": self.state.epoch})
            logs = self._optimizer_step(micro)
            self.callbacks.on_batch_end(logs)
            if val_every and self.state.step % val_every == 0 and not self._done():
                self.validate()
        return False

    def _optimizer_step(self, micro: list[Any]) -> dict[str, Any]:
        """Forward/backward over the micro-batches, then clip, check and step the optimizer."""
        loss_sum = self._forward_backward(micro)
        grad_norm = self._clip_gradients()
        if self._deferred_finite:
            self._step_unless_nonfinite(loss_sum, grad_norm)  # no host sync (see _setup_finite_check)
            skipped = False
        else:
            skipped = not self._check_finite(loss_sum, grad_norm)
            if not skipped:
                if self.scaler is not None:
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                else:
                    self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        logs: dict[str, Any] = {"step": self.state.step, "epoch": self.state.epoch, "skipped": skipped}
        if grad_norm is not None:
            self._meter.add({"grad_norm": grad_norm}, weight=1.0, count=False)
        log_now = self.state.step % self.config.training.log_interval == 0 or self._done()
        if log_now or self._checkpoint_due():
            self._raise_deferred_nonfinite()  # no log line or checkpoint may follow a refused update unnoticed
        if log_now:
            logs.update(self._collect_train_logs())
        return logs

    def _checkpoint_due(self) -> bool:
        interval = getattr(getattr(self.config, "checkpoint", None), "interval", 0)
        return bool(interval) and self.state.step % interval == 0

    def _forward_backward(self, micro: list[Any]) -> torch.Tensor:
        model, accum = self.model, len(micro)
        loss_sum = torch.zeros((), device=self.device)
        for i, batch in enumerate(micro):
            batch = move_to_device(batch, self.device)
            samples, tokens = batch_size_and_tokens(batch)
            sync = contextlib.nullcontext()
            if isinstance(model, DistributedDataParallel) and i < accum - 1:
                sync = model.no_sync()  # gradients all-reduce once, on the last micro-batch
            with sync:
                with self._autocast():
                    loss, metrics = self.task.train_step(batch, model, self.criterion)
                    aux = self._collect_aux_loss(self.unwrapped_model)
                    total = loss + aux if aux is not None else loss
                scaled = total / accum
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            extra = {"loss": loss} if aux is None else {"loss": loss, "aux_loss": aux}
            self._meter.add({**metrics, **extra}, weight=1.0 / accum)
            loss_sum = loss_sum + total.detach().float()
            self.data_module.advance(1)
            self.state.samples_seen += samples * self.world_size
            self.state.tokens_seen += tokens * self.world_size
            self._window["samples"] += samples
            self._window["tokens"] += tokens
        return loss_sum

    def _clip_gradients(self) -> torch.Tensor | None:
        clip = self.config.training.grad_clip
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        params = [p for p in self.unwrapped_model.parameters() if p.grad is not None]
        if not params:
            return None
        return clip_grad_norm(params, clip if clip > 0 else math.inf)  # FSDP's DTensor grads too

    # -- non-finite losses ----------------------------------------------------------------------
    def _setup_finite_check(self) -> None:
        """Choose how `nan_policy` is applied.

        Deferred, with no host sync per step: the `raise` policy with an optimizer that can refuse an update on
        the device (fused Adam/AdamW/SGD/Adagrad, through the `found_inf` input GradScaler uses; the optimizer
        registry builds fused ones where it can). Otherwise one bool per step goes to the host (`_check_finite`):
        the `skip` policy needs the verdict on the host every step (skip counts, the lr schedule holds on skipped
        steps, a warning per step), a non-fused optimizer cannot skip on the device, and FSDP's DTensor
        parameters are kept on the proven path.
        """
        self._deferred_finite = (
            self.scaler is None
            and self.config.training.nan_policy == "raise"
            and bool(getattr(self.optimizer, "_step_supports_amp_scaling", False))
            and not is_fsdp(self.unwrapped_model)
        )
        self._first_bad_step = torch.zeros((), dtype=torch.long, device=self.device)

    def _step_unless_nonfinite(self, loss: torch.Tensor, grad_norm: torch.Tensor | None) -> None:
        """The `raise` policy without a host sync: from the first non-finite step on, the optimizer skips every
        update on the device; that step's number stays on the device until `_raise_deferred_nonfinite` reads it.

        Trade-off: a failure is raised up to `log_interval` steps late (those steps' compute is wasted, their
        updates refused) instead of stalling the device queue with a device-to-host copy every step. Weights and
        optimizer state stay those from before the bad step, and every log step, checkpoint, validation and the
        final save check first, so the outcome is the eager check's: no non-finite update applied, its step named.
        """
        finite = torch.isfinite(loss) if grad_norm is None else torch.isfinite(loss) & torch.isfinite(grad_norm)
        if is_distributed():
            finite = all_reduce_sum((~finite).float()) == 0  # every rank refuses alike (a collective, no sync)
        first = self._first_bad_step
        self._first_bad_step = torch.where(finite | (first > 0), first, self.state.step + 1)
        self.optimizer.found_inf = (self._first_bad_step > 0).float()  # read by the fused step, as from GradScaler
        try:
            self.optimizer.step()
        finally:
            del self.optimizer.found_inf

    def _raise_deferred_nonfinite(self) -> None:
        """The deferred check's one host sync: raise if any step since the last check was non-finite."""
        if not self._deferred_finite or self._first_bad_step is None:
            return
        bad = int(self._first_bad_step)
        if bad:
            step = self.state.step
            later = f" (nor those of steps {bad + 1}-{step}, run before the check)" if step > bad else ""
            raise NonFiniteLossError(
                f"training.nan_policy=raise: non-finite loss or gradient norm at step {bad}; the update was not "
                f"applied{later} (use --training-nan-policy skip to drop such steps)"
            )

    def _check_finite(self, loss: torch.Tensor, grad_norm: torch.Tensor | None) -> bool:
        """Apply `nan_policy`; every rank reaches the same verdict. Returns False to skip the update."""
        if self.scaler is not None:
            return True  # fp16: the GradScaler skips non-finite steps itself
        finite = torch.isfinite(loss) if grad_norm is None else torch.isfinite(loss) & torch.isfinite(grad_norm)
        ok = all_agree(bool(finite), self.device)
        if ok:
            self.state.consecutive_skips = 0
            return True
        step, cfg = self.state.step + 1, self.config.training
        if cfg.nan_policy == "raise":
            raise NonFiniteLossError(
                f"training.nan_policy=raise: non-finite loss or gradient norm at step {step}; "
                "the update was not applied (use --training-nan-policy skip to drop such steps)"
            )
        self.state.skipped_steps += 1
        self.state.consecutive_skips += 1
        self.logger.warning("step %d: non-finite loss or gradient norm; update skipped", step)
        if self.state.consecutive_skips >= cfg.max_skipped_steps:
            raise NonFiniteLossError(
                f"training.max_skipped_steps: {self.state.consecutive_skips} consecutive non-finite steps "
                f"(last at step {step}); stopping"
            )
        return False

    def _autocast(self) -> contextlib.AbstractContextManager:
        precision = self.config.training.precision
        if precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=_DTYPES[precision])

    def _collect_train_logs(self) -> dict[str, Any]:
        """The log step: one host sync and one collective for every metric of the window."""
        values = self._meter.compute(self.device, reduce=True)
        self._meter.reset()
        elapsed = max(time.perf_counter() - self._window_start, 1e-9)
        logs: dict[str, Any] = {f"train/{k}": v for k, v in values.items()}
        logs["lr"] = self.lr
        logs["train/samples_per_s"] = self._window["samples"] * self.world_size / elapsed
        if self._window["tokens"]:
            logs["train/tokens_per_s"] = self._window["tokens"] * self.world_size / elapsed
        logs["train/skipped_steps"] = self.state.skipped_steps
        self._window_start, self._window = time.perf_counter(), {"samples": 0, "tokens": 0}
        return logs

    # -- validation -----------------------------------------------------------------------------
    def validate(self) -> dict[str, Any]:
        """Average `validation_step` metrics over this rank's shard, weighted by batch size, across ranks."""
        self._raise_deferred_nonfinite()
        loader = self.data_module.val_dataloader()
        self.state.last_val_step = self.state.step
        if loader is None:
            return {}
        self.callbacks.on_validation_start({"step": self.state.step, "epoch": self.state.epoch})
        model, meter, limit = self.unwrapped_model, MetricAccumulator(), self.config.training.val_max_batches
        model.eval()
        batches = islice(loader, limit or None)
        # An FSDP forward is a collective: a rank with fewer batches runs throw-away forwards (real=False).
        paired = lockstep_batches(batches, self.device) if is_fsdp(model) else ((b, True) for b in batches)
        with torch.no_grad(), self._autocast():
            for batch, real in paired:
                batch = move_to_device(batch, self.device)
                loss, metrics = self.task.validation_step(batch, model, self.criterion)
                if real:
                    meter.add({**metrics, "loss": loss}, weight=batch_size_and_tokens(batch)[0])
        model.train()
        values = meter.compute(self.device, reduce=True, agree_keys=True)
        logs = {"step": self.state.step, "epoch": self.state.epoch, **{f"val/{k}": v for k, v in values.items()}}
        self.last_val_logs = {k: v for k, v in logs.items() if k.startswith("val/")}
        self.callbacks.on_validation_end(logs)
        return logs

    # -- state ----------------------------------------------------------------------------------
    def _save_final(self) -> None:
        from .checkpoint import save_weights

        self._raise_deferred_nonfinite()
        path = self.run_dir / "model.safetensors"
        if is_fsdp(self.unwrapped_model):
            save_full_weights(self.unwrapped_model, path)  # a collective: every rank's shards, gathered on rank 0
        elif self.is_global_zero:
            save_weights(self.unwrapped_model, path)
        if self.is_global_zero:
            self.logger.info("saved final weights to %s", path)
        barrier()

    def state_dict(self) -> dict[str, Any]:
        """Everything but the weights needed to continue exactly (per rank)."""
        from .checkpoint import rng_state

        self._raise_deferred_nonfinite()  # a checkpoint must not hold a run that has refused updates
        return {
            "state": asdict(self.state),
            "optimizer": self.optimizer.state_dict(),
            "lr_schedule": self.lr_schedule.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "data": self.data_module.state_dict(),
            "callbacks": self.callbacks.state_dict(),
            "rng": rng_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from .checkpoint import set_rng_state

        self.state = TrainState(**state["state"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_schedule.load_state_dict(state["lr_schedule"])
        if self.scaler is not None and state.get("scaler") is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.data_module.load_state_dict(state["data"])
        self.callbacks.load_state_dict(state["callbacks"])
        set_rng_state(state["rng"])
