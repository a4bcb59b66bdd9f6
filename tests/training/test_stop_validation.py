"""What a stopped run validates (docs/checkpointing.md, "Failures"): a stop signal skips the final validation (the
job manager's grace period is for the checkpoint, written already); a callback's `should_stop` is a normal end whose
final weights are validated."""

from __future__ import annotations

import os
import signal

from helpers import read_metrics

from llm.training.core.callbacks import Callback


class StopAt(Callback):
    """At the end of optimizer step `step`: SIGTERM to this process (as a job manager sends it), or should_stop."""

    def __init__(self, step: int, by_signal: bool) -> None:
        super().__init__()
        self.step, self.by_signal = step, by_signal

    def on_batch_end(self, logs=None):
        if logs["step"] == self.step:
            if self.by_signal:
                os.kill(os.getpid(), signal.SIGTERM)
            else:
                self.engine.should_stop = True


def _val_steps(make_engine, by_signal: bool) -> list[int]:
    engine = make_engine("--training-max-steps", "8", "--training-val-interval", "0",
                         extra_callbacks=[StopAt(3, by_signal)], run=True)
    assert engine.state.step == 3 and (engine.run_dir / "model.safetensors").is_file()
    return [m["step"] for m in read_metrics(engine.run_dir) if "val/loss" in m]


def test_a_stop_signal_skips_the_final_validation(make_engine):
    assert _val_steps(make_engine, by_signal=True) == []


def test_a_callbacks_should_stop_validates_the_final_weights(make_engine):
    assert _val_steps(make_engine, by_signal=False) == [3]
