"""The non-finite policy (`training.nan_policy`): what happens to an optimizer step whose loss or gradient norm is
NaN or infinite, agreed by every rank.

`raise` stops the run naming the step; `skip` drops the update (the schedule holds) and stops after
`max_skipped_steps` in a row. Where it can, `raise` is checked without a host sync per step (see `__init__`).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from llm.errors import UserError
from llm.training.parallel.distributed import all_agree, all_reduce_sum, is_distributed


class NonFiniteLossError(UserError):
    """Raised by the `raise` policy when a step produces a non-finite loss or gradient norm."""


class NonFiniteGuard:
    """Steps the optimizer unless `nan_policy` refuses the update.

    It is given what it uses: the optimizer and GradScaler (None without fp16), the run's counters (`state`: step,
    skipped_steps, consecutive_skips), the policy (`nan_policy`, `max_skipped_steps`), whether the parameters are
    FSDP shards, the device and the logger."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler | None,
        state: Any,
        *,
        nan_policy: str,
        max_skipped_steps: int,
        sharded: bool,
        device: torch.device,
        logger: logging.Logger,
    ) -> None:
        """Choose how the policy is applied.

        Deferred, with no host sync per step: the `raise` policy with an optimizer that can refuse an update on
        the device (fused Adam/AdamW/SGD/Adagrad, through the `found_inf` input GradScaler uses; the optimizer
        registry builds fused ones where it can). Otherwise one bool per step goes to the host (`_check`): the
        `skip` policy needs the verdict on the host every step (skip counts, the lr schedule holds on skipped
        steps, a warning per step), a non-fused optimizer cannot skip on the device, and FSDP's DTensor
        parameters are kept on the proven path.
        """
        self.optimizer, self.scaler, self.state = optimizer, scaler, state
        self.nan_policy, self.max_skipped_steps = nan_policy, max_skipped_steps
        self.device, self.logger = device, logger
        self.deferred = (
            scaler is None
            and nan_policy == "raise"
            and bool(getattr(optimizer, "_step_supports_amp_scaling", False))
            and not sharded
        )
        self._first_bad_step = torch.zeros((), dtype=torch.long, device=device)

    def step(self, loss: torch.Tensor, grad_norm: torch.Tensor | None) -> bool:
        """Apply the policy and step the optimizer (or the GradScaler); returns False when the update is skipped."""
        if self.deferred:
            self._step_unless_nonfinite(loss, grad_norm)  # no host sync
            return True
        if not self._check(loss, grad_norm):
            return False
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        return True

    def _step_unless_nonfinite(self, loss: torch.Tensor, grad_norm: torch.Tensor | None) -> None:
        """The `raise` policy without a host sync: from the first non-finite step on, the optimizer skips every
        update on the device; that step's number stays on the device until `raise_pending` reads it.

        Trade-off: a failure is raised up to `log_interval` steps late (those steps' compute is wasted, their
        updates refused) instead of stalling the device queue with a device-to-host copy every step. Weights and
        optimizer state stay those from before the bad step, and every log step, checkpoint, validation and the
        final save check first, so the outcome is the eager check's: no non-finite update applied, its step named.
        """
        optimizer = self.optimizer
        finite = torch.isfinite(loss) if grad_norm is None else torch.isfinite(loss) & torch.isfinite(grad_norm)
        if is_distributed():
            finite = all_reduce_sum((~finite).float()) == 0  # every rank refuses alike (a collective, no sync)
        first = self._first_bad_step
        self._first_bad_step = torch.where(finite | (first > 0), first, self.state.step + 1)
        optimizer.found_inf = (self._first_bad_step > 0).float()  # read by the fused step, as from GradScaler
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf

    def raise_pending(self) -> None:
        """The deferred check's one host sync: raise if any step since the last check was non-finite."""
        if not self.deferred:
            return
        bad = int(self._first_bad_step)
        if bad:
            step = self.state.step
            later = f" (nor those of steps {bad + 1}-{step}, run before the check)" if step > bad else ""
            raise NonFiniteLossError(
                f"training.nan_policy=raise: non-finite loss or gradient norm at step {bad}; the update was not "
                f"applied{later} (use --training-nan-policy skip to drop such steps)"
            )

    def clear_pending(self) -> None:
        """Forget a deferred non-finite step: the run was rolled back to a checkpoint from before it (spike.py)."""
        self._first_bad_step = torch.zeros_like(self._first_bad_step)

    def _check(self, loss: torch.Tensor, grad_norm: torch.Tensor | None) -> bool:
        """The eager check; every rank reaches the same verdict. Returns False to skip the update."""
        state = self.state
        if self.scaler is not None:
            return True  # fp16: the GradScaler skips non-finite steps itself
        finite = torch.isfinite(loss) if grad_norm is None else torch.isfinite(loss) & torch.isfinite(grad_norm)
        if all_agree(bool(finite), self.device):
            state.consecutive_skips = 0
            return True
        step = state.step + 1
        if self.nan_policy == "raise":
            raise NonFiniteLossError(
                f"training.nan_policy=raise: non-finite loss or gradient norm at step {step}; "
                "the update was not applied (use --training-nan-policy skip to drop such steps)"
            )
        state.skipped_steps += 1
        state.consecutive_skips += 1
        self.logger.warning("step %d: non-finite loss or gradient norm; update skipped", step)
        if state.consecutive_skips >= self.max_skipped_steps:
            raise NonFiniteLossError(
                f"training.max_skipped_steps: {state.consecutive_skips} consecutive non-finite steps "
                f"(last at step {step}); stopping"
            )
        return False
