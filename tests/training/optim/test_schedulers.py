"""LR values at warmup, peak and end for every built-in schedule, and warmup composition."""

from __future__ import annotations

import math

import pytest
import torch
from torch import optim

from llm.errors import ConfigError
from llm.training.core.config import TrainingConfig
from llm.training.optim.schedulers import LRSchedule, build_scheduler


def _lrs(scheduler_type: str, steps: int, warmup: int = 0, **cfg_kwargs) -> list[float]:
    param = torch.nn.Parameter(torch.zeros(1))
    opt = optim.SGD([param], lr=1.0)
    cfg = TrainingConfig(lr=1.0, scheduler_type=scheduler_type, warmup=warmup, **cfg_kwargs)
    sched = LRSchedule(opt, build_scheduler(opt, cfg, max(1, steps - warmup)), warmup=warmup)
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])  # the lr used by this step's update
        opt.step()
        sched.step_batch()
    return lrs


def test_warmup_then_cosine():
    lrs = _lrs("cosine", steps=14, warmup=4, min_lr_ratio=0.1)
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[4] == pytest.approx(1.0)  # peak: first step after warmup
    assert lrs[9] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 5 / 10)))
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))  # monotone decay
    assert lrs[-1] > 0.1 and lrs[-1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 9 / 10)))


def test_linear_constant_wsd():
    assert _lrs("linear", steps=5) == pytest.approx([1.0, 0.8, 0.6, 0.4, 0.2])
    assert _lrs("constant", steps=3, warmup=2) == pytest.approx([0.5, 1.0, 1.0])
    wsd = _lrs("wsd", steps=10, decay_fraction=0.2)
    assert wsd[:9] == pytest.approx([1.0] * 9) and wsd[9] == pytest.approx(0.5)  # same convention as linear


def test_step_and_exponential_with_warmup():
    assert _lrs("step", steps=6, warmup=2, step_size=2, gamma=0.5) == pytest.approx([0.5, 1.0, 1.0, 1.0, 0.5, 0.5])
    assert _lrs("exponential", steps=5, warmup=1, gamma=0.5) == pytest.approx([1.0, 1.0, 0.5, 0.25, 0.125])


def test_plateau_steps_on_validation_metric():
    param = torch.nn.Parameter(torch.zeros(1))
    opt = optim.SGD([param], lr=1.0)
    cfg = TrainingConfig(lr=1.0, scheduler_type="plateau", plateau_patience=1, plateau_factor=0.5)
    sched = LRSchedule(opt, build_scheduler(opt, cfg, 10), monitor="val/loss")
    for value in (1.0, 1.0, 1.0):
        sched.step_batch()  # per-step stepping never touches a plateau schedule
        sched.step_validation({"val/loss": value})
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5)
    with pytest.raises(ConfigError, match="plateau_monitor"):
        sched.step_validation({"val/acc": 1.0})


def test_state_dict_round_trip_continues_identically():
    param = torch.nn.Parameter(torch.zeros(1))
    opt = optim.SGD([param], lr=1.0)
    cfg = TrainingConfig(lr=1.0, scheduler_type="cosine", warmup=3)
    sched = LRSchedule(opt, build_scheduler(opt, cfg, 10), warmup=3)
    for _ in range(5):
        opt.step()
        sched.step_batch()
    state, opt_state = sched.state_dict(), opt.state_dict()
    expected = []
    for _ in range(4):
        opt.step()
        sched.step_batch()
        expected.append(opt.param_groups[0]["lr"])
    opt2 = optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched2 = LRSchedule(opt2, build_scheduler(opt2, cfg, 10), warmup=3)
    opt2.load_state_dict(opt_state)
    sched2.load_state_dict(state)
    got = []
    for _ in range(4):
        opt2.step()
        sched2.step_batch()
        got.append(opt2.param_groups[0]["lr"])
    assert got == expected


def test_a_saved_schedule_refuses_another_scheduler_class():
    # The refusal lives in the state itself, so it holds even where the config's resume policy was lost (a field
    # pasted from the user's guide without its metadata).
    from torch.optim.lr_scheduler import ExponentialLR, StepLR

    def schedule(inner):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        return LRSchedule(opt, inner(opt), warmup=0)

    saved = schedule(lambda o: StepLR(o, step_size=2)).state_dict()
    assert saved["scheduler_class"] == "StepLR"
    with pytest.raises(ValueError, match="the saved schedule is a StepLR and this run's a ExponentialLR"):
        schedule(lambda o: ExponentialLR(o, gamma=0.9)).load_state_dict(saved)
    same = schedule(lambda o: StepLR(o, step_size=2))
    same.load_state_dict(saved)  # the same class resumes
    older = {k: v for k, v in saved.items() if k != "scheduler_class"}  # checkpoints written before the record
    schedule(lambda o: ExponentialLR(o, gamma=0.9)).load_state_dict(older)


def test_wsd_trapezoid_with_a_1_minus_sqrt_decay_and_its_resume():
    # warmup 2, stable, then the last 4 of 10 scheduled steps decay to the 0.1 floor along 1 - sqrt(progress)
    lrs = _lrs("wsd", steps=12, warmup=2, decay_fraction=0.4, min_lr_ratio=0.1, decay_shape="sqrt")
    assert lrs[:2] == pytest.approx([0.5, 1.0]) and lrs[2:9] == pytest.approx([1.0] * 7)
    assert lrs[9:] == pytest.approx([0.1 + 0.9 * (1 - math.sqrt(p / 4)) for p in (1, 2, 3)])
    linear = _lrs("wsd", steps=12, warmup=2, decay_fraction=0.4, min_lr_ratio=0.1)
    assert linear[9:] == pytest.approx([0.1 + 0.9 * (1 - p / 4) for p in (1, 2, 3)])  # the default is unchanged
    assert all(s < lin for s, lin in zip(lrs[9:], linear[9:]))
    # Resumed half-way through the decay, the schedule continues bit for bit.
    cfg = TrainingConfig(lr=1.0, scheduler_type="wsd", decay_fraction=0.4, decay_shape="sqrt")
    opts = [optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0) for _ in range(2)]
    a, b = (LRSchedule(o, build_scheduler(o, cfg, 10)) for o in opts)
    for _ in range(7):
        opts[0].step()
        a.step_batch()
    b.load_state_dict(a.state_dict())
    for _ in range(3):
        for opt, schedule in zip(opts, (a, b)):
            opt.step()
            schedule.step_batch()
        assert opts[0].param_groups[0]["lr"] == opts[1].param_groups[0]["lr"] < 1.0
