"""``python -m llm.export RUN --to gguf OUT.gguf``: the file loads in transformers' GGUF loader with the run's
logits and tokenizer; bad dtypes and occupied targets are one-line refusals that write nothing."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import save_model

from llm.data.tokenizers import ByteTokenizer, HFTokenizer
from llm.export import main
from llm.models import DecoderModel

pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

MODEL_CFG = dict(vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=96,
                 max_seq_len=64)
# How far q8_0 may move the logits from the run's fp32 ones, as a fraction of the largest |logit|: measured 0.9%
# here and 1.7% at hidden size 256 (docs/export.md states the bound).
Q8_0_BOUND = 0.02


def _run(tmp_path, tokenizer: HFTokenizer | None = None, **overrides) -> tuple:
    torch.manual_seed(0)
    cfg = {**MODEL_CFG, **overrides}
    model = DecoderModel(**cfg).eval()
    run = tmp_path / "run"
    run.mkdir()
    config = {"task": "lm", "model": cfg}
    if tokenizer is not None:
        tokenizer.tok.save(str(run / "tokenizer.json"))
        config["data"] = {"tokenizer": "bpe"}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    save_model(model, str(run / "model.safetensors"))
    return run, model


def _load(path):
    logging.getLogger("transformers").setLevel(logging.ERROR)
    return transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                             dtype=torch.float32).eval()


def _rounded(model: DecoderModel, dtype: torch.dtype) -> DecoderModel:
    """The run with its weights in `dtype` (computed in fp32), what an export in that dtype holds."""
    copy = DecoderModel(**{**MODEL_CFG}).eval()
    copy.load_state_dict({k: v.to(dtype).float() for k, v in model.state_dict().items()})
    return copy


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16", "q8_0"])
def test_gguf_loads_in_transformers_with_the_runs_logits(tmp_path, dtype):
    run, model = _run(tmp_path)
    out = tmp_path / f"model-{dtype}.gguf"
    assert main([str(run), "--to", "gguf", str(out), "--dtype", dtype]) == 0
    ids = torch.randint(0, 256, (2, 40))  # longer than a few positions: a wrong q/k permutation shows
    with torch.no_grad():
        theirs = _load(out)(ids).logits
        ours = model(ids)
        if dtype == "f32":
            torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)
        elif dtype in ("f16", "bf16"):
            reference = _rounded(model, torch.float16 if dtype == "f16" else torch.bfloat16)(ids)
            assert (theirs - reference).abs().max() <= 1e-3
        else:
            assert 0 < (theirs - ours).abs().max() <= Q8_0_BOUND * ours.abs().max()


def test_byte_tokenizer_round_trips_through_gguf(tmp_path):
    run, _ = _run(tmp_path)
    out = tmp_path / "byte.gguf"
    assert main([str(run), "--to", "gguf", str(out)]) == 0
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=out.name)
    text = "héllo, wörld 1234"
    assert tok.encode(text, add_special_tokens=False) == ByteTokenizer().encode(text)
    assert tok.eos_token_id == 0 and tok.convert_ids_to_tokens(0) == "<|endoftext|>"


def test_bpe_tokenizer_and_tied_embeddings(tmp_path):
    texts = ["the quick brown fox jumps over the lazy dog"] * 50 + ["a stitch in time saves nine"] * 50
    bpe = HFTokenizer.train_bpe(texts, vocab_size=300)
    run, model = _run(tmp_path, bpe, vocab_size=320, tie_embeddings=True)  # 20 padding rows past the vocab
    out = tmp_path / "bpe.gguf"
    assert main([str(run), "--to", "gguf", str(out), "--dtype", "f32"]) == 0
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=out.name)
    text = "the lazy fox saves time"
    assert tok.encode(text, add_special_tokens=False) == bpe.encode(text)
    ids = torch.tensor([bpe.encode(text)])
    with torch.no_grad():
        torch.testing.assert_close(_load(out)(ids).logits, model(ids), atol=1e-4, rtol=0)


def test_refusals_are_one_line_and_write_nothing(tmp_path, capsys):
    run, _ = _run(tmp_path)
    out = tmp_path / "m.gguf"
    assert main([str(run), "--to", "gguf", str(out), "--dtype", "q4_k"]) == 2
    assert not out.exists()
    assert main([str(run), "--to", "gguf", str(out), "--dtype", "f16"]) == 0
    before = out.read_bytes()
    assert main([str(run), "--to", "gguf", str(out), "--dtype", "f32"]) == 2  # exists, no --overwrite
    assert out.read_bytes() == before
    assert main([str(run), "--to", "gguf", str(out), "--dtype", "f32", "--overwrite"]) == 0
    assert out.read_bytes() != before
    other = tmp_path / "notes.gguf"
    other.write_text("not a model")
    assert main([str(run), "--to", "gguf", str(other), "--overwrite"]) == 2  # --overwrite replaces only a GGUF
    assert other.read_text() == "not a model"
    assert main([str(run), "--to", "gguf", str(tmp_path / "m.bin")]) == 2
    assert main([str(run), "--to", "gguf", str(run / "inside.gguf")]) == 2
    assert main([str(run), "--to", "hf", str(tmp_path / "hf"), "--dtype", "q8_0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 6 and all(line.startswith("error: ") for line in err), err
    assert "q4_k" in err[0] and "exists" in err[1] and "not a GGUF file" in err[2] and ".gguf" in err[3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "notes.gguf", "run"]  # no temp file left


def test_moe_is_refused(tmp_path, capsys):
    run, _ = _run(tmp_path, use_moe=True, num_experts=2, top_k=1, moe_intermediate_size=32)
    assert main([str(run), "--to", "gguf", str(tmp_path / "moe.gguf")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Mixture-of-Experts" in err[0]
    assert not (tmp_path / "moe.gguf").exists()


def test_a_killed_exports_temp_file_is_removed_by_the_next_export(tmp_path):
    run, _ = _run(tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid is gone: the temp file it "left" belongs to no live writer
    host = socket.gethostname()
    stale = tmp_path / f".m.gguf.export-tmp-{host}-{dead.pid}-0"
    live = tmp_path / f".m.gguf.export-tmp-{host}-{os.getpid()}-99"  # another export of this process, in progress
    stale.write_bytes(b"GGUF half")
    live.write_bytes(b"GGUF half")
    assert main([str(run), "--to", "gguf", str(tmp_path / "m.gguf")]) == 0
    assert not stale.exists() and live.exists()
