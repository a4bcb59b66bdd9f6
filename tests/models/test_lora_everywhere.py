"""Adapters everywhere (issue 21, item 3): every documented target trains under every variant, MoE experts and the
router included; the merge stays exact for each variant; QLoRA refuses in one line where it cannot run; the run
says what trains; the adapters switch off for a reference model; FSDP with 2 processes equals 1 process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO, call_main
from safetensors.torch import load_file
from torch import nn

from llm.artifacts import base_pin
from llm.artifacts.checkpoint import MANIFEST
from llm.artifacts.runs import load_run
from llm.errors import ConfigError
from llm.models import lora
from llm.models.decoder import DecoderModel
from llm.models.lora_experts import ExpertLoRA
from llm.training.train import main as train_main

MOE = {"use_moe": True, "num_experts": 4, "top_k": 2, "hidden_size": 32, "num_heads": 2}
# Every name the README documents, on a model that has it.
TARGETS = [*[(t, {}) for t in lora.DEFAULT_TARGETS], ("gate", MOE), ("w_gate_up", MOE), ("w_down", MOE),
           ("lm_head", {}), ("up_proj", {**MOE, "num_shared_experts": 1})]  # the last: an MoE layer's shared experts
IDS = [t if not o.get("num_shared_experts") else f"shared-{t}" for t, o in TARGETS]
assert {t for t, _ in TARGETS} == set(lora.TARGETS)


def adapted(targets, variant: str = "lora", seed: int = 0, **overrides) -> DecoderModel:
    torch.manual_seed(seed)
    return lora.apply_lora(DecoderModel.tiny(**overrides), rank=4, alpha=8, targets=list(targets), variant=variant)


def batch(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(seed))


def step(model: nn.Module, steps: int = 1) -> None:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for i in range(steps):
        ids = batch(i)
        loss = nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.roll(-1, 1).flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("variant", lora.VARIANTS)
@pytest.mark.parametrize(("target", "overrides"), TARGETS, ids=IDS)
def test_each_documented_target_s_adapter_moves_after_one_step(target, overrides, variant):
    model = adapted([target], variant, **overrides)
    adapters = lora.adapter_parameters(model)
    mine = {n for n in adapters if f".{target}." in n or f"lora_{target}." in n or n.startswith(f"{target}.")}
    assert mine and mine == set(adapters), sorted(adapters)
    assert all(not p.requires_grad for n, p in model.named_parameters() if n not in adapters)
    before = {n: p.detach().clone() for n, p in adapters.items()}
    step(model)
    moved = {n for n, p in adapters.items() if not torch.equal(p, before[n])}
    assert any("lora_B" in n for n in moved), sorted(moved)  # B starts at zero: the adapter now changes the output
    if variant == "dora":
        assert any("magnitude" in n for n in moved), sorted(adapters)


@pytest.mark.parametrize("variant", lora.VARIANTS)
@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_the_merged_export_equals_the_adapted_model_for_each_variant(variant, moe):
    targets = [*lora.DEFAULT_TARGETS, "lm_head"] if not moe else ["q_proj", "o_proj", "gate", "w_gate_up", "w_down"]
    model = adapted(targets, variant, **(MOE if moe else {}))
    scales = {m.scaling["default"] for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "scaling")}
    scales |= {m.scale for m in model.modules() if isinstance(m, ExpertLoRA)}
    assert scales == {8 / 2 if variant == "rslora" else 8 / 4}  # alpha / sqrt(r) for rsLoRA, alpha / r otherwise
    step(model, steps=2)
    merged = lora.merged_model(model.eval()).eval()
    assert not lora.is_adapted(merged) and set(merged.state_dict()) == set(DecoderModel.tiny(
        **(MOE if moe else {})).state_dict())
    with torch.no_grad():
        torch.testing.assert_close(merged(batch(5)), model(batch(5)), atol=1e-5, rtol=0)
        if moe:  # the experts' merged weights really changed (the adapters are not a no-op)
            assert not torch.equal(merged.layers[0].mlp.w_gate_up, model.layers[0].mlp.w_gate_up)


@pytest.mark.parametrize("variant", lora.VARIANTS)
def test_adapters_start_as_the_base_also_after_a_new_base_loads(variant):
    torch.manual_seed(3)
    base = DecoderModel.tiny(**MOE).eval()
    model = adapted(["q_proj", "gate", "w_gate_up", "w_down"], variant, seed=4, **MOE).eval()
    model.load_state_dict(base.state_dict())  # as model.init_from does: DoRA's magnitudes follow the new base
    with torch.no_grad():
        torch.testing.assert_close(model(batch()), base(batch()), atol=1e-6, rtol=0)


def test_disabled_computes_the_base_and_restores_the_adapters():
    model = adapted(["q_proj", "gate", "w_down"], "dora", **MOE)
    step(model, steps=2)
    plain = DecoderModel.tiny(**MOE)
    with lora.full_state(model):
        plain.load_state_dict({k.replace(".base_layer.", "."): v for k, v in model.state_dict().items()
                               if not lora.is_adapter_key(k)})
    model.eval(), plain.eval()
    with torch.no_grad():
        adapted_out = model(batch())
        with lora.disabled(model):
            torch.testing.assert_close(model(batch()), plain(batch()), atol=1e-6, rtol=0)
        torch.testing.assert_close(model(batch()), adapted_out, atol=0, rtol=0)
    assert all(p.requires_grad for p in lora.adapter_parameters(model).values())


def test_expert_adapters_refuse_dropout_and_are_named_in_the_target_error():
    with pytest.raises(ConfigError, match=r"^training.lora_dropout: invalid value 0.1 with expert targets"):
        lora.apply_lora(DecoderModel.tiny(**MOE), rank=2, alpha=4, dropout=0.1, targets=["w_down"])
    with pytest.raises(ConfigError, match=r"^training.lora_targets: \['w_down'\] name no nn.Linear .*q_proj"):
        lora.apply_lora(DecoderModel.tiny(), rank=2, alpha=4, targets=["w_down"])  # a dense model has no experts
    assert isinstance(adapted(["w_down"], **MOE).layers[0].mlp.lora_w_down, ExpertLoRA)


TINY_SFT = [
    "--task", "sft", "--model-hidden-size", "32", "--model-num-layers", "1", "--model-num-heads", "4",
    "--data-num-samples", "32", "--training-batch-size", "8", "--training-precision", "fp32", "--training-device",
    "cpu", "--training-val-max-batches", "1", "--training-callbacks", "LRSchedulerCallback", "--logging-loggers",
    "jsonl", "--training-lora-rank", "4",
]


@pytest.mark.parametrize(("extra", "message"), [
    (["--training-lora-quantize", "nf4"], "error: training.lora_quantize: nf4 is not available: "),
    (["--training-lora-variant", "qlora"], "error: training.lora_variant: invalid value 'qlora'"),
    (["--model-use-moe", "--distributed-expert-parallel", "2", "--distributed-nproc-per-node", "2",
      "--training-lora-targets", "w_gate_up"], "error: distributed.expert_parallel: invalid value 2"),
], ids=["nf4-on-cpu", "variant", "expert-parallel"])
def test_refusals_are_one_line_exit_2_and_write_nothing(tmp_path, extra, message):
    run = tmp_path / "run"
    result = call_main(train_main, [*TINY_SFT, *extra, "--training-max-steps", "1", "--logging-log-dir", str(run)],
                       tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), result.stderr
    assert not run.exists()


def test_nf4_says_why_on_this_machine():
    why = lora.quantize_unavailable("nf4", "cpu")
    assert why and ("bitsandbytes" in why or "CUDA" in why)
    assert lora.quantize_unavailable("none", "cpu") is None


def test_the_run_states_trainable_and_total_parameters_and_the_adapted_modules(tmp_path):
    run = tmp_path / "run"
    result = call_main(train_main, [*TINY_SFT, "--training-lora-variant", "rslora", "--training-lora-targets",
                                    "q_proj", "v_proj", "--training-max-steps", "1", "--logging-log-dir", str(run)],
                       tmp_path)
    assert result.returncode == 0, result.stderr
    [line] = [x for x in (run / "train.log").read_text().splitlines() if "adapters: " in x]
    plain = sum(p.numel() for p in load_run(run, tokenizer=False).model.parameters())  # the merged final model
    trainable = 2 * 4 * (32 + 32)  # q_proj and v_proj (32 -> 32 here): A (4, 32) and B (32, 4) each
    assert f"adapters: {trainable:,} trainable of {plain + trainable:,} parameters" in line
    assert line.endswith("rslora rank 4 alpha 16 on 2 modules: q_proj x1, v_proj x1")


# ------------------------------------------------------------------------------------- FSDP: 2 processes = 1
LM = ["--task", "lm", "--data-seq-len", "16", "--model-max-seq-len", "16", "--model-hidden-size", "32",
      "--model-num-layers", "1", "--model-num-heads", "2", "--model-use-moe", "--model-num-experts", "4",
      "--model-top-k", "2", "--training-optimizer", "adamw", "--training-scheduler-type", "constant", "--training-lr",
      "3e-3", "--training-warmup", "0", "--training-precision", "fp32", "--training-device", "cpu",
      "--training-log-interval", "1", "--training-val-interval", "0", "--training-callbacks", "MetricsLogger",
      "--logging-loggers", "jsonl", "--seed", "3"]


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


@pytest.mark.slow
def test_fsdp_two_processes_equal_one_with_resume_and_the_base_pin(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"value_{i} = {i} * {i % 5}\n" for i in range(400)), encoding="utf-8")
    data = [*LM, "--data-path", str(corpus), "--data-cache-dir", str(tmp_path / "cache")]
    base = tmp_path / "base"
    assert call_main(train_main, [*data, "--training-batch-size", "8", "--training-max-steps", "1",
                                  "--logging-log-dir", str(base)], tmp_path).returncode == 0
    adapters = [*data, "--model-init-from", str(base), "--training-lora-rank", "4", "--training-lora-alpha", "8",
                "--training-lora-variant", "dora", "--training-lora-targets", "q_proj", "o_proj", "gate",
                "w_gate_up", "w_down", "--training-grad-clip", "0.5", "--checkpoint-interval", "2"]
    one, two = tmp_path / "one", tmp_path / "two"
    result = call_main(train_main, [*adapters, "--training-batch-size", "8", "--training-max-steps", "4",
                                    "--logging-log-dir", str(one)], tmp_path)
    assert result.returncode == 0, result.stderr
    fsdp = [*adapters, "--training-batch-size", "4", "--distributed-strategy", "fsdp", "--distributed-nproc-per-node",
            "2", "--logging-log-dir", str(two)]
    for steps in ("2", "4"):  # stopped after step 2's checkpoint, then resumed from it
        proc = subprocess.run([sys.executable, "-m", "llm.training.train", *fsdp, "--training-max-steps", steps],
                              cwd=tmp_path, env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": ""},
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in (two / "train.log").read_text()
    assert losses(two) == pytest.approx(losses(one), abs=1e-5) and len(losses(one)) == 4
    got, want = load_file(two / "model.safetensors"), load_file(one / "model.safetensors")  # merged, plain names
    assert got.keys() == want.keys() and not any(lora.is_adapter_key(k) for k in got)
    assert max((got[k] - want[k]).abs().max().item() for k in want) < 1e-5
    # What export/evaluate/generate rebuild from an adapters-only checkpoint (base + DoRA, experts): the run's merge.
    rebuilt = load_run(one / "checkpoints" / "step-00000004", tokenizer=False).model.state_dict()
    assert all(torch.equal(rebuilt[k], want[k]) for k in want)
    step2 = two / "checkpoints" / "step-00000002"
    assert json.loads((step2 / MANIFEST).read_text())[base_pin.MANIFEST_KEY]["path"] == str(base)
    shards = b"".join(p.read_bytes() for p in (step2 / "sharded").glob("*"))
    assert b"lora_w_gate_up.lora_A" in shards and b"base_layer.weight" not in shards  # adapters only, as under DDP
