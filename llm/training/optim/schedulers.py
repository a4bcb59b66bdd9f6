"""Learning-rate schedulers: a registry of the built-ins and `LRSchedule`, which composes linear
warmup with any of them (including one a task builds itself, as in the guide's recipe 1).

A registered scheduler is `fn(optimizer, cfg: TrainingConfig, total: int) -> LRScheduler | None`,
where `total` is the number of scheduler intervals (optimizer steps, or epochs) after warmup.
The closed-form schedules are `LambdaLR`s, so their value at any step does not depend on the
history of stepping (which keeps resume exact).

On resume (`LRSchedule.load_state_dict`) the schedule keeps its saved *position* but takes its *shape* from the
run's config: a new `training.lr` becomes the peak the schedule scales, and a new horizon (`max_steps`, `epochs`)
replaces the one a closed-form schedule was built for, so a longer run continues along the new curve instead of
sitting at the old curve's end (lr 0 for a cosine to 0).
"""

from __future__ import annotations

import math
from typing import Any

from torch.optim import Optimizer
from torch.optim.lr_scheduler import ExponentialLR, LambdaLR, LRScheduler, ReduceLROnPlateau, StepLR

from llm.errors import ConfigError, did_you_mean
from llm.registry import SCHEDULERS, register_scheduler

__all__ = ["DECAY_SHAPES", "SCHEDULERS", "LRSchedule", "build_scheduler"]


class _Horizon:
    """A closed-form lr factor whose shape depends on the run's length (`total`): rebuilt, not restored, on resume."""

    total: int


class _Cosine(_Horizon):
    """Picklable cosine factor from 1 to `floor` over `total` steps."""

    def __init__(self, total: int, floor: float) -> None:
        self.total, self.floor = max(1, total), floor

    def __call__(self, step: int) -> float:
        progress = min(step, self.total) / self.total
        return self.floor + (1 - self.floor) * 0.5 * (1 + math.cos(math.pi * progress))


class _Linear(_Horizon):
    def __init__(self, total: int, floor: float) -> None:
        self.total, self.floor = max(1, total), floor

    def __call__(self, step: int) -> float:
        return self.floor + (1 - self.floor) * max(0.0, 1 - step / self.total)


# How a WSD schedule's decay falls from the peak to its floor: progress p in [0, 1] -> the share of (peak - floor)
# left. 1-sqrt falls faster at first and spends longer near the floor (Hägele et al., 2024, "Scaling Laws and
# Compute-Optimal Training Beyond Fixed Training Durations").
DECAY_SHAPES: dict[str, Any] = {
    "linear": lambda p: 1 - p,
    "sqrt": lambda p: 1 - math.sqrt(p),
}


class _WarmupStableDecay(_Horizon):
    """Hold the peak, then decay to `floor` over the last `fraction` of the run, in `shape` (`DECAY_SHAPES`).
    With `training.warmup` before it this is the trapezoid: warmup, stable, decay."""

    def __init__(self, total: int, floor: float, fraction: float, shape: str = "linear") -> None:
        self.total, self.floor = max(1, total), floor
        self.decay = max(1, round(self.total * fraction))
        if shape != "linear":  # recorded only when set, so a linear schedule's saved state is what it always was
            self.shape = shape

    def __call__(self, step: int) -> float:
        into_decay = step - (self.total - self.decay)
        if into_decay <= 0:
            return 1.0
        progress = min(1.0, into_decay / self.decay)
        return self.floor + (1 - self.floor) * DECAY_SHAPES[getattr(self, "shape", "linear")](progress)


@register_scheduler("cosine")
def _cosine(opt: Optimizer, cfg: Any, total: int) -> LRScheduler:
    return LambdaLR(opt, _Cosine(total, cfg.min_lr_ratio))


@register_scheduler("linear")
def _linear(opt: Optimizer, cfg: Any, total: int) -> LRScheduler:
    return LambdaLR(opt, _Linear(total, cfg.min_lr_ratio))


@register_scheduler("wsd")
def _wsd(opt: Optimizer, cfg: Any, total: int) -> LRScheduler:
    return LambdaLR(opt, _WarmupStableDecay(total, cfg.min_lr_ratio, cfg.decay_fraction,
                                            getattr(cfg, "decay_shape", "linear")))


@register_scheduler("constant")
def _constant(opt: Optimizer, cfg: Any, total: int) -> None:
    return None


@register_scheduler("step")
def _step(opt: Optimizer, cfg: Any, total: int) -> LRScheduler:
    return StepLR(opt, step_size=cfg.step_size, gamma=cfg.gamma)


@register_scheduler("exponential")
def _exponential(opt: Optimizer, cfg: Any, total: int) -> LRScheduler:
    return ExponentialLR(opt, gamma=cfg.gamma)


@register_scheduler("plateau")
def _plateau(opt: Optimizer, cfg: Any, total: int) -> ReduceLROnPlateau:
    mode = "max" if any(k in cfg.plateau_monitor for k in ("acc", "accuracy")) else "min"
    return ReduceLROnPlateau(opt, mode=mode, factor=cfg.plateau_factor, patience=cfg.plateau_patience)


def build_scheduler(optimizer: Optimizer, cfg: Any, total: int) -> Any:
    """The registered scheduler `cfg.scheduler_type` ('none' means a constant lr)."""
    if cfg.scheduler_type == "none":
        return None
    return SCHEDULERS.get(cfg.scheduler_type)(optimizer, cfg, total)


