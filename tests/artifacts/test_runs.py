"""`load_run` / `resolve_run`: which weights a run, checkpoint or file path names; one-line errors; file modes.

Runs are built with checkpoint.py's own writers (the same calls a training save makes), so each case is exact
and takes milliseconds; tests/test_generate.py and tests/models/test_export.py drive the CLIs over them too.
"""

from __future__ import annotations

import io
import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from llm import fs
from llm.artifacts import checkpoint as ckpt
from llm.artifacts.checkpoint import CheckpointError
from llm.artifacts.consolidate import export_sharded
from llm.artifacts.consolidate import main as consolidate_main
from llm.artifacts.runs import final_weights_step, load_run, read_run_config, resolve_run
from llm.export import main as export_main
from llm.generate import main as generate_main
from llm.models.decoder import DecoderModel
from llm.models.hf import load_hf
from llm.training.core.config import Config

MODEL = dict(hidden_size=32, num_layers=1, num_heads=2, max_seq_len=64)


def lm_config(task: str = "lm", **model: object) -> Config:
    config = Config(task=task)
    for key, value in {**MODEL, **model}.items():
        setattr(config.model, key, value)
    return config


def new_model(seed: int, config: Config) -> DecoderModel:
    torch.manual_seed(seed)
    return DecoderModel(**{k: getattr(config.model, k) for k in MODEL}, vocab_size=config.model.vocab_size,
                       tie_embeddings=config.model.tie_embeddings)


def write_checkpoint(run: Path, step: int, model: DecoderModel, config: Config, complete: bool = True) -> Path:
    """A checkpoint written the way a save writes one: temp directory, files, manifest, rename.
    `complete=False` stops before the manifest, as a crash (or a save still in progress) does."""
    tmp = run / ckpt.CHECKPOINTS_DIR / f"{ckpt.TMP_PREFIX}{ckpt.step_dir_name(step)}"
    tmp.mkdir(parents=True)
    ckpt.save_checkpoint_weights(model, tmp / ckpt.WEIGHTS)
    ckpt.save_trainer_state({"state": {"step": step}}, tmp / ckpt.trainer_state_name(0))
    fs.write_durable(tmp / ckpt.CONFIG, config.to_yaml().encode())
    if not complete:
        return tmp
    ckpt.write_manifest(tmp, step, 1)
    final = run / ckpt.CHECKPOINTS_DIR / ckpt.step_dir_name(step)
    ckpt.commit_checkpoint(tmp, final)
    return final


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def generate(*args: str) -> int:
    return generate_main(["--max-new-tokens", "3", "--seed", "0", *args], out=io.StringIO())


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


