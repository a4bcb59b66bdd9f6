"""Loss-spike recovery (`training.spike_policy=rollback`): on a non-finite loss or a loss spike, restore the last
verified checkpoint, skip the data that caused it, optionally lower the lr, and continue.

Detection runs on the device, with no host sync of its own: each optimizer step's loss (averaged over the ranks,
so every rank reaches the same verdict) is compared with the losses of the last `spike_window` accepted steps; a
loss more than `spike_zscore` standard deviations above their mean (the deviation floored at 1% of the mean, so a
flat curve's noise is not a spike), once `spike_min_steps` losses are in the window, or a non-finite loss or
gradient norm, marks the step. The mark is read where the engine reads to the host anyway: at log steps, before
every checkpoint save, at the run's end, and, where the non-finite policy already reads a bool every step (a
non-fused optimizer, FSDP), at every step. Steps run between a spike and its check are thrown away by the
rollback, so no checkpoint ever holds a spiked state.

The rollback goes through the checkpointer's resume path (`Checkpointer.roll_back`), then records the data
windows to skip: the micro-batches of the last `spike_skip_steps` optimizer steps up to the spike, as (epoch,
first micro-batch, end) positions of the data module. The engine asks `before_step` to skip them when the data
reaches them again. The skip list, the rollback count and the loss window are this component's trainer state
(entry `spike`), so a run resumed after a rollback takes the same path as one that was not interrupted; a run
interrupted before its next checkpoint resumes from the rolled-back-to checkpoint and meets the same spike again
(the same verdict on the same data), so it ends the same too.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator
from typing import Any

import torch

from llm.artifacts.checkpoint import CheckpointError
from llm.errors import UserError
from llm.training.parallel.distributed import all_reduce_sum, is_distributed

# The standard deviation a loss is measured in is at least this share of the window's mean loss.
STD_FLOOR = 0.01


class SpikeDetected(Exception):
    """A checked step spiked (raised inside the engine's step loop; `SpikeRecovery.run` catches it and rolls back).
    Never a user-facing error: a rollback that cannot happen raises `SpikeRecoveryError`."""

    def __init__(self, step: int, loss: float, zscore: float, finite: bool = True) -> None:
        super().__init__(f"loss spike at step {step}")
        self.step, self.loss, self.zscore, self.finite = step, loss, zscore, finite

    def describe(self) -> str:
        if not self.finite:
            return f"a non-finite loss or gradient norm at step {self.step}"
        return f"a loss spike at step {self.step} (loss {self.loss:.4g}, {self.zscore:.1f} standard deviations up)"


class SpikeRecoveryError(UserError):
    """A spike that the rollback policy cannot recover from: no checkpoint yet, or too many rollbacks."""


class SpikeRecovery:
    """The rollback policy of one run: detection (`observe`, `check`), the data windows it skips (`before_step`),
    the rollback (`run`) and its trainer state. With `spike_policy=off` every method returns at once.

    It is given the training section (`cfg`), the run context (counters, data module, lr schedule, model, logger,
    metrics channel), the checkpointer whose resume path it uses, and the non-finite guard (whose pending refusal
    a rollback clears, and which says whether this run reads a bool to the host every step anyway)."""

    def __init__(self, cfg: Any, context: Any, checkpointer: Any, guard: Any) -> None:
        self.enabled = cfg.spike_policy == "rollback"
        self.context, self.checkpointer, self.guard = context, checkpointer, guard
        self.window, self.zscore, self.min_steps = cfg.spike_window, cfg.spike_zscore, cfg.spike_min_steps
        self.skip_steps, self.lr_scale = cfg.spike_skip_steps, cfg.spike_lr_scale
        self.max_rollbacks = cfg.spike_max_rollbacks
        self.accum = cfg.grad_accum_steps
        # The checks ride on the host reads that happen anyway: every step where the non-finite guard reads one
        # (not deferred, no GradScaler), else the log steps and saves.
        self.eager = not getattr(guard, "deferred", False) and getattr(guard, "scaler", None) is None
        # Under fp16 an infinite gradient norm is the GradScaler's routine overflow, not a spike.
        self.judge_grad_norm = getattr(guard, "scaler", None) is None
        self.rollbacks = 0
        self.skipped: list[list[int]] = []  # [epoch, first micro-batch, end] windows of data to skip
        self._peaks = list(context.lr_schedule.target_lrs) if context.lr_schedule is not None else []
        self._starts: collections.deque[tuple[int, int, int]] = collections.deque(
            maxlen=cfg.log_interval + cfg.spike_skip_steps)  # (step, epoch, first micro-batch) of recent steps
        device = context.device
        self._losses = torch.zeros(self.window, dtype=torch.float32, device=device)
        self._seen = 0  # losses accepted into the window so far (host count: where the next one goes)
        self._bad_step = torch.zeros((), dtype=torch.long, device=device)  # the first marked step (0: none)
        self._bad_info = torch.zeros(3, dtype=torch.float32, device=device)  # its loss, z-score, 1 if non-finite

    # -- the engine's calls, in step order ------------------------------------------------------
    def before_step(self, batches: Iterator[Any]) -> None:
        """Discard the micro-batches of a skip window that the data has reached (the data module's position)."""
        if not self.enabled:
            return
        data = self.context.data_module
        skip = self._to_skip(data.position.epoch, data.position.batch)
        while skip and next(batches, None) is not None:
            data.advance(1)
            skip -= 1

    def observe(self, loss: torch.Tensor, grad_norm: torch.Tensor | None) -> None:
        """Judge this step's loss on the device (no host sync); marks the first bad step. Where the run reads a
        bool every step anyway, the mark is checked at once (before the optimizer step)."""
        if not self.enabled:
            return
        step, position = self.context.state.step + 1, self.context.data_module.position
        self._starts.append((step, position.epoch, position.batch - self.accum))  # where this step's data began
        loss = loss.detach().float().clone()
        if is_distributed():  # every rank judges the same mean loss (a collective, no sync)
            loss = all_reduce_sum(loss) / self.context.world_size
        finite = torch.isfinite(loss)
        if self.judge_grad_norm and grad_norm is not None:
            finite = finite & torch.isfinite(grad_norm)
        bad, z = ~finite, torch.full_like(loss, float("nan"))
        if self._seen >= self.min_steps:
            std, mean = torch.std_mean(self._losses[: min(self._seen, self.window)])
            z = (loss - mean) / torch.maximum(std, STD_FLOOR * mean.abs() + 1e-12)
            bad = bad | (z > self.zscore)
        first = bad & (self._bad_step == 0)
        self._bad_step = torch.where(first, step, self._bad_step)
        self._bad_info = torch.where(first, torch.stack([loss, z, (~finite).float()]), self._bad_info)
        slot = self._seen % self.window
        self._losses[slot] = torch.where(bad, self._losses[slot], loss)
        self._seen += 1
        if self.eager:
            self.check()

    def check(self) -> None:
        """The one host read: raise `SpikeDetected` if a step since the last rollback was marked."""
        if not self.enabled:
            return
        step = int(self._bad_step)
        if step:
            loss, z, nonfinite = self._bad_info.tolist()
            raise SpikeDetected(step, loss, z, finite=not nonfinite)

    def run(self, fit: Callable[[], None]) -> None:
        """Run the engine's `fit` to its end, rolling back and running it again after each spike."""
        while True:
            try:
                fit()
                self.check()  # steps after the last check (a stop by a callback or a signal)
                return
            except SpikeDetected as spike:
                self._roll_back(spike)

    # -- the rollback ---------------------------------------------------------------------------
    def _roll_back(self, spike: SpikeDetected) -> None:
        run = self.context
        what = spike.describe()
        if self.rollbacks >= self.max_rollbacks:
            raise SpikeRecoveryError(
                f"training.spike_max_rollbacks: {what}, after {self.rollbacks} rollback(s); stopping (the checkpoints "
                f"are kept: raise --training-spike-max-rollbacks, --training-spike-skip-steps or "
                f"--training-spike-zscore and resume with the same --logging-log-dir)"
            )
        starts = [entry for entry in self._starts if spike.step - self.skip_steps < entry[0] <= spike.step]
        self.rollbacks += 1  # before the load: the restored state merges with this count (load_state_dict)
        self._scale_peaks()  # before the load too: the schedule applies its new peaks at its restored position
        path = self.checkpointer.roll_back(before=spike.step)
        if path is None:
            raise SpikeRecoveryError(
                f"training.spike_policy=rollback: {what}, and no checkpoint of this run to roll back to (the first "
                f"is saved at step {self.checkpointer.options.interval}); lower --checkpoint-interval or raise "
                "--training-spike-min-steps"
            )
        restored = run.state.step
        self._bad_step = torch.zeros_like(self._bad_step)
        windows = [[epoch, batch, batch + self.accum] for step, epoch, batch in starts if step > restored]
        for window in windows:
            self._add_window(window)
        self.guard.clear_pending()  # a refusal the guard deferred belongs to the steps thrown away
        run.model.zero_grad(set_to_none=True)  # an eager check fires between backward and the optimizer step
        run.should_stop = False  # a stop decided on the thrown-away steps (a signal's stop comes again: after_step)
        self._starts.clear()
        skipped = ", ".join(f"epoch {e} micro-batch{'es' if b - a > 1 else ''} {a}{f'-{b - 1}' if b - a > 1 else ''}"
                            for e, a, b in windows) or "no data"
        if run.is_global_zero:
            lr = f"; peak lr x{self.lr_scale ** self.rollbacks:g}" if self.lr_scale != 1 else ""
            run.logger.warning("spike: %s; rolled back to %s (step %d), skipping %s%s (rollback %d of at most %d)",
                               what, path.name, restored, skipped, lr,
                               self.rollbacks, self.max_rollbacks)
        run.log({"spike/rollbacks": self.rollbacks, "spike/step": spike.step}, restored)

    def _add_window(self, window: list[int]) -> None:
        last = self.skipped[-1] if self.skipped else None
        if last is not None and last[0] == window[0] and last[2] == window[1]:  # contiguous: one window
            last[2] = window[2]
        elif window not in self.skipped:
            self.skipped.append(window)

    def _to_skip(self, epoch: int, batch: int) -> int:
        """Micro-batches to discard at this data position (0: none)."""
        for e, start, end in self.skipped:
            if e == epoch and start <= batch < end:
                return end - batch
        return 0

    def _scale_peaks(self) -> None:
        """The lr schedule's peaks for the rollbacks so far; set before the schedule's state loads, which then
        applies them at its restored position (as for a changed --training-lr on resume)."""
        if self.lr_scale != 1 and self._peaks:
            factor = self.lr_scale ** self.rollbacks
            self.context.lr_schedule.target_lrs = [lr * factor for lr in self._peaks]

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        data = self.context.data_module
        return {
            "losses": self._losses.cpu(), "seen": self._seen, "rollbacks": self.rollbacks,
            "skipped": [list(w) for w in self.skipped], "world_size": self.context.world_size,
            "position": [int(data.position.epoch), int(data.position.batch)],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the loss window; the rollback count and the skip list only grow, so a rollback (which loads an
        older state than it holds) keeps its own and a resume takes the saved ones."""
        saved_world, (epoch, batch) = int(state["world_size"]), state["position"]
        ahead = [w for w in state["skipped"] if (w[0], w[2]) > (epoch, batch)]
        if ahead and saved_world != self.context.world_size:
            raise CheckpointError(
                f"checkpoint: its data skip list (training.spike_policy=rollback) holds windows ahead of its position "
                f"counted by {saved_world} process(es); resume with --distributed-nproc-per-node {saved_world} "
                "until the run has passed them"
            )
        self.rollbacks = max(self.rollbacks, int(state["rollbacks"]))
        for window in state["skipped"]:
            if [int(v) for v in window] not in self.skipped:
                self.skipped.append([int(v) for v in window])
        self.skipped.sort()
        losses, seen = state["losses"].to(self._losses.device, torch.float32), int(state["seen"])
        if losses.numel() == self.window:  # the same window: restored slot for slot (the same sums, bitwise)
            self._losses.copy_(losses)
            self._seen = seen
        else:  # another --training-spike-window: the newest losses, oldest first
            count = min(seen, losses.numel())
            order = torch.arange(seen - count, seen) % losses.numel()
            newest = losses[order][-self.window:]
            self._losses.zero_()
            self._losses[: newest.numel()] = newest
            self._seen = newest.numel()
        self._bad_step = torch.zeros_like(self._bad_step)
        self._scale_peaks()
