"""Peak resident memory of a training step: our DecoderModel against Hugging Face, one fresh process per side.

    python -m benchmarks.bench_memory [--repeats 3] [--steps 3] [--sides ours hf ...]

Every measurement is a child process (`--child SIDE`), so no side inherits another's peak. Each child imports
the same libraries (torch, transformers, llm), builds its model, optimizer and batch, then resets the kernel's
peak-RSS counter (`/proc/self/clear_refs`), notes its resident set, trains `steps` steps and reports its peak RSS
(VmHWM, the counter behind `ru_maxrss`; see `_peak_bytes` for why not `ru_maxrss` itself): the peak during the
steps, and that peak above the pre-step RSS (the step's own memory: activations, gradients, optimizer state,
allocator slack). The lifetime peak (imports and set-up included) is reported too.
Children alternate (ours, HF, ours, HF, ...) `repeats` times, two at a time (memory is per process); medians.

The step is identical on both sides: bf16 autocast forward, cross-entropy on fp32 logits (as the lm task), backward,
gradient clipping, fused AdamW. Config: the lm task's default model (hidden 128, 4 layers, 4 heads, SwiGLU 512,
vocab 256, seq 256, batch 16); MoE sides use 8 experts, top-2. HF: `LlamaForCausalLM` / `MixtralForCausalLM`
(sdpa); "+ckpt" sides use activation checkpointing (ours: `--training-activation-checkpointing`; HF:
`gradient_checkpointing_enable`). Target: ours not above HF.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any

SIDES = ("ours", "hf", "ours+ckpt", "hf+ckpt", "ours-moe", "hf-moe")
PAIRS = (("ours", "hf"), ("ours+ckpt", "hf+ckpt"), ("ours-moe", "hf-moe"), ("ours+ckpt", "ours"))
BATCH, EXPERTS, TOP_K = 16, 8, 2


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_bytes() -> int:
    """This process's peak RSS: VmHWM, else ru_maxrss.

    Not ru_maxrss first: at exec Linux carries the old address space's peak into it, and the old address space of
    a child started by `subprocess` is a copy of its parent's, so ru_maxrss is never below the parent's RSS at
    fork time (a suite that has loaded models would lift both sides to its own size).
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the peak RSS (VmHWM)
        return True
    except OSError:
        return False


def _model_config() -> Any:
    from llm.training.train import parse_config

    config, _, _ = parse_config(["--task", "lm"])
    return config


