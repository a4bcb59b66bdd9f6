"""The sinks of the engine's metrics channel: console (with progress), JSONL, TensorBoard, CSV, W&B, MLflow.

Everything a run reports goes through one channel: `engine.log(metrics, step)` (`self.engine.log` in a
callback, through its run context). The engine gathers what the step produced (its own train or validation
metrics plus whatever callbacks and tasks logged for that step) into one record and hands the record to every
sink once, on rank 0, so no sink depends on the order of the callback list. Sinks are chosen by name in
`logging.loggers` (`console`, `jsonl`, `tensorboard`, `csv`, `wandb`, `mlflow`); the callback names
`MetricsLogger`, `TensorBoardLogger` and `ProgressBar` are the same classes, so listing them in
`training.callbacks` (as the user's guide does) selects or configures the same sink instead of adding a second
one.

A record is `{"step": int, key: value, ...}`: numbers are scalars; a string, or a list of `{"text": ...}`
items (the lm task's samples), is text.
"""

from __future__ import annotations

import csv
import errno
import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llm.errors import ConfigError, UserError
from llm.fs import is_link_error, open_append, write_failure
from llm.registry import Registry
from llm.training.observers.context import RunContext
from llm.training.observers.hooks import Callback

LOGGERS: Registry[Any] = Registry("logger", "logging.loggers")

# A log record that carries this flag reaches train.log but not the console (set up by train.setup_logging):
# the progress bar already shows what the line says.
FILE_ONLY = {"console": False}


def register_logger(name: str, obj: Any = None, *, override: bool = False) -> Any:
    """Register a `MetricSink` subclass under a `logging.loggers` name (`override=True` replaces a taken one)."""
    return LOGGERS.register(name, obj, override=override)


