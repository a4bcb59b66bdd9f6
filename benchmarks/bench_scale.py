"""Issue 23's single-device measurements: recompute modes, the stall of asynchronous checkpoints, float8 vs bf16.

    python -m benchmarks.bench_scale recompute [--device cpu|cuda] [--hidden 256 --layers 4 --seq-len 256 --batch 8]
    python -m benchmarks.bench_scale async [--device cpu|cuda] [--hidden 512 --layers 4 --steps 40 --interval 8]
        [--fsdp 2]
    python -m benchmarks.bench_scale fp8 [--device cuda] [--preset byte-125m --compile]
    python -m benchmarks.bench_scale sp [--hidden 256 --layers 4 --seq-len 256 --batch 8 --vocab 8192]

- `recompute`: time per training step (forward, backward, AdamW) and the step's peak memory of `none`, `full` and
  `selective` (`--training-activation-checkpointing`), each in a fresh child process, alternating the modes `rounds`
  times; medians. Peak memory: on CUDA `max_memory_allocated` above what was allocated before the steps; on the CPU
  the peak resident set above the pre-step resident set (VmHWM reset through /proc/self/clear_refs, as
  bench_memory.py), so it does not depend on the machine's load.
- `async`: one engine run per side (sync, then async) of the lm task at a model big enough that a checkpoint write
  lasts several steps; per step the wall time from `on_batch_start` to `on_batch_end` (after a CUDA synchronize) and
  whether an asynchronous write was in flight. Reports the median step time with a write in flight over the median
  without (target <= 1.1), and the pause per save: the synchronous save's duration vs the asynchronous staging. With
  `--fsdp N` both runs are FSDP over N spawned gloo processes (sharded checkpoints) and rank 0's steps are reported.
- `sp`: tensor parallelism 2 over two gloo CPU processes without and with `--distributed-sequence-parallel` (and
  its vocabulary-parallel loss), each side in a fresh pair of processes, alternated `rounds` times: per rank the
  bytes autograd saves for the backward of one training step (counted by a saved-tensors hook, unique storages: a
  measure that does not depend on the machine's load), the step's peak resident set above the pre-step level, and
  the step time; rank 0's medians (the ranks are symmetric).
- `fp8`: the engine's tokens/s (ThroughputMonitor) with `--training-precision bf16` and `fp8`, alternated; needs a
  CUDA GPU of compute capability >= 8.9 and torchao (elsewhere it says why and exits 0).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MODES = ("none", "full", "selective")


# ------------------------------------------------------------------------------------------------------ recompute
def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def recompute_child(mode: str, args: argparse.Namespace) -> dict[str, float]:
    """One mode in this fresh process: median step seconds and the steps' peak memory above the pre-step level."""
    import torch
    import torch.nn.functional as F

    from benchmarks.bench_memory import _peak_bytes, _reset_peak
    from llm.models.decoder import DecoderModel

    torch.set_num_threads(args.threads or torch.get_num_threads())
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = DecoderModel(vocab_size=256, hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads,
                         max_seq_len=args.seq_len).to(device)
    for block in model.layers:
        block.activation_checkpointing = mode
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, 256, (args.batch, args.seq_len + 1), generator=torch.Generator().manual_seed(0)).to(device)
    x, y = ids[:, :-1], ids[:, 1:]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            loss = F.cross_entropy(model(x).flatten(0, 1).float(), y.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # optimizer state and allocator warm
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        _reset_peak()
        before = _rss_bytes()
    times = []
    for _ in range(args.steps):
        began = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - began)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else _peak_bytes()
    return {"step_s": statistics.median(times), "peak_mib": (peak - before) / 2**20}


