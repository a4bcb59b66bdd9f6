"""torch's attention kernel on the CPU in bf16 and in fp32, the measurement behind `model.attention_fp32_on_cpu`
(issue 24; a benchmark, not a test).

    OMP_NUM_THREADS=1 python -m benchmarks.bench_attention [--rounds 10] [--shapes 16x4x256x32 2x8x1024x128 ...]
    OMP_NUM_THREADS=1 python -m benchmarks.bench_attention --profile-step [-- lm training flags ...]

The first form times forward + backward of `F.scaled_dot_product_attention(q, k, v, is_causal=True)` for each
(batch x heads x positions x head width) shape: the flash kernel in bf16 and in fp32 and the math backend in both,
median CPU milliseconds (`time.process_time`, one thread) of `--rounds` calls after two warm-up calls, the four
variants alternating so that the machine's load hits all alike. The second profiles three engine steps of the lm
default (after three warm-up steps) with torch.profiler and prints the ten operators with the most CPU time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

# The lm default's heads before issue 24's third sweep (4 x 32) and after (2 x 64), then wider heads, longer rows.
SHAPES = ["16x4x256x32", "16x2x256x64", "8x12x256x64", "4x8x512x64", "2x8x1024x128"]
VARIANTS = {"bf16 flash": (torch.bfloat16, SDPBackend.FLASH_ATTENTION), "fp32 flash": (torch.float32,
            SDPBackend.FLASH_ATTENTION), "bf16 math": (torch.bfloat16, SDPBackend.MATH),
            "fp32 math": (torch.float32, SDPBackend.MATH)}


def time_shape(shape: tuple[int, ...], rounds: int) -> dict[str, float]:
    """Median CPU ms of one causal forward + backward per variant, the variants alternating."""
    inputs = {name: [torch.randn(*shape, dtype=dtype, requires_grad=True) for _ in range(3)]
              for name, (dtype, _) in VARIANTS.items()}
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for i in range(rounds + 2):
        for name, (_, backend) in VARIANTS.items():
            start = time.process_time()
            with sdpa_kernel(backend):
                F.scaled_dot_product_attention(*inputs[name], is_causal=True).sum().backward()
            if i >= 2:  # two warm-up calls
                times[name].append(time.process_time() - start)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def profile_step(flags: list[str]) -> str:
    from torch.profiler import ProfilerActivity, profile

    from benchmarks.bench_levers import lm_engine

    with tempfile.TemporaryDirectory(prefix="bench-attention-") as tmp:
        engine, batch = lm_engine(flags, Path(tmp) / "run")
        for _ in range(3):
            engine._optimizer_step([batch])
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                engine._optimizer_step([batch])
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ours, flags = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--shapes", nargs="+", default=SHAPES, help="BxHxTxD, as 16x4x256x32")
    parser.add_argument("--profile-step", action="store_true", help="profile the lm default's engine step instead")
    args = parser.parse_args(ours)
    torch.set_num_threads(1)
    if args.profile_step:
        print(profile_step(flags))
        return 0
    print(f"torch {torch.__version__}, 1 thread; causal forward + backward, median CPU ms of {args.rounds}")
    print(f"{'shape':<16}" + "".join(f"{name:>12}" for name in VARIANTS) + "   fp32/bf16 flash")
    for text in args.shapes:
        ms = time_shape(tuple(int(n) for n in text.split("x")), args.rounds)
        print(f"{text:<16}" + "".join(f"{ms[name]:12.1f}" for name in VARIANTS)
              + f"   {ms['fp32 flash'] / ms['bf16 flash']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
