"""Expert parallelism on CPU processes: throughput of the same MoE lm run on 1 process, 2 DDP processes (every rank
holds every expert) and 2 processes with the experts split over them (`--distributed-expert-parallel 2`).

    python -m benchmarks.bench_expert_parallel [--steps 40] [--experts 8] [--hidden 128]

Each configuration is the CLI run a user would launch (same global batch of 16 x 256 tokens, bf16 autocast, one
thread per process), run back to back; tokens/s are the runs' own `train/tokens_per_s` averaged over the logged
steps after the first (start-up excluded), and the final train loss shows the three runs train the same model.
Expert parallelism trades the experts' memory (each rank holds E/2 of them) for two all-to-alls per MoE layer and
direction; on one machine's CPU cores the exchange is a memory copy, so this measures its overhead, not a speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(name: str, extra: list[str], args: argparse.Namespace, workdir: Path) -> dict[str, float]:
    cmd = [sys.executable, "-m", "llm.training.train", "--task", "lm", "--training-device", "cpu",
           "--model-hidden-size", str(args.hidden), "--model-num-layers", str(args.layers), "--model-use-moe",
           "--model-num-experts", str(args.experts), "--model-top-k", "2", "--data-max-bytes", "4000000",
           "--training-max-steps", str(args.steps), "--training-log-interval", "5", "--training-val-interval", "0",
           "--training-callbacks", "MetricsLogger", "LRSchedulerCallback", "--logging-log-dir", str(workdir / name),
           *extra]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    began = time.perf_counter()
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - began
    if proc.returncode:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in (workdir / name / "metrics.jsonl").read_text().splitlines()]
    rates = [r["train/tokens_per_s"] for r in records if "train/tokens_per_s" in r][1:]
    loss = [r["train/loss"] for r in records if "train/loss" in r][-1]
    return {"tokens_per_s": sum(rates) / len(rates), "wall_s": wall, "loss": loss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()
    configs = [
        ("1 process", ["--training-batch-size", "16"]),
        ("2 processes, DDP", ["--training-batch-size", "8", "--distributed-nproc-per-node", "2"]),
        ("2 processes, DDP + expert parallel 2", ["--training-batch-size", "8", "--distributed-nproc-per-node", "2",
                                                 "--distributed-expert-parallel", "2"]),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        results = [(name, run(f"run{i}", extra, args, Path(tmp))) for i, (name, extra) in enumerate(configs)]
    print(f"MoE lm: hidden {args.hidden}, {args.layers} layers, {args.experts} experts top-2, global batch 16 x 256, "
          f"{args.steps} steps")
    print(f"| {'configuration':38} | tokens/s | vs 1 process | wall s | final train loss |")
    print(f"| {'-' * 38} | -------- | ------------ | ------ | ---------------- |")
    base = results[0][1]["tokens_per_s"]
    for name, r in results:
        print(f"| {name:38} | {r['tokens_per_s']:8.0f} | {r['tokens_per_s'] / base:11.2f}x | {r['wall_s']:6.1f} | "
              f"{r['loss']:16.4f} |")


if __name__ == "__main__":
    main()
