"""The benchmark suite: `python -m benchmarks.run [--quick] [--sections ...] [--threads N] [--json out.json]`.

Every section runs our side and its peer alternately (in one process, or in paired child processes), repeats,
and prints medians and the ratio; a table of every ratio closes the run. Sections:
- overhead: the full `TrainingEngine` vs a hand-written PyTorch loop on the default lm config (bench_overhead);
- switches: each speed switch on vs off through the engine (torch.compile dense and MoE, bf16 autocast,
  activation checkpointing's time cost), fused vs foreach AdamW;
- model: DecoderModel vs HF Llama and MoE vs HF Mixtral (bench_model, child process);
- data: the lm loader's windows/s vs what training consumes (bench_data, child process);
- memory: peak RSS of a train step vs HF, one fresh process per side (bench_memory).
transformers is needed for the model and memory sections only (the `dev` extra); without it they are skipped.

Threads: all cores, or 1 when the machine is busy (1-minute load average >= half the cores): on a shared machine
two OpenMP threads per process spin against other processes and every number gets slower and far noisier (up to
10x). On a shared machine pass `--threads 1`: the load can change in the middle of a run.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("overhead", "switches", "model", "data", "memory")
Row = dict[str, Any]


def pick_threads(requested: int) -> int:
    if requested:
        return requested
    cores = os.cpu_count() or 1
    return 1 if os.getloadavg()[0] >= cores / 2 else cores


def row(section: str, name: str, ratio: float, meaning: str, target: str = "") -> Row:
    return {"section": section, "name": name, "ratio": ratio, "meaning": meaning, "target": target}


def alternate(settings: dict[str, Callable[[], dict[str, float]]], rounds: int) -> dict[str, list[dict[str, float]]]:
    """Run each setting once per round, rotating the order every round."""
    names, out = list(settings), {n: [] for n in settings}
    for i in range(rounds):
        for name in names[i % len(names):] + names[: i % len(names)]:
            out[name].append(settings[name]())
    return out


def median_of(results: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in results)


# -------------------------------------------------------------------------------------------------- sections
def section_overhead(quick: bool) -> list[Row]:
    from benchmarks import bench_overhead

    rounds, steps = (2, 40) if quick else (5, 60)
    result = bench_overhead.run(rounds=rounds, warmup=3, steps=steps, extra=["--training-val-max-batches", "2"])
    s = result["summary"]
    return [row("overhead", "engine / hand loop tokens/s", s["ratio"], "higher is better", ">= 0.98"),
            row("overhead", "engine / hand loop median step", s["step_ratio_median"], "higher is better", ">= 0.98")]


def _switch_pair(label: str, off: dict[str, Any], on: dict[str, Any], rounds: int, steps: int,
                 extra: list[str] | None = None) -> tuple[float, dict[str, Any]]:
    from benchmarks.bench_overhead import engine_throughput

    def setting(kwargs: dict[str, Any]) -> Callable[[], dict[str, float]]:
        return lambda: engine_throughput("default", "cpu", steps=steps, log_interval=max(2, steps // 4),
                                         extra=extra or [], **kwargs)

    res = alternate({"off": setting(off), "on": setting(on)}, rounds)
    tok = {k: median_of(v, "perf/tokens_per_s_per_device") for k, v in res.items()}
    wall = {k: median_of(v, "wall_s") for k, v in res.items()}
    ratio = tok["on"] / tok["off"]
    print(f"  {label}: {tok['on']:,.0f} vs {tok['off']:,.0f} tokens/s -> {ratio:.2f}x "
          f"(run wall time incl. compile {wall['on']:.0f} s vs {wall['off']:.0f} s)", flush=True)
    return ratio, res


def bench_fused_adamw(steps: int) -> float:
    """Optimizer step time, fused vs foreach AdamW, on the default lm model's parameters (alternated per step)."""
    from benchmarks.bench_overhead import lm_config
    from llm.config import replace_values

    config, task_class = lm_config(Path(tempfile.gettempdir()) / "llm-bench-unused", 1)
    config = replace_values(config, {"model.vocab_size": 256})  # the resolved config is frozen
    model = task_class(config).build_model()
    opts = {}
    for fused in (True, False):
        params = [torch.nn.Parameter(p.detach().clone()) for p in model.parameters()]
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
        opts["fused" if fused else "foreach"] = torch.optim.AdamW(params, lr=1e-3, fused=fused or None,
                                                                  foreach=None if fused else True)
    times: dict[str, list[float]] = {k: [] for k in opts}
    for i in range(steps + 3):
        for name, opt in opts.items():
            began = time.perf_counter()
            opt.step()
            if i >= 3:
                times[name].append(time.perf_counter() - began)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"  fused AdamW step {med['fused'] * 1e3:.2f} ms vs foreach {med['foreach'] * 1e3:.2f} ms "
          f"-> {med['foreach'] / med['fused']:.2f}x", flush=True)
    return med["foreach"] / med["fused"]