class LRSchedule:
    """Linear warmup for `warmup` optimizer steps, then `scheduler` stepped per step or per epoch.

    The inner scheduler is not stepped during warmup; warmup scales the lr it starts from, and at
    the hand-over that lr is restored, so chained (recursive) torch schedulers stay correct.
    `ReduceLROnPlateau` steps on validation with the monitored metric instead.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        scheduler: Any,
        *,
        warmup: int = 0,
        interval: str = "step",
        monitor: str = "val/loss",
    ) -> None:
        self.optimizer, self.scheduler = optimizer, scheduler
        self.warmup, self.interval, self.monitor = warmup, interval, monitor
        self.is_plateau = isinstance(scheduler, ReduceLROnPlateau)
        self.steps = 0
        self.target_lrs = [group["lr"] for group in optimizer.param_groups]
        if warmup > 0:
            self._apply_warmup()

    @property
    def in_warmup(self) -> bool:
        return self.steps < self.warmup

    def _apply_warmup(self) -> None:
        factor = (self.steps + 1) / self.warmup
        for group, lr in zip(self.optimizer.param_groups, self.target_lrs):
            group["lr"] = lr * factor

    def step_batch(self) -> None:
        """Call after every optimizer step."""
        self.steps += 1
        if self.in_warmup:
            self._apply_warmup()
        elif self.steps == self.warmup:
            for group, lr in zip(self.optimizer.param_groups, self.target_lrs):
                group["lr"] = lr
        elif self.scheduler is not None and self.interval == "step" and not self.is_plateau:
            self.scheduler.step()

    def step_epoch(self) -> None:
        if self.scheduler is not None and self.interval == "epoch" and not self.is_plateau and not self.in_warmup:
            self.scheduler.step()

    def step_validation(self, metrics: dict[str, Any]) -> None:
        if not (self.is_plateau and not self.in_warmup):
            return
        if self.monitor not in metrics:
            names = sorted(k for k in metrics if k.startswith("val/"))
            raise ConfigError(
                f"training.plateau_monitor: invalid value {self.monitor!r}; the validation metrics are {names}"
                f"{did_you_mean(self.monitor, names)}"
            )
        self.scheduler.step(float(metrics[self.monitor]))

    def state_dict(self) -> dict[str, Any]:
        inner = self.scheduler.state_dict() if self.scheduler is not None else None
        # The class is recorded so that a resume under another scheduler is refused by the state itself, whatever
        # the config's resume policy says (a field pasted from the user's guide carries no policy).
        kind = type(self.scheduler).__name__ if self.scheduler is not None else None
        return {"steps": self.steps, "target_lrs": list(self.target_lrs), "scheduler": inner, "scheduler_class": kind}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the position (steps taken, the inner scheduler's counters and plateau record) of a saved
        schedule, keeping this run's peak lrs (`target_lrs`, from its config) and the horizon its closed-form
        schedules were built for. Call after the optimizer's `load_state_dict`, which brings back the saved lrs.

        When neither changed, nothing is recomputed, so a resume stays bitwise equal to an uninterrupted run.
        Otherwise the current lrs are set to what the new schedule gives at the saved position: the warmup ramp
        or the closed form of the new horizon, and for history-dependent schedules (step, exponential, plateau)
        the saved lr scaled by new peak / old peak.
        """
        fresh, saved = list(self.target_lrs), [float(lr) for lr in state["target_lrs"]]
        kind = type(self.scheduler).__name__ if self.scheduler is not None else None
        if "scheduler_class" in state and state["scheduler_class"] != kind:  # older checkpoints did not record it
            raise ValueError(f"the saved schedule is a {state['scheduler_class']} and this run's a {kind}")
        if len(saved) != len(fresh):
            raise ValueError(f"the saved schedule has {len(saved)} parameter groups and this optimizer {len(fresh)}")
        self.steps = state["steps"]
        inner = state.get("scheduler")
        reshaped = False
        if self.scheduler is not None and inner is not None:
            inner = dict(inner)
            if isinstance(self.scheduler, LambdaLR) and isinstance(inner.get("lr_lambdas"), list):
                # A horizon-shaped factor keeps this run's shape; torch would restore the saved one's `total`.
                kept = []
                for fn, saved_fn in zip(self.scheduler.lr_lambdas, inner["lr_lambdas"]):
                    mine = isinstance(fn, _Horizon)
                    reshaped |= mine and saved_fn is not None and saved_fn != fn.__dict__
                    kept.append(None if mine else saved_fn)
                inner["lr_lambdas"] = kept
            self.scheduler.load_state_dict(inner)
            if hasattr(self.scheduler, "base_lrs"):
                self.scheduler.base_lrs = list(fresh)
        for group, lr in zip(self.optimizer.param_groups, fresh):
            if "initial_lr" in group:
                group["initial_lr"] = lr
        self.target_lrs = fresh
        if fresh != saved or reshaped:
            self._reapply(saved)

    def _reapply(self, saved: list[float]) -> None:
        """Set the current lrs to what this (changed) schedule gives at its restored position."""
        groups = self.optimizer.param_groups
        if self.in_warmup:
            self._apply_warmup()
        elif isinstance(self.scheduler, LambdaLR):
            # Closed form at the restored position: the value LambdaLR itself computes when stepped there.
            for group, base, fn in zip(groups, self.scheduler.base_lrs, self.scheduler.lr_lambdas):
                group["lr"] = base * fn(self.scheduler.last_epoch)
        else:
            for group, lr, old in zip(groups, self.target_lrs, saved):
                group["lr"] = group["lr"] * (lr / old) if old else lr
        if self.scheduler is not None and hasattr(self.scheduler, "_last_lr"):
            self.scheduler._last_lr = [group["lr"] for group in groups]
