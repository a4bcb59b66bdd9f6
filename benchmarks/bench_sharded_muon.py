"""Muon under FSDP (issue 23): what a step costs with `ShardedMuon` against FSDP + AdamW and DDP + Muon.

    python -m benchmarks.bench_sharded_muon [--hidden 256] [--layers 4] [--rounds 6] [--steps 4]

Two gloo processes on the CPU (one thread each) hold three copies of one lm-shaped `DecoderModel` (vocab 256,
sequence 128, batch 4 per rank, fp32): DDP + Muon, FSDP + Muon (`ShardedMuon`: gather, owner-rank Newton-Schulz,
bf16 broadcast) and FSDP + AdamW, built by the framework's own `parallelize` and `build_optimizer`. The three are
timed side by side, alternating in rounds of `--steps` steps (so machine load hits all three alike); each reports
the median over rounds of the whole step (forward, backward, optimizer) and of the optimizer step alone, per step.
Both ranks end every timed block at a barrier, so a time is the slower rank's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

CONFIGS = [("DDP + Muon", "ddp", "muon"), ("FSDP + Muon", "fsdp", "muon"), ("FSDP + AdamW", "fsdp", "adamw")]


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    from llm.models.decoder import DecoderModel
    from llm.training.optim.optimizers import build_optimizer
    from llm.training.parallel.plan import parallelize

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    cpu = torch.device("cpu")
    runs = []
    for _, strategy, optimizer in CONFIGS:
        torch.manual_seed(0)
        model = DecoderModel(vocab_size=256, hidden_size=args.hidden, num_layers=args.layers,
                             num_heads=max(1, args.hidden // 64), max_seq_len=args.seq)
        wrapped = parallelize(model, strategy, world, cpu, "fp32")
        cfg = SimpleNamespace(optimizer=optimizer, lr=1e-3, muon_lr_scale=8.0, weight_decay=0.1, betas=(0.9, 0.95))
        runs.append((wrapped, build_optimizer(model, cfg), {"step": [], "optim": []}))
    params = sum(p.numel() for p in DecoderModel(vocab_size=256, hidden_size=args.hidden, num_layers=args.layers,
                                                  num_heads=max(1, args.hidden // 64),
                                                  max_seq_len=args.seq).parameters())
    gen = torch.Generator().manual_seed(rank)
    for round_ in range(args.rounds + 1):  # round 0 warms up
        for wrapped, optimizer, times in runs:
            step_total = optim_total = 0.0
            for _ in range(args.steps):
                tokens = torch.randint(0, 256, (args.batch, args.seq + 1), generator=gen)
                dist.barrier()
                began = time.perf_counter()
                logits = wrapped(tokens[:, :-1])
                loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
                loss.backward()
                dist.barrier()
                mid = time.perf_counter()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                dist.barrier()
                ended = time.perf_counter()
                step_total += ended - began
                optim_total += ended - mid
            if round_:
                times["step"].append(step_total / args.steps)
                times["optim"].append(optim_total / args.steps)
    if rank == 0:
        result = {"params": params, "runs": [{"name": name, "step_s": statistics.median(t["step"]),
                                              "optim_s": statistics.median(t["optim"])}
                                             for (name, _, _), (_, _, t) in zip(CONFIGS, runs)]}
        Path(out).write_text(json.dumps(result))
    dist.destroy_process_group()


def main() -> None:
    from llm.training.parallel.distributed import free_port

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "result.json")
        mp.start_processes(_worker, args=(2, free_port(), args, out), nprocs=2, start_method="spawn")
        result = json.loads(Path(out).read_text())
    print(f"2 gloo processes x 1 thread, DecoderModel hidden {args.hidden}, {args.layers} layers "
          f"({result['params'] / 1e6:.2f}M params), batch {args.batch} x {args.seq} per rank, fp32; median of "
          f"{args.rounds} alternating rounds of {args.steps} steps")
    print("| configuration | step ms | optimizer step ms | step vs DDP + Muon |")
    print("| --- | --- | --- | --- |")
    base = result["runs"][0]["step_s"]
    for run in result["runs"]:
        print(f"| {run['name']} | {run['step_s'] * 1e3:.1f} | {run['optim_s'] * 1e3:.1f} | "
              f"{run['step_s'] / base:.2f}x |")


if __name__ == "__main__":
    main()
