"""Validation progress: silent in a short validation, a line every INTERVAL_S seconds in a long one (rank 0 only),
naming how far it is and the flag that caps it."""

from __future__ import annotations

import pytest

from llm.training.observers import val_progress
from llm.training.observers.val_progress import validation_progress


class Clock:
    """A clock that advances `per_read` seconds each time it is read."""

    def __init__(self, per_read: float) -> None:
        self.now, self.per_read = 0.0, per_read

    def __call__(self) -> float:
        self.now += self.per_read
        return self.now


class Lines:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def info(self, msg: str, *args) -> None:
        self.lines.append(msg % args)


def run(monkeypatch, per_read: float, batches: int = 10, limit: int = 0, show: bool = True,
        sized: bool = True) -> list[str]:
    monkeypatch.setattr(val_progress, "_clock", Clock(per_read))
    logger = Lines()
    data = list(range(batches))
    source = data if sized else iter(data)
    seen = list(validation_progress(iter(data[: limit or None]), loader=source, limit=limit, step=7, logger=logger,
                                    show=show))
    assert seen == data[: limit or None]  # every batch passes, in order
    return logger.lines


def test_a_short_validation_says_nothing(monkeypatch):
    assert run(monkeypatch, per_read=0.5) == []


def test_a_long_validation_reports_every_interval_with_the_cap_flag(monkeypatch):
    # Clock reads: start = 7, then batch k done at 7 * (k + 1): the first line once 20 s have passed (batch 3,
    # 21 s), the next 30 s after it (batch 8, 56 s), then the closing line (one more read, 77 s).
    lines = run(monkeypatch, per_read=7.0)
    assert lines == [
        "validation at step 7: 3/10 batches (30%), 21 s, about 49 s left; "
        "--training-val-max-batches N validates only N batches",
        "validation at step 7: 8/10 batches (80%), 56 s, about 14 s left; "
        "--training-val-max-batches N validates only N batches",
        "validation at step 7: 10 batches in 77 s",
    ]


def test_a_capped_validation_counts_to_its_cap_without_the_hint(monkeypatch):
    lines = run(monkeypatch, per_read=7.0, limit=4)
    assert lines == ["validation at step 7: 3/4 batches (75%), 21 s, about 7 s left",
                     "validation at step 7: 4 batches in 35 s"]


def test_an_unsized_loader_counts_without_a_total(monkeypatch):
    assert run(monkeypatch, per_read=7.0, sized=False)[0].startswith("validation at step 7: 3 batches, 21 s; ")


def test_other_ranks_say_nothing(monkeypatch):
    assert run(monkeypatch, per_read=7.0, show=False) == []


@pytest.mark.parametrize("per_read", [0.0, 30.0])
def test_the_engine_reports_through_the_run_logger(make_engine, monkeypatch, per_read):
    engine = make_engine("--training-max-steps", "2", "--training-val-interval", "0")
    monkeypatch.setattr(val_progress, "_clock", Clock(per_read))
    said: list[str] = []
    monkeypatch.setattr(engine.logger, "info", lambda msg, *args: said.append(msg % args))
    engine.run()
    lines = [line for line in said if line.startswith("validation at step 2")]
    if per_read:  # every batch "takes" 30 s: a line per batch, then the closing one
        assert len(lines) > 2 and lines[0].startswith("validation at step 2: 1/") and "--training-val-max" in lines[0]
        assert lines[-1].endswith(" s") and " batches in " in lines[-1]
    else:
        assert lines == []
