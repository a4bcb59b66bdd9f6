"""Framework overhead: the full `TrainingEngine` against a minimal hand-written PyTorch loop, step by step.

    python -m benchmarks.bench_overhead [--rounds 3] [--warmup 5] [--steps 60] [--threads N]

Both sides train the default `lm` config (`LMTask.config_defaults`, resolved as the CLI resolves it) on the CPU:
the same model and seed, the same data windows and batch, bf16 autocast, gradient clipping, fused AdamW with
the same parameter groups, warmup + cosine. The engine runs as `make train` does: the task's default callbacks,
its services (schedule, checkpointing at the default interval, the metrics channel to the console, JSONL and
TensorBoard sinks), the CLI's logging (to `train.log`) and metric logging every `log_interval` steps; the hand
loop reads its loss at the same log steps.

Alternation is per step: a callback at the end of the engine's callback list runs one hand-loop step after each
engine step, so load on a shared machine hits both sides alike. An engine step is the wall time from the end
of the previous hand step to the engine's next `on_batch_end`: the previous step's log record and checkpoint
work, data loading, the step, the metric sync at log steps and every other callback. Reported: tokens/s of each
side over the timed steps (warm-up excluded) per round, medians over rounds, and the ratio engine / hand loop
(target >= 0.98). A benchmark, not a test.

    python -m benchmarks.bench_overhead throughput --device cuda --preset byte-125m --precision bf16 --compile

Engine throughput: the `lm` task through the full engine with the speed switches given (precision, compile,
activation checkpointing) on one of `PRESETS` (model shapes by `--model-preset` name), reporting what
`ThroughputMonitor` logs: tokens/s per device and MFU, medians over the log windows after the first (which holds the
compile), and the parameter count of the model that ran. `gpu_check.sh` runs it on a GPU; `--device cpu --preset
tiny` is its smoke mode (a test runs it), and the suite's switch benchmarks call `engine_throughput` on the CPU.
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.optim.lr_scheduler import LambdaLR

from llm.models.flops import flops_per_token
from llm.training.core.callbacks import Callback, build_callbacks
from llm.training.core.engine import compile_backend
from llm.training.observers.sinks import MetricSink
from llm.training.observers.throughput import device_peak_flops
from llm.training.optim.precision import compute_dtype
from llm.training.parallel.distributed import resolve_device
from llm.training.train import build_engine, parse_config, prepare_run_dir, setup_logging


def lm_config(run_dir: Path, steps: int, extra: Sequence[str] = ()) -> tuple[Any, type]:
    """The default `lm` run, `steps` optimizer steps long, writing into `run_dir`, with AdamW: the hand loop's
    optimizer (the lm default is Muon; this measures the framework around the step, not the optimizer)."""
    argv = ["--task", "lm", "--training-max-steps", str(steps), "--training-optimizer", "adamw",
            "--logging-log-dir", str(run_dir), *extra]
    config, task_class, _ = parse_config(argv)
    return config, task_class


class HandLoop:
    """What a user writes without a framework: the same model, data, optimizer and schedule on the same device
    (compiled when the engine is), nothing else."""

    def __init__(self, config: Any, task_class: type) -> None:
        t = config.training
        task = task_class(config)
        data = task.build_data_module()
        data.prepare_data()
        data.setup("fit")
        torch.manual_seed(config.seed)
        self.device = resolve_device(t.device)
        self.model = task.build_model().to(self.device)
        named = list(self.model.named_parameters())
        decay = [p for n, p in named if p.ndim >= 2 and "embed" not in n]
        no_decay = [p for n, p in named if not (p.ndim >= 2 and "embed" not in n)]
        groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        self.opt = torch.optim.AdamW(groups, lr=t.lr, betas=tuple(t.betas), fused=True)
        warmup, total, floor = t.warmup, max(1, t.max_steps - t.warmup), t.min_lr_ratio

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = min(step - warmup, total) / total
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

        self.sched = LambdaLR(self.opt, factor)
        self.params = [p for _, p in named]
        self.forward = torch.compile(self.model, backend=compile_backend()) if t.compile else self.model
        self.batches = iter(data.train_dataloader())
        self.bf16 = t.precision == "bf16"
        self.clip, self.log_interval = t.grad_clip, t.log_interval
        self.steps, self.last_loss = 0, float("nan")

    def step(self) -> None:
        x, y = (b.to(self.device, non_blocking=True) for b in next(self.batches))
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            logits = self.forward(x)  # (B, T, V)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.clip, foreach=True)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        self.steps += 1
        if self.steps % self.log_interval == 0:
            self.last_loss = loss.item()


class Interleave(Callback):
    """Last in the engine's callback list: after each engine step, times it and runs (and times) one hand step."""

    def __init__(self, hand: HandLoop) -> None:
        self.hand = hand
        self.engine_s: list[float] = []
        self.hand_s: list[float] = []
        self._mark = 0.0

    def _now(self) -> float:
        # On a GPU a step has ended when its kernels have, not when they were queued.
        if self.hand.device.type == "cuda":
            torch.cuda.synchronize(self.hand.device)
        return time.perf_counter()

    def on_train_start(self, logs: dict[str, Any] | None = None) -> None:
        self._mark = self._now()

    def on_batch_end(self, logs: dict[str, Any] | None = None) -> None:
        began = self._now()
        self.engine_s.append(began - self._mark)
        self.hand.step()
        self._mark = self._now()
        self.hand_s.append(self._mark - began)


