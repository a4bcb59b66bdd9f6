"""Loss curves of a run: `python -m llm.plot RUN_DIR [--output loss.png]`.

Reads `RUN_DIR/metrics.jsonl` (one JSON object per log event) and draws train and validation loss and the
learning rate against the optimizer step into one PNG (default `RUN_DIR/loss.png`). Records without these
keys (e.g. text samples) are skipped. matplotlib is an optional dependency (`pip install 'llm[plot]'`); its
absence is a one-line error with exit status 2, like any other user mistake.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import NoReturn

from llm.errors import UserError

SERIES = {"train/loss": "train loss", "val/loss": "val loss", "lr": "learning rate"}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UserError(message)


def read_series(metrics_file: str | Path) -> dict[str, list[tuple[int, float]]]:
    """(step, value) pairs of each key of `SERIES` found in a metrics.jsonl file, in file order."""
    series: dict[str, list[tuple[int, float]]] = {key: [] for key in SERIES}
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
        if not isinstance(record, dict) or "step" not in record:
            continue
        for key in SERIES:
            value = record.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                series[key].append((int(record["step"]), float(value)))
    return series


def plot_run(run_dir: str | Path, output: str | Path | None = None) -> Path:
    """Draw the run's loss and learning-rate curves into a PNG; returns its path."""
    run_dir = Path(run_dir)
    metrics_file = run_dir / "metrics.jsonl" if run_dir.is_dir() else run_dir
    if not metrics_file.is_file():
        raise UserError(f"run: no metrics.jsonl in {str(run_dir)!r} (is it a run directory?)")
    series = read_series(metrics_file)
    if not series["train/loss"] and not series["val/loss"]:
        raise UserError(f"run: {str(metrics_file)!r} has no train/loss or val/loss records yet")
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("matplotlib is not installed; install it with: pip install 'llm[plot]'") from None

    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, height_ratios=(3, 1))
    for key, style in (("train/loss", "-"), ("val/loss", "o-")):
        if series[key]:
            steps, values = zip(*series[key])
            ax_loss.plot(steps, values, style, label=SERIES[key], markersize=4)
    ax_loss.set_ylabel("loss (nats/token)")
    ax_loss.set_title(run_dir.name or str(run_dir))
    ax_loss.grid(alpha=0.3)
    ax_loss.legend()
    if series["lr"]:
        steps, values = zip(*series["lr"])
        ax_lr.plot(steps, values, color="tab:green")
    ax_lr.set_ylabel("lr")
    ax_lr.set_xlabel("step")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(output) if output else metrics_file.parent / "loss.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="python -m llm.plot", description="Plot train/val loss and lr of a run to a PNG.")
    parser.add_argument("run_dir", help="run directory holding metrics.jsonl")
    parser.add_argument("--output", "-o", default=None, help="PNG path (default: RUN_DIR/loss.png)")
    try:
        args = parser.parse_args(argv)
        print(plot_run(args.run_dir, args.output))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
