"""Tier 3: QLoRA (`--training-lora-quantize nf4`), the frozen base in 4-bit NF4 through bitsandbytes on CUDA.

Skipped without CUDA or without bitsandbytes (which the CPU suite never installs; the refusal there is tested in
tests/models/test_lora_everywhere.py). What it holds: the targeted projections become bitsandbytes `Linear4bit`
layers holding packed 4-bit bytes, re-quantized when `model.init_from` loads a new base; the adapted model starts
at (the NF4 rounding of) the base, only the adapters train, the merged export is the dequantized base plus the
adapters, and a CLI run says its base is NF4.
"""

from __future__ import annotations

import pytest
import torch
from helpers import call_main
from torch import nn

from llm.models import lora
from llm.models.decoder import DecoderModel
from llm.training.train import main as train_main

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
bnb = pytest.importorskip("bitsandbytes")

SIZE = {"hidden_size": 64, "num_layers": 2, "num_heads": 4}


def test_nf4_base_trains_its_adapters_and_merges():
    torch.manual_seed(0)
    base = DecoderModel.tiny(**SIZE).cuda().eval()
    torch.manual_seed(1)
    model = lora.apply_lora(DecoderModel.tiny(**SIZE), rank=8, alpha=16, adapters_only=True, quantize="nf4")
    model = model.cuda()
    model.load_state_dict(base.state_dict())  # what model.init_from does: the new base is quantized, not copied
    q = model.layers[0].self_attn.q_proj.base_layer
    assert type(q).__name__ == "Linear4bit" and q.weight.dtype == torch.uint8
    ids = torch.randint(0, 256, (2, 32), device="cuda")
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
        start, want = model.eval()(ids).float(), base(ids).float()
    assert (start - want).abs().mean() < 0.15 * want.abs().mean()  # the NF4 rounding of the same base (~6% on CPU)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    before = {n: p.detach().clone() for n, p in lora.adapter_parameters(model).items()}
    for _ in range(3):
        with torch.autocast("cuda", torch.bfloat16):
            loss = nn.functional.cross_entropy(model(ids).float().flatten(0, 1), ids.roll(-1, 1).flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert all(not torch.equal(p, before[n]) for n, p in lora.adapter_parameters(model).items() if "lora_B" in n)
    assert all(not p.requires_grad for n, p in model.named_parameters() if not lora.is_adapter_key(n))
    merged = lora.merged_model(model.eval()).cuda().eval()
    assert type(merged.layers[0].self_attn.q_proj) is nn.Linear
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
        got, want = merged(ids).float(), model(ids).float()
    assert (got - want).abs().max() < 0.05 * want.abs().max()  # bf16 compute on both sides


def test_a_qlora_run_says_its_base_is_nf4(tmp_path):
    common = ["--task", "sft", "--model-hidden-size", "64", "--model-num-layers", "1", "--model-num-heads", "4",
              "--data-num-samples", "32", "--training-batch-size", "8", "--training-device", "cuda",
              "--training-precision", "bf16", "--training-val-max-batches", "1", "--logging-loggers", "jsonl"]
    base, run = tmp_path / "base", tmp_path / "run"
    assert call_main(train_main, [*common, "--training-max-steps", "1", "--logging-log-dir", str(base)],
                     tmp_path).returncode == 0
    result = call_main(train_main, [*common, "--model-init-from", str(base), "--training-lora-rank", "8",
                                    "--training-lora-quantize", "nf4", "--training-max-steps", "3",
                                    "--logging-log-dir", str(run)], tmp_path)
    assert result.returncode == 0, result.stderr
    [line] = [x for x in (run / "train.log").read_text().splitlines() if "adapters: " in x]
    assert "(base in NF4)" in line
    assert (run / "model.safetensors").exists()
