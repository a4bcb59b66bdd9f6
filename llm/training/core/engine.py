"""`TrainingEngine`: turns a task, a data module and callbacks into a training run.

The step loop (`_fit`, `_train_epoch`, `_optimizer_step`) is deliberately short; everything else is a helper
with one job. The engine owns what a run cannot do without: the model wrapping (device, the parallel plan, compile,
precision), the optimizer step (accumulation, clipping, non-finite policy), the learning-rate schedule (stepped
per optimizer step or per epoch, plateau after validation), checkpoints, resume and signals (`Checkpointer`),
and the metrics channel (`log`, fanned out to the sinks of sinks.py once per step). Tasks own what a batch
means; callbacks observe and add behaviour, and no callback list or order can remove a service.

Collaborators never hold the engine: callbacks, sinks and the task see the run through its `RunContext`
(`self.context`); the checkpointer gets that context, the `StatefulComponents` of the trainer state (state.py)
and a weights strategy (weights.py).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import time
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from llm.artifacts.checkpoint import CheckpointError, rng_state, set_rng_state, step_dir_name
from llm.artifacts.runs import load_init_from
from llm.errors import UserError
from llm.fs import atomic_write, is_write_error, write_failure
from llm.models import hooks
from llm.models.recompute import parse_mode
from llm.training.checkpointer import Checkpointer, ModelCheckpoint
from llm.training.core.callbacks import build_callbacks
from llm.training.core.config import CheckpointConfig
from llm.training.observers.context import RunContext
from llm.training.observers.hooks import Callback, CallbackList
from llm.training.observers.metrics import MetricAccumulator
from llm.training.observers.profiler import requested_profiler
from llm.training.observers.run_summary import announce_run
from llm.training.observers.sinks import MetricSink, build_sinks, close_quietly
from llm.training.observers.val_progress import validation_progress
from llm.training.optim.nonfinite import NonFiniteGuard, NonFiniteLossError  # noqa: F401  (NonFiniteLossError: re-exported)
from llm.training.optim.precision import autocast, prepare_for_precision
from llm.training.optim.schedulers import LRSchedule
from llm.training.optim.spike import SpikeRecovery
from llm.training.parallel.distributed import all_agree, all_reduce_sum, barrier, resolve_device
from llm.training.parallel.plan import ParallelPlan
from llm.training.state import StateFns, StatefulComponents, TrainState
from llm.training.weights import build_weights


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


def is_metric(key: str) -> bool:
    """Keys of a step's logs that are metrics (published), as opposed to bookkeeping (step, epoch, skipped)."""
    return "/" in key or key == "lr"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def checkpoint_options(config: Any, callbacks: list[Callback]) -> CheckpointConfig:
    """`config.checkpoint`, with the options of a `ModelCheckpoint` in the callback list applied."""
    listed = next((cb for cb in callbacks if isinstance(cb, ModelCheckpoint)), None)
    return listed.resolve(config.checkpoint) if listed is not None else config.checkpoint


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
        callbacks = list(callbacks) if callbacks is not None else build_callbacks(config)
        callbacks += requested_profiler(config)  # training.profile_steps, whatever the callback list
        self.callbacks = CallbackList(callbacks)
        self.sinks: list[MetricSink] = build_sinks(config, callbacks) if self.is_global_zero else []
        self.run_dir = Path(config.logging.log_dir or ".")
        self.state = TrainState()
        # What callbacks, sinks, the task and the checkpointer see of the run; it holds the run length and the
        # `should_stop` control field (engine.total_steps, engine.should_stop read and write it).
        self.context = RunContext(config, rank=rank, world_size=world_size, device=self.device, run_dir=self.run_dir,
                                  state=self.state, log=self.log, logger=self.logger)
        self._checkpoint_options = checkpoint_options(config, callbacks)
        self.components = StatefulComponents()  # the trainer state's parts, registered in set-up
        self.checkpointer: Checkpointer | None = None  # built in set-up, with the model it saves
        self.model: nn.Module | None = None
        self.unwrapped_model: nn.Module | None = None
        self.plan = ParallelPlan.from_config(config, rank, world_size, self.device)  # applied to the model in setup
        self.optimizer: torch.optim.Optimizer | None = None
        self.lr_schedule: LRSchedule | None = None
        self.criterion: Any = None
        self.scaler: torch.amp.GradScaler | None = None
        self.last_val_logs: dict[str, Any] = {}
        self._meter = MetricAccumulator()
        self.finite: NonFiniteGuard | None = None  # the nan_policy, set up with the optimizer
        self._window_start = time.perf_counter()
        self._window = {"samples": 0, "tokens": 0}
        self._record: dict[str, Any] = {}  # the metrics channel's record of the current step (rank 0)
        self._sinks_open = False  # between the start and the end of `run`

    # -- properties -----------------------------------------------------------------------------
    @property
    def is_global_zero(self) -> bool:
        return self.rank == 0

    @property
    def should_stop(self) -> bool:
        """The control field: set (by a callback through the context, or a signal) to end the run after this step."""
        return self.context.should_stop

    @should_stop.setter
    def should_stop(self, value: bool) -> None:
        self.context.should_stop = value

    @property
    def total_steps(self) -> int:
        return self.context.total_steps

    @total_steps.setter
    def total_steps(self, value: int) -> None:
        self.context.total_steps = value

    @property
    def steps_per_epoch(self) -> int:
        return self.context.steps_per_epoch

    @steps_per_epoch.setter
    def steps_per_epoch(self, value: int) -> None:
        self.context.steps_per_epoch = value

    def find_callback(self, key: str | type) -> Callback | None:
        return self.callbacks.find(key)

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"]) if self.optimizer else 0.0

    # -- set-up ---------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.config.training
        seed_everything(self.config.seed + self.rank)
        self.task.context = self.context  # tasks publish through it and read the run length from it
        self._setup_data()
        model = self.task.adapt_model(self.task.build_model()).to(self.device)  # LoRA adapters when configured
        if getattr(getattr(self.config, "model", None), "init_from", ""):  # fresh run state; a resume replaces them
            load_init_from(model, self.config.model.init_from)
        recompute_mode = parse_mode(cfg.activation_checkpointing)  # a mode; the old switch's booleans too
        if recompute_mode != "none":
            self._enable_activation_checkpointing(model, recompute_mode)
        model = prepare_for_precision(model, cfg.precision)  # fp8: torchao's float8 linears, before the plan
        self.unwrapped_model = model
        # The parallel layout (parallel/plan.py) may convert the module in place (sharded weights), so the
        # optimizer is built on `unwrapped_model` after it.
        model = self.plan.apply(model)
        if cfg.compile:
            model = torch.compile(model, backend=compile_backend())
        self.model = model
        self.optimizer = self.task.build_optimizer(self.unwrapped_model)
        self._plan_steps()
        scheduler = self.task.build_scheduler(self.optimizer)
        if scheduler is None and cfg.scheduler_type not in ("constant", "none"):
            # A task's own build_scheduler may not know every registered name (the original guide's else-branch).
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
        self.finite = NonFiniteGuard(
            self.optimizer, self.scaler, self.state, nan_policy=cfg.nan_policy, max_skipped_steps=cfg.max_skipped_steps,
            sharded=self.plan.sharded, device=self.device, logger=self.logger,
        )
        self._setup_services()

    def _setup_services(self) -> None:
        """Fill in the run context, then build the checkpointer and the trainer state it saves."""
        ctx = self.context
        ctx.model, ctx.data_module, ctx.lr_schedule = self.unwrapped_model, self.data_module, self.lr_schedule
        ctx.forward_is_collective = self.plan.lockstep
        weights = build_weights(self.unwrapped_model, self.optimizer, self.is_global_zero, self.plan.sharded,
                                self.plan.full_weights)
        self.checkpointer = Checkpointer(self._checkpoint_options, ctx, self.components, weights, self.callbacks,
                                         before_save=self._raise_pending)
        self.spike = SpikeRecovery(self.config.training, ctx, self.checkpointer, self.finite)  # spike_policy
        self._register_state()
        self.callbacks.set_engine(ctx)

    def _register_state(self) -> None:
        """The trainer state's components, in the order they are saved and restored."""
        c = self.components
        c.register("state", self.state)
        c.register("optimizer", StateFns(self._optimizer_state, self._load_optimizer_state))
        if self.spike.enabled:  # before the schedule: it sets the peaks the schedule's restore applies
            c.register("spike", self.spike)
        c.register("lr_schedule", self.lr_schedule)
        c.register("scaler", self.scaler)
        c.register("data", self.data_module)
        c.register("callbacks", self.callbacks)
        # The metrics of the steps since the last log line, so the first log after a resume averages the same steps
        # as an uninterrupted run would.
        c.register("meter", StateFns(self._meter.state_dict, lambda s: self._meter.load_state_dict(s, self.device)))
        c.register("checkpointer", self.checkpointer)
        c.register("rng", StateFns(rng_state, set_rng_state))

    def full_weights(self, load: bool = False) -> contextlib.AbstractContextManager:
        """A block in which the model holds all its weights (the plan gathers what its layout split; a collective):
        around every write or read of whole-model weights; with `load`, each rank keeps its share of what loads."""
        return self.plan.full_weights(load)

    def _setup_data(self) -> None:
        dm = self.data_module
        # The data-parallel coordinates: the ranks of a tensor-parallel group read the same batch (parallel/plan.py).
        dm.rank, dm.world_size = self.plan.data_rank, self.plan.data_parallel
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
                f"training.batch_size: {cfg.batch_size} x grad_accum_steps {cfg.grad_accum_steps} x data-parallel "
                f"degree {self.plan.data_parallel} is more than the {batches} training batches available per epoch"
            )
        by_epochs = self.steps_per_epoch * cfg.epochs if self.steps_per_epoch else 0
        self.total_steps = min(s for s in (cfg.max_steps, by_epochs) if s) if (cfg.max_steps or by_epochs) else 0
        if not self.total_steps:
            raise UserError("training.max_steps: the data loader has no length; set --training-max-steps")

    def _enable_activation_checkpointing(self, model: nn.Module, mode: str) -> None:
        flagged = [m for m in model.modules() if hasattr(m, "activation_checkpointing")]
        if not flagged:
            raise UserError("training.activation_checkpointing: this task's model has no checkpointable blocks")
        for module in flagged:
            module.activation_checkpointing = mode

    # -- the run --------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Set up (unless `setup` was called already), resume, train, validate, save; returns the last validation
        logs."""
        if self.checkpointer is None:
            self.setup()
        try:
            resumed = self.checkpointer.maybe_resume()
            idle = self._nothing_to_train() if resumed is not None else None
            if idle is not None:  # a finished run: say why, write nothing (no re-save, config.yaml unchanged)
                if self.is_global_zero:
                    self.logger.warning("%s", idle)
                self.checkpointer.abort()
                return self.last_val_logs
            if getattr(self.config.training, "eval_only", False):  # validate the weights once; save nothing
                self._open_sinks()
                self.validate()
                self.checkpointer.abort()
                return self.last_val_logs
            self._write_run_config()  # only now: a refused resume leaves the run's config.yaml as it was
            self._open_sinks()
            announce_run(self.context)
            self.checkpointer.start()
            self.callbacks.on_train_start({"step": self.state.step, "total_steps": self.total_steps})
            self.spike.run(self._fit)  # _fit, run again from a checkpoint after a loss spike (spike_policy)
            self._flush()  # the last step's record, before the final saves report
            self._save_final()
            self.callbacks.on_train_end({"step": self.state.step, **self.last_val_logs})
        except BaseException as exc:
            self.callbacks.on_exception({"step": self.state.step, "exception": exc})
            self.checkpointer.abort()
            raise
        finally:
            self._flush()
            close_quietly(self.sinks)
            self._sinks_open = False
        return self.last_val_logs

    def _open_sinks(self) -> None:
        for sink in self.sinks:
            with self._sink_errors(sink):
                sink.open(self.context)
        self._sinks_open = True

    def _done(self) -> bool:
        return self.should_stop or self.state.step >= self.total_steps or self._epochs_done()

    def _epochs_done(self) -> bool:
        """The epoch limit, which a resume on another world size (its epochs have another number of steps) or on
        other data can reach before `total_steps`."""
        return bool(self.steps_per_epoch) and self.state.epoch >= self.config.training.epochs

    def _nothing_to_train(self) -> str | None:
        """Why a resumed run has no step left to take (None: it has)."""
        cfg, step = self.config.training, self.state.step
        if step >= self.total_steps:
            limit = (f"training.max_steps={cfg.max_steps}" if cfg.max_steps == self.total_steps else
                     f"training.epochs={cfg.epochs} ({self.steps_per_epoch} steps per epoch)")
            flag = "--training-max-steps" if limit.startswith("training.max_steps") else "--training-epochs"
        elif self._epochs_done():
            limit, flag = f"training.epochs={cfg.epochs} (epoch {self.state.epoch} is done)", "--training-epochs"
        else:
            return None
        # model.init_from takes decoder language models only (runs.read_init_source).
        fresh = "" if self.task.model_kind == "encoder" else (
            f", or start a new run from its weights, with a fresh optimizer and schedule, in another --logging-log-dir "
            f"with --model-init-from {self.run_dir}")
        return (f"nothing to train: the checkpoint is at step {step} and {limit} ends the run there; nothing was "
                f"written (raise {flag} to train further{fresh})")

    def _write_run_config(self) -> None:
        """`RUN_DIR/config.yaml`, the resolved config of this run (atomically: a reader never sees half of it), and
        the data module's tokenizer (`save_tokenizer`), so the run directory decodes its ids after the source file
        or the token cache is gone."""
        if not self.is_global_zero:
            return
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write(self.run_dir / "config.yaml", self.config.to_yaml())  # via config.yaml.tmp
        except OSError as exc:
            raise UserError(f"logging: {write_failure(exc, self.run_dir / 'config.yaml')}") from None
        save_tokenizer = getattr(self.data_module, "save_tokenizer", None)
        if save_tokenizer is not None:
            try:
                save_tokenizer(self.run_dir)
            except OSError as exc:
                raise UserError(f"logging: {write_failure(exc, self.run_dir / 'tokenizer.json')}") from None

    def _fit(self) -> None:
        while not self._done():
            self.data_module.set_epoch(self.state.epoch)
            self.callbacks.on_epoch_start({"epoch": self.state.epoch, "step": self.state.step})
            if not self._train_epoch():
                break  # stopped mid-epoch: no epoch-end events for a partial epoch
            if self.state.last_val_step != self.state.step:
                self.validate()
            self.lr_schedule.step_epoch()
            self.callbacks.on_epoch_end({"epoch": self.state.epoch, "step": self.state.step, **self.last_val_logs})
            self._flush()
            self.state.epoch += 1
        # The run ends with a validation of its final weights, unless a job manager asked it to stop: its grace
        # period is for the checkpoint (already written), and the resumed run validates where it ends.
        if self.state.last_val_step != self.state.step and not self.checkpointer.stop_agreed():
            self.validate()

    def _train_epoch(self) -> bool:
        """Train until the epoch's data runs out (True) or the run must stop (False)."""
        accum, val_every = self.config.training.grad_accum_steps, self.config.training.val_interval
        batches: Iterator[Any] = iter(self.data_module.train_dataloader())
        while not self._done():
            self.spike.before_step(batches)  # skips the data a spike rollback set aside
            micro = list(islice(batches, accum))
            if len(micro) < accum:
                return True
            self.checkpointer.before_step()  # a save that fell due at the last boundary, resume's RNG
            self.callbacks.on_batch_start({"step": self.state.step, "epoch": self.state.epoch})
            logs = self._optimizer_step(micro)
            if not logs["skipped"]:
                self.lr_schedule.step_batch()  # the schedule holds on refused updates
            self.callbacks.on_batch_end(logs)
            self._publish(logs)
            self.checkpointer.after_step()  # a signal saves and stops here; an interval save falls due
            if self._done():
                return False  # the run's final validation and end join this step's record
            if val_every and self.state.step % val_every == 0:
                self.validate()
            self._flush()  # the step's one record: its train metrics, its validation, what callbacks logged
        return False

    def _optimizer_step(self, micro: list[Any]) -> dict[str, Any]:
        """Forward/backward over the micro-batches, then clip, check and step the optimizer."""
        hooks.begin_step(self.unwrapped_model)  # the model's per-step statistics span the step's micro-batches
        loss_sum = self._forward_backward(micro)
        self.plan.finish_gradients()
        grad_norm = self._clip_gradients()
        self.spike.observe(loss_sum, grad_norm)  # on the device; checked where the host reads anyway
        skipped = not self.finite.step(loss_sum, grad_norm)  # the optimizer step, unless nan_policy refuses it
        hooks.end_step(self.unwrapped_model, applied=not skipped)
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        logs: dict[str, Any] = {"step": self.state.step, "epoch": self.state.epoch, "skipped": skipped}
        if grad_norm is not None:
            self._meter.add({"grad_norm": grad_norm}, weight=1.0, count=False)
        log_now = self.state.step % self.config.training.log_interval == 0 or self._done()
        if log_now or self._checkpoint_due():
            self._raise_pending()  # no log line or checkpoint may follow a refused update or a spike unnoticed
        if log_now:
            logs.update(self._collect_train_logs())
        return logs

    def _raise_pending(self) -> None:
        """The lazy checks' host reads, before a log line or a save: a loss spike (rolled back), a refused update."""
        self.spike.check()
        self.finite.raise_pending()

    def _checkpoint_due(self) -> bool:
        interval = self.checkpointer.options.interval
        return bool(interval) and self.state.step % interval == 0

    def _forward_backward(self, micro: list[Any]) -> torch.Tensor:
        model, accum, unwrapped = self.model, len(micro), self.unwrapped_model
        loss_sum = torch.zeros((), device=self.device)
        for i, batch in enumerate(micro):
            batch = move_to_device(batch, self.device)
            samples, tokens = batch_size_and_tokens(batch)
            with self.plan.no_sync(model, last=i == accum - 1):  # gradients are reduced on the last micro-batch
                with autocast(self.config.training.precision, self.device):
                    loss, metrics = self.task.train_step(batch, model, self.criterion)
                    aux = hooks.aux_loss(unwrapped)  # the model's own objective terms (its hooks)
                    total = loss + aux if aux is not None else loss
                scaled = total / accum
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            extra = {"loss": loss} if aux is None else {"loss": loss, "aux_loss": aux,
                                                         **hooks.step_metrics(unwrapped)}
            self._meter.add({**metrics, **extra}, weight=1.0 / accum)
            loss_sum = loss_sum + total.detach().float()
            self.data_module.advance(1)
            self.state.samples_seen += samples * self.plan.data_parallel  # a tensor-parallel group's batch once
            self.state.tokens_seen += tokens * self.plan.data_parallel
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
        return self.plan.clip_grad_norm(params, clip if clip > 0 else math.inf)  # the norm spans the layout

    def _collect_train_logs(self) -> dict[str, Any]:
        """The log step: one host sync and one collective for every metric of the window."""
        values = self.task.reduce_metrics(self._meter.compute(self.device, reduce=True), "train")
        self._meter.reset()
        elapsed = max(time.perf_counter() - self._window_start, 1e-9)
        logs: dict[str, Any] = {f"train/{k}": v for k, v in values.items()}
        logs["lr"] = self.lr
        logs["train/samples_per_s"] = self._window["samples"] * self.plan.data_parallel / elapsed
        if self._window["tokens"]:
            logs["train/tokens_per_s"] = self._window["tokens"] * self.plan.data_parallel / elapsed
        logs["train/skipped_steps"] = self.state.skipped_steps
        logs.update(hooks.window_metrics(self.unwrapped_model, all_reduce_sum))  # summed over the ranks
        self._window_start, self._window = time.perf_counter(), {"samples": 0, "tokens": 0}
        return logs

    # -- validation -----------------------------------------------------------------------------
    def validate(self) -> dict[str, Any]:
        """Average `validation_step` metrics over this rank's shard, weighted by batch size, across ranks."""
        self._raise_pending()
        self.data_module.val_max_batches = self.config.training.val_max_batches  # global, for make_loader's loaders
        loader = self.data_module.val_dataloader()
        self.state.last_val_step = self.state.step
        if loader is None:
            return {}
        self.callbacks.on_validation_start({"step": self.state.step, "epoch": self.state.epoch})
        model, meter, limit = self.unwrapped_model, MetricAccumulator(), self.config.training.val_max_batches
        model.eval()
        batches = islice(loader, limit or None)
        batches = validation_progress(batches, loader=loader, limit=limit, step=self.state.step, logger=self.logger,
                                      show=self.is_global_zero)  # a line every 30 s in a long one
        # Where the layout makes a forward a collective, a rank with fewer batches runs throw-away forwards
        # (real=False).
        paired = self.plan.lockstep_batches(batches)
        with torch.no_grad(), autocast(self.config.training.precision, self.device):
            for batch, real in paired:
                batch = move_to_device(batch, self.device)
                loss, metrics = self.task.validation_step(batch, model, self.criterion)
                if real:
                    meter.add({**metrics, "loss": loss}, weight=batch_size_and_tokens(batch)[0])
        model.train()
        values = self.task.reduce_metrics(meter.compute(self.device, reduce=True, agree_keys=True), "val")
        logs = {"step": self.state.step, "epoch": self.state.epoch, **{f"val/{k}": v for k, v in values.items()}}
        self.last_val_logs = {k: v for k, v in logs.items() if k.startswith("val/")}
        self.lr_schedule.step_validation(logs)  # plateau schedules
        self.callbacks.on_validation_end(logs)
        self.checkpointer.after_validation(logs)
        self._publish(logs)
        return logs

    # -- the metrics channel --------------------------------------------------------------------
    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        """Publish `metrics` for `step` (default: the current step) to every logger sink, once.

        Everything logged for a step (the engine's own train or validation metrics, and what callbacks and the
        task log meanwhile) becomes one record, written when the step's events are over. Values are numbers,
        strings or lists of `{"text": ...}` (text); tensors are read to the host here. Values must already be
        the same on every rank (reduced): any rank may call this, and rank 0 writes.
        """
        if not self.is_global_zero:
            return
        step = self.state.step if step is None else int(step)
        if self._record and self._record["step"] != step:
            self._flush()
        self._record.setdefault("step", step)
        for key, value in metrics.items():
            self._record[key] = value.item() if isinstance(value, torch.Tensor) else value

    def _publish(self, logs: dict[str, Any]) -> None:
        """Add the engine's own metrics of a step (or a validation) to the step's record."""
        self.log({k: v for k, v in logs.items() if is_metric(k)}, logs.get("step"))

    def _flush(self) -> None:
        """Write the step's record to every sink (called once the step's events are over)."""
        record, self._record = self._record, {}
        if len(record) > 1 and self._sinks_open:  # more than the step number, and a run to write it
            for sink in self.sinks:
                with self._sink_errors(sink):
                    sink.write(record)

    @contextlib.contextmanager
    def _sink_errors(self, sink: MetricSink) -> Iterator[None]:
        """A logger that cannot write (disk full, permissions) stops the run with one line naming what it writes."""
        try:
            yield
        except OSError as exc:
            where = sink.target(self.run_dir)
            raise UserError(f"logging: {type(sink).__name__}: {write_failure(exc, where)}") from None

    # -- state ----------------------------------------------------------------------------------
    def _save_final(self) -> None:
        """The resumable checkpoint first (it must survive a failure of what follows), then the final weights."""

        self.finite.raise_pending()
        self.checkpointer.finish()
        path = self.run_dir / "model.safetensors"
        error: Exception | None = None
        try:
            # The step is recorded in the file, so a reader can tell it from a newer checkpoint of a resumed run.
            self.checkpointer.weights.save_final(path, self.state.step)  # a collective; LoRA merged
        except Exception as exc:  # noqa: BLE001  (a failed write, in whatever type its writer reports it)
            if not is_write_error(exc):
                raise
            error = exc
            path.with_name(path.name + ".tmp").unlink(missing_ok=True)  # the writers' temp file
        if not all_agree(error is None, self.device):  # every rank fails alike, none waits for the others
            what = write_failure(error, path) if error is not None else f"another rank failed to write {path}"
            saved = self.checkpointer.root / step_dir_name(self.state.step)  # finish() saved this step
            raise CheckpointError(f"final weights: {what}; the checkpoint {saved} is complete (resume or export "
                                  "from it)")
        if self.is_global_zero:
            self.logger.info("saved final weights to %s", path)
        barrier()

    def state_dict(self) -> dict[str, Any]:
        """Everything but the weights needed to continue exactly (per rank): the states of `self.components`."""
        self.finite.raise_pending()  # a checkpoint must not hold a run that has refused updates
        return self.components.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.components.load_state_dict(state)

    def _optimizer_state(self) -> dict[str, Any]:
        # In the layout-independent form (a collective where the layout splits it): resumable on any layout.
        return self.plan.optimizer_state_dict(self.optimizer)

    def _load_optimizer_state(self, optimizer_state: dict[str, Any]) -> None:
        self.plan.load_optimizer_state_dict(self.optimizer, optimizer_state)
