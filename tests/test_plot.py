"""`python -m llm.plot RUN_DIR`: a PNG of the loss and lr curves from metrics.jsonl, clear errors otherwise."""

from __future__ import annotations

import json
import sys

import pytest

from llm.plot import main, plot_run, read_series
from llm.training.core.errors import UserError


def write_metrics(run_dir, torn_tail=True):
    run_dir.mkdir(exist_ok=True)
    records = [{"step": s, "train/loss": 5.0 / s, "lr": 1e-3 * s / 40} for s in range(10, 50, 10)]
    records += [{"step": 20, "val/loss": 0.3}, {"step": 40, "val/loss": 0.2, "val/bpb": 0.29}]
    records += [{"step": 40, "samples": [{"prompt": "a", "text": "ab"}]}]
    text = "\n".join(json.dumps(r) for r in records) + "\n"
    (run_dir / "metrics.jsonl").write_text(text + ('{"step": 50, "train/lo' if torn_tail else ""))
    return run_dir


def test_read_series_picks_losses_and_lr(tmp_path):
    series = read_series(write_metrics(tmp_path / "run") / "metrics.jsonl")
    assert [s for s, _ in series["train/loss"]] == [10, 20, 30, 40]
    assert series["val/loss"] == [(20, 0.3), (40, 0.2)]
    assert len(series["lr"]) == 4


def test_plot_writes_a_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    run = write_metrics(tmp_path / "run")
    out = plot_run(run)
    assert out == run / "loss.png" and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main([str(run), "--output", str(tmp_path / "curves.png")]) == 0
    assert (tmp_path / "curves.png").stat().st_size > 1000
    assert capsys.readouterr().out.strip() == str(tmp_path / "curves.png")


def test_missing_run_and_empty_metrics_are_clear_errors(tmp_path, capsys):
    assert main([str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.startswith("error: run: no metrics.jsonl")
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "samples": []}\n')
    with pytest.raises(UserError, match="no train/loss or val/loss"):
        plot_run(tmp_path)


def test_missing_matplotlib_is_a_clear_error(tmp_path, monkeypatch):
    run = write_metrics(tmp_path / "run")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    with pytest.raises(UserError, match=r"matplotlib is not installed.*pip install"):
        plot_run(run)
