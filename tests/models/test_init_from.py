"""`--model-init-from`: a run starts from an HF Llama/Mixtral folder or one of our runs, with the source's shape,
tokenizer and weights (its first validation loss is the source's loss), and every bad source is one line."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import read_metrics

from llm.data.text import TextDataModule
from llm.data.tokenizers import HFTokenizer
from llm.errors import UserError
from llm.training.train import main as train_main
from llm.training.train import parse_config

transformers = pytest.importorskip("transformers")

TEXT = "def square(x):\n    return x * x\n\n\ndef cube(x):\n    return x * x * x\n\n" * 10
SHAPE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=48,
             max_position_embeddings=64, rms_norm_eps=1e-6, rope_theta=500.0)


def make_hf_folder(path, kind: str = "llama"):
    """A tiny random HF model saved with save_pretrained, plus a BPE tokenizer.json built with `tokenizers`."""
    tok = HFTokenizer.train_bpe([TEXT], 300)
    torch.manual_seed(0)
    if kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=tok.vocab_size, **SHAPE))
    else:
        config = transformers.MixtralConfig(vocab_size=tok.vocab_size, num_local_experts=4, num_experts_per_tok=2,
                                            **SHAPE)
        model = transformers.MixtralForCausalLM(config)
    with torch.no_grad():  # HF initializes norms to 1: random values catch a swapped or missing norm
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.eval().save_pretrained(path)
    tok.save(path)
    return model


def run_args(tmp_path, source, *extra: str) -> list[str]:
    (tmp_path / "corpus.txt").write_text(TEXT, encoding="utf-8")
    return ["--task", "lm", "--model-init-from", str(source), "--data-path", str(tmp_path / "corpus.txt"),
            "--data-seq-len", "16", "--data-val-fraction", "0.3", "--data-cache-dir", str(tmp_path / "cache"),
            "--training-batch-size", "4", "--training-precision", "fp32", "--training-device", "cpu",
            "--training-callbacks", "MetricsLogger", "--logging-loggers", "jsonl",
            "--logging-log-dir", str(tmp_path / "run"), *extra]


@pytest.mark.parametrize("kind", ["llama", "mixtral"])
def test_first_validation_loss_is_the_hf_models_own_loss(tmp_path, kind):
    hf = make_hf_folder(tmp_path / "hf", kind)
    args = run_args(tmp_path, tmp_path / "hf", "--training-eval-only")
    config, _, _ = parse_config(args)
    assert (config.model.hidden_size, config.model.num_layers, config.model.use_moe) == (32, 2, kind == "mixtral")
    assert config.data.tokenizer == str(tmp_path / "hf" / "tokenizer.json")
    assert config.model.vocab_size == hf.config.vocab_size

    assert train_main(args) == 0
    [record] = read_metrics(tmp_path / "run")
    assert record["step"] == 0

    # the same validation windows, scored by transformers itself
    dm = TextDataModule(config.data, batch_size=config.training.batch_size, seed=config.seed)
    dm.prepare_data()
    dm.setup("fit")
    losses, weights = [], []
    with torch.no_grad():
        for inputs, targets in dm.val_dataloader():
            logits = hf(inputs).logits
            losses.append(torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten()))
            weights.append(len(inputs))
    expected = sum(w * loss.item() for w, loss in zip(weights, losses)) / sum(weights)
    assert record["val/loss"] == pytest.approx(expected, abs=1e-5)
    # eval-only: no training, no checkpoint, no final weights, no config.yaml
    run = tmp_path / "run"
    assert not (run / "checkpoints").exists() and not (run / "model.safetensors").exists()
    assert not (run / "config.yaml").exists()


def test_init_from_one_of_our_runs_adopts_its_shape_and_weights(tmp_path):
    source = tmp_path / "src"
    (tmp_path / "corpus.txt").write_text(TEXT, encoding="utf-8")
    assert train_main([
        "--task", "lm", "--data-path", str(tmp_path / "corpus.txt"), "--data-seq-len", "16",
        "--data-val-fraction", "0.3", "--data-cache-dir", str(tmp_path / "cache"), "--model-hidden-size", "48",
        "--model-num-layers", "1", "--model-num-heads", "2", "--model-max-seq-len", "32", "--training-batch-size", "4",
        "--training-max-steps", "4", "--training-precision", "fp32", "--training-device", "cpu",
        "--training-callbacks", "MetricsLogger", "--logging-loggers", "jsonl", "--logging-log-dir", str(source),
    ]) == 0
    source_loss = read_metrics(source)[-1]["val/loss"]

    args = run_args(tmp_path, source, "--model-num-heads", "2", "--training-max-steps", "2")  # equal: fine
    config, _, _ = parse_config(args)
    m = config.model
    assert (m.hidden_size, m.num_layers, m.max_seq_len, config.data.tokenizer) == (48, 1, 32, "byte")
    assert train_main([*args, "--training-eval-only"]) == 0
    assert read_metrics(tmp_path / "run")[0]["val/loss"] == pytest.approx(source_loss, abs=1e-6)
    # a real (non-eval) run from it trains: fresh step counter, its own checkpoints
    assert train_main([*args, "--logging-log-dir", str(tmp_path / "run2")]) == 0
    assert [r["step"] for r in read_metrics(tmp_path / "run2") if "val/loss" in r] == [2]


def _write(path, name, text):
    path.mkdir(parents=True, exist_ok=True)
    (path / name).write_text(text)
    return path


@pytest.mark.parametrize("setup, message", [
    (lambda p: p / "nope", "does not exist"),
    (lambda p: _write(p / "empty", "notes.txt", "x"), "is neither a Hugging Face"),
    (lambda p: _write(p / "gpt2", "config.json", json.dumps({"model_type": "gpt2"})),
     "unsupported architecture: config.json model_type 'gpt2'"),
    (lambda p: _write(p / "noweights", "config.json", json.dumps({"model_type": "llama", "vocab_size": 300,
                                                                     **SHAPE})), "holds no weights"),
])
def test_bad_sources_are_one_line_naming_the_field(tmp_path, capsys, setup, message):
    source = setup(tmp_path)
    with pytest.raises(UserError, match=f"model.init_from: '{source}' .*{message}"):
        parse_config(run_args(tmp_path, source))
    assert train_main(run_args(tmp_path, source)) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "model.init_from" in err and "Traceback" not in err


def test_a_shape_that_conflicts_with_the_source_is_an_error(tmp_path):
    make_hf_folder(tmp_path / "hf")
    with pytest.raises(UserError, match=r"model.hidden_size: 64 conflicts with model.init_from .* hidden_size is 32"):
        parse_config(run_args(tmp_path, tmp_path / "hf", "--model-hidden-size", "64"))
    with pytest.raises(UserError, match="data.tokenizer: 'byte' conflicts with model.init_from"):
        parse_config(run_args(tmp_path, tmp_path / "hf", "--data-tokenizer", "byte"))
    config, _, _ = parse_config(run_args(tmp_path, tmp_path / "hf", "--model-hidden-size", "32",
                                         "--model-max-seq-len", "128", "--data-seq-len", "100"))
    assert (config.model.hidden_size, config.model.max_seq_len, config.data.seq_len) == (32, 128, 100)


def test_missing_shards_are_an_error(tmp_path):
    make_hf_folder(tmp_path / "hf")
    index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}}
    (tmp_path / "hf" / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match="missing weight files listed in model.safetensors.index.json"):
        parse_config(run_args(tmp_path, tmp_path / "hf"))
