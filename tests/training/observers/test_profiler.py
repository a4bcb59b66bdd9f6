"""`--training-profile-steps A:B`: a Chrome trace of those optimizer steps in RUN/profile/, named by step, one log
line saying where; bad spellings are one line."""

from __future__ import annotations

import json

import pytest
from helpers import call_main

from llm.errors import ConfigError
from llm.training.observers.profiler import parse_profile_steps
from llm.training.train import main


def test_the_trace_of_the_profiled_steps_is_written_and_named(make_engine, caplog):
    caplog.set_level("INFO", logger="llm")
    engine = make_engine("--training-max-steps", "4", "--training-profile-steps", "2:3", run=True)
    trace = engine.run_dir / "profile" / "trace-steps-2-3-rank0.json"
    events = json.loads(trace.read_text())["traceEvents"]
    steps = {e["name"] for e in events if str(e.get("name", "")).startswith("llm.step ")}
    assert steps == {"llm.step 2", "llm.step 3"}  # the window's steps, no others
    assert any(f"profile of steps 2-3 written to {trace}" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(("text", "steps"), [("", None), ("3:5", (3, 5)), ("4", (4, 4)), (" 2 : 2 ", (2, 2))])
def test_spellings(text, steps):
    assert parse_profile_steps(text) == steps


@pytest.mark.parametrize("text", ["5:3", "a:b", "-1:2", "0:2", "1:2:3", "1.5:2"])
def test_bad_spellings_are_refused(text):
    with pytest.raises(ConfigError, match="training.profile_steps"):
        parse_profile_steps(text)


def test_a_bad_window_is_one_line_exit_2(tmp_path):
    proc = call_main(main, ["--task", "regression", "--training-profile-steps", "5:3"], cwd=tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "training.profile_steps" in lines[0] and "'5:3'" in lines[0]