def is_scalar(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def text_items(key: str, value: Any) -> Iterator[tuple[str, str]]:
    """(tag, text) pairs of a text value: a string, or a list of strings or `{"text": ...}` items."""
    if isinstance(value, str):
        yield key, value
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            text = item.get("text") if isinstance(item, dict) else item
            if isinstance(text, str):
                yield f"{key}/{i}", text


def format_scalars(record: dict[str, Any]) -> str:
    parts = []
    for key, value in record.items():
        if key != "step" and is_scalar(value):
            parts.append(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}")
    return " ".join(parts)


class MetricSink(Callback):
    """A destination of the metrics channel. The engine opens it on rank 0, writes records, closes it.

    A sink is also a `Callback` (so its name can appear in `training.callbacks`), but it needs no hook: the engine
    calls `open` (with the run's `RunContext`), `write` and `close` itself, exactly once per run, record and end,
    whatever the list order.
    """

    def open(self, context: RunContext) -> None:
        self.set_engine(context)

    def target(self, run_dir: Path) -> Path:
        """What this sink writes (named in its write errors)."""
        return Path(run_dir)

    def write(self, record: dict[str, Any]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Flush and release; called once at the end of the run (also when it fails)."""


# Per-layer, per-expert routing loads (dozens to hundreds of keys): kept in metrics.jsonl and TensorBoard, not on
# the console line, which shows the MoE losses instead.
DETAIL_PREFIXES = ("moe/layer",)


class ConsoleLogger(MetricSink):
    """The console: a progress bar on a terminal (train lines then go to train.log only), else log lines with
    progress and ETA. Validation lines and text (samples) always reach the console."""

    def __init__(self) -> None:
        self.bar: Any = None
        self._rate_start: tuple[float, int] | None = None

    def open(self, context: RunContext) -> None:
        super().open(context)
        if sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=context.total_steps, initial=context.state.step, unit="step", dynamic_ncols=True)

    def _progress(self, step: int) -> str:
        """'step N/total (pct, eta H:MM:SS)' from the rate since the first record of this process."""
        total, now = self.engine.total_steps, time.monotonic()
        if self._rate_start is None:
            self._rate_start = (now, step)
        began, first = self._rate_start
        rate = (step - first) / max(now - began, 1e-9)
        eta = time.strftime("%H:%M:%S", time.gmtime((total - step) / rate)) if rate > 0 else "?"
        return f"step {step}/{total} ({100 * step / max(total, 1):.0f}%, eta {eta})"

    def write(self, record: dict[str, Any]) -> None:
        step, logger = int(record.get("step", 0)), self.engine.logger
        val = format_scalars({k: v for k, v in record.items() if k.startswith("val/")})
        train = format_scalars({k: v for k, v in record.items() if not k.startswith(("val/", *DETAIL_PREFIXES))})
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            if "train/loss" in record:
                postfix = {"loss": f"{record['train/loss']:.4f}", "lr": f"{record.get('lr', 0.0):.2e}"}
                if "train/tokens_per_s" in record:
                    postfix["tok/s"] = f"{record['train/tokens_per_s']:.0f}"
                self.bar.set_postfix(postfix, refresh=False)
            if train:
                logger.info("step %d %s", step, train, extra=FILE_ONLY)
        elif train:
            logger.info("%s %s", self._progress(step), train)
        if val:
            logger.info("step %d %s", step, val)
        for key, value in record.items():
            for tag, text in text_items(key, value):
                logger.info("%s at step %d:\n%s\n%s", tag, step, text, "-" * 40)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def open_log(path: Path, *, binary: bool = False, readable: bool = False) -> Any:
    """Open a log file of the run directory for appending, never through a symbolic link (`llm.fs.open_append`);
    a failure is one line naming the file."""
    try:
        return open_append(path, binary=binary, readable=readable)
    except OSError as exc:
        if is_link_error(exc):
            raise UserError(f"logging: {path} is a symbolic link: a run writes its logs itself and never through a "
                            "link; remove the link") from None
        raise UserError(f"logging: {write_failure(exc, path)}") from None


class RunLogHandler(logging.FileHandler):
    """`RUN_DIR/train.log`: a `logging.FileHandler` that opens its file with `open_log` (no link followed)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, mode="a", encoding="utf-8", delay=True)
        self.stream = self._open()  # now, so that a refused file fails the set-up, not the first record

    def _open(self) -> Any:
        return open_log(Path(self.baseFilename))


class _FileSink(MetricSink):
    """A sink appending to one file of the run directory (a resumed run continues it)."""

    def __init__(self, filename: str) -> None:
        self.filename = filename
        self._file: Any = None

    def target(self, run_dir: Path) -> Path:
        return Path(run_dir) / self.filename

    def open(self, context: RunContext) -> None:
        super().open(context)
        self._file = open_log(self.target(context.run_dir))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class MetricsLogger(_FileSink):
    """`RUN_DIR/metrics.jsonl`: one JSON object per record, and never a partial line.

    The file is written unbuffered, one line per write: a crash leaves whole records behind, a failed write
    (disk full) is cut back to the last whole line before its one-line error ends the run, and a partial last
    line left by an earlier process (killed mid-write, or an older version) is cut when a resumed run reopens it.
    """

    def __init__(self, filename: str = "metrics.jsonl") -> None:
        super().__init__(filename)
        self.path: Path | None = None

    def open(self, context: RunContext) -> None:
        MetricSink.open(self, context)
        self.path = Path(context.run_dir) / self.filename
        self._file = open_log(self.path, binary=True, readable=True)  # unbuffered; closed in close()
        try:
            cut = self._cut_partial_line()
        except OSError as exc:
            self.close()
            raise UserError(f"logging: {write_failure(exc, self.path)}") from None
        if cut:
            context.logger.warning("%s ended in a partial line (%d bytes, from an interrupted write); removed it",
                                  self.path, cut)

    def _cut_partial_line(self) -> int:
        """Truncate the file after its last newline; returns the number of bytes removed."""
        fd = self._file.fileno()  # read through the open file: the name could be swapped for a link meanwhile
        size = os.fstat(fd).st_size
        end, chunk = size, 4096
        while end > 0:
            start = max(0, end - chunk)
            newline = os.pread(fd, end - start, start).rfind(b"\n")
            if newline >= 0:
                end = start + newline + 1
                break
            end = start
        if end < size:
            os.ftruncate(self._file.fileno(), end)
        return size - end

    def write(self, record: dict[str, Any]) -> None:
        if self._file is None:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        line = memoryview((json.dumps(clean, default=str) + "\n").encode())
        fd = self._file.fileno()
        size = os.fstat(fd).st_size
        try:
            while line:  # a write may be short (a full disk, a signal); the rest follows or fails
                written = self._file.write(line)
                if not written:  # nothing written and no error: do not spin
                    raise OSError(errno.EIO, os.strerror(errno.EIO))
                line = line[written:]
        except OSError as exc:
            try:
                os.ftruncate(fd, size)  # no partial record stays behind
            except OSError:
                pass
            self.close()  # later records are refused: the run ends with this error
            raise UserError(f"logging: {write_failure(exc, self.path)}") from None


class TensorBoardLogger(MetricSink):
    """TensorBoard event files in `log_dir` (default: the run directory): scalars and text."""

    def __init__(self, log_dir: str | os.PathLike = "") -> None:
        self.log_dir = str(log_dir)
        self.writer: Any = None

    @classmethod
    def from_config(cls, config: Any) -> TensorBoardLogger:
        return cls(log_dir=config.logging.log_dir)

    def open(self, context: RunContext) -> None:
        super().open(context)
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=self.log_dir or str(context.run_dir))

    def write(self, record: dict[str, Any]) -> None:
        if self.writer is None:
            return
        step = int(record.get("step", 0))
        for key, value in record.items():
            if key == "step":
                continue
            if is_scalar(value):
                self.writer.add_scalar(key, value, step)
            for tag, text in text_items(key, value):
                self.writer.add_text(tag, "```\n" + text + "\n```", step)
        if any(k.startswith("val/") for k in record):
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class CSVLogger(_FileSink):
    """`RUN_DIR/metrics.csv` in long form (`step,metric,value`), so records with different keys share one file."""

    def __init__(self, filename: str = "metrics.csv") -> None:
        super().__init__(filename)

    def open(self, context: RunContext) -> None:
        super().open(context)
        if self._file.tell() == 0:  # a new file (append mode starts at its end)
            csv.writer(self._file).writerow(["step", "metric", "value"])

    def write(self, record: dict[str, Any]) -> None:
        if self._file is None:
            return
        step = record.get("step", 0)
        csv.writer(self._file).writerows([step, k, v] for k, v in record.items() if k != "step" and is_scalar(v))
        self._file.flush()


