"""``python -m llm.export``: run/checkpoint resolution, HF output that loads back, one-line errors.

Which weights a path names is `runs.resolve_run`'s rule, tested in depth in
tests/artifacts/test_runs.py; these tests drive it through the export CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import save_file, save_model

from llm import fs
from llm.artifacts import checkpoint as ckpt
from llm.export import main
from llm.models import DecoderModel
from llm.models.hf import load_hf

MODEL_CFG = dict(vocab_size=256, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64,
                 max_seq_len=64, rope_theta=10000.0, norm_eps=1e-5, tie_embeddings=False, dropout=0.0, use_moe=False,
                 num_experts=4, top_k=2, moe_intermediate_size=None, num_shared_experts=0, moe_aux_loss_coef=0.01,
                 moe_z_loss_coef=0.001)


def _write_ckpt(path, model: DecoderModel, cfg: dict, extra: dict | None = None) -> None:
    path.mkdir(parents=True)
    config = {"task": "lm", "model": cfg, "training": {"lr": 1e-3}, **(extra or {})}
    (path / "config.yaml").write_text(yaml.safe_dump(config))
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


def _commit_ckpt(run, step: int, model: DecoderModel) -> None:
    """A complete checkpoint as a training save leaves it (manifest written last, then renamed into place)."""
    tmp = run / "checkpoints" / f".tmp-step-{step:08d}"
    _write_ckpt(tmp, model, MODEL_CFG)
    ckpt.save_trainer_state({"state": {"step": step}}, tmp / ckpt.trainer_state_name(0))
    ckpt.write_manifest(tmp, step, 1)
    ckpt.commit_checkpoint(tmp, run / "checkpoints" / ckpt.step_dir_name(step))


def test_run_dir_prefers_final_weights_then_newest_complete_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    models = {}
    for step in (900, 1000, 1100):
        torch.manual_seed(step)
        models[step] = DecoderModel(**MODEL_CFG)
    _commit_ckpt(run, 900, models[900])
    _commit_ckpt(run, 1000, models[1000])  # the newest complete checkpoint
    _write_ckpt(run / "checkpoints" / ".tmp-step-00001100", models[1100], MODEL_CFG)  # a save in progress
    assert main([str(run), "--to", "hf", str(tmp_path / "a")]) == 0
    _same_logits(load_hf(tmp_path / "a"), models[1000])

    torch.manual_seed(5)
    final = DecoderModel(**MODEL_CFG)
    (run / "config.yaml").write_text(yaml.safe_dump({"task": "lm", "model": MODEL_CFG}))
    save_file({f"_orig_mod.{k}": v for k, v in final.state_dict().items()}, str(run / "model.safetensors"))
    assert main([str(run), "--to", "hf", str(tmp_path / "b"), "--dtype", "bf16"]) == 0
    out = load_hf(tmp_path / "b")
    assert out.embed_tokens.weight.dtype == torch.bfloat16
    torch.testing.assert_close(out.embed_tokens.weight, final.embed_tokens.weight.bfloat16())

    assert main([str(run / "checkpoints" / "step-00000900" / "model.safetensors"), "--to", "hf",
                 str(tmp_path / "c")]) == 0  # a weights file names exactly that file
    _same_logits(load_hf(tmp_path / "c"), models[900])
    assert "warning" not in capsys.readouterr().err


@pytest.mark.parametrize(
    "setup, message",
    [
        ("missing", "no such file or directory"),
        ("empty", "holds no model.safetensors"),
        ("regression", "not a decoder language model"),
        ("no_config", "no config.yaml"),
        ("mismatch", "does not match its config"),
    ],
)
def test_errors_are_one_line_exit_2(tmp_path, capsys, setup, message):
    src = tmp_path / "src"
    if setup != "missing":
        src.mkdir()
    if setup in ("regression", "no_config", "mismatch"):
        torch.manual_seed(0)
        save_model(DecoderModel(**MODEL_CFG), str(src / "model.safetensors"))
    if setup in ("regression", "mismatch"):
        cfg = {"regression": {"task": "regression", "model": MODEL_CFG},
               "mismatch": {"task": "lm", "model": {**MODEL_CFG, "hidden_size": 64}}}[setup]
        (src / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert main([str(src), "--to", "hf", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1 and str(src) in err


def test_cli_module_entry_point(tmp_path):
    result = subprocess.run([sys.executable, "-m", "llm.export", str(tmp_path / "nope"), "--to", "hf", "x"],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1


def test_bad_arguments_are_one_line_too(tmp_path, capsys):
    assert main([str(tmp_path), "--to", "onnx", "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "onnx" in err and err.count("\n") == 1


# -- an export never mixes models --------------------------------------------------------------------------------
def _files(directory) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.mark.parametrize("first_sharded", [True, False])
def test_a_non_empty_target_needs_overwrite_which_removes_the_stale_export(tmp_path, capsys, first_sharded):
    models = {}
    for name, seed in (("a", 1), ("b", 2)):
        torch.manual_seed(seed)
        models[name] = DecoderModel(**MODEL_CFG)
        _write_ckpt(tmp_path / name, models[name], MODEL_CFG)
    out = tmp_path / "out"
    shard = ["--max-shard-size", "20KB"]
    assert main([str(tmp_path / "a"), "--to", "hf", str(out), *(shard if first_sharded else [])]) == 0
    (out / "README.md").write_text("notes the user keeps next to the model\n")
    (out / "tokenizer.json").write_text("{}")  # a tokenizer of model a, left by another tool
    before = _files(out)
    assert any(name.startswith("model-0") for name in before) == first_sharded
    capsys.readouterr()

    assert main([str(tmp_path / "b"), "--to", "hf", str(out), *([] if first_sharded else shard)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "is not empty" in err and "--overwrite" in err and err.count("\n") == 1
    assert _files(out) == before  # refused before anything was written

    assert main([str(tmp_path / "b"), "--to", "hf", str(out), *([] if first_sharded else shard), "--overwrite"]) == 0
    after = sorted(p.name for p in out.iterdir())
    shards = [n for n in after if n.startswith("model-0")]
    common = ["README.md", "config.json", "generation_config.json", "special_tokens_map.json", "tokenizer.json",
              "tokenizer_config.json"]
    if first_sharded:  # a single file now: no shard and no index of model a may remain
        assert after == sorted([*common, "model.safetensors"])
    else:  # shards now: model a's single file must be gone (a loader could pick either)
        assert len(shards) >= 2 and "model.safetensors" not in after and "model.safetensors.index.json" in after
        assert sorted(set(after) - set(shards)) == sorted([*common, "model.safetensors.index.json"])
    assert (out / "README.md").read_text() == before["README.md"].decode()
    assert (out / "tokenizer.json").read_text() != "{}"  # model b's own tokenizer replaced the stale one
    _same_logits(load_hf(out), models["b"])


def test_a_failed_export_keeps_the_previous_one(tmp_path, capsys):
    torch.manual_seed(0)
    model = DecoderModel(**MODEL_CFG)
    _write_ckpt(tmp_path / "a", model, MODEL_CFG)
    out = tmp_path / "out"
    assert main([str(tmp_path / "a"), "--to", "hf", str(out)]) == 0
    before = _files(out)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "model.safetensors").write_bytes(b"not safetensors")
    (tmp_path / "broken" / "config.yaml").write_text(yaml.safe_dump({"task": "lm", "model": MODEL_CFG}))
    assert main([str(tmp_path / "broken"), "--to", "hf", str(out), "--overwrite"]) == 2
    assert "cannot read" in capsys.readouterr().err
    assert _files(out) == before


@pytest.mark.parametrize("target", ["run", "run-dotdot", "run-link", "checkpoint", "checkpoints", "inside-ckpt"])
def test_never_exports_into_the_source(tmp_path, capsys, target):
    run = tmp_path / "run"
    torch.manual_seed(0)
    _commit_ckpt(run, 10, DecoderModel(**MODEL_CFG))
    (run / "config.yaml").write_text(yaml.safe_dump({"task": "lm", "model": MODEL_CFG}))
    save_model(DecoderModel(**MODEL_CFG), str(run / "model.safetensors"))
    (tmp_path / "link").symlink_to(run, target_is_directory=True)
    source = run / "checkpoints" / "step-00000010" if target in ("checkpoint", "inside-ckpt") else run
    out = {"run": run, "run-dotdot": run / "checkpoints" / "..", "run-link": tmp_path / "link",
           "checkpoint": source, "checkpoints": run / "checkpoints", "inside-ckpt": source / "hf"}[target]
    before = {str(p): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}
    assert main([str(source), "--to", "hf", str(out), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and ("own directory" in err or "checkpoints/" in err)
    assert {str(p): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()} == before


@pytest.mark.parametrize(
    "setup, message",
    [
        ("yaml-syntax", "cannot read"),
        ("yaml-not-mapping", "expected a mapping"),
        ("yaml-unknown-key", "model.hidden_sizes"),
        ("model-invalid", "invalid model config"),
        ("weights-truncated", "cannot read"),
        ("weights-empty", "cannot read"),
    ],
)
def test_malformed_config_or_truncated_weights_are_one_line(tmp_path, capsys, setup, message):
    src = tmp_path / "src"
    torch.manual_seed(0)
    _write_ckpt(src, DecoderModel(**MODEL_CFG), MODEL_CFG)
    weights = src / "model.safetensors"
    config = {"yaml-syntax": "model: [hidden_size: 1\n", "yaml-not-mapping": "- lm\n",
              "yaml-unknown-key": yaml.safe_dump({"task": "lm", "model": {**MODEL_CFG, "hidden_sizes": 8}}),
              "model-invalid": yaml.safe_dump({"task": "lm", "model": {**MODEL_CFG, "num_heads": 3}})}.get(setup)
    if config is not None:
        (src / "config.yaml").write_text(config)
    if setup == "weights-truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    if setup == "weights-empty":
        weights.write_bytes(b"")
    assert main([str(src), "--to", "hf", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_bad_target_and_shard_size_are_one_line(tmp_path, capsys):
    torch.manual_seed(0)
    _write_ckpt(tmp_path / "a", DecoderModel(**MODEL_CFG), MODEL_CFG)
    (tmp_path / "file").write_text("x")
    assert main([str(tmp_path / "a"), "--to", "hf", str(tmp_path / "file")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert main([str(tmp_path / "a"), "--to", "hf", str(tmp_path / "out"), "--max-shard-size", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --max-shard-size") and err.count("\n") == 1


@pytest.mark.slow
def test_the_export_is_complete_for_transformers(tmp_path):
    """tokenizer, generation_config and special ids: transformers' pipeline writes llm.generate's greedy text."""
    import io

    transformers = pytest.importorskip("transformers")
    from llm.generate import main as generate
    from llm.training.train import main as train

    text = "def square(x):\n    return x * x\n\n\ndef cube(x):\n    return x * x * x\n\n" * 8
    (tmp_path / "corpus.txt").write_text(text, encoding="utf-8")
    assert train(["--task", "lm", "--data-path", str(tmp_path / "corpus.txt"), "--data-seq-len", "32",
                  "--data-val-fraction", "0.2", "--data-cache-dir", str(tmp_path / "cache"),
                  "--model-hidden-size", "32", "--model-num-layers", "1", "--model-num-heads", "2",
                  "--model-max-seq-len", "64",
                  "--training-batch-size", "4", "--training-max-steps", "40", "--training-precision", "fp32",
                  "--training-device", "cpu", "--training-callbacks", "MetricsLogger", "--logging-loggers", "jsonl",
                  "--logging-log-dir", str(tmp_path / "run")]) == 0
    out = tmp_path / "hf"
    assert main([str(tmp_path / "run"), "--to", "hf", str(out)]) == 0
    mode = 0o666 & ~fs.umask()  # what an ordinary open() gives: 0644 under umask 022, not safetensors' 0600
    for path in out.iterdir():
        assert path.stat().st_mode & 0o777 == mode, path
    config = json.loads((out / "config.json").read_text())
    generation = json.loads((out / "generation_config.json").read_text())
    assert config["eos_token_id"] == config["bos_token_id"] == config["pad_token_id"] == 0  # the byte separator
    assert generation["eos_token_id"] == 0 and generation["max_length"] == 64

    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    sample = "naïve café → Ā\tx = 1\n"
    assert tokenizer(sample)["input_ids"] == list(sample.encode("utf-8"))  # our ByteTokenizer's ids
    assert tokenizer.decode(list(sample.encode("utf-8"))) == sample

    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    pipe = transformers.pipeline("text-generation", model=model, tokenizer=tokenizer, device="cpu")
    for prompt in ("def cu", "    return"):
        ours = io.StringIO()
        assert generate(["--checkpoint", str(tmp_path / "run"), "--prompt", prompt, "--max-new-tokens", "30",
                         "--temperature", "0"], out=ours) == 0
        theirs = pipe(prompt, max_new_tokens=30, do_sample=False)[0]["generated_text"]
        assert theirs == ours.getvalue().removesuffix("\n")
        assert len(theirs) > len(prompt)


def test_a_bpe_runs_tokenizer_is_exported_with_its_special_tokens(tmp_path):
    transformers = pytest.importorskip("transformers")
    from llm.data.tokenizers import HFTokenizer

    text = "def square(x):\n    return x * x\n\n" * 20
    tok = HFTokenizer.train_bpe([text], 300)
    torch.manual_seed(0)
    model = DecoderModel(**{**MODEL_CFG, "vocab_size": tok.vocab_size})
    _write_ckpt(tmp_path / "ckpt", model, {**MODEL_CFG, "vocab_size": tok.vocab_size},
                {"data": {"tokenizer": "bpe"}})
    tok.save(tmp_path / "ckpt")
    assert main([str(tmp_path / "ckpt"), "--to", "hf", str(tmp_path / "hf")]) == 0
    special = json.loads((tmp_path / "hf" / "special_tokens_map.json").read_text())
    assert special == {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    loaded = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert loaded("def cube(y):")["input_ids"] == tok.encode("def cube(y):")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["eos_token_id"] == tok.eos_id
