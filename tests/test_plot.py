"""`python -m llm.plot RUN [RUN ...]`: curves labelled for each run's task, resumed runs split into segments,
several runs overlaid, a log scale on request; clear errors otherwise."""

from __future__ import annotations

import json
import sys

import pytest

from llm.errors import UserError
from llm.plot import TASK_PANELS, build_figure, load_runs, main, plot_run, read_series

METRICS = {
    "lm": {"train/loss": 5.0, "train/bpb": 7.0, "val/loss": 4.0, "val/bpb": 6.0, "val/ppl": 60.0},
    "regression": {"train/loss": 1.0, "train/mse": 3e4, "train/mae": 140.0, "val/loss": 0.9, "val/mse": 2.8e4,
                   "val/mae": 130.0, "val/rmse": 167.0},
    "classification": {"train/loss": 2.0, "train/accuracy": 0.3, "val/loss": 1.8, "val/accuracy": 0.4},
    "sft": {"train/loss": 3.0, "val/loss": 2.5, "val/accuracy": 0.2, "val/ppl": 12.0},
}


def write_run(run_dir, task="lm", steps=(10, 20, 30, 40), config=True, torn_tail=False):
    """A run directory whose metrics.jsonl logs `task`'s metrics (falling with the step) at `steps`."""
    run_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for step in steps:
        values = {k: v / step if "accuracy" not in k else min(1.0, v * step / 10) for k, v in METRICS[task].items()}
        records.append({"step": step, **{k: v for k, v in values.items() if k.startswith("train/")},
                        "lr": 1e-3 * step / 40})
        records.append({"step": step, **{k: v for k, v in values.items() if k.startswith("val/")}})
    records.append({"step": steps[-1], "samples": [{"prompt": "a", "text": "ab"}]})
    text = "\n".join(json.dumps(r) for r in records) + "\n"
    (run_dir / "metrics.jsonl").write_text(text + ('{"step": 50, "train/lo' if torn_tail else ""))
    if config:
        (run_dir / "config.yaml").write_text(f"task: {task}\nseed: 0\n")
    return run_dir


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    if "matplotlib.pyplot" in sys.modules:
        sys.modules["matplotlib.pyplot"].close("all")


def ylabels(fig):
    return [ax.get_ylabel() for ax in fig.axes]


def test_read_series_picks_numeric_keys_and_survives_a_torn_tail(tmp_path):
    series = read_series(write_run(tmp_path / "run", torn_tail=True) / "metrics.jsonl")
    assert [s for s, _ in series["train/loss"][0]] == [10, 20, 30, 40] and len(series["train/loss"]) == 1
    assert series["val/loss"] == [[(10, 0.4), (20, 0.2), (30, 4.0 / 30), (40, 0.1)]]
    assert "samples" not in series and len(series["lr"][0]) == 4


@pytest.mark.parametrize("task", ["lm", "regression", "classification", "sft"])
def test_each_task_is_labelled_in_its_own_units(tmp_path, task):
    pytest.importorskip("matplotlib")
    fig = build_figure(load_runs([write_run(tmp_path / "run", task)]))
    labels = ylabels(fig)
    assert labels == [panel.ylabel for panel in TASK_PANELS[task]] + ["learning rate"]
    wanted = {"lm": ["loss (nats/token)", "bits per byte", "perplexity"],
              "regression": ["MSE (target units squared)", "MAE (target units)"],
              "classification": ["accuracy"], "sft": ["loss (nats/answer token)", "answer-token accuracy"]}[task]
    assert all(label in labels for label in wanted)
    assert task == "lm" or not any("nats/token" in label for label in labels)
    # The curves drawn are the run's values, on the panel that names their unit.
    loss = fig.axes[labels.index(TASK_PANELS[task][0].ylabel)].lines[0]
    assert list(loss.get_xdata()) == [10, 20, 30, 40] and loss.get_ydata()[0] == METRICS[task]["train/loss"] / 10


def test_a_run_without_config_yaml_is_told_by_its_metrics(tmp_path):
    pytest.importorskip("matplotlib")
    runs = load_runs([write_run(tmp_path / "r", "regression", config=False), write_run(tmp_path / "c",
                      "classification", config=False)])
    assert [run.task for run in runs] == ["regression", "classification"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "metrics.jsonl").write_text('{"step": 1, "train/loss": 2.0}\n')
    (tmp_path / "mine" / "config.yaml").write_text("task: my_plugin_task\n")
    assert ylabels(build_figure(load_runs([tmp_path / "mine"]))) == ["loss"]  # unknown task: no invented unit


