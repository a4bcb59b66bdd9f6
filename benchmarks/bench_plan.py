"""The planner's memory model (`llm.plan`) against measured peaks of real training steps on the CPU (issue 23).

    python -m benchmarks.bench_plan

Each configuration runs in a fresh process: the lm task's step as the engine runs it (`DecoderModel` from a preset,
`nn.CrossEntropyLoss` on fp32 logits, bf16 as CPU autocast, activation checkpointing by the blocks' own flag,
the registry's optimizer: fused AdamW, or torch's Muon + AdamW), three optimizer steps (the first creates the
optimizer state), `zero_grad(set_to_none=True)` between them. Measured peak = the process's resident-set high-water
mark (`VmHWM`, /proc/self/status) after the steps minus its resident set (`VmRSS`) just before the model is built,
with glibc's malloc told to map every block over 64 KiB on its own and unmap it when freed (`MALLOC` below), so the
resident set follows the live tensors; the models are big enough (0.5-2 GB peaks) that the interpreter's own noise
(a few MB) stays far below 15%.
(tracemalloc does not see torch's allocations; the profiler's memory events count allocations, not the peak.)
Predicted = `llm.plan.predict` for 1 GPU with the same shape, sequence, micro-batch, precision, optimizer and
checkpointing mode; the FSDP rows shard the model over 2 gloo processes (`shard_model`, as the engine does) and
report the larger rank's peak against the 2-GPU FSDP prediction.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
PRESET, LAYERS = "byte-125m", 8  # 8 of byte-125m's 18 blocks (hidden 768, SwiGLU 2048, vocab 256): 57M params

# glibc's malloc serves every block over 64 KiB by mmap and returns freed memory at once, so the resident set follows
# the live tensors. Its default raises the mmap threshold (up to 32 MiB) as blocks are freed and then keeps freed
# heap memory: that retention added about 500 MiB (+50%) to the high-water mark of the `full` row below.
MALLOC = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}

CONFIGS = [  # (precision, activation checkpointing, optimizer, micro-batch, seq, processes: 1, or 2 under FSDP)
    ("fp32", "none", "adamw", 8, 256, 1),
    ("fp32", "full", "adamw", 8, 256, 1),
    ("fp32", "none", "muon", 2, 256, 1),
    ("bf16", "none", "adamw", 8, 256, 1),
    ("fp32", "none", "adamw", 4, 512, 1),
    ("fp32", "none", "adamw", 8, 256, 2),
    ("fp32", "none", "muon", 8, 256, 2),
]


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def _rank(rank: int, port: int, config: list, out: str) -> None:
    """One FSDP rank: its own peak, into out/peak-<rank>."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    peak = measure(*config[:5], fsdp=True)
    Path(out, f"peak-{rank}").write_text(str(peak))
    dist.destroy_process_group()


def measure_fsdp(config: list) -> int:
    """The larger of 2 FSDP ranks' peaks (each measured as `measure` does)."""
    import tempfile

    import torch.multiprocessing as mp

    from llm.training.parallel.distributed import free_port

    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_rank, args=(free_port(), config, out), nprocs=2, start_method="spawn")
        return max(int(Path(out, f"peak-{r}").read_text()) for r in range(2))


def measure(precision: str, ac: str, optimizer: str, batch: int, seq: int, fsdp: bool = False) -> int:
    """Peak bytes of three training steps above the resident set before the model exists (this process)."""
    import contextlib

    import torch

    from llm.models.decoder import DecoderModel
    from llm.training.optim.optimizers import build_optimizer
    from llm.training.parallel.fsdp import shard_model

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 256, (batch, seq + 1), generator=gen) for _ in range(3)]
    criterion = torch.nn.CrossEntropyLoss()
    before = _status("VmRSS")
    model = DecoderModel.from_preset(PRESET, num_layers=LAYERS, max_seq_len=seq)
    for block in model.layers:
        block.activation_checkpointing = ac == "full"
    if fsdp:
        shard_model(model, torch.device("cpu"), precision)
    cfg = SimpleNamespace(optimizer=optimizer, lr=1e-4, muon_lr_scale=8.0, weight_decay=0.1, betas=(0.9, 0.95))
    opt = build_optimizer(model, cfg)
    for tokens in batches:
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
        with autocast:
            logits = model(tokens[:, :-1])
            loss = criterion(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        del logits, loss
    return _status("VmHWM") - before


def predicted(precision: str, ac: str, optimizer: str, batch: int, seq: int, procs: int) -> dict[str, float]:
    from llm.plan import Candidate, model_shape, predict

    shape = model_shape(PRESET, seq, num_layers=LAYERS)
    strategy = "fsdp" if procs > 1 else "ddp"
    plan = predict(shape, Candidate(strategy, 1, ac, batch), procs, 1, 1 << 62, seq, precision, optimizer)
    return {"peak": plan.peak, "params": shape.params}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--measure", default="", help=argparse.SUPPRESS)  # internal: one config, in this process
    parser.add_argument("--only", type=int, nargs="*", default=None, help="indices of CONFIGS to run (default all)")
    args = parser.parse_args()
    if args.measure:
        config = json.loads(args.measure)
        print(json.dumps(measure_fsdp(config) if config[5] > 1 else measure(*config[:5])))
        return
    rows = []
    for config in [c for i, c in enumerate(CONFIGS) if args.only is None or i in args.only]:
        out = subprocess.run([sys.executable, "-m", "benchmarks.bench_plan", "--measure", json.dumps(config)],
                             cwd=REPO, capture_output=True, text=True, check=True, env={**os.environ, **MALLOC})
        measured = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append((config, measured, predicted(*config)))
    params = rows[0][2]["params"]
    print(f"{PRESET} with {LAYERS} blocks ({params / 1e6:.1f}M params), 3 steps, peak per process")
    print("| plan | precision | checkpointing | optimizer | micro-batch x seq | measured peak MiB | predicted MiB | "
          "error |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for (precision, ac, optimizer, batch, seq, procs), measured, pred in rows:
        error = pred["peak"] / measured - 1
        plan = "1 process" if procs == 1 else f"FSDP, {procs} gloo processes"
        print(f"| {plan} | {precision} | {ac} | {optimizer} | {batch} x {seq} | {measured / 2**20:.0f} | "
              f"{pred['peak'] / 2**20:.0f} | {error:+.1%} |")


if __name__ == "__main__":
    main()
