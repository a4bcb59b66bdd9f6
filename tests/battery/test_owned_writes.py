"""Issue 22, kind 2: writes stay inside what the framework owns.

A run never writes into another run's checkpoints (however the path is spelt: `.` from inside, `..`, a link), never
through a symbolic link planted in its run directory, and keep-N rotation never deletes what is not its own; an
export never writes into, over or around its source, and `--overwrite` replaces only a previous export. Each case
asserts the exit status and the one line, and that a sentinel tree outside (or the source run) is byte-identical.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from helpers import CKPT, TINY_REGRESSION, call_main
from safetensors.torch import save_model

from llm import fs
from llm.artifacts import checkpoint as ckpt
from llm.artifacts.rundir import check_run_dir
from llm.data.tokenizers import HFTokenizer, copy_tokenizer
from llm.errors import ConfigError, UserError
from llm.export import main as export_main
from llm.models import DecoderModel
from llm.training.observers.sinks import MetricsLogger, RunLogHandler
from llm.training.train import main as train_main

TINY_MODEL = dict(vocab_size=256, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2, intermediate_size=64,
                  max_seq_len=64)


def tree(root: Path) -> dict[str, str]:
    """Every entry under `root` (links not followed): a file's sha256, a link's target, a directory's mark."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            key = str(path.relative_to(root))
            if path.is_symlink():
                found[key] = "-> " + os.readlink(path)
            elif path.is_dir():
                found[key] = "dir"
            else:
                found[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def one_line_error(result, *parts: str) -> str:
    err = result.stderr
    assert result.returncode == 2, err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    for part in parts:
        assert part in err, err
    return err


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A tiny regression run of 2 steps with checkpoints at steps 1 and 2 (copied by each test)."""
    base = tmp_path_factory.mktemp("finished")
    result = call_main(train_main, [*TINY_REGRESSION, *CKPT, "--training-max-steps", "2", "--checkpoint-interval",
                                    "1", "--logging-log-dir", str(base / "run")], base)
    assert result.returncode == 0, result.stderr
    return base / "run"


@pytest.fixture
def world(tmp_path, finished_run):
    """(the run, a sentinel tree outside it): the user's files that no case may change."""
    run = tmp_path / "run"
    shutil.copytree(finished_run, run, symlinks=True)
    outside = tmp_path / "outside"
    (outside / "sub").mkdir(parents=True)
    (outside / "notes.txt").write_text("the user's own notes\n")
    (outside / "sub" / "data.bin").write_bytes(os.urandom(256))
    (outside / "checkpoints").mkdir()  # a folder of the user's that happens to share the name
    return run, outside


def _train(cwd: Path, log_dir: str, *flags: str):
    return call_main(train_main, [*TINY_REGRESSION, *CKPT, "--training-max-steps", "4", "--checkpoint-interval", "1",
                                  "--logging-log-dir", log_dir, *flags], cwd)


# -- a run directory inside another run's checkpoints, however it is spelt ----------------------------------------
@pytest.mark.parametrize("spelling", ["dot-in-checkpoints", "dot-in-step", "relative-under-run", "dotdot",
                                      "absolute-step-child", "link-to-checkpoints"])
def test_a_run_inside_another_runs_checkpoints_is_refused(world, tmp_path, spelling):
    run, outside = world
    step = run / "checkpoints" / "step-00000002"
    (tmp_path / "link").symlink_to(run / "checkpoints", target_is_directory=True)
    cwd, log_dir = {
        "dot-in-checkpoints": (run / "checkpoints", "."),
        "dot-in-step": (step, "."),
        "relative-under-run": (run, "checkpoints/new-run"),
        "dotdot": (step, "../../checkpoints/../checkpoints/x"),
        "absolute-step-child": (tmp_path, str(step / "logs")),
        "link-to-checkpoints": (tmp_path, "link/other"),
    }[spelling]
    before, sentinel = tree(run), tree(outside)
    result = _train(cwd, log_dir)
    one_line_error(result, "logging.log_dir", "pick a directory outside it")
    assert tree(run) == before and tree(outside) == sentinel


def test_a_run_resumed_from_inside_its_own_directory_is_allowed(world):
    run, _ = world
    result = _train(run, ".")  # `cd runs/x && ... --logging-log-dir .`: the same run, resumed to step 4
    assert result.returncode == 0, result.stderr
    assert (run / "checkpoints" / "step-00000004" / ckpt.MANIFEST).is_file()


def test_a_users_own_checkpoints_folder_is_not_taken_for_a_runs(world, tmp_path):
    _, outside = world
    (outside / "config.yaml").write_text("a project's own config\n")
    result = _train(outside, "checkpoints")  # a project folder named checkpoints: no run's, so a run may go there
    assert result.returncode == 0, result.stderr
    assert (outside / "config.yaml").read_text() == "a project's own config\n"


# -- symbolic links where a run writes ------------------------------------------------------------------------------
LINKED = ["train.log", "metrics.jsonl", "config.yaml", "tokenizer.json", ".lock", "checkpoints",
          "checkpoints/step-00000002", "config.yaml.tmp", "model.safetensors"]


@pytest.mark.parametrize("name", LINKED)
def test_a_link_planted_in_the_run_directory_is_refused(world, name):
    run, outside = world
    planted = run / name
    if planted.is_dir() and not planted.is_symlink():
        shutil.copytree(planted, outside / "moved", symlinks=True)
        shutil.rmtree(planted)
        target = outside / "moved"
    else:
        planted.unlink(missing_ok=True)
        target = outside / "notes.txt"
    planted.symlink_to(target)
    before, sentinel = tree(run), tree(outside)
    result = _train(run.parent, str(run))
    one_line_error(result, f"{name} is a symbolic link", "remove the link")
    assert tree(run) == before and tree(outside) == sentinel


@pytest.mark.parametrize("name", ["train.log", "metrics.jsonl"])
def test_the_log_writers_never_follow_a_link_even_unchecked(world, monkeypatch, name):
    """Without the start-up check (a link planted after it), the writers themselves refuse the link."""
    run, outside = world
    (run / name).unlink()
    (run / name).symlink_to(outside / "notes.txt")
    sentinel = tree(outside)
    monkeypatch.setattr("llm.training.train.check_run_dir", lambda path: None)
    result = _train(run.parent, str(run))
    assert result.returncode == 2, result.stderr
    last = result.stderr.splitlines()[-1]  # refused when the writer opens it: the start-up lines came first
    assert last.startswith("error: logging: ") and f"{name} is a symbolic link" in last, result.stderr
    assert "Traceback" not in result.stderr
    assert tree(outside) == sentinel
    assert (run / name).is_symlink()


def test_the_config_writer_replaces_a_link_itself_even_unchecked(world, monkeypatch):
    run, outside = world
    (run / "config.yaml").unlink()
    (run / "config.yaml").symlink_to(outside / "notes.txt")
    sentinel = tree(outside)
    monkeypatch.setattr("llm.training.train.check_run_dir", lambda path: None)
    result = _train(run.parent, str(run))
    assert result.returncode == 0, result.stderr
    assert tree(outside) == sentinel
    assert not (run / "config.yaml").is_symlink()
    assert yaml.safe_load((run / "config.yaml").read_text())["training"]["max_steps"] == 4


def test_library_writers_refuse_or_replace_links(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("keep\n")
    run = tmp_path / "run"
    run.mkdir()
    for name in ("metrics.jsonl", "train.log"):
        (run / name).symlink_to(outside)
    logger = MetricsLogger()

    class Context:
        run_dir = run

    with pytest.raises(UserError, match="metrics.jsonl is a symbolic link"):
        logger.open(Context())
    with pytest.raises(UserError, match="train.log is a symbolic link"):
        RunLogHandler(run / "train.log")
    (run / "config.yaml.tmp").symlink_to(outside)  # a planted temp name
    fs.atomic_write(run / "config.yaml", "task: lm\n")
    assert outside.read_text() == "keep\n" and (run / "config.yaml").read_text() == "task: lm\n"


def test_the_tokenizer_copy_replaces_a_link_not_its_target(tmp_path):
    from tokenizers import Tokenizer, models

    source = tmp_path / "data" / "tokenizer.json"
    source.parent.mkdir()
    Tokenizer(models.BPE(vocab={"a": 0, "b": 1}, merges=[])).save(str(source))
    outside = tmp_path / "outside.json"
    outside.write_text("the user's file\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / "tokenizer.json").symlink_to(outside)
    copy_tokenizer(HFTokenizer.from_file(source), run)
    assert outside.read_text() == "the user's file\n"
    assert not (run / "tokenizer.json").is_symlink()
    assert (run / "tokenizer.json").read_bytes() == source.read_bytes()


# -- keep-N rotation and temp cleanup delete only the run's own ----------------------------------------------------
def test_rotation_and_temp_cleanup_never_delete_through_links(tmp_path):
    root = tmp_path / "run" / "checkpoints"
    root.mkdir(parents=True)
    users = tmp_path / "users"
    users.mkdir()
    (users / "precious.txt").write_text("mine\n")
    (users / ckpt.MANIFEST).write_text("{}")  # looks like a checkpoint from inside
    for step in (1, 2, 3):
        (root / ckpt.step_dir_name(step)).mkdir()
        (root / ckpt.step_dir_name(step) / ckpt.MANIFEST).write_text("{}")
    (root / ckpt.step_dir_name(0)).symlink_to(users, target_is_directory=True)  # oldest: rotation's first pick
    (root / ".tmp-cache").symlink_to(users, target_is_directory=True)
    before = tree(users)
    ckpt.remove_stale_temps(root)
    ckpt.prune_checkpoints(root, keep_last=1, up_to_step=3, protect=set())
    assert tree(users) == before
    assert sorted(p.name for p in root.iterdir()) == [".tmp-cache", "step-00000000", "step-00000003"]


def test_check_run_dir_speaks_for_the_field(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "step-00000005").mkdir(parents=True)
    (run / "checkpoints" / "step-00000005" / ckpt.MANIFEST).write_text("{}")
    with pytest.raises(ConfigError, match=r"^logging.log_dir: .* is inside .*checkpoints"):
        check_run_dir(run / "checkpoints" / "step-00000005" / "x")
    check_run_dir(run)  # the run itself
    check_run_dir(tmp_path / "new")


# -- export targets ----------------------------------------------------------------------------------------------
@pytest.fixture
def source_run(tmp_path) -> Path:
    """A run directory with final weights and one checkpoint (no training: written as a run leaves them)."""
    run = tmp_path / "src"
    torch.manual_seed(0)
    model = DecoderModel(**TINY_MODEL)
    tmp = run / "checkpoints" / ".tmp-step-00000010"
    tmp.mkdir(parents=True)
    config = yaml.safe_dump({"task": "lm", "model": TINY_MODEL})
    for where in (run, tmp):
        (where / "config.yaml").write_text(config)
        save_model(model, str(where / "model.safetensors"))
    ckpt.save_trainer_state({"state": {"step": 10}}, tmp / ckpt.trainer_state_name(0))
    ckpt.write_manifest(tmp, 10, 1)
    ckpt.commit_checkpoint(tmp, run / "checkpoints" / "step-00000010")
    return run


@pytest.mark.parametrize("spelling, message", [
    ("run", "own directory"), ("run-trailing-dotdot", "own directory"), ("run-link", "own directory"),
    ("inside-run", "inside the source"), ("inside-run-via-link", "inside the source"),
    ("inside-checkpoint", "inside the source"), ("parent", "contains the source"),
    ("parent-dotdot", "contains the source"), ("parent-relative", "contains the source"),
    ("parent-via-link", "contains the source"),
])
@pytest.mark.parametrize("overwrite", [False, True])
def test_an_export_never_targets_its_source(tmp_path, source_run, spelling, message, overwrite):
    run = source_run
    (tmp_path / "link").symlink_to(run, target_is_directory=True)
    (tmp_path / "up").symlink_to(tmp_path, target_is_directory=True)
    cwd = run / "checkpoints"
    out = {"run": str(run), "run-trailing-dotdot": str(run / "checkpoints" / ".."), "run-link": str(tmp_path / "link"),
           "inside-run": str(run / "hf"), "inside-run-via-link": str(tmp_path / "link" / "hf"),
           "inside-checkpoint": str(run / "checkpoints" / "step-00000010" / "hf"), "parent": str(tmp_path),
           "parent-dotdot": str(run / ".."), "parent-relative": "../..", "parent-via-link": str(tmp_path / "up"),
           }[spelling]
    before = tree(tmp_path)
    result = call_main(export_main, [str(run), "--to", "hf", out, *(["--overwrite"] if overwrite else [])], cwd)
    one_line_error(result, message)
    assert tree(tmp_path) == before


@pytest.mark.parametrize("contents", ["user-files", "subdirectory", "link", "weights-without-config"])
def test_overwrite_replaces_only_a_previous_export(tmp_path, source_run, contents):
    out = tmp_path / "out"
    out.mkdir()
    if contents == "user-files":
        (out / "thesis.tex").write_text("years of work\n")
        (out / "figure.png").write_bytes(os.urandom(64))
    elif contents == "subdirectory":
        assert call_main(export_main, [str(source_run), "--to", "hf", str(out)], tmp_path).returncode == 0
        (out / ".git").mkdir()
        (out / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    elif contents == "link":
        assert call_main(export_main, [str(source_run), "--to", "hf", str(out)], tmp_path).returncode == 0
        (tmp_path / "elsewhere.txt").write_text("x")
        (out / "README.md").symlink_to(tmp_path / "elsewhere.txt")
    else:
        (out / "model.safetensors").write_bytes(b"someone else's weights")
    before = tree(tmp_path)
    result = call_main(export_main, [str(source_run), "--to", "hf", str(out), "--overwrite"], tmp_path)
    one_line_error(result, "--overwrite replaces only a previous export")
    assert tree(tmp_path) == before


def test_an_export_target_that_is_a_link_is_refused(tmp_path, source_run):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "out").symlink_to(real, target_is_directory=True)
    before = tree(tmp_path)
    result = call_main(export_main, [str(source_run), "--to", "hf", str(tmp_path / "out")], tmp_path)
    one_line_error(result, "is a symbolic link")
    assert tree(tmp_path) == before


def test_overwrite_keeps_the_users_readme_and_drops_stale_model_files(tmp_path, source_run):
    out = tmp_path / "out"
    assert call_main(export_main, [str(source_run), "--to", "hf", str(out), "--max-shard-size", "20KB"],
                     tmp_path).returncode == 0
    (out / "README.md").write_text("model card\n")
    (out / "pytorch_model.bin").write_bytes(b"another format's weights, which a loader could prefer")
    result = call_main(export_main, [str(source_run), "--to", "hf", str(out), "--overwrite"], tmp_path)
    assert result.returncode == 0, result.stderr
    names = sorted(p.name for p in out.iterdir())
    assert names == ["README.md", "config.json", "generation_config.json", "model.safetensors",
                     "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    assert (out / "README.md").read_text() == "model card\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # no temp or aside left beside it
