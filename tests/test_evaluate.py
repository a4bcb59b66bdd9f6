"""`python -m llm.evaluate`: loss, perplexity and bits per byte of a run, checkpoint or HF folder on any text, equal
to the lm task's validation numbers on the same windows; `--training-eval-only` is the same check inside a run."""

from __future__ import annotations

import io
import json
import math

import pytest
import torch
from helpers import read_metrics

from llm.evaluate import main
from llm.training.train import main as train_main

TEXT = "def square(x):\n    return x * x\n\n\ndef cube(x):\n    return x * x * x\n\n" * 8
OTHER = "class Point:\n    def __init__(self, x, y):\n        self.x, self.y = x, y\n\n" * 6


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("eval")
    (root / "corpus.txt").write_text(TEXT, encoding="utf-8")
    assert train_main([
        "--task", "lm", "--data-path", str(root / "corpus.txt"), "--data-seq-len", "32", "--data-val-fraction", "0.2",
        "--data-cache-dir", str(root / "cache"), "--model-hidden-size", "32", "--model-num-layers", "1",
        "--model-num-heads", "2", "--model-max-seq-len", "64", "--training-batch-size", "4",
        "--training-max-steps", "6", "--training-precision", "fp32", "--training-device", "cpu",
        "--training-callbacks", "MetricsLogger", "--logging-loggers", "jsonl", "--logging-log-dir", str(root / "run"),
    ]) == 0
    yield root / "run"
    torch.set_num_threads(before)


def evaluate(*args: str) -> tuple[int, str]:
    out = io.StringIO()
    return main(list(args), out=out), out.getvalue()


def test_val_split_equals_the_runs_own_validation(run_dir):
    root = run_dir.parent
    code, out = evaluate(str(run_dir), "--data-path", str(root / "corpus.txt"), "--split", "val",
                         "--data-val-fraction", "0.2", "--data-cache-dir", str(root / "cache"),
                         "--training-device", "cpu", "--training-precision", "fp32", "--json")
    assert code == 0
    result = json.loads(out)
    final = read_metrics(run_dir)[-1]
    assert result["loss"] == pytest.approx(final["val/loss"], abs=1e-6)
    assert result["bits_per_byte"] == pytest.approx(final["val/bpb"], abs=1e-6)
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]), rel=1e-9)
    assert result["seq_len"] == 32  # the run's training window by default


def test_all_windows_of_other_text_as_a_table(run_dir, tmp_path):
    (tmp_path / "other.txt").write_text(OTHER, encoding="utf-8")
    args = [str(run_dir), "--data-path", str(tmp_path / "other.txt"), "--data-seq-len", "16",
            "--data-cache-dir", str(tmp_path / "cache"), "--training-device", "cpu", "--training-precision", "fp32"]
    code, table = evaluate(*args)
    assert code == 0
    rows = dict(line.split(None, 1) if not line.startswith("bits") else ("bpb", line[len("bits per byte"):].strip())
                for line in table.strip().splitlines())
    assert set(rows) == {"source", "data", "loss", "perplexity", "bpb"}
    code, out = evaluate(*args, "--json")
    result = json.loads(out)
    tokens = len(OTHER.encode()) + 1  # bytes plus the document separator
    assert result["windows"] == (tokens - 1) // 16 and result["split"] == "all"
    assert rows["loss"] == f"{result['loss']:.4f} nats/token"
    assert result["bits_per_byte"] == pytest.approx(result["loss"] / math.log(2))  # one byte per token


def test_hf_folder_source(tmp_path):
    transformers = pytest.importorskip("transformers")
    from llm.export import byte_level_tokenizer

    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=256, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=64)).eval()
    hf.save_pretrained(tmp_path / "hf")
    byte_level_tokenizer().save(str(tmp_path / "hf" / "tokenizer.json"))
    (tmp_path / "t.txt").write_text(OTHER, encoding="utf-8")
    code, out = evaluate(str(tmp_path / "hf"), "--data-path", str(tmp_path / "t.txt"), "--data-cache-dir",
                         str(tmp_path / "cache"), "--training-device", "cpu", "--training-precision", "fp32", "--json")
    assert code == 0
    result = json.loads(out)
    assert result["seq_len"] == 64  # an HF folder's context
    ids = torch.tensor(list(OTHER.encode()))
    n = (len(ids) - 1) // 64
    windows = torch.stack([ids[i * 64:i * 64 + 65] for i in range(n)])
    with torch.no_grad():
        logits = hf(windows[:, :-1]).logits
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten()).item()
    assert result["windows"] == n and result["loss"] == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("args, message", [
    (["nope", "--data-path", "x"], "model.init_from: 'nope' does not exist"),
    (["RUN", "--data-path", "nope.txt"], "data.path"),
    (["RUN", "--data-path", "DATA", "--data-seq-len", "999"], "data.seq_len"),
    (["RUN", "--data-path", "DATA", "--training-batch-size", "0"], "--training-batch-size"),
    (["RUN"], "--data-path"),
])
def test_errors_are_one_line_exit_2(run_dir, capsys, args, message):
    args = [a.replace("RUN", str(run_dir)).replace("DATA", str(run_dir.parent / "corpus.txt")) for a in args]
    code, _ = evaluate(*args)
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and message in err and "\n" not in err


def test_a_run_is_scored_with_its_own_precision(run_dir, tmp_path):
    """The run's training.precision (here edited to bf16 in a copy) is the default; the flag overrides it."""
    import shutil

    import yaml

    bf16_run = tmp_path / "bf16-run"
    shutil.copytree(run_dir, bf16_run)
    config = yaml.safe_load((bf16_run / "config.yaml").read_text(encoding="utf-8"))
    assert config["training"]["precision"] == "fp32"
    config["training"]["precision"] = "bf16"
    (bf16_run / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    root = run_dir.parent
    common = ["--data-path", str(root / "corpus.txt"), "--data-cache-dir", str(root / "cache"),
              "--training-device", "cpu", "--json"]
    scores = {}
    for name, source, extra in (("own-fp32", run_dir, []), ("own-bf16", bf16_run, []),
                                ("flag-bf16", run_dir, ["--training-precision", "bf16"])):
        code, out = evaluate(str(source), *common, *extra)
        assert code == 0, out
        scores[name] = json.loads(out)
    assert scores["own-fp32"]["precision"] == "fp32" and scores["own-bf16"]["precision"] == "bf16"
    assert scores["own-bf16"]["loss"] == scores["flag-bf16"]["loss"]  # bf16 autocast, as the flag gives
    assert scores["own-bf16"]["loss"] != scores["own-fp32"]["loss"]


def test_help_says_which_split_is_scored_by_default(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "all (the default): every window of --data-path" in text
    assert "default: the run's training.precision" in text