def recompute_main(args: argparse.Namespace) -> None:
    rows: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
    for _ in range(args.rounds):
        for mode in MODES:
            out = subprocess.run([sys.executable, "-m", "benchmarks.bench_scale", "recompute", "--child", mode,
                                  *_shape_flags(args)], capture_output=True, text=True, check=True)
            rows[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"recompute modes on {args.device}: hidden {args.hidden}, {args.layers} layers, seq {args.seq_len}, "
          f"batch {args.batch}; medians of {args.rounds} rounds x {args.steps} steps")
    base = {key: statistics.median(r[key] for r in rows["none"]) for key in ("step_s", "peak_mib")}
    for mode in MODES:
        step = statistics.median(r["step_s"] for r in rows[mode])
        peak = statistics.median(r["peak_mib"] for r in rows[mode])
        print(f"  {mode:9s} step {step * 1e3:8.1f} ms ({step / base['step_s']:.2f}x)   step peak {peak:8.1f} MiB "
              f"({peak / base['peak_mib']:.2f}x)", flush=True)


def _shape_flags(args: argparse.Namespace) -> list[str]:
    return ["--device", args.device, "--hidden", str(args.hidden), "--layers", str(args.layers), "--heads",
            str(args.heads), "--seq-len", str(args.seq_len), "--batch", str(args.batch), "--steps", str(args.steps),
            "--threads", str(args.threads)]


# ---------------------------------------------------------------------------------------------------------- async
def async_side(args: argparse.Namespace, asynchronous: bool) -> dict[str, Any]:
    """One run (sync or async): in this process, or with `--fsdp N` in N spawned FSDP processes (gloo), rank 0's
    step times and pauses."""
    flags = ["--task", "lm", "--data-max-bytes", "2000000", "--model-hidden-size", str(args.hidden),
             "--model-num-layers", str(args.layers), "--model-num-heads", str(args.heads), "--data-seq-len",
             str(args.seq_len), "--training-batch-size", str(args.batch), "--training-max-steps", str(args.steps),
             "--training-device", args.device, "--training-precision", "bf16" if args.device.startswith("cuda")
             else "fp32", "--training-val-interval", "0", "--training-val-max-batches", "1",
             "--training-log-interval", "1000", "--training-callbacks", "LRSchedulerCallback",
             "--checkpoint-interval", str(args.interval), "--checkpoint-keep-last", "2", "--logging-loggers", "jsonl"]
    if asynchronous:
        flags.append("--checkpoint-async")
    with tempfile.TemporaryDirectory(dir=args.tmp or None) as tmp:
        if not args.fsdp:
            return _async_rank(0, 1, args, flags, tmp, 0)
        import torch.multiprocessing as mp

        from llm.training.parallel.distributed import free_port

        flags += ["--distributed-strategy", "fsdp", "--distributed-nproc-per-node", str(args.fsdp)]
        mp.spawn(_async_rank, args=(args.fsdp, args, flags, tmp, free_port()), nprocs=args.fsdp, join=True)
        return json.loads((Path(tmp) / "rank0.json").read_text())


def _async_rank(rank: int, world: int, args: argparse.Namespace, flags: list[str], tmp: str,
                port: int) -> dict[str, Any]:
    import torch

    from llm.training.core.callbacks import Callback, build_callbacks
    from llm.training.train import build_engine, parse_config, prepare_run_dir

    class StepTimes(Callback):
        def __init__(self) -> None:
            self.rows: list[tuple[float, bool]] = []
            self.pauses: list[float] = []
            self.engine_ref: Any = None
            self._began = 0.0
            self._pending = False

        def on_batch_start(self, logs: Any = None) -> None:
            writer = getattr(self.engine_ref.checkpointer, "_writer", None)
            self._pending = bool(writer is not None and writer.pending and not writer.done)
            self._began = time.perf_counter()

        def on_batch_end(self, logs: Any = None) -> None:
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            self.rows.append((time.perf_counter() - self._began, self._pending))

        def on_save_checkpoint(self, logs: Any = None) -> None:
            self.pauses.append(float(logs["seconds"]))

    if world > 1:
        from llm.training.parallel import distributed as D

        if args.threads:
            torch.set_num_threads(args.threads)
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        D.init_process_group(rank, world, "gloo", torch.device(args.device), 10.0)
    try:
        config, task_class, _ = parse_config([*flags, "--logging-log-dir", str(Path(tmp) / "run")])
        if rank == 0:
            prepare_run_dir(config)
        if world > 1:
            D.barrier()
        timer = StepTimes()
        engine = build_engine(config, task_class, rank, world, callbacks=[*build_callbacks(config), timer])
        timer.engine_ref = engine
        engine.run()
        if world > 1:
            D.barrier()
    finally:
        if world > 1:
            D.destroy_process_group()
    size = sum(f.stat().st_size for f in (Path(tmp) / "run/checkpoints").rglob("*") if f.is_file()) / 2
    steps = timer.rows[2:]  # the first steps warm the allocator up
    result = {"in_flight": [t for t, p in steps if p], "idle": [t for t, p in steps if not p],
              "pauses": timer.pauses[:-1] or timer.pauses,  # the last one is the (synchronous) final save
              "params": sum(p.numel() for p in engine.unwrapped_model.parameters()), "ckpt_mib": size / 2**20}
    if world > 1 and rank == 0:
        (Path(tmp) / "rank0.json").write_text(json.dumps(result))
    return result


