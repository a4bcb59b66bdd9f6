"""The metrics channel: one record per step to every sink once, whatever the callback list; the sinks themselves
(JSONL, CSV, console with progress, W&B and MLflow through stand-in modules); the run's start summary."""

from __future__ import annotations

import csv
import logging
import re
import sys
import types

import pytest
from helpers import make_config, read_metrics, tiny_engine

from llm.config import replace_values
from llm.errors import ConfigError
from llm.training.core.callbacks import Callback, build_callbacks
from llm.training.observers.sinks import ConsoleLogger, MetricSink, build_sinks, check_logger_names
from llm.training.train import setup_logging


class Recording(MetricSink):
    def __init__(self) -> None:
        self.records: list[dict] = []
        self.opened = self.closed = 0

    def open(self, engine) -> None:
        super().open(engine)
        self.opened += 1

    def write(self, record) -> None:
        self.records.append(dict(record))

    def close(self) -> None:
        self.closed += 1


class Publisher(Callback):
    """Publishes one extra value per log step through the channel."""

    def on_batch_end(self, logs=None) -> None:
        if logs and "train/loss" in logs:
            self.engine.log({"extra/double_loss": 2 * logs["train/loss"]})


def run_engine(tmp_path, *args, callbacks=None):
    return tiny_engine(tmp_path, *args, callbacks=callbacks, run=True)


@pytest.mark.parametrize("publisher_first", [True, False])
def test_one_record_per_step_reaches_every_sink_once(tmp_path, publisher_first):
    sink = Recording()
    callbacks = [Publisher(), sink] if publisher_first else [sink, Publisher()]
    run_engine(tmp_path, "--training-max-steps", "4", "--training-log-interval", "2", "--training-val-interval", "4",
               callbacks=callbacks)
    assert sink.opened == 1 and sink.closed == 1
    steps = [r["step"] for r in sink.records]
    assert steps == [2, 4]  # train and validation metrics of step 4 are one record
    for record in sink.records:
        assert record["extra/double_loss"] == pytest.approx(2 * record["train/loss"])
    assert "val/loss" in sink.records[-1] and "lr" in sink.records[0]
    # The JSONL sink of the default loggers holds the same records.
    assert [{k: v for k, v in r.items()} for r in read_metrics(tmp_path / "run")] == sink.records


def test_listed_logger_callbacks_are_the_configured_sinks_not_copies(tmp_path):
    config, _ = make_config(tmp_path, "--training-callbacks", "MetricsLogger", "ProgressBar", "TensorBoardLogger")
    callbacks = build_callbacks(config)
    sinks = build_sinks(config, callbacks)
    assert [type(s).__name__ for s in sinks] == ["MetricsLogger", "ConsoleLogger", "TensorBoardLogger"]
    assert all(any(s is cb for cb in callbacks) for s in sinks)
    config = replace_values(config, {"logging.loggers": ["console", "csv"]})  # the resolved config is frozen
    assert [type(s).__name__ for s in build_sinks(config, [])] == ["ConsoleLogger", "CSVLogger"]


def test_an_empty_callback_list_still_logs_checkpoints_and_schedules(tmp_path):
    run_engine(tmp_path, "--training-max-steps", "30", "--training-log-interval", "1", callbacks=[])
    records = [r for r in read_metrics(tmp_path / "run") if "lr" in r]
    lrs = [r["lr"] for r in records]
    assert lrs[19] == pytest.approx(2e-3) and lrs[-1] < lrs[19] / 10  # warmup 20, then cosine
    assert (tmp_path / "run" / "checkpoints" / "step-00000030" / "manifest.json").is_file()
    assert list((tmp_path / "run").glob("events.out.tfevents*"))


