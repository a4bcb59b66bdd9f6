"""Training curves of one or more runs: `python -m llm.plot RUN [RUN ...] [--out curves.png] [--log-scale]`.

Reads each run's `metrics.jsonl` (one JSON object per log event) and draws its metrics against the optimizer step
into one PNG (one run: `RUN/loss.png` by default; several runs: `--out` is required, each run gets a colour and the
legend names it by its directory). What is drawn, and in which unit, follows the run's task (`task:` in its
`config.yaml`; a run without one is told by its metric names) through `TASK_PANELS`, a table: an lm's loss is nats
per token, with bits per byte and perplexity; a regression's loss is the MSE of the standardized target, with MSE
and MAE in the target's own units; a classification's loss is cross-entropy, with accuracy; an sft run's loss is
nats per answer token, with answer-token accuracy and perplexity. A task the table does not know gets its loss,
unlabelled by unit. Panels that tasks name differently stay apart, so overlaid runs of different tasks never share
an axis whose units differ. `--log-scale` makes the metric axes logarithmic (not the learning rate's).

A run resumed from an earlier checkpoint appends to the same file, so its steps go back: a step at or below the
previous one of the same metric starts a new segment, drawn as its own line in the same colour, not
joined to the last point in a zig-zag. Records without the plotted keys (text samples) are skipped; the torn last
line of a killed run is ignored. matplotlib is an optional dependency (`pip install 'llm[plot]'`); its absence, like
any other user mistake, is a one-line error with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from llm.errors import UserError, run_tool

Segment = list[tuple[int, float]]  # (step, value) pairs in file order, steps increasing


@dataclass(frozen=True)
class Panel:
    """One axis: its y label and the metrics drawn on it (metrics.jsonl key -> legend label)."""

    ylabel: str
    series: tuple[tuple[str, str], ...]


_LM = (
    Panel("loss (nats/token)", (("train/loss", "train"), ("val/loss", "val"))),
    Panel("bits per byte", (("train/bpb", "train"), ("val/bpb", "val"))),
    Panel("perplexity", (("val/ppl", "val"),)),
)
_REGRESSION = (
    Panel("loss (MSE of the standardized target)", (("train/loss", "train"), ("val/loss", "val"))),
    Panel("MSE (target units squared)", (("train/mse", "train"), ("val/mse", "val"))),
    Panel("MAE (target units)", (("train/mae", "train"), ("val/mae", "val"))),
)
_CLASSIFICATION = (
    Panel("loss (cross-entropy, nats/sample)", (("train/loss", "train"), ("val/loss", "val"))),
    Panel("accuracy", (("train/accuracy", "train"), ("val/accuracy", "val"))),
)
_SFT = (
    Panel("loss (nats/answer token)", (("train/loss", "train"), ("val/loss", "val"))),
    Panel("answer-token accuracy", (("val/accuracy", "val"),)),
    Panel("perplexity", (("val/ppl", "val"),)),
)
# What each task's metrics mean. A task (a user's plugin) missing here gets `_GENERIC`.
TASK_PANELS: dict[str, tuple[Panel, ...]] = {
    "lm": _LM, "sft": _SFT, "regression": _REGRESSION, "classification": _CLASSIFICATION,
}
_GENERIC = (Panel("loss", (("train/loss", "train"), ("val/loss", "val"))),)
# A run without config.yaml: the first task whose telltale metric it logged (checked in this order).
TELLTALE_METRICS = {"train/bpb": "lm", "train/accuracy": "classification", "train/mae": "regression"}
LR_PANEL = Panel("learning rate", (("lr", "lr"),))
SERIES_STYLE = {"train": {"linestyle": "-"}, "val": {"linestyle": "--", "marker": "o", "markersize": 3}}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UserError(message)


# --------------------------------------------------------------------------------------------------------- reading
def read_series(metrics_file: str | Path, keys: list[str] | None = None) -> dict[str, list[Segment]]:
    """The segments of (step, value) pairs of each numeric key (or of `keys`) of a metrics.jsonl file; a step at
    or below the key's previous one (a resumed run appending) starts a new segment."""
    series: dict[str, list[Segment]] = {key: [] for key in keys or ()}
    try:
        lines = Path(metrics_file).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise UserError(f"run: cannot read {str(metrics_file)!r}: {exc.strerror or exc}") from None
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            # A run killed mid-write leaves a torn last line; everything before it is still good.
            if lineno == len(lines):
                break
            raise UserError(f"run: {str(metrics_file)!r} line {lineno} is not JSON") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            continue
        step = record["step"]
        for key, value in record.items():
            if key == "step" or (keys is not None and key not in series):
                continue
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                segments = series.setdefault(key, [])
                if not segments or step <= segments[-1][-1][0]:
                    segments.append([])
                segments[-1].append((step, float(value)))
    return series


@dataclass
class Run:
    """A run as plotted: its legend name, task (None: unknown) and metric segments."""

    name: str
    task: str | None
    series: dict[str, list[Segment]]

    @property
    def panels(self) -> tuple[Panel, ...]:
        return TASK_PANELS.get(self.task or "", _GENERIC)


