"""LoRA vs full fine-tuning of the same DecoderModel: trainable parameters, gradient and optimizer-state memory,
peak RSS (also above the RSS after the imports: peft pulls in transformers, ~150 MiB) and step time.

    python -m benchmarks.bench_lora [--hidden 256] [--layers 4] [--rank 8] [--steps 20] [--threads 1]

Each mode runs in its own child process (so peak RSS is that mode's alone): build the model (seeded, fp32), adapt
it with `llm.models.lora.apply_lora` for LoRA, build AdamW over the trainable parameters exactly as the training
engine does (`build_optimizer`), then time optimizer steps (forward, cross-entropy, backward, step, zero_grad) on
random token batches and report the median. Gradient bytes are counted after a backward, optimizer-state bytes
after a step. This is a benchmark, not a test: numbers go to RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

import torch
from torch import nn


def _mib(nbytes: float) -> float:
    return nbytes / 2**20


def measure(mode: str, args: argparse.Namespace) -> dict[str, Any]:
    """One mode's numbers (run in a fresh process)."""
    from types import SimpleNamespace

    import peft  # noqa: F401  (both modes import it, so the RSS above the imports compares like with like)

    from llm.models.decoder import DecoderModel
    from llm.models.lora import apply_lora
    from llm.training.optim.optimizers import build_optimizer

    imported = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = DecoderModel(vocab_size=256, hidden_size=args.hidden, num_layers=args.layers, num_heads=args.hidden // 64,
                         max_seq_len=args.seq_len)
    total = sum(p.numel() for p in model.parameters())
    if mode == "lora":
        apply_lora(model, rank=args.rank, alpha=2 * args.rank)
    cfg = SimpleNamespace(optimizer="adamw", lr=1e-3, betas=[0.9, 0.95], weight_decay=0.1, momentum=0.9)
    optimizer = build_optimizer(model, cfg)
    gen = torch.Generator().manual_seed(1)
    times, grad_bytes = [], 0
    for step in range(args.steps + 2):
        ids = torch.randint(0, 256, (args.batch, args.seq_len + 1), generator=gen)
        start = time.perf_counter()
        loss = nn.functional.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        grad_bytes = sum(p.grad.nbytes for p in model.parameters() if p.grad is not None)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= 2:  # the first steps allocate the optimizer state and warm the allocator
            times.append(time.perf_counter() - start)
    state_bytes = sum(t.nbytes for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "mode": mode, "params": total, "trainable": trainable, "grad_mib": _mib(grad_bytes),
        "optim_mib": _mib(state_bytes), "import_rss_mib": imported,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "step_ms": 1000 * statistics.median(times),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", choices=("full", "lora"), help=argparse.SUPPRESS)  # a child's mode
    args = parser.parse_args(argv)
    if args.only:
        print(json.dumps(measure(args.only, args)))
        return
    child = [a for a in (argv if argv is not None else sys.argv[1:])]
    rows = []
    for mode in ("full", "lora"):
        out = subprocess.run([sys.executable, "-m", "benchmarks.bench_lora", *child, "--only", mode],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"DecoderModel hidden {args.hidden}, {args.layers} layers, batch {args.batch}x{args.seq_len}, "
          f"LoRA rank {args.rank}, {args.threads} thread(s), fp32 AdamW; median of {args.steps} steps")
    header = f"{'mode':<6} {'params':>10} {'trainable':>10} {'grads MiB':>10} {'optim MiB':>10} " \
             f"{'peak RSS MiB':>13} {'above imports':>14} {'step ms':>9}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['mode']:<6} {r['params']:>10,} {r['trainable']:>10,} {r['grad_mib']:>10.2f} {r['optim_mib']:>10.2f} "
              f"{r['peak_rss_mib']:>13.0f} {r['peak_rss_mib'] - r['import_rss_mib']:>14.0f} {r['step_ms']:>9.1f}")


if __name__ == "__main__":
    main()