def _import_optional(module: str, logger_name: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(
            f"logging.loggers: {logger_name!r} needs the {module} package, which is not installed "
            f"(pip install {module})"
        ) from None


class WandbLogger(MetricSink):
    """Weights & Biases: one W&B run per training run (project `logging.project`, named after the run directory)."""

    package = "wandb"

    def __init__(self, project: str = "llm") -> None:
        self.project = project
        self.run: Any = None

    @classmethod
    def from_config(cls, config: Any) -> WandbLogger:
        return cls(project=config.logging.project)

    def open(self, context: RunContext) -> None:
        super().open(context)
        wandb = _import_optional(self.package, "wandb")
        run_dir = Path(context.run_dir)
        self.run = wandb.init(project=self.project, name=run_dir.name, dir=str(run_dir),
                              config=context.config.to_dict(), resume="allow", id=run_dir.name)

    def write(self, record: dict[str, Any]) -> None:
        if self.run is None:
            return
        values: dict[str, Any] = {k: v for k, v in record.items() if k != "step" and is_scalar(v)}
        values.update({tag: text for key, value in record.items() for tag, text in text_items(key, value)})
        self.run.log(values, step=int(record.get("step", 0)))

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


class MLflowLogger(MetricSink):
    """MLflow: metrics per step and samples as text artifacts, in experiment `logging.project` (the tracking URI
    comes from MLflow's own settings, e.g. `MLFLOW_TRACKING_URI`)."""

    package = "mlflow"

    def __init__(self, project: str = "llm") -> None:
        self.project = project
        self.mlflow: Any = None

    @classmethod
    def from_config(cls, config: Any) -> MLflowLogger:
        return cls(project=config.logging.project)

    def open(self, context: RunContext) -> None:
        super().open(context)
        self.mlflow = _import_optional(self.package, "mlflow")
        self.mlflow.set_experiment(self.project)
        self.mlflow.start_run(run_name=Path(context.run_dir).name)

    def write(self, record: dict[str, Any]) -> None:
        if self.mlflow is None:
            return
        step = int(record.get("step", 0))
        scalars = {k.replace("/", "_"): float(v) for k, v in record.items() if k != "step" and is_scalar(v)}
        if scalars:
            self.mlflow.log_metrics(scalars, step=step)
        for key, value in record.items():
            for tag, text in text_items(key, value):
                self.mlflow.log_text(text, f"{tag}/step-{step:08d}.txt")

    def close(self) -> None:
        if self.mlflow is not None:
            self.mlflow.end_run()
            self.mlflow = None


for _name, _cls in (("console", ConsoleLogger), ("jsonl", MetricsLogger), ("tensorboard", TensorBoardLogger),
                    ("csv", CSVLogger), ("wandb", WandbLogger), ("mlflow", MLflowLogger)):
    register_logger(_name, _cls)


def _installed(package: str) -> bool:
    import importlib.util

    if package in sys.modules:  # imported already (or explicitly blocked with None)
        return sys.modules[package] is not None
    return importlib.util.find_spec(package) is not None


def check_logger_names(names: list[str]) -> None:
    """Validation: every name is a registered sink (or `module:Class` of one) whose package is installed."""
    if len(set(names)) != len(names):
        raise ConfigError(f"logging.loggers: {names} names a logger twice")
    for name in names:
        cls = LOGGERS.get(name)
        if not (isinstance(cls, type) and issubclass(cls, MetricSink)):
            raise ConfigError(f"logging.loggers: {name!r} is not a MetricSink subclass")
        package = getattr(cls, "package", None)
        if package and not _installed(package):
            raise ConfigError(f"logging.loggers: {name!r} needs the {package} package, which is not installed "
                              f"(pip install {package})")


def build_sinks(config: Any, callbacks: list[Callback]) -> list[MetricSink]:
    """The run's sinks: those in the callback list, then one of each `logging.loggers` class not already there."""
    sinks = [cb for cb in callbacks if isinstance(cb, MetricSink)]
    for name in config.logging.loggers:
        cls = LOGGERS.get(name)
        if not any(isinstance(sink, cls) for sink in sinks):
            sinks.append(cls.from_config(config))
    return sinks


def close_quietly(sinks: list[MetricSink]) -> None:
    """Close every sink even if one fails (the run's own error, if any, is what the user must see)."""
    for sink in sinks:
        try:
            sink.close()
        except Exception:  # noqa: BLE001
            logging.getLogger("llm").exception("logger %s failed to close", type(sink).__name__)