def quiet_cli_logging(run_dir: Path) -> None:
    """The CLI's logging (formatted lines into train.log) without the console handler cluttering the report."""
    setup_logging(0, "INFO", run_dir)
    logger = logging.getLogger("llm")
    logger.handlers = [h for h in logger.handlers if isinstance(h, logging.FileHandler)]


def one_round(warmup: int, steps: int, extra: Sequence[str] = ()) -> dict[str, float]:
    """One engine run with the hand loop interleaved; tokens/s of both over the timed steps."""
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        config, task_class = lm_config(run_dir, warmup + steps, extra)
        prepare_run_dir(config)
        quiet_cli_logging(run_dir)
        timer = Interleave(HandLoop(config, task_class))
        engine = build_engine(config, task_class, callbacks=[*build_callbacks(config), timer])
        engine.run()
        logging.getLogger("llm").handlers.clear()  # close train.log before the directory goes
    tokens = config.training.batch_size * config.data.seq_len * steps
    engine_s, hand_s = sum(timer.engine_s[warmup:]), sum(timer.hand_s[warmup:])
    row = {
        "engine_tokens_per_s": tokens / engine_s,
        "hand_tokens_per_s": tokens / hand_s,
        "ratio": hand_s / engine_s,
        "step_ratio_median": statistics.median(timer.hand_s[warmup:]) / statistics.median(timer.engine_s[warmup:]),
        "parameters": float(sum(p.numel() for p in timer.hand.model.parameters())),
    }
    peak = device_peak_flops(timer.hand.device, compute_dtype(config.training.precision))
    if peak:  # MFU of each side: the same FLOPs per token (llm.models.flops) over the device's peak
        flops = flops_per_token(timer.hand.model, config.data.seq_len)
        row["engine_mfu"] = 100 * row["engine_tokens_per_s"] * flops / peak
        row["hand_mfu"] = 100 * row["hand_tokens_per_s"] * flops / peak
    return row


def _mfu_text(row: dict[str, float], side: str) -> str:
    return f" (MFU {row[side + '_mfu']:.1f}%)" if side + "_mfu" in row else ""


def run(rounds: int = 3, warmup: int = 5, steps: int = 60, extra: Sequence[str] = ()) -> dict[str, Any]:
    """`rounds` rounds; prints each and the medians. Returns the medians and the per-round rows."""
    rows = []
    for i in range(rounds):
        row = one_round(warmup, steps, extra)
        rows.append(row)
        print(f"  round {i + 1}: engine {row['engine_tokens_per_s']:8.0f} tok/s{_mfu_text(row, 'engine')}  hand "
              f"loop {row['hand_tokens_per_s']:8.0f} tok/s{_mfu_text(row, 'hand')}  ratio {row['ratio']:.3f}  "
              f"(median-step ratio {row['step_ratio_median']:.3f})", flush=True)
    summary = {key: statistics.median(r[key] for r in rows) for key in rows[0]}
    print(f"overhead ({summary['parameters']:,.0f} parameters): engine {summary['engine_tokens_per_s']:.0f} "
          f"tok/s{_mfu_text(summary, 'engine')} vs hand loop {summary['hand_tokens_per_s']:.0f} tok/s"
          f"{_mfu_text(summary, 'hand')} (medians of {rounds} rounds x {steps} steps): ratio {summary['ratio']:.3f} "
          "(target >= 0.98)")
    return {"summary": summary, "rounds": rows}


# ---------------------------------------------------------------------------------------- engine throughput
# Per benchmark preset: a model shape by name (`--model-preset`, the catalogue in llm/models/presets.py, where each
# shape's parameter count is stated and tested) plus the batch and window (train CLI flags). Byte-level tokens
# (vocab 256) on the embedded corpus.
PRESETS: dict[str, list[str]] = {
    "tiny": ["--model-preset", "tiny", "--data-seq-len", "64", "--training-batch-size", "4",
             "--data-max-bytes", "2000000"],
    "default": [],  # the lm task's defaults (hidden 128, 4 layers, seq 256, batch 16)
    # A ~1B dense shape (the real model's widths and heads; byte vocabulary). `--layers` cuts it to fit memory.
    "tinyllama-1.1b": ["--model-preset", "tinyllama-1.1b", "--data-seq-len", "2048", "--training-batch-size", "8",
                       "--training-lr", "3e-4"],
    # The GPU check's dense and MoE shapes (their sizes: the presets' notes and counts), 2048-token windows.
    "byte-125m": ["--model-preset", "byte-125m", "--data-seq-len", "2048", "--training-batch-size", "16",
                  "--training-lr", "6e-4"],
    "byte-moe-480m": ["--model-preset", "byte-moe-480m", "--data-seq-len", "2048", "--training-batch-size", "8",
                      "--training-lr", "6e-4"],
}


