"""Callbacks: the exact hook order of a run, misspelled hooks, early stopping, TensorBoard output."""

from __future__ import annotations

import logging

from helpers import make_config, read_metrics

from llm.training.core import callbacks as training_callbacks
from llm.training.core.callbacks import HOOKS, Callback, EarlyStopping, misspelled_hooks, resolve_callback
from llm.training.train import train_worker


class Recorder(Callback):
    def __init__(self) -> None:
        self.events: list[str] = []

    def __getattribute__(self, name):
        if name in HOOKS:
            events = object.__getattribute__(self, "events")
            return lambda logs=None: events.append(name)
        return object.__getattribute__(self, name)


def test_exact_hook_order_with_validation(make_engine):
    # 80 samples, 10% validation -> 72 train = 3 batches of 24 per epoch; 4 steps; validate every 2.
    recorder = Recorder()
    make_engine("--data-num-samples", "80", "--training-batch-size", "24", "--training-max-steps", "4",
                "--training-val-interval", "2", callbacks=[recorder], run=True)
    b, v = ["on_batch_start", "on_batch_end"], ["on_validation_start", "on_validation_end"]
    expected = (
        ["on_train_start", "on_epoch_start"] + b + b + v + b + v + ["on_epoch_end"]
        + ["on_epoch_start"] + b + v + ["on_save_checkpoint", "on_train_end"]  # the engine's final checkpoint
    )
    assert recorder.events == expected


def test_misspelled_hook_is_reported(make_engine, caplog):
    class Typo(Callback):
        def on_train_begin(self, logs=None):
            pass

    assert misspelled_hooks(Typo()) == ["Typo.on_train_begin is not a hook (did you mean 'on_train_start'?)"]
    logging.getLogger("llm").propagate = True
    with caplog.at_level(logging.WARNING, logger="llm"):
        make_engine("--training-max-steps", "1", callbacks=[Typo()], run=True)
    assert "on_train_begin is not a hook" in caplog.text


def test_class_pasted_into_callbacks_module_is_found_by_name(monkeypatch):
    class PastedHere(Callback):
        pass

    monkeypatch.setattr(training_callbacks, "PastedHere", PastedHere, raising=False)
    assert resolve_callback("PastedHere") is PastedHere


def test_early_stopping_sets_should_stop(make_engine):
    stopper = EarlyStopping(monitor="val/loss", mode="min", patience=2, min_delta=1.0)
    engine = make_engine("--training-max-steps", "200", "--training-val-interval", "1", "--training-lr", "1e-9",
                         "--training-scheduler-type", "constant", callbacks=[stopper], run=True)
    assert engine.should_stop and engine.state.step == 3  # first validation sets best, two more fail
    assert stopper.state_dict() == {"best": stopper.best, "bad_validations": 2}


class StopAtStepTwo(Callback):
    """Written as the user's guide writes callbacks: `self.engine.rank`, `self.engine.logger`, `should_stop`."""

    def on_batch_end(self, logs=None):
        if self.engine.rank == 0:
            self.engine.logger.info("stopper saw step %d", self.engine.state.step)
        if self.engine.state.step == 2:
            self.engine.should_stop = True


def test_callback_sees_the_run_context_and_stops_the_run_through_it(make_engine, caplog):
    from llm.training.core.engine import TrainingEngine
    from llm.training.observers.context import RunContext

    stopper = StopAtStepTwo()
    logging.getLogger("llm").propagate = True
    with caplog.at_level(logging.INFO, logger="llm"):
        engine = make_engine("--training-max-steps", "10", callbacks=[stopper], run=True)
    assert isinstance(stopper.engine, RunContext) and not isinstance(stopper.engine, TrainingEngine)
    assert stopper.engine is engine.context and engine.task.context is engine.context
    assert engine.state.step == 2 and engine.should_stop and engine.context.should_stop
    assert "stopper saw step 1" in caplog.text and "stopper saw step 2" in caplog.text
    assert engine.task.total_steps == engine.total_steps == 10
    # No collaborator holds the engine: the checkpointer works from the context and the state's components.
    assert all(value is not engine for value in vars(engine.checkpointer).values())


def test_tensorboard_events_readable_with_scalars_at_steps(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config, task_class = make_config(
        tmp_path, "--training-max-steps", "6", "--training-log-interval", "2", "--training-val-interval", "3",
        "--training-callbacks", "MetricsLogger", "TensorBoardLogger", "LRSchedulerCallback",
    )
    train_worker(0, 1, config, task_class)
    run_dir = tmp_path / "run"
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [2, 4, 6]
    assert [e.step for e in acc.Scalars("lr")] == [2, 4, 6]
    assert [e.step for e in acc.Scalars("val/loss")] == [3, 6]
    logged = {m["step"]: m["train/loss"] for m in read_metrics(run_dir) if "train/loss" in m}
    assert [e.value for e in acc.Scalars("train/loss")] == [
        __import__("pytest").approx(logged[s], rel=1e-6) for s in (2, 4, 6)
    ]