def async_main(args: argparse.Namespace) -> None:
    sync, asyn = async_side(args, False), async_side(args, True)
    idle, busy = statistics.median(asyn["idle"]), statistics.median(asyn["in_flight"] or [float("nan")])
    where = f"{args.device}, FSDP over {args.fsdp} processes (rank 0's steps)" if args.fsdp else args.device
    print(f"async checkpoints on {where}: {asyn['params'] / 1e6:.1f}M parameters, checkpoint "
          f"~{asyn['ckpt_mib']:.0f} MiB, a save every {args.interval} steps, {args.steps} steps")
    print(f"  step time, async run: {idle * 1e3:.1f} ms without a write in flight ({len(asyn['idle'])} steps), "
          f"{busy * 1e3:.1f} ms with one ({len(asyn['in_flight'])} steps): ratio {busy / idle:.3f} (target <= 1.1)")
    print(f"  step time, sync run: {statistics.median(sync['idle']) * 1e3:.1f} ms")
    print(f"  pause per save: sync {statistics.median(sync['pauses']) * 1e3:.1f} ms, async staging "
          f"{statistics.median(asyn['pauses']) * 1e3:.1f} ms", flush=True)


# ------------------------------------------------------------------------------------------------------------ fp8
# ------------------------------------------------------------------------------------ sequence parallelism (TP 2)
def sp_rank(rank: int, port: int, sequence_parallel: bool, args: argparse.Namespace, out: str) -> None:
    """One rank of a TP 2 pair: saved-activation bytes, step peak RSS above the pre-step level, step seconds."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.distributed.device_mesh import init_device_mesh

    from benchmarks.bench_memory import _peak_bytes, _reset_peak
    from llm.models.decoder import DecoderModel
    from llm.training.parallel import tensor

    torch.set_num_threads(args.threads or 1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
    torch.manual_seed(0)
    model = DecoderModel(vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers,
                         num_heads=args.heads, max_seq_len=args.seq_len)
    tensor.parallelize(model, mesh, sequence_parallel=sequence_parallel)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq_len + 1), generator=torch.Generator().manual_seed(0))
    x, y = ids[:, :-1], ids[:, 1:]
    summed = tensor.summed_parameters(model)
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        local = t
        while hasattr(local, "_local_tensor") or hasattr(local, "elem"):  # a DTensor's, a pending collective's
            local = local._local_tensor if hasattr(local, "_local_tensor") else local.elem
        saved[local.untyped_storage().data_ptr()] = local.untyped_storage().nbytes()
        return t

    def step(count: bool = False) -> None:
        block = tensor.loss_parallel_block() if sequence_parallel else contextlib.nullcontext()
        hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t) if count else contextlib.nullcontext()
        with block:
            with hooks:
                loss = tensor.plain(F.cross_entropy(model(x).flatten(0, 1), y.flatten()))
            loss.backward()
        tensor.sum_partial_gradients(list(model.parameters()), summed, mesh.get_group())
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(count=True)  # also warms the optimizer state and the allocator
    _reset_peak()
    before = _rss_bytes()
    times = []
    for _ in range(args.steps):
        dist.barrier()
        began = time.perf_counter()
        step()
        times.append(time.perf_counter() - began)
    result = {"saved_mib": sum(saved.values()) / 2**20, "peak_mib": (_peak_bytes() - before) / 2**20,
              "step_s": statistics.median(times)}
    if rank == 0:
        Path(out).write_text(json.dumps(result))
    dist.destroy_process_group()


def sp_main(args: argparse.Namespace) -> None:
    import torch.multiprocessing as mp

    from llm.training.parallel.distributed import free_port

    rows: dict[str, list[dict[str, float]]] = {"tp2": [], "tp2+sp": []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            for side in rows:
                out = os.path.join(tmp, "rank0.json")
                mp.spawn(sp_rank, args=(free_port(), side == "tp2+sp", args, out), nprocs=2, join=True)
                rows[side].append(json.loads(Path(out).read_text()))
    print(f"TP 2 on 2 gloo CPU processes: hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, seq "
          f"{args.seq_len}, batch {args.batch}; rank 0, medians of {args.rounds} rounds x {args.steps} steps")
    base = {key: statistics.median(r[key] for r in rows["tp2"]) for key in ("saved_mib", "peak_mib", "step_s")}
    for side, results in rows.items():
        m = {key: statistics.median(r[key] for r in results) for key in base}
        print(f"  {side:7s} saved for backward {m['saved_mib']:8.1f} MiB ({m['saved_mib'] / base['saved_mib']:.2f}x)"
              f"   step peak {m['peak_mib']:8.1f} MiB ({m['peak_mib'] / base['peak_mib']:.2f}x)   step "
              f"{m['step_s'] * 1e3:8.1f} ms ({m['step_s'] / base['step_s']:.2f}x)", flush=True)


def fp8_main(args: argparse.Namespace) -> None:
    from benchmarks.bench_overhead import engine_throughput
    from llm.training.optim.precision import float8_refusal

    why = float8_refusal(args.device)
    if why:
        print(f"fp8 vs bf16: skipped: {why}")
        return
    rows: dict[str, list[float]] = {"bf16": [], "fp8": []}
    for _ in range(args.rounds):
        for precision in rows:
            layers = ["--model-num-layers", str(args.layers)] if args.layers else []
            result = engine_throughput(args.preset, args.device, precision, args.compile, steps=args.steps,
                                       log_interval=args.log_interval, extra=layers)
            rows[precision].append(result["perf/tokens_per_s_per_device"])
    bf16, fp8 = statistics.median(rows["bf16"]), statistics.median(rows["fp8"])
    print(f"fp8 vs bf16 ({args.preset}{', compile' if args.compile else ''}): bf16 {bf16:,.0f} tokens/s, fp8 "
          f"{fp8:,.0f} tokens/s: {fp8 / bf16:.2f}x (target >= 1.25 at 1B)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["recompute", "async", "fp8", "sp"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--hidden", type=int, default=0)
    parser.add_argument("--layers", type=int, default=0, help="layers (default 4; fp8: the preset's)")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--interval", type=int, default=8, help="async: optimizer steps between saves")
    parser.add_argument("--fsdp", type=int, default=0, help="async: N spawned FSDP processes (gloo) instead of one")
    parser.add_argument("--tmp", default="", help="async: where the run directories go (default: the system's)")
    parser.add_argument("--preset", default="byte-125m", help="fp8: a bench_overhead preset")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--log-interval", type=int, default=10)
    parser.add_argument("--vocab", type=int, default=8192, help="sp: the vocabulary (the loss is split by it)")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.what != "fp8":
        args.layers = args.layers or 4
    if args.what == "recompute":
        args.hidden, args.steps = args.hidden or 256, args.steps or 5
        if args.child:
            print(json.dumps(recompute_child(args.child, args)))
            return
        recompute_main(args)
    elif args.what == "sp":
        args.hidden, args.steps = args.hidden or 256, args.steps or 3
        sp_main(args)
    elif args.what == "async":
        args.hidden, args.steps = args.hidden or 512, args.steps or 40
        async_main(args)
    else:
        args.steps = args.steps or 40
        fp8_main(args)


if __name__ == "__main__":
    main()