def test_csv_sink_writes_long_form(tmp_path):
    run_engine(tmp_path, "--training-max-steps", "2", "--training-log-interval", "1", "--logging-loggers", "+csv")
    with open(tmp_path / "run" / "metrics.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["step", "metric", "value"]
    losses = {int(step): float(value) for step, metric, value in rows[1:] if metric == "train/loss"}
    jsonl = {r["step"]: r["train/loss"] for r in read_metrics(tmp_path / "run") if "train/loss" in r}
    assert losses == pytest.approx(jsonl) and set(losses) == {1, 2}


def test_wandb_and_mlflow_sinks_with_stand_in_packages(tmp_path, monkeypatch):
    calls: dict[str, list] = {"wandb": [], "mlflow": []}

    class Run:
        def log(self, values, step):
            calls["wandb"].append(("log", step, dict(values)))

        def finish(self):
            calls["wandb"].append(("finish",))

    wandb = types.SimpleNamespace(init=lambda **kw: calls["wandb"].append(("init", kw["project"])) or Run())
    mlflow = types.SimpleNamespace(
        set_experiment=lambda name: calls["mlflow"].append(("experiment", name)),
        start_run=lambda run_name: calls["mlflow"].append(("start", run_name)),
        log_metrics=lambda metrics, step: calls["mlflow"].append(("metrics", step, dict(metrics))),
        log_text=lambda text, path: calls["mlflow"].append(("text", path)),
        end_run=lambda: calls["mlflow"].append(("end",)),
    )
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    monkeypatch.setitem(sys.modules, "mlflow", mlflow)
    run_engine(tmp_path, "--training-max-steps", "2", "--training-log-interval", "1", "--logging-loggers", "wandb",
               "mlflow", "--logging-project", "proj", callbacks=[])
    assert calls["wandb"][0] == ("init", "proj") and calls["wandb"][-1] == ("finish",)
    logged = [c for c in calls["wandb"] if c[0] == "log"]
    assert [c[1] for c in logged] == [1, 2] and "val/loss" in logged[-1][2]  # step 2 with its final validation
    assert calls["mlflow"][:2] == [("experiment", "proj"), ("start", "run")] and calls["mlflow"][-1] == ("end",)
    assert any(c[0] == "metrics" and "train_loss" in c[2] for c in calls["mlflow"])


def test_logger_names_are_checked(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if it were not installed
    with pytest.raises(ConfigError, match="needs the wandb package"):
        check_logger_names(["wandb"])
    with pytest.raises(ConfigError, match="did you mean 'tensorboard'"):
        check_logger_names(["tensorbord"])
    with pytest.raises(ConfigError, match="twice"):
        check_logger_names(["jsonl", "jsonl"])


def test_with_a_progress_bar_train_lines_reach_train_log_only(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    engine = tiny_engine(tmp_path, "--training-max-steps", "4", "--training-log-interval", "2", callbacks=[])
    setup_logging(0, "INFO", tmp_path / "run")
    try:
        assert any(isinstance(s, ConsoleLogger) for s in engine.sinks)
        engine.run()
    finally:
        logging.getLogger("llm").handlers.clear()
    console = capsys.readouterr().err
    log = (tmp_path / "run" / "train.log").read_text()
    assert re.search(r"step 2 .*train/loss=", log) and re.search(r"step 4 .*train/loss=", log)  # every train line
    assert "train/loss=" not in console  # the bar shows them on screen
    assert "val/loss=" in console and "val/loss=" in log


def test_run_start_summary_and_warmup_warning(tmp_path, caplog):
    logging.getLogger("llm").propagate = True
    with caplog.at_level(logging.INFO, logger="llm"):
        run_engine(tmp_path, "--training-max-steps", "5", "--training-warmup", "10", callbacks=[])
    text = caplog.text
    assert f"run directory: {tmp_path / 'run'}" in text
    assert "device: cpu x 1 process(es), precision fp32" in text
    assert "model: RegressionModel," in text and "parameters" in text
    assert "data: 14 steps per epoch of 16 samples" in text and "train 231 samples; val 25 samples" in text
    assert "schedule: cosine" in text and "warmup 10 steps, 5 steps" in text
    assert "training.warmup: 10 warmup steps exceed the run's 5 steps" in text
