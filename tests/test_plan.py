"""The pre-flight planner (`python -m llm.plan`, issue 23): its arithmetic against the real byte counts of a tiny
model and its optimizer, and its CLI (the printed flags parse with the training CLI; bad input is one line, exit 2).

The memory model's accuracy on whole training steps is measured by benchmarks/bench_plan.py (RESULTS.md)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from llm.models.decoder import DecoderModel
from llm.plan import Candidate, candidates, main, model_shape, parse_memory, predict
from llm.training.optim.optimizers import build_optimizer, split_muon_params
from llm.training.train import parse_config

SEQ = 16


def _state_bytes(model: torch.nn.Module, optimizer_name: str) -> int:
    """Bytes of the per-parameter optimizer state after one real step (scalar step counters excluded)."""
    cfg = SimpleNamespace(optimizer=optimizer_name, lr=1e-3, muon_lr_scale=8.0, weight_decay=0.1, betas=(0.9, 0.95))
    opt = build_optimizer(model, cfg)
    model(torch.randint(0, 256, (2, SEQ))).float().pow(2).mean().backward()
    opt.step()
    return sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
               if torch.is_tensor(v) and v.numel() > 1)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_parameter_gradient_and_optimizer_bytes_are_the_real_ones(optimizer):
    shape = model_shape("tiny", SEQ)
    model = DecoderModel.from_preset("tiny", max_seq_len=SEQ)
    params = sum(p.numel() for p in model.parameters())
    assert shape.params == params
    assert shape.muon_params == sum(p.numel() for p in split_muon_params(model)[0])
    one = predict(shape, Candidate("ddp", 1, "none", 2), 1, 1, 1 << 40, SEQ, "fp32", optimizer)
    assert one.weights == one.grads == sum(p.numel() * p.element_size() for p in model.parameters())
    assert one.optimizer == pytest.approx(_state_bytes(model, optimizer))
    # FSDP over 4 GPUs holds a quarter of each; the activations of a micro-batch do not shrink with it.
    four = predict(shape, Candidate("fsdp", 1, "none", 2), 4, 1, 1 << 40, SEQ, "fp32", optimizer)
    assert (four.weights, four.optimizer) == pytest.approx((one.weights / 4, one.optimizer / 4))
    assert four.activations == one.activations
    # Checkpointing keeps less; a larger micro-batch keeps more.
    full = predict(shape, Candidate("fsdp", 1, "full", 2), 4, 1, 1 << 40, SEQ, "fp32", optimizer)
    sel = predict(shape, Candidate("fsdp", 1, "selective", 2), 4, 1, 1 << 40, SEQ, "fp32", optimizer)
    big = predict(shape, Candidate("fsdp", 1, "none", 4), 4, 1, 1 << 40, SEQ, "fp32", optimizer)
    assert full.activations < sel.activations < four.activations < big.activations


def test_moe_counts_total_and_active_parameters_and_tp_divides_heads():
    moe = model_shape("debug-moe", SEQ)
    assert moe.moe and moe.active_params < moe.params
    layouts = {(c.strategy, c.tp) for c in candidates(model_shape("tiny", SEQ), 8, 1, 2)}
    assert layouts == {("ddp", 1), ("fsdp", 1), ("fsdp", 2)}  # tiny: 4 heads, 2 KV heads
    assert {(c.strategy, c.tp) for c in candidates(model_shape("tiny", SEQ), 1, 1, 2)} == {("ddp", 1)}


def test_memory_spellings():
    assert parse_memory("80GB") == 80 * 10**9
    assert parse_memory("80GiB") == parse_memory("80") == parse_memory("80g") == 80 * 2**30
    assert parse_memory("512MiB") == 512 * 2**20


def test_cli_prints_the_fastest_fitting_plan_as_flags_the_train_cli_parses(capsys, tmp_path, monkeypatch):
    assert main(["--model-preset", "tiny", "--gpus", "2", "--gpu-memory", "1GB", "--seq-len", "32",
                 "--optimizer", "adamw"]) == 0
    out = capsys.readouterr().out
    line = next(row for row in out.splitlines() if row.startswith("flags: "))
    flags = line.split()[1:]
    assert "--training-activation-checkpointing" in flags and "--training-batch-size" in flags
    monkeypatch.chdir(tmp_path)
    config, _, _ = parse_config(flags)  # every flag printed is one the training CLI takes, as printed
    assert (config.model.preset, config.data.seq_len, config.training.optimizer) == ("tiny", 32, "adamw")
    assert config.training.batch_size == int(flags[flags.index("--training-batch-size") + 1])
    assert config.distributed.strategy == flags[flags.index("--distributed-strategy") + 1]
    assert config.training.activation_checkpointing == flags[flags.index("--training-activation-checkpointing") + 1]
    if "--distributed-tensor-parallel" in flags:
        assert config.distributed.tensor_parallel == int(flags[flags.index("--distributed-tensor-parallel") + 1])


@pytest.mark.parametrize("argv, needle", [
    (["--model-preset", "nope", "--gpus", "2", "--gpu-memory", "80GB"], "--model-preset"),
    (["--model-preset", "tiny", "--gpus", "0", "--gpu-memory", "80GB"], "--gpus"),
    (["--model-preset", "tiny", "--gpus", "2", "--gpu-memory", "80 parsecs"], "--gpu-memory"),
    (["--model-preset", "tiny", "--gpus", "two", "--gpu-memory", "80GB"], "--gpus"),
    (["--model-preset", "tiny", "--gpus", "4", "--nodes", "3", "--gpu-memory", "80GB"], "--nodes"),
])
def test_bad_input_is_one_line_and_exit_2(argv, needle, capsys):
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and needle in captured.err


def test_nothing_fits_says_so():
    assert main(["--model-preset", "llama-3.1-8b", "--gpus", "1", "--gpu-memory", "8GB"]) == 1


def test_the_docs_planner_commands_run(capsys):
    from helpers import REPO

    lines = [line for line in (REPO / "docs" / "scale-out.md").read_text("utf-8").splitlines()
             if line.startswith("python -m llm.plan ")]
    assert len(lines) >= 2
    for line in lines:
        assert main(line.split()[3:]) == 0, line
        assert "flags: " in capsys.readouterr().out