def _task_of(config_file: Path, series: dict[str, list[Segment]]) -> str | None:
    task = None
    if config_file.is_file():
        import yaml

        try:
            config = yaml.safe_load(config_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise UserError(f"run: cannot read {str(config_file)!r}: {_first_line(exc)}") from None
        task = config.get("task") if isinstance(config, dict) else None
    if isinstance(task, str) and task:
        return task
    return next((t for key, t in TELLTALE_METRICS.items() if key in series), None)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def load_runs(paths: list[str | Path]) -> list[Run]:
    """Each path (a run directory or its metrics.jsonl) read and named: its directory's name, or the path as given
    where two runs share a name."""
    found = []
    for path in paths:
        path = Path(path)
        metrics_file = path / "metrics.jsonl" if path.is_dir() else path
        if not metrics_file.is_file():
            raise UserError(f"run: no metrics.jsonl in {str(path)!r} (is it a run directory?)")
        series = read_series(metrics_file)
        if not series.get("train/loss") and not series.get("val/loss"):
            raise UserError(f"run: {str(metrics_file)!r} has no train/loss or val/loss records yet")
        run_dir = metrics_file.parent
        found.append((path, run_dir, _task_of(run_dir / "config.yaml", series), series))
    names = [run_dir.resolve().name or str(path) for path, run_dir, _, _ in found]
    return [Run(name if names.count(name) == 1 else str(path), task, series)
            for name, (path, _, task, series) in zip(names, found)]


# -------------------------------------------------------------------------------------------------------- drawing
def _panels(runs: list[Run]) -> list[Panel]:
    """The panels any run has data for, in table order (first run first), then the learning rate."""
    panels: list[Panel] = []
    for run in runs:
        for panel in run.panels:
            if panel not in panels and any(run.series.get(key) for key, _ in panel.series):
                panels.append(panel)
    if any(run.series.get("lr") for run in runs):
        panels.append(LR_PANEL)
    return panels


def build_figure(runs: list[Run], log_scale: bool = False) -> Any:
    """A matplotlib Figure with one axis per panel of `_panels(runs)`; lines labelled by run where there are several."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("matplotlib is not installed; install it with: pip install 'llm[plot]'") from None
    panels = _panels(runs)
    heights = [1 if panel is LR_PANEL else 2 for panel in panels]
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 1.2 + 1.3 * sum(heights)), sharex=True,
                             height_ratios=heights, squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, panel in zip(axes[:, 0], panels):
        for r, run in enumerate(runs):
            if panel is not LR_PANEL and panel not in run.panels:
                continue
            for s, (key, label) in enumerate(panel.series):
                # Several runs: a colour per run (the legend names it); one run: a colour per metric.
                colour = colours[(r if len(runs) > 1 else s) % len(colours)]
                name = f"{run.name} {label}" if len(runs) > 1 else label
                for n, segment in enumerate(run.series.get(key, [])):
                    steps, values = zip(*segment)
                    # Later segments (a resumed run's) share the colour and stay out of the legend.
                    ax.plot(steps, values, color=colour, label=name if n == 0 else "_nolegend_",
                            **SERIES_STYLE.get(label, {}))
        ax.set_ylabel(panel.ylabel)
        if log_scale and panel is not LR_PANEL:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        if panel is not LR_PANEL and ax.lines:
            ax.legend(fontsize="small")
    axes[0, 0].set_title(runs[0].name if len(runs) == 1 else ", ".join(run.name for run in runs))
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    return fig


def plot_runs(paths: list[str | Path], output: str | Path | None = None, log_scale: bool = False) -> Path:
    """Draw the runs' curves into a PNG; returns its path (default for one run: RUN/loss.png)."""
    if not paths:
        raise UserError("run: name at least one run directory")
    if output is None and len(paths) > 1:
        raise UserError(f"--out: required when plotting {len(paths)} runs (where should the PNG go?)")
    runs = load_runs(list(paths))
    fig = build_figure(runs, log_scale)
    first = Path(paths[0])
    out = Path(output) if output else (first if first.is_dir() else first.parent) / "loss.png"
    try:
        fig.savefig(out, dpi=100)
    except OSError as exc:
        raise UserError(f"--out: cannot write {str(out)!r}: {exc.strerror or exc}") from None
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)
    return out


def plot_run(run_dir: str | Path, output: str | Path | None = None, log_scale: bool = False) -> Path:
    """One run's curves into a PNG (default RUN_DIR/loss.png); returns its path."""
    return plot_runs([run_dir], output, log_scale)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m llm.plot",
                     description="Plot the training curves of one or more runs into a PNG, labelled for their task.")
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run directory (or its metrics.jsonl)")
    parser.add_argument("--out", "--output", "-o", dest="output", default=None,
                        help="PNG path (default: RUN/loss.png for one run; required for several)")
    parser.add_argument("--log-scale", action="store_true",
                        help="logarithmic y axes for the metrics (default: linear)")
    return parser


def main(argv: list[str] | None = None) -> int:
    def body() -> None:
        args = build_parser().parse_args(argv)
        print(plot_runs(args.runs, args.output, args.log_scale))

    return run_tool(body)


if __name__ == "__main__":
    sys.exit(main())
