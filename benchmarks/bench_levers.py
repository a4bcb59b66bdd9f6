"""Recipe levers of the main job, ranked at a fixed step budget (issue 24; a benchmark, not a test).

    python -m benchmarks.bench_levers [--steps 400] [--out ablations/levers.jsonl] [--queue FILE] [NAME ...]
    python -m benchmarks.bench_levers --timing NAME NAME [--timing-steps 40] [--rounds 3]
    python -m benchmarks.bench_levers --step-cost NAME NAME [--rounds 20]

Each variant is the default `lm` job (`python -m llm.training.train --task lm`, what `make train` runs) with the
budget shortened to `--steps` optimizer steps (warmup a tenth of it, the schedule fitted to the budget, validation
at half-way and at the end on the first `--val-batches` batches of the held-out split) on top of `--base` (the lm
default as it is now, or issue 15's warmup + cosine recipe the first sweep ranked against) plus the variant's own
flags. Runs go one at a time, each in its own process with one intra-op thread (`OMP_NUM_THREADS=1`), and each
result is appended to `--out` as one JSON line as soon as it is known, so an interrupted sweep keeps what it
finished and a second invocation skips the variants already there (`--redo` runs them again).

What is recorded per variant: val bits per byte at each validation step (a pure function of the code, config and
seed: the same on a loaded machine, so the ranking does not depend on load) and the median seconds per optimizer
step over the logged intervals (from the engine's `train/samples_per_s`; this one does depend on load).

`--timing A B` measures what a lever costs per step where it changes the compute: short runs of A and B
alternate (A B A B ...; `--rounds` of each, `--timing-steps` steps, no validation) so that the machine's load hits
both alike, and the medians and their ratio are printed. `--step-cost A B` does the same for the training step
alone in CPU time: both engines in one process, stepped in turn (`--rounds` steps each).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
WSD = ["--training-scheduler-type", "wsd", "--training-decay-fraction"]

# name -> the flags that differ from the default job. The first group uses levers that predate issue 24, the rest
# the levers it added; combinations last.
VARIANTS: dict[str, list[str]] = {
    "baseline": [],
    "baseline-seed1": ["--seed", "1"],
    "wsd-linear-0.2": [*WSD, "0.2", "--training-decay-shape", "linear"],
    "wsd-sqrt-0.2": [*WSD, "0.2", "--training-decay-shape", "sqrt"],
    "wsd-sqrt-0.4": [*WSD, "0.4", "--training-decay-shape", "sqrt"],
    "warmup-half": ["--training-warmup", "{warmup_half}"],
    "warmup-double": ["--training-warmup", "{warmup_x2}"],
    "tied-embeddings": ["--model-tie-embeddings"],
    "qk-norm": ["--model-qk-norm"],
    "heads-2": ["--model-num-heads", "2"],
    "heads-8": ["--model-num-heads", "8"],
    "heads-1": ["--model-num-heads", "1"],
    "heads-4": ["--model-num-heads", "4"],
    "muon-scale-12": ["--training-muon-lr-scale", "12"],
    "zero-init-output": ["--model-zero-init-output"],
    "softcap-15": ["--model-logit-softcap", "15"],
    "softcap-30": ["--model-logit-softcap", "30"],
    "muon-embeddings": ["--training-muon-embeddings"],
    "muon-no-nesterov": ["--no-training-muon-nesterov"],
    "muon-momentum-0.9": ["--training-muon-momentum", "0.9"],
    "muon-ns-steps-3": ["--training-muon-ns-steps", "3"],
    "adamw-lr-x2": ["--training-adamw-lr-scale", "2"],
    "adamw-lr-x4": ["--training-adamw-lr-scale", "4"],
    "seq-len-warmup": ["--training-seq-len-warmup", "{warmup_x2}"],
    # Width vs depth at the default's parameter (and so compute) budget: layers x hidden^2 held near 4 x 128^2.
    "depth-2-width-176": ["--model-num-layers", "2", "--model-hidden-size", "176", "--model-num-heads", "4"],
    "depth-3-width-144": ["--model-num-layers", "3", "--model-hidden-size", "144", "--model-num-heads", "4"],
    "depth-6-width-104": ["--model-num-layers", "6", "--model-hidden-size", "104", "--model-num-heads", "4"],
    "document-mask": ["--data-document-mask"],
    # The baseline given the training compute of a variant that costs 13% more per step (qk-norm: --step-cost).
    "baseline-452-steps": ["--training-max-steps", "452"],
    "sampling-sequential": ["--data-sampling", "sequential"],
    # The learning rate and the schedule's floor at a short budget (the lr scales both Muon and AdamW sides).
    "lr-x1.5": ["--training-lr", "1.5e-3"],
    "lr-x0.7": ["--training-lr", "7e-4"],
    "min-lr-0": ["--training-min-lr-ratio", "0"],
    "weight-decay-0": ["--training-weight-decay", "0"],
    # Systems: the attention kernel in fp32 on the CPU (numerics only; see llm/models/layers.py attention_in_fp32).
    "attention-fp32": ["--model-attention-fp32-on-cpu"],
    "attention-bf16": ["--no-model-attention-fp32-on-cpu"],
}

# What every variant of a sweep sits on top of. `default`: the lm default as it is now (WSD with a 1-sqrt decay
# over the last 20%, Muon on the embeddings). `issue15`: the recipe the first sweep ranked against (warmup +
# cosine, embeddings on AdamW), kept so that its rows can be reproduced; rows recorded before bases existed are
# issue15's.
BASES: dict[str, list[str]] = {
    "default": [],
    "issue15": ["--training-scheduler-type", "cosine", "--no-training-muon-embeddings"],
}


def job_flags(steps: int, val_batches: int, base: str = "default") -> list[str]:
    """The default job shortened to `steps`: warmup a tenth, validation at half-way and the end, on top of the
    recipe `base` names (BASES), so every variant differs from its base's `baseline` by its own flags alone."""
    return [*BASES[base], "--training-max-steps", str(steps), "--training-warmup", str(max(1, steps // 10)),
            "--training-val-interval", str(max(1, steps // 2)), "--training-val-max-batches", str(val_batches),
            "--logging-loggers", "console", "jsonl", "--checkpoint-resume", "none"]


def variant_flags(name: str, steps: int) -> list[str]:
    if "+" in name and name not in VARIANTS:  # an ad-hoc combination: a+b
        return [flag for part in name.split("+") for flag in variant_flags(part, steps)]
    if name not in VARIANTS:
        raise SystemExit(f"unknown variant {name!r}; --list shows them")
    values = {"warmup_half": str(max(1, steps // 20)), "warmup_x2": str(max(1, steps // 5))}
    return [flag.format(**values) for flag in VARIANTS[name]]


def run_job(flags: list[str], log_dir: Path) -> dict[str, Any]:
    """One training process; its val bpb per validation step, sec/step (median of the logged intervals), wall."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO),
                                                                               os.environ.get("PYTHONPATH", "")])}
    argv = [sys.executable, "-m", "llm.training.train", "--task", "lm", *flags, "--logging-log-dir", str(log_dir)]
    start = time.perf_counter()
    proc = subprocess.run(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        return {"error": proc.stdout[-2000:], "wall_s": wall}
    records = [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    val = {r["step"]: r["val/bpb"] for r in records if "val/bpb" in r}
    rates = [r["train/samples_per_s"] for r in records if r.get("train/samples_per_s")]
    batch = int(flags[flags.index("--training-batch-size") + 1]) if "--training-batch-size" in flags else 16
    return {"val_bpb": val, "sec_per_step": batch / statistics.median(rates) if rates else None, "wall_s": wall}


def _pending(names: list[str], args: argparse.Namespace, done: set[str]) -> str | None:
    """The next variant to run: the first not done of `names`, or of the `--queue` file as it reads now (one name
    a line; edit it while the sweep runs to reorder or extend what is left)."""
    if args.queue:
        names = [line.strip() for line in Path(args.queue).read_text().splitlines() if line.strip()]
        for name in names:
            variant_flags(name, args.steps)
    return next((name for name in names if name not in done), None)


def sweep(names: list[str], args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done: set[str] = set()
    if out.exists() and not args.redo:
        done = {r["name"] for r in _records(out) if r.get("base", "issue15") == args.base}
    while (name := _pending(names, args, done)) is not None:
        done.add(name)
        flags = [*job_flags(args.steps, args.val_batches, args.base), *variant_flags(name, args.steps)]
        with tempfile.TemporaryDirectory(prefix="bench-levers-") as tmp:
            result = run_job(flags, Path(tmp) / "run")
        record = {"name": name, "base": args.base, "steps": args.steps, "flags": variant_flags(name, args.steps),
                  "finished": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), **result}
        with out.open("a") as f:
            f.write(json.dumps(record) + "\n")
        shown = "FAILED" if "error" in result else (
            " ".join(f"@{s} {b:.4f}" for s, b in sorted(result["val_bpb"].items(), key=lambda kv: int(kv[0])))
            + f"  {result['sec_per_step']:.3f} s/step")
        print(f"{name}: {shown}  ({result['wall_s']:.0f} s)", flush=True)
    print(table(out, args.base))


def _records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def table(path: Path, base: str = "default") -> str:
    """The variants recorded on top of `base` by final val bpb (markdown), with the difference to its baseline."""
    rows = [r for r in _records(path) if "val_bpb" in r and r.get("base", "issue15") == base]
    rows = [r for i, r in enumerate(rows) if r["name"] not in {q["name"] for q in rows[:i]}]  # a rerun: the first
    final = {r["name"]: r["val_bpb"][max(r["val_bpb"], key=int)] for r in rows}
    base_bpb = final.get("baseline")
    lines = ["| variant | val bpb (mid) | val bpb (end) | vs baseline | s/step (loaded) |", "|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: final[r["name"]]):
        steps = sorted(r["val_bpb"], key=int)
        mid = r["val_bpb"][steps[0]] if len(steps) > 1 else float("nan")
        delta = f"{final[r['name']] - base_bpb:+.4f}" if base_bpb is not None else "-"
        lines.append(f"| {r['name']} | {mid:.4f} | {final[r['name']]:.4f} | {delta} | {r['sec_per_step']:.3f} |")
    return "\n".join(lines)


def timing(names: list[str], args: argparse.Namespace) -> None:
    """Alternate short runs of each named variant; the median sec/step of each and the ratio to the first."""
    per: dict[str, list[float]] = {name: [] for name in names}
    steps = args.timing_steps
    for round_ in range(args.rounds):
        for name in names:
            flags = ["--training-max-steps", str(steps), "--training-warmup", "1", "--training-val-interval", "0",
                     "--training-epochs", "1", "--training-log-interval", str(max(1, steps // 4)),
                     "--training-callbacks", "MetricsLogger", "LRSchedulerCallback", "--logging-loggers", "jsonl",
                     "--checkpoint-resume", "none", "--training-val-max-batches", "1",
                     *variant_flags(name, args.steps)]
            with tempfile.TemporaryDirectory(prefix="bench-levers-t-") as tmp:
                result = run_job(flags, Path(tmp) / "run")
            if "error" in result:
                raise SystemExit(f"{name} failed:\n{result['error']}")
            per[name].append(result["sec_per_step"])
            print(f"round {round_ + 1} {name}: {result['sec_per_step']:.4f} s/step", flush=True)
    first = statistics.median(per[names[0]])
    for name in names:
        med = statistics.median(per[name])
        print(f"{name:<24} median {med:.4f} s/step  ({med / first:.3f}x {names[0]})")


def lm_engine(flags: list[str], log_dir: Path) -> tuple[Any, Any]:
    """A set-up engine of the lm job with `flags` over its defaults (no checkpoints read, JSONL logs under
    `log_dir`), and its first training batch: what the benchmarks step by hand (`engine._optimizer_step([batch])`)."""
    from llm.training.train import build_engine, parse_config

    engine = build_engine(parse_config(["--task", "lm", "--logging-loggers", "jsonl", "--checkpoint-resume", "none",
                                        "--logging-log-dir", str(log_dir), *flags])[0])
    engine.setup()
    return engine, next(iter(engine.data_module.train_dataloader()))


def step_cost(names: list[str], args: argparse.Namespace) -> None:
    """CPU time of one engine step of each named variant, engines built side by side in this process and stepped
    in turn (A B A B ...: the machine's load hits all alike; `time.process_time` with one thread is far less
    load-dependent than wall seconds); medians of `--rounds` steps after 3 warm-up steps each."""
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="bench-levers-c-") as tmp:
        engines = {name: lm_engine(variant_flags(name, args.steps), Path(tmp) / name) for name in names}
    per: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(args.rounds + 3):
        for name, (engine, batch) in engines.items():
            start = time.process_time()
            engine._optimizer_step([batch])
            engine.lr_schedule.step_batch()
            if round_ >= 3:
                per[name].append(time.process_time() - start)
    first = statistics.median(per[names[0]])
    for name in names:
        med = statistics.median(per[name])
        print(f"{name:<24} median {med * 1e3:7.1f} ms CPU/step  ({med / first:.3f}x {names[0]})")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="variants to run, in order (default: all); a+b combines two")
    parser.add_argument("--steps", type=int, default=400, help="optimizer steps per run")
    parser.add_argument("--val-batches", type=int, default=40, help="validation batches (the first N)")
    parser.add_argument("--out", default=str(REPO / "ablations" / "levers.jsonl"), help="results, one JSON line each")
    parser.add_argument("--base", choices=sorted(BASES), default="default",
                        help="what the variants sit on top of: the lm default now, or issue 15's recipe")
    parser.add_argument("--redo", action="store_true", help="run variants already in --out again")
    parser.add_argument("--queue", default="", help="read the variants to run from this file before each run")
    parser.add_argument("--list", action="store_true", help="print the variants and their flags, then exit")
    parser.add_argument("--table", action="store_true", help="print the table of --out, then exit")
    parser.add_argument("--timing", action="store_true", help="alternate short runs of the named variants")
    parser.add_argument("--step-cost", action="store_true",
                        help="CPU time of one engine step of each named variant, stepped in turn in one process")
    parser.add_argument("--timing-steps", type=int, default=40, help="--timing: steps per run")
    parser.add_argument("--rounds", type=int, default=3, help="--timing: runs of each variant")
    args = parser.parse_args(argv)
    if args.list:
        for name in VARIANTS:
            print(f"{name:<26} {' '.join(variant_flags(name, args.steps))}")
        return
    if args.table:
        print(table(Path(args.out), args.base))
        return
    names = args.names or ([] if args.queue else list(VARIANTS))
    for name in names:
        variant_flags(name, args.steps)  # unknown names fail before anything runs
    (step_cost if args.step_cost else timing if args.timing else sweep)(names, args)


if __name__ == "__main__":
    main()
