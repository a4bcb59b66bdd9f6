"""NonFiniteGuard on its own: it is given the optimizer, the counters and the policy, never an engine."""

from __future__ import annotations

import logging

import pytest
import torch

from llm.training.optim.nonfinite import NonFiniteGuard, NonFiniteLossError
from llm.training.state import TrainState


def _guard(policy: str, max_skipped: int = 3, fused: bool = False) -> tuple[NonFiniteGuard, torch.nn.Parameter]:
    param = torch.nn.Parameter(torch.ones(2))
    param.grad = torch.ones(2)
    opt = torch.optim.AdamW([param], lr=0.1, fused=fused) if fused else torch.optim.SGD([param], lr=0.1)
    guard = NonFiniteGuard(opt, None, TrainState(), nan_policy=policy, max_skipped_steps=max_skipped, sharded=False,
                           device=torch.device("cpu"), logger=logging.getLogger("llm"))
    return guard, param


def test_skip_policy_counts_skips_leaves_the_weights_and_stops_after_the_limit():
    guard, param = _guard("skip", max_skipped=2)
    assert guard.step(torch.tensor(1.0), torch.tensor(1.0)) is True
    after_good = param.detach().clone()
    assert not torch.equal(after_good, torch.ones(2))  # a finite step updates
    assert guard.step(torch.tensor(float("nan")), None) is False
    assert torch.equal(param.detach(), after_good) and guard.state.skipped_steps == 1
    with pytest.raises(NonFiniteLossError, match="training.max_skipped_steps: 2 consecutive"):
        guard.step(torch.tensor(1.0), torch.tensor(float("inf")))


def test_raise_policy_with_a_fused_optimizer_refuses_on_the_device_and_names_the_step():
    pytest.importorskip("torch.optim")
    try:
        guard, param = _guard("raise", fused=True)
    except RuntimeError:  # a build without fused CPU AdamW
        pytest.skip("fused AdamW is not available on this device")
    assert guard.deferred
    guard.state.step = 4
    guard.step(torch.tensor(float("nan")), None)  # no host sync: nothing raised yet
    before = param.detach().clone()
    guard.state.step = 5
    guard.step(torch.tensor(1.0), None)  # refused too: updates stay off from the first bad step on
    assert torch.equal(param.detach(), before)
    with pytest.raises(NonFiniteLossError, match="at step 5; the update was not applied"):
        guard.raise_pending()