def section_switches(quick: bool) -> list[Row]:
    from llm.models.decoder import TransformerBlock

    rounds, steps = (2, 24) if quick else (3, 40)
    rows = []
    ratio, _ = _switch_pair("torch.compile (inductor), dense, bf16", {"compile": False}, {"compile": True},
                            rounds, steps)
    rows.append(row("switches", "compile / eager tokens/s (dense)", ratio, "higher is better", "> 1"))
    moe = ["--model-use-moe", "--model-num-experts", "4", "--model-top-k", "2"]
    ratio, _ = _switch_pair("torch.compile (inductor), MoE 4 experts top-2, bf16", {"compile": False},
                            {"compile": True}, max(1, rounds - 1), steps, moe)
    rows.append(row("switches", "compile / eager tokens/s (MoE)", ratio, "higher is better", "> 1"))
    ratio, _ = _switch_pair("bf16 autocast vs fp32", {"precision": "fp32"}, {"precision": "bf16"}, rounds, steps)
    rows.append(row("switches", "bf16 / fp32 tokens/s", ratio, "higher is better (where bf16 matmuls are fast)", "> 1"))
    if hasattr(TransformerBlock, "activation_checkpointing"):
        ratio, _ = _switch_pair("activation checkpointing (time cost)", {"activation_checkpointing": False},
                                {"activation_checkpointing": True}, rounds, steps)
        rows.append(row("switches", "act. ckpt / none tokens/s", ratio, "its time price (memory: below)", "~0.75"))
    else:
        print("  activation checkpointing: TransformerBlock has no switch yet; skipped")
    rows.append(row("switches", "foreach / fused AdamW step time", bench_fused_adamw(20 if quick else 60),
                    "higher is better", "> 1"))
    return rows


def _child(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True)
    sys.stdout.write(proc.stdout)
    if proc.returncode:
        sys.stdout.write(proc.stderr[-3000:])
    sys.stdout.flush()
    return proc


def section_model(quick: bool, threads: int) -> list[Row]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "model.json"
        sections = ["equal", "layer"] if quick else ["equal", "fast", "layer"]
        proc = _child(["benchmarks.bench_model", *(["--quick"] if quick else []), "--sections", *sections,
                       "--threads", str(threads), "--json", str(out)])
        if proc.returncode or not out.exists():
            return [row("model", "bench_model failed", float("nan"), "see output")]
        rows = json.loads(out.read_text())
    return [row("model", f"{r['section']}: {r['name']} / ours", r["speedup_median"], "time ratio; > 1: ours faster",
                ">= 1") for r in rows if r["speedup_median"] != 1.0]


def section_data(quick: bool, threads: int) -> list[Row]:
    args = ["--steps", "5", "--loader-batches", "50", "--no-cold"] if quick else ["--steps", "20"]
    proc = _child(["benchmarks.bench_data", *args, "--threads", str(threads)])
    ratio = next((float(line.split()[1].rstrip("x")) for line in proc.stdout.splitlines()
                  if line.startswith("ratio:")), float("nan"))
    return [row("data", "loader / training windows/s", ratio, "higher is better", ">= 10")]


def section_memory(quick: bool, threads: int) -> list[Row]:
    from benchmarks import bench_memory

    result = bench_memory.run(bench_memory.SIDES, repeats=1 if quick else 3, steps=3, threads=threads)
    return [row("memory", f"peak RSS {pair}", ratio, "lower is better", "<= 1" if "hf" in pair else "< 1")
            for pair, ratio in result["ratios"].items()]


# ------------------------------------------------------------------------------------------------------ main
def print_table(rows: list[Row]) -> None:
    print("\n== summary: every ratio ==")
    print(f"{'section':<9} {'ratio':>8}  {'target':<9} {'meaning':<30} what")
    for r in rows:
        print(f"{r['section']:<9} {r['ratio']:8.3f}  {r['target']:<9} {r['meaning']:<30} {r['name']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and steps (under 10 minutes on 2 cores)")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: auto, see the module docstring)")
    parser.add_argument("--json", help="write every ratio here")
    args = parser.parse_args()
    threads = pick_threads(args.threads)
    torch.set_num_threads(threads)
    has_hf = importlib.util.find_spec("transformers") is not None
    versions = f"torch {torch.__version__}"
    if has_hf:
        import transformers

        versions += f", transformers {transformers.__version__}"
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {threads} torch threads, "
          f"load average {os.getloadavg()[0]:.1f}; {versions}; python {platform.python_version()}")
    began, rows = time.perf_counter(), []
    runners: dict[str, Callable[[], list[Row]]] = {
        "overhead": lambda: section_overhead(args.quick),
        "switches": lambda: section_switches(args.quick),
        "model": lambda: section_model(args.quick, threads),
        "data": lambda: section_data(args.quick, threads),
        "memory": lambda: section_memory(args.quick, threads),
    }
    for name in args.sections:
        if name in ("model", "memory") and not has_hf:
            print(f"\n== {name}: skipped (transformers is not installed; pip install -e '.[dev]') ==")
            continue
        print(f"\n== {name} ==", flush=True)
        section_began = time.perf_counter()
        rows += runners[name]()
        print(f"({name}: {time.perf_counter() - section_began:.0f} s)", flush=True)
    print_table(rows)
    print(f"\ntotal {time.perf_counter() - began:.0f} s; load average at the end {os.getloadavg()[0]:.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
