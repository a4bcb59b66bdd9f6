"""`DecoderModel` against Hugging Face `LlamaForCausalLM` / `MixtralForCausalLM`, same shape, same device, one run.

    python -m benchmarks.bench_gpu_models [--device cuda] [--shapes byte-125m byte-moe-480m] [--compile]

For each shape (a preset name of llm/models/presets.py; the HF config is built from the same fields), both
models train with the same hand loop: bf16 autocast, fused AdamW, cross-entropy on fp32 logits, random tokens
of `--seq-len`. Rounds alternate the two sides so load hits both alike; reported: tokens/s and MFU of each (the
FLOPs of llm.models.flops over the device's peak) and the ratio ours / HF. A side that fails to compile is run
eagerly and marked so. `gpu_check.sh` runs it; on a CPU `--device cpu --shapes tiny --seq-len 64` is a smoke run.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F

from llm.models import DecoderModel
from llm.models.flops import flops_per_token
from llm.training.core.engine import compile_backend
from llm.training.observers.throughput import device_peak_flops


def hf_model(model: DecoderModel) -> torch.nn.Module:
    """The transformers model of the same shape (random weights; speed does not depend on them)."""
    import transformers

    c = model.config
    common = dict(vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_layers,
                  num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads, rope_theta=c.rope_theta,
                  rms_norm_eps=c.norm_eps, max_position_embeddings=c.max_seq_len, tie_word_embeddings=c.tie_embeddings)
    if c.use_moe:
        cfg = transformers.MixtralConfig(**common, intermediate_size=c.moe_intermediate_size,
                                         num_local_experts=c.num_experts, num_experts_per_tok=c.top_k)
        return transformers.MixtralForCausalLM(cfg)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**common, intermediate_size=c.intermediate_size))


class Side:
    """One model with its optimizer and (maybe compiled) forward; `steps(n)` trains n steps, returns seconds."""

    def __init__(self, name: str, model: torch.nn.Module, device: torch.device, compile: bool, hf: bool) -> None:
        self.name, self.model, self.device, self.hf = name, model.to(device), device, hf
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, fused=device.type == "cuda" or None)
        self.forward: Any = self.model
        self.note = ""
        if compile:
            self.forward = torch.compile(self.model, backend=compile_backend())

    def _step(self, ids: torch.Tensor) -> None:
        with torch.autocast(self.device.type, dtype=torch.bfloat16):
            out = self.forward(ids)
            logits = out.logits if self.hf else out  # (B, T, V)
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def steps(self, ids: torch.Tensor, n: int) -> float:
        try:
            self._step(ids)  # warm-up (and compilation) outside the timing
        except Exception as exc:  # noqa: BLE001  (a benchmark reports what did not compile and goes on)
            if self.forward is self.model:
                raise
            self.forward, self.note = self.model, f" [eager: compile failed: {type(exc).__name__}]"
            self._step(ids)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        began = time.perf_counter()
        for _ in range(n):
            self._step(ids)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - began


def compare(preset: str, device: torch.device, batch: int, seq_len: int, steps: int, rounds: int, compile: bool,
            layers: int) -> dict[str, float]:
    overrides: dict[str, Any] = {"max_seq_len": max(seq_len, 64)}
    if layers:
        overrides["num_layers"] = layers
    torch.manual_seed(0)
    ours = DecoderModel.from_preset(preset, **overrides)
    sides = [Side("ours", ours, device, compile, hf=False), Side("hf", hf_model(ours), device, compile, hf=True)]
    ids = torch.randint(0, ours.config.vocab_size, (batch, seq_len), device=device)
    seconds: dict[str, list[float]] = {s.name: [] for s in sides}
    for _ in range(rounds):
        for side in sides:
            seconds[side.name].append(side.steps(ids, steps))
    tokens = batch * seq_len * steps
    result = {f"{name}_tokens_per_s": tokens / statistics.median(s) for name, s in seconds.items()}
    result["ratio"] = result["ours_tokens_per_s"] / result["hf_tokens_per_s"]
    peak = device_peak_flops(device, torch.bfloat16)
    flops = flops_per_token(ours, seq_len)
    for name in seconds:
        if peak:
            result[f"{name}_mfu"] = 100 * result[f"{name}_tokens_per_s"] * flops / peak
    result["parameters"] = float(sum(p.numel() for p in ours.parameters()))
    notes = "".join(s.note for s in sides)
    mfu = {n: f" (MFU {result[n + '_mfu']:.1f}%)" if n + "_mfu" in result else "" for n in seconds}
    print(f"{preset}{f' ({layers} layers)' if layers else ''}, {result['parameters'] / 1e6:.1f}M parameters, "
          f"batch {batch} x {seq_len}: ours {result['ours_tokens_per_s']:,.0f} tok/s{mfu['ours']}, HF "
          f"{result['hf_tokens_per_s']:,.0f} tok/s{mfu['hf']}: {result['ratio']:.2f}x{notes}", flush=True)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--shapes", nargs="+", default=["byte-125m", "byte-moe-480m"], help="preset names")
    parser.add_argument("--layers", type=int, default=0, help="override the presets' layer counts (fit memory)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}")
    for preset in args.shapes:
        compare(preset, device, args.batch, args.seq_len, args.steps, args.rounds, args.compile, args.layers)


if __name__ == "__main__":
    main()