class _PerfLog(MetricSink):
    """A logger sink that keeps the perf/* values of every log step (what ThroughputMonitor publishes)."""

    def __init__(self) -> None:
        self.windows: list[dict[str, float]] = []

    def write(self, record: dict[str, Any]) -> None:
        if "perf/tokens_per_s_per_device" in record:
            self.windows.append({k: v for k, v in record.items() if k.startswith("perf/")})


def engine_throughput(preset: str = "default", device: str = "cpu", precision: str = "bf16", compile: bool = False,
                      activation_checkpointing: bool = False, steps: int = 40, log_interval: int = 10,
                      extra: Sequence[str] = ()) -> dict[str, float]:
    """Train `steps` steps of `preset` through the engine; medians of ThroughputMonitor's windows after the first."""
    switches = ["--training-compile"] if compile else []
    switches += ["--training-activation-checkpointing"] if activation_checkpointing else []
    flags = [*PRESETS[preset], "--training-device", device, "--training-precision", precision,
             "--training-log-interval", str(log_interval), "--training-val-max-batches", "1",
             "--training-callbacks", "LRSchedulerCallback", "ThroughputMonitor", *switches, *extra]
    with tempfile.TemporaryDirectory() as tmp:
        config, task_class, _ = parse_config(["--task", "lm", "--training-max-steps", str(steps),
                                              "--logging-log-dir", str(Path(tmp) / "run"), *flags])
        prepare_run_dir(config)
        perf = _PerfLog()
        engine = build_engine(config, task_class, callbacks=[*build_callbacks(config), perf])
        began = time.perf_counter()
        engine.run()
        wall = time.perf_counter() - began
    windows = perf.windows[1:] or perf.windows  # the first window holds compilation and warm-up
    result = {key: statistics.median(w[key] for w in windows) for key in windows[0]}
    result["wall_s"] = wall
    result["parameters"] = sum(p.numel() for p in engine.unwrapped_model.parameters())
    return result


def report_throughput(name: str, result: dict[str, float]) -> None:
    mfu = result.get("perf/mfu")
    print(f"{name}: {result['perf/tokens_per_s_per_device']:,.0f} tokens/s per device, "
          f"{result['perf/tflops_per_device']:.3g} TFLOP/s, MFU {'n/a' if mfu is None else f'{mfu:.1f}%'} "
          f"({result['parameters'] / 1e6:.1f}M parameters, run {result['wall_s']:.0f} s)", flush=True)


def _throughput_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="bench_overhead throughput", description="engine tokens/s and MFU")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--preset", default="byte-125m", choices=sorted(PRESETS))
    parser.add_argument("--tiny", action="store_true", help="the smoke preset (same as --preset tiny)")
    parser.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--log-interval", type=int, default=10)
    parser.add_argument("--target-mfu", type=float, default=0.0, help="exit 1 if the MFU (%%) is below this")
    args = parser.parse_args(argv)
    preset = "tiny" if args.tiny else args.preset
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    result = engine_throughput(preset, args.device, args.precision, args.compile, args.activation_checkpointing,
                               args.steps, args.log_interval)
    switches = [args.precision] + ["compile"] * args.compile + ["act. checkpointing"] * args.activation_checkpointing
    report_throughput(f"{preset} ({' + '.join(switches)}, {args.device})", result)
    if args.target_mfu and result.get("perf/mfu", 0.0) < args.target_mfu:
        print(f"MFU below the target of {args.target_mfu:.0f}%")
        raise SystemExit(1)


def main() -> None:
    if sys.argv[1:2] == ["throughput"]:
        _throughput_main(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps at the start of each round")
    parser.add_argument("--steps", type=int, default=60, help="timed steps per round")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    parser.add_argument("--preset", default="default", choices=sorted(PRESETS), help="model and batch shape")
    parser.add_argument("--device", default="cpu", help="cpu | cuda (the engine and the hand loop alike)")
    parser.add_argument("--compile", action="store_true", help="torch.compile both sides")
    parser.add_argument("--layers", type=int, default=0, help="override the preset's layer count (fit memory)")
    parser.add_argument("--target-ratio", type=float, default=0.0, help="exit 1 if engine / hand loop is below")
    parser.add_argument("--config-args", nargs=argparse.REMAINDER, default=[], help="extra train CLI flags")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        print(f"device: {torch.cuda.get_device_name()}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, preset {args.preset}")
    extra = [*PRESETS[args.preset], "--training-device", args.device, *(["--training-compile"] * args.compile),
             *(["--model-num-layers", str(args.layers)] if args.layers else []), *args.config_args]
    summary = run(args.rounds, args.warmup, args.steps, extra)["summary"]
    if args.target_ratio and summary["ratio"] < args.target_ratio:
        print(f"engine / hand loop below the target of {args.target_ratio}")
        raise SystemExit(1)


if __name__ == "__main__":
    main()
