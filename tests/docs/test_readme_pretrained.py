"""Every command of the README's "Start from a pretrained model" section, executed in order on tiny random HF
models (their folders stand in for SmolLM2-135M, Llama-3.2-1B and Qwen3-0.6B); flags appended to each command shrink
the work to seconds."""

from __future__ import annotations

import re
import shlex

import pytest
import torch
from helpers import REPO, read_metrics

from llm.data.tokenizers import HFTokenizer
from llm.evaluate import main as evaluate_main
from llm.export import main as export_main
from llm.registry import TASKS
from llm.training.train import main as train_main

transformers = pytest.importorskip("transformers")

SECTION = "## Start from a pretrained model"
TEXT = "def square(x):\n    return x * x\n\n\ndef cube(x):\n    return x * x * x\n\n" * 10
COMMON = ["--training-device", "cpu", "--training-precision", "fp32", "--data-cache-dir", "cache"]
FAST = {
    "llm.training.train": [*COMMON, "--data-seq-len", "16", "--data-val-fraction", "0.3", "--training-batch-size", "4",
                           "--training-max-steps", "2", "--training-callbacks", "MetricsLogger",
                           "--logging-loggers", "jsonl"],
    "sft": [*COMMON, "--training-batch-size", "2", "--training-max-steps", "2", "--training-callbacks", "MetricsLogger",
            "--logging-loggers", "jsonl"],  # the demo set's own window: the source's context
    "llm.evaluate": [*COMMON, "--data-seq-len", "16", "--training-batch-size", "4"],
    "llm.export": [],
}
MAINS = {"llm.training.train": train_main, "llm.evaluate": evaluate_main, "llm.export": export_main}


def section_blocks() -> list[tuple[str, str]]:
    """(language, code) of each fenced block of the section."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    start = text.index(SECTION)
    end = text.index("\n## ", start + len(SECTION))
    return re.findall(r"```(\w+)\n(.*?)```", text[start:end], flags=re.S)


def commands(code: str) -> list[list[str]]:
    joined = code.replace("\\\n", " ")
    return [shlex.split(line) for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_the_section_is_there_with_every_step():
    blocks = section_blocks()
    modules = [cmd[2] for lang, code in blocks if lang == "bash" for cmd in commands(code)]
    assert modules == ["llm.training.train"] * 3 + ["llm.evaluate", "llm.export", "llm.export"] + \
        ["llm.training.train", "llm.export"] * 2  # SmolLM2 (hf, then gguf), then Llama 3 and Qwen3
    assert any(lang == "python" and "pipeline(" in code for lang, code in blocks)


@pytest.mark.slow
def test_every_command_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    tok = HFTokenizer.train_bpe([TEXT], 300)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, intermediate_size=48,
                                      max_position_embeddings=128)
    transformers.LlamaForCausalLM(config).save_pretrained("SmolLM2-135M")
    tok.save("SmolLM2-135M")
    shape = dict(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=48, max_position_embeddings=128)
    llama3 = dict(rope_type="llama3", rope_theta=500000.0, factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                  original_max_position_embeddings=64)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**shape, rope_parameters=llama3)).save_pretrained(
        "Llama-3.2-1B")
    transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**shape, head_dim=16)).save_pretrained("Qwen3-0.6B")
    for folder in ("Llama-3.2-1B", "Qwen3-0.6B"):
        tok.save(folder)
    for name in ("my_corpus.txt", "held_out.txt"):
        (tmp_path / name).write_text(TEXT, encoding="utf-8")

    ran = []
    for lang, code in section_blocks():
        if lang == "bash":
            for cmd in commands(code):
                assert cmd[:2] == ["python", "-m"]
                module, args = cmd[2], cmd[3:]
                sft = "--task" in args and args[args.index("--task") + 1] == "sft"
                if sft and "sft" not in TASKS.names():
                    continue  # the sft task is not part of this checkout yet
                assert MAINS[module]([*args, *FAST["sft" if sft else module]]) == 0, (cmd, capsys.readouterr().err)
                ran.append(module)
        elif lang == "python":
            exec(compile(code, "README.md", "exec"), {})  # noqa: S102  (the README's own snippet)
            ran.append("python")
    assert ran.count("llm.training.train") >= 4 and ran[-1] == "python" and "llm.evaluate" in ran
    out = capsys.readouterr().out
    assert "perplexity" in out and "def fibonacci(n):" in out
    assert [r["step"] for r in read_metrics(tmp_path / "runs" / "smollm2-before")] == [0]
    assert (tmp_path / "exported" / "tokenizer.json").is_file()
    assert (tmp_path / "smollm2-corpus.gguf").read_bytes()[:4] == b"GGUF"
    for folder, name in (("llama32-exported", "LlamaForCausalLM"), ("qwen3-exported", "Qwen3ForCausalLM")):
        assert type(transformers.AutoModelForCausalLM.from_pretrained(folder)).__name__ == name
