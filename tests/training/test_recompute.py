"""Activation recomputation modes (`--training-activation-checkpointing none|full|selective`): equal gradients, what
each mode recomputes, the flag's spellings old and new, and a bad value as one line."""

from __future__ import annotations

import collections
import json

import pytest
import torch
from helpers import CKPT, call_main
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import CheckpointPolicy

from llm.artifacts.checkpoint import write_manifest
from llm.errors import ConfigError
from llm.models.decoder import DecoderModel, TransformerBlock
from llm.models.recompute import SAVED_OPS, _keep_matmuls, parse_mode
from llm.training.train import main


class CountOps(TorchDispatchMode):
    """Counts the aten ops that run (in backward: what recomputation re-executes)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls[func.__name__.split(".")[0]] += 1
        return func(*args, **(kwargs or {}))


def grads_and_backward_ops(mode) -> tuple[dict[str, torch.Tensor], collections.Counter[str]]:
    torch.manual_seed(0)
    model = DecoderModel.tiny(hidden_size=32, num_layers=2, num_heads=4, vocab_size=64, dropout=0.1)
    for block in model.layers:
        block.activation_checkpointing = mode
    torch.manual_seed(1)  # the same dropout masks on every side (recomputation replays the RNG)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(2))
    loss = model(ids).float().logsumexp(-1).mean()
    with CountOps() as ops:
        loss.backward()
    return {n: p.grad for n, p in model.named_parameters()}, ops.calls


def test_none_full_and_selective_give_the_same_gradients_and_recompute_what_they_say():
    plain, none_ops = grads_and_backward_ops("none")
    ops = {}
    for mode in ("full", "selective", True):
        got, ops[mode] = grads_and_backward_ops(mode)
        for name in plain:
            torch.testing.assert_close(got[name], plain[name], rtol=1e-6, atol=1e-6, msg=f"{mode}: {name}")
    # (with dropout on, attention is the math path: bmm, softmax, dropout)
    assert none_ops["silu"] == 0 and none_ops["_safe_softmax"] == 0 and none_ops["rsqrt"] == 0
    assert ops["full"]["mm"] > none_ops["mm"] and ops["full"]["bmm"] > none_ops["bmm"]
    # selective: norms, activations and the softmax path run again; the matmul outputs are the stored ones
    assert (ops["selective"]["mm"], ops["selective"]["bmm"]) == (none_ops["mm"], none_ops["bmm"])
    assert ops["selective"]["silu"] == ops["selective"]["_safe_softmax"] == 2
    assert ops["selective"]["rsqrt"] == ops["full"]["rsqrt"] > 0
    assert ops[True] == ops["full"]


def test_selective_keeps_matmul_and_attention_outputs_and_recomputes_the_rest():
    aten = torch.ops.aten
    assert {aten.mm.default, aten.addmm.default, aten.bmm.default} <= SAVED_OPS
    assert _keep_matmuls(None, aten.mm.default) is CheckpointPolicy.MUST_SAVE
    for cheap in (aten.mul.Tensor, aten.rsqrt.default, aten.silu.default, aten._softmax.default):
        assert _keep_matmuls(None, cheap) is CheckpointPolicy.PREFER_RECOMPUTE


@pytest.mark.parametrize(("value", "mode"), [
    (True, "full"), (False, "none"), ("true", "full"), ("False", "none"), ("selective", "selective"), ("full", "full"),
])
def test_spellings_of_the_mode(value, mode):
    assert parse_mode(value) == mode


def test_flags_and_yaml_spellings_resolve_to_a_mode(tmp_path, tiny_config):
    for flags, mode in ((["--training-activation-checkpointing"], "full"),
                        (["--no-training-activation-checkpointing"], "none"),
                        (["--training-activation-checkpointing", "true"], "full")):
        assert tiny_config(*flags)[0].training.activation_checkpointing == mode, flags
    yaml = tmp_path / "c.yaml"
    yaml.write_text("training:\n  activation_checkpointing: true\n")
    assert tiny_config("--config", str(yaml))[0].training.activation_checkpointing == "full"


def test_a_bad_mode_is_one_line_exit_2(tmp_path):
    with pytest.raises(ConfigError, match="training.activation_checkpointing"):
        parse_mode("sometimes")
    proc = call_main(main, ["--task", "regression", "--training-activation-checkpointing", "partial"], cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "training.activation_checkpointing" in lines[0] and "'partial'" in lines[0]
    assert "selective" in lines[0]


def test_a_block_left_alone_does_not_recompute():
    assert TransformerBlock.activation_checkpointing == "none"




def test_a_checkpoint_written_when_the_field_was_a_switch_resumes_without_a_change_warning(make_engine, caplog):
    engine = make_engine(*CKPT, "--training-max-steps", "2", run=True)
    saved = engine.run_dir / "checkpoints" / "step-00000002"
    text = (saved / "config.yaml").read_text()
    assert "activation_checkpointing: none" in text
    old = text.replace("activation_checkpointing: none", "activation_checkpointing: false")  # as an old run wrote it
    (saved / "config.yaml").write_text(old)
    manifest = json.loads((saved / "manifest.json").read_text())
    write_manifest(saved, 2, 1, {k: v for k, v in manifest.items() if k in ("task", "reason")})
    caplog.set_level("INFO", logger="llm")
    make_engine(*CKPT, "--training-max-steps", "3", run=True)
    assert any(f"resumed from {saved}" in r.getMessage() for r in caplog.records)
    changes = [r.getMessage() for r in caplog.records if "changed config" in r.getMessage()]
    assert not any("activation_checkpointing" in line for line in changes), changes


def moe_grads(mode: str) -> dict[str, torch.Tensor]:
    """Gradients of one optimizer step of 2 micro-batches of an MoE model, balance loss included (its fractions
    come from the step's counts so far: the second micro-batch's differ from its own)."""
    from llm.models import hooks

    torch.manual_seed(0)
    model = DecoderModel.tiny(hidden_size=32, num_layers=2, num_heads=4, vocab_size=64, use_moe=True, num_experts=4,
                              top_k=2, moe_aux_loss_coef=1.0)
    for block in model.layers:
        block.activation_checkpointing = mode
    hooks.begin_step(model)
    for seed in (2, 3):
        ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(seed))
        loss = model(ids).float().logsumexp(-1).mean() + hooks.aux_loss(model)
        loss.backward()
    hooks.end_step(model)
    return {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_moe_balance_loss_gradients_are_the_same_when_recomputed(mode):
    """The recomputed forward must save what the first one saved: the balance loss's fractions of the step's global
    counts, not of the micro-batch's own (the drift once seen with MoE + recomputation on several processes)."""
    plain, got = moe_grads("none"), moe_grads(mode)
    for name in plain:
        torch.testing.assert_close(got[name], plain[name], rtol=1e-6, atol=1e-6, msg=f"{mode}: {name}")
