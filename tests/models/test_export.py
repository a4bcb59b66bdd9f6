"""``python -m llm.export``: run/checkpoint resolution, HF output that loads back, one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import save_file, save_model

from llm.export import main
from llm.models import DecoderModel
from llm.models.hf import load_hf

MODEL_CFG = dict(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64,
                 max_seq_len=64, rope_theta=10000.0, norm_eps=1e-5, tie_embeddings=False, dropout=0.0, use_moe=False,
                 num_experts=4, top_k=2, moe_intermediate_size=None, num_shared_experts=0, moe_aux_loss_coef=0.01,
                 moe_z_loss_coef=0.001)


def _write_ckpt(path, model: DecoderModel, cfg: dict, extra: dict | None = None) -> None:
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(yaml.safe_dump({"model": cfg, "training": {"lr": 1e-3}, **(extra or {})}))
    save_model(model, str(path / "model.safetensors"))  # dedups tied weights, as a trainer would


def _same_logits(a: DecoderModel, b: DecoderModel) -> None:
    ids = torch.randint(0, 64, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(a(ids), b(ids))


@pytest.mark.parametrize("overrides", [{}, {"tie_embeddings": True}, {"use_moe": True, "moe_intermediate_size": 16}])
def test_checkpoint_dir_exports(tmp_path, overrides):
    torch.manual_seed(0)
    cfg = {**MODEL_CFG, **overrides}
    model = DecoderModel(**cfg)
    _write_ckpt(tmp_path / "ckpt", model, cfg)
    assert main([str(tmp_path / "ckpt"), "--to", "hf", str(tmp_path / "out")]) == 0
    _same_logits(load_hf(tmp_path / "out"), model)


def test_run_dir_prefers_final_weights_then_newest_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    models = {}
    for i, name in enumerate(["step_100", "step_200"]):
        torch.manual_seed(i)
        models[name] = DecoderModel(**MODEL_CFG)
        _write_ckpt(run / "checkpoints" / name, models[name], MODEL_CFG)
        os.utime(run / "checkpoints" / name / "model.safetensors", (time.time() + i, time.time() + i))
    assert main([str(run), "--to", "hf", str(tmp_path / "a")]) == 0
    _same_logits(load_hf(tmp_path / "a"), models["step_200"])

    torch.manual_seed(5)
    final = DecoderModel(**MODEL_CFG)
    (run / "config.yaml").write_text(yaml.safe_dump({"model": MODEL_CFG}))
    save_file({f"_orig_mod.{k}": v for k, v in final.state_dict().items()}, str(run / "model.safetensors"))
    assert main([str(run), "--to", "hf", str(tmp_path / "b"), "--dtype", "bf16"]) == 0
    out = load_hf(tmp_path / "b")
    assert out.embed_tokens.weight.dtype == torch.bfloat16
    torch.testing.assert_close(out.embed_tokens.weight, final.embed_tokens.weight.bfloat16())


@pytest.mark.parametrize(
    "setup, message",
    [
        ("missing", "not a directory"),
        ("empty", "no model.safetensors"),
        ("regression", "not a decoder language model"),
        ("no_model", "no 'model:' mapping"),
        ("mismatch", "does not match its config"),
    ],
)
def test_errors_are_one_line_exit_2(tmp_path, capsys, setup, message):
    src = tmp_path / "src"
    if setup != "missing":
        src.mkdir()
    if setup in ("regression", "no_model", "mismatch"):
        torch.manual_seed(0)
        save_model(DecoderModel(**MODEL_CFG), str(src / "model.safetensors"))
        cfg = {"regression": {"task": "regression", "model": MODEL_CFG}, "no_model": {"training": {}},
               "mismatch": {"model": {**MODEL_CFG, "hidden_size": 64}}}[setup]
        (src / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert main([str(src), "--to", "hf", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_cli_module_entry_point(tmp_path):
    result = subprocess.run([sys.executable, "-m", "llm.export", str(tmp_path / "nope"), "--to", "hf", "x"],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1


def test_bad_arguments_are_one_line_too(tmp_path, capsys):
    assert main([str(tmp_path), "--to", "onnx", "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "onnx" in err and err.count("\n") == 1