def test_a_resumed_run_is_drawn_as_separate_segments(tmp_path):
    """Steps 10..40, then a resume from step 20 appending 30..60: two lines per metric, never a zig-zag."""
    pytest.importorskip("matplotlib")
    run = write_run(tmp_path / "run", "lm")
    first = (run / "metrics.jsonl").read_text()
    write_run(tmp_path / "tail", "lm", steps=(30, 40, 50, 60))
    (run / "metrics.jsonl").write_text(first + (tmp_path / "tail" / "metrics.jsonl").read_text())
    series = read_series(run / "metrics.jsonl")
    assert [[s for s, _ in seg] for seg in series["train/loss"]] == [[10, 20, 30, 40], [30, 40, 50, 60]]
    fig = build_figure(load_runs([run]))
    loss_axis = fig.axes[0]
    lines = loss_axis.lines
    assert len(lines) == 4  # train and val, two segments each
    for line in lines:
        steps = list(line.get_xdata())
        assert steps == sorted(set(steps))
    legend = [t.get_text() for t in loss_axis.get_legend().get_texts()]
    assert legend == ["train", "val"]
    assert lines[0].get_color() == lines[1].get_color()  # the resumed segment keeps the metric's colour


def test_several_runs_overlay_with_a_legend_by_run_and_log_scale(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    a, b = write_run(tmp_path / "baseline"), write_run(tmp_path / "wider", steps=(10, 20))
    out = tmp_path / "both.png"
    assert main([str(a), str(b), "--out", str(out), "--log-scale"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and capsys.readouterr().out.strip() == str(out)
    fig = build_figure(load_runs([a, b]), log_scale=True)
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert legend == ["baseline train", "baseline val", "wider train", "wider val"]
    assert [ax.get_yscale() for ax in fig.axes] == ["log", "log", "log", "linear"]  # not the lr panel
    colours = {line.get_label(): line.get_color() for line in fig.axes[0].lines}
    assert colours["baseline train"] != colours["wider train"]
    assert build_figure(load_runs([a])).axes[0].get_yscale() == "linear"
    # Two runs of the same name are told apart by their paths.
    write_run(tmp_path / "x" / "run"), write_run(tmp_path / "y" / "run")
    assert [r.name for r in load_runs([tmp_path / "x" / "run", tmp_path / "y" / "run"])] == [
        str(tmp_path / "x" / "run"), str(tmp_path / "y" / "run")]


def test_runs_of_different_tasks_never_share_a_loss_axis(tmp_path):
    pytest.importorskip("matplotlib")
    fig = build_figure(load_runs([write_run(tmp_path / "lm", "lm"), write_run(tmp_path / "reg", "regression")]))
    labels = ylabels(fig)
    assert "loss (nats/token)" in labels and "loss (MSE of the standardized target)" in labels
    lm_axis = fig.axes[labels.index("loss (nats/token)")]
    assert {line.get_label() for line in lm_axis.lines} == {"lm train", "lm val"}


def test_plot_run_writes_a_png_next_to_the_metrics(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    run = write_run(tmp_path / "run")
    out = plot_run(run)
    assert out == run / "loss.png" and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main([str(run), "--output", str(tmp_path / "curves.png")]) == 0
    assert (tmp_path / "curves.png").stat().st_size > 1000


def test_missing_run_empty_metrics_and_several_runs_without_out_are_clear_errors(tmp_path, capsys):
    assert main([str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.startswith("error: run: no metrics.jsonl")
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "samples": []}\n')
    with pytest.raises(UserError, match="no train/loss or val/loss"):
        plot_run(tmp_path)
    run = write_run(tmp_path / "run")
    assert main([str(run), str(run)]) == 2
    assert capsys.readouterr().err == "error: --out: required when plotting 2 runs (where should the PNG go?)\n"


def test_missing_matplotlib_is_a_clear_error(tmp_path, monkeypatch):
    run = write_run(tmp_path / "run")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    with pytest.raises(UserError, match=r"matplotlib is not installed.*pip install"):
        plot_run(run)