def _build(side: str) -> tuple[Any, Any]:
    """(model, config) of one side; same shapes on both libraries."""
    import dataclasses

    import torch
    import transformers

    from llm.models.decoder import DecoderModel, TransformerBlock, default_intermediate_size

    config = _model_config()
    m, moe = config.model, side.endswith("moe")
    torch.manual_seed(0)
    if side.startswith("ours"):
        kwargs = dataclasses.asdict(m) | ({"use_moe": True, "num_experts": EXPERTS, "top_k": TOP_K} if moe else {})
        model = DecoderModel(**kwargs)
        if side.endswith("+ckpt"):
            if not hasattr(TransformerBlock, "activation_checkpointing"):
                raise SystemExit("TransformerBlock has no activation checkpointing yet")
            for block in model.layers:
                block.activation_checkpointing = True
        return model, config
    common = dict(vocab_size=m.vocab_size, hidden_size=m.hidden_size, num_hidden_layers=m.num_layers,
                  num_attention_heads=m.num_heads, num_key_value_heads=m.num_kv_heads or m.num_heads,
                  intermediate_size=m.intermediate_size or default_intermediate_size(m.hidden_size),
                  max_position_embeddings=m.max_seq_len, rms_norm_eps=m.norm_eps)
    if moe:
        hf_cfg = transformers.MixtralConfig(**common, num_local_experts=EXPERTS, num_experts_per_tok=TOP_K,
                                            output_router_logits=True)
        model = transformers.MixtralForCausalLM._from_config(hf_cfg, attn_implementation="sdpa")
    else:
        model = transformers.LlamaForCausalLM._from_config(transformers.LlamaConfig(**common),
                                                           attn_implementation="sdpa")
    if side.endswith("+ckpt"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model, config


def child(side: str, steps: int, threads: int) -> dict[str, Any]:
    """One side in this (fresh) process; returns the memory numbers in MiB."""
    import torch
    import torch.nn.functional as F
    import transformers  # noqa: F401  (both sides carry the same libraries)

    import llm.models  # noqa: F401

    torch.set_num_threads(threads)
    model, config = _build(side)
    hf = not side.startswith("ours")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    seq = config.data.seq_len
    ids = torch.randint(0, config.model.vocab_size, (BATCH, seq + 1), generator=torch.Generator().manual_seed(0))
    x, y = ids[:, :-1], ids[:, 1:]
    gc.collect()
    setup_peak = _peak_bytes()
    reset = _reset_peak()
    before = _rss_bytes()
    for _ in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(input_ids=x) if hf else model(x)
            logits = out.logits if hf else out  # (B, T, V)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
            if hf and getattr(out, "aux_loss", None) is not None:
                loss = loss + model.config.router_aux_loss_coef * out.aux_loss
            elif not hf and model.aux_loss is not None:
                loss = loss + model.aux_loss  # coefficients already applied
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    peak = _peak_bytes()
    mib = 2**20
    return {"side": side, "peak_mib": peak / mib, "step_mib": (peak - before) / mib,
            "lifetime_mib": max(peak, setup_peak) / mib, "peak_reset": reset, "loss": loss.item()}


def measure(side: str, steps: int, threads: int) -> dict[str, Any]:
    """Run `child` in a fresh interpreter and parse its JSON line."""
    cmd = [sys.executable, "-m", "benchmarks.bench_memory", "--child", side, "--steps", str(steps),
           "--threads", str(threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=root)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return {"side": side, "error": tail}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(sides: tuple[str, ...] = SIDES, repeats: int = 1, steps: int = 3, threads: int = 1,
        parallel: int = 2) -> dict[str, Any]:
    """All sides, alternating, `repeats` times; prints medians and the pair ratios. Returns the medians."""
    samples: dict[str, list[dict[str, Any]]] = {s: [] for s in sides}
    order = [side for _ in range(repeats) for side in sides]
    # Two children at a time: a process's RSS is its own, so running side by side changes no number, only time.
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        for row in pool.map(lambda side: measure(side, steps, threads), order):
            samples[row["side"]].append(row)
    medians: dict[str, dict[str, float]] = {}
    for side, rows in samples.items():
        good = [r for r in rows if "error" not in r]
        if not good:
            print(f"  {side:<10} failed: {rows[0]['error']}")
            continue
        medians[side] = {k: statistics.median(r[k] for r in good) for k in ("peak_mib", "step_mib", "lifetime_mib")}
        m = medians[side]
        print(f"  {side:<10} peak during steps {m['peak_mib']:7.0f} MiB  step above pre-step RSS "
              f"{m['step_mib']:6.0f} MiB  lifetime peak {m['lifetime_mib']:7.0f} MiB  (n={len(good)})")
    ratios = {}
    for a, b in PAIRS:
        if a in medians and b in medians:
            ratios[f"{a}/{b}"] = medians[a]["peak_mib"] / medians[b]["peak_mib"]
            step_ratio = medians[a]["step_mib"] / max(medians[b]["step_mib"], 1e-9)
            print(f"  {a} / {b}: peak {ratios[f'{a}/{b}']:.2f}x, step memory {step_ratio:.2f}x")
    return {"medians": medians, "ratios": ratios}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.steps, args.threads)))
        return
    run(tuple(args.sides), args.repeats, args.steps, args.threads)


if __name__ == "__main__":
    main()