@pytest.fixture
def run(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    lm_config().save(run / ckpt.CONFIG)
    return run


def test_a_half_written_newer_checkpoint_is_never_chosen(run, tmp_path, capsys):
    config = lm_config()
    older = new_model(2, config)
    complete = write_checkpoint(run, 2, older, config)
    partial = write_checkpoint(run, 4, new_model(4, config), config, complete=False)
    assert (partial / ckpt.WEIGHTS).is_file() and partial.name == ".tmp-step-00000004"

    files = resolve_run(run)
    assert files.weights == complete / ckpt.WEIGHTS and files.checkpoint_dir == complete and files.run_dir == run
    assert resolve_run(run / "checkpoints") == files
    loaded = load_run(run)
    assert same_weights(loaded.model, older) and loaded.checkpoint_dir == complete and not loaded.model.training
    assert generate("--checkpoint", str(run), "--prompt", "a") == 0
    assert export_main([str(run), "--to", "hf", str(tmp_path / "hf")]) == 0
    assert same_weights(load_hf(tmp_path / "hf"), older)
    assert "warning" not in capsys.readouterr().err  # a temp directory is not a broken checkpoint

    assert generate("--checkpoint", str(partial)) == 2  # named explicitly: refused, not loaded
    assert "incomplete checkpoint" in one_line_error(capsys)
    assert generate("--checkpoint", str(partial / ckpt.WEIGHTS)) == 2
    assert "incomplete checkpoint" in one_line_error(capsys)


def test_a_corrupt_newest_checkpoint_falls_back_with_a_warning(run, tmp_path, capsys):
    config = lm_config()
    older = new_model(2, config)
    write_checkpoint(run, 2, older, config)
    newest = write_checkpoint(run, 4, new_model(4, config), config)
    flip_last_byte(newest / ckpt.WEIGHTS)

    warnings: list[str] = []
    assert same_weights(load_run(run, warn=warnings.append).model, older)
    assert len(warnings) == 1 and "step-00000004" in warnings[0] and "checksum" in warnings[0]
    assert export_main([str(run), "--to", "hf", str(tmp_path / "hf")]) == 0
    assert same_weights(load_hf(tmp_path / "hf"), older)
    err = capsys.readouterr().err
    assert err.startswith("warning: skipping checkpoint") and "step-00000004" in err


@pytest.mark.parametrize("tool", ["generate", "export", "consolidate"])
def test_an_explicitly_named_corrupt_checkpoint_is_one_line_exit_2(run, tmp_path, capsys, tool):
    config = lm_config()
    write_checkpoint(run, 2, new_model(2, config), config)
    named = write_checkpoint(run, 4, new_model(4, config), config)
    flip_last_byte(named / ckpt.WEIGHTS)
    code = {
        "generate": lambda: generate("--checkpoint", str(named)),
        "export": lambda: export_main([str(named), "--to", "hf", str(tmp_path / "hf")]),
        "consolidate": lambda: consolidate_main([str(named), str(tmp_path / "out.safetensors")]),
    }[tool]()
    assert code == 2
    line = one_line_error(capsys)
    assert "fails its checksum" in line and str(named) in line
    assert not (tmp_path / "hf").exists() and not (tmp_path / "out.safetensors").exists()


def test_weights_file_paths_find_their_config(run, tmp_path):
    config = lm_config()
    model = new_model(2, config)
    step = write_checkpoint(run, 2, model, config)
    (step / ckpt.CONFIG).unlink()  # verification would now fail: this is the unverified path
    with pytest.raises(CheckpointError, match="missing config.yaml"):
        load_run(step / ckpt.WEIGHTS)
    loaded = load_run(step / ckpt.WEIGHTS, verify=False)  # the run's config, two levels up
    assert same_weights(loaded.model, model) and loaded.run_dir == run and loaded.checkpoint_dir == step

    loose = tmp_path / "loose"
    loose.mkdir()
    ckpt.save_weights(model, loose / "weights.safetensors")
    config.save(loose / ckpt.CONFIG)
    loaded = load_run(loose / "weights.safetensors", dtype=torch.bfloat16)
    assert loaded.checkpoint_dir is None and loaded.run_dir == loose
    assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16
    assert torch.equal(loaded.model.embed_tokens.weight, model.embed_tokens.weight.bfloat16())


def test_final_weights_win_unless_a_resumed_run_checkpointed_past_them(run):
    config = lm_config()
    final_model, ckpt_model = new_model(1, config), new_model(2, config)
    write_checkpoint(run, 4, ckpt_model, config)
    ckpt.save_weights(final_model, run / ckpt.WEIGHTS)  # no step recorded: the final file wins
    assert resolve_run(run).weights == run / ckpt.WEIGHTS
    ckpt.save_weights(final_model, run / ckpt.WEIGHTS, step=4)  # the run ended at the newest checkpoint
    assert final_weights_step(run / ckpt.WEIGHTS) == 4
    assert resolve_run(run).weights == run / ckpt.WEIGHTS
    ckpt.save_weights(final_model, run / ckpt.WEIGHTS, step=3)  # ended at 3, resumed, saved step 4 since
    assert resolve_run(run).checkpoint_dir == run / "checkpoints" / "step-00000004"
    assert same_weights(load_run(run).model, ckpt_model)


def test_wrapped_names_tied_and_moe_models_load(run):
    config = lm_config(tie_embeddings=True)
    model = new_model(3, config)
    save_file({f"_orig_mod.{k}": v for k, v in model.state_dict().items() if k != "lm_head.weight"},
              str(run / ckpt.WEIGHTS))
    config.save(run / ckpt.CONFIG)
    loaded = load_run(run).model
    assert same_weights(loaded, model) and loaded.lm_head.weight is loaded.embed_tokens.weight

    moe = lm_config(use_moe=True, num_experts=4, top_k=2)
    torch.manual_seed(0)
    moe_model = DecoderModel(**{**MODEL, "use_moe": True, "num_experts": 4, "top_k": 2})
    step = write_checkpoint(run, 2, moe_model, moe)
    assert same_weights(load_run(step).model, moe_model)


def _error(path: Path) -> str:
    with pytest.raises(CheckpointError) as info:
        load_run(path)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_every_problem_is_one_line_naming_the_path(tmp_path, capsys):
    config = lm_config()
    model = new_model(0, config)
    cases = {}
    for name in ("no_config", "bad_yaml", "not_a_mapping", "unknown_key", "truncated", "regression", "mismatch",
                 "not_a_decoder", "empty"):
        (tmp_path / name).mkdir()
        cases[name] = tmp_path / name
        if name not in ("not_a_decoder", "empty"):
            ckpt.save_weights(model, cases[name] / ckpt.WEIGHTS)
    (cases["bad_yaml"] / ckpt.CONFIG).write_text("model: [unclosed\n")
    (cases["not_a_mapping"] / ckpt.CONFIG).write_text("- 1\n")
    (cases["unknown_key"] / ckpt.CONFIG).write_text("model:\n  hiden_size: 32\n")
    lm_config().save(cases["truncated"] / ckpt.CONFIG)
    weights = cases["truncated"] / ckpt.WEIGHTS
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    lm_config(task="regression").save(cases["regression"] / ckpt.CONFIG)
    lm_config(hidden_size=64).save(cases["mismatch"] / ckpt.CONFIG)
    save_file({"head.weight": torch.zeros(1, 4)}, str(cases["not_a_decoder"] / ckpt.WEIGHTS))
    lm_config().save(cases["not_a_decoder"] / ckpt.CONFIG)

    expected = {
        "no_config": "no config.yaml", "bad_yaml": "cannot read", "not_a_mapping": "not a run config",
        "unknown_key": "hiden_size", "truncated": "cannot read", "regression": "'regression' run",
        "mismatch": "does not match its config", "not_a_decoder": "no decoder language model",
        "empty": "holds no model.safetensors",
    }
    for name, needle in expected.items():
        message = _error(cases[name])
        assert needle in message and name in message, (name, message)
    assert "no such file or directory" in _error(tmp_path / "nowhere")
    # The CLIs print exactly that line (exit 2), never a traceback.
    assert generate("--checkpoint", str(cases["truncated"])) == 2
    assert "cannot read" in one_line_error(capsys)
    assert export_main([str(cases["regression"]), "--to", "hf", str(tmp_path / "hf")]) == 2
    assert "'regression' run" in one_line_error(capsys)


def test_read_run_config_takes_any_run_path(run):
    config = lm_config(hidden_size=48)
    step = write_checkpoint(run, 2, new_model(0, lm_config()), config)
    assert read_run_config(step).model.hidden_size == 48  # the checkpoint's own config first
    assert read_run_config(step / ckpt.CONFIG).model.hidden_size == 48
    assert read_run_config(run).model.hidden_size == 48  # a run without final weights: its newest checkpoint
    assert read_run_config(run / ckpt.CONFIG).model.hidden_size == 32


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_written_files_follow_the_umask(run, tmp_path, umask):
    config = lm_config()
    model = new_model(0, config)
    previous = os.umask(umask)
    try:
        step = write_checkpoint(run, 2, model, config)
        ckpt.save_weights(model, run / ckpt.WEIGHTS, step=2)
        assert export_main([str(run), "--to", "hf", str(tmp_path / "hf"), "--max-shard-size", "20KB"]) == 0
    finally:
        os.umask(previous)
    expected = 0o666 & ~umask  # what open() gives; safetensors alone would give 0600
    written = [run / ckpt.WEIGHTS, *step.iterdir(), *(tmp_path / "hf").iterdir()]
    assert len(list((tmp_path / "hf").glob("model-*.safetensors"))) > 1
    assert {p.name: _mode(p) for p in written} == {p.name: expected for p in written}


# ---------------------------------------------------------------------------------------------
# FSDP: sharded checkpoints read in one process
# ---------------------------------------------------------------------------------------------


def write_sharded_checkpoint(run: Path, step: int, model: DecoderModel, config: Config) -> Path:
    import torch.distributed.checkpoint as dcp

    tmp = run / ckpt.CHECKPOINTS_DIR / f"{ckpt.TMP_PREFIX}{ckpt.step_dir_name(step)}"
    tmp.mkdir(parents=True)
    dcp.save({"model": model.state_dict(), "optimizer": {"step": torch.tensor(step)}},
             checkpoint_id=str(tmp / ckpt.SHARDED_DIR), no_dist=True)
    ckpt.save_trainer_state({"state": {"step": step}}, tmp / ckpt.trainer_state_name(0))
    fs.write_durable(tmp / ckpt.CONFIG, config.to_yaml().encode())
    ckpt.write_manifest(tmp, step, 2)
    final = run / ckpt.CHECKPOINTS_DIR / ckpt.step_dir_name(step)
    ckpt.commit_checkpoint(tmp, final)
    return final


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # one-process DCP save, on purpose
def test_sharded_checkpoints_load_and_consolidate(run, tmp_path, capsys):
    config = lm_config()
    model = new_model(5, config)
    step = write_sharded_checkpoint(run, 6, model, config)
    assert resolve_run(run).weights == step / ckpt.SHARDED_DIR and resolve_run(run).sharded
    assert same_weights(load_run(run).model, model)  # generate and export need no consolidation step

    out = tmp_path / "out" / "model.safetensors"
    for source in (step, step / ckpt.SHARDED_DIR, run):
        assert consolidate_main([str(source), str(out)]) == 0
        exported = load_file(out)
        assert exported.keys() == model.state_dict().keys()
        assert all(torch.equal(exported[k], v) for k, v in model.state_dict().items())
        assert _mode(out) == 0o666 & ~_current_umask()
    capsys.readouterr()

    flip_last_byte(next((step / ckpt.SHARDED_DIR).glob("*.distcp")))
    assert consolidate_main([str(step), str(tmp_path / "x.safetensors")]) == 2
    assert "fails its checksum" in one_line_error(capsys)
    plain = write_checkpoint(run, 8, model, config)
    with pytest.raises(CheckpointError, match="already one safetensors file"):
        export_sharded(plain, tmp_path / "x.safetensors")
    assert consolidate_main([str(tmp_path / "nowhere"), str(tmp_path / "x.safetensors")]) == 2
    assert "no such file" in one_line_error(capsys)


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
