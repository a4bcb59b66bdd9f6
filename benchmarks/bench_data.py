"""Is the lm data loader ever the bottleneck? Windows/s it serves vs windows/s a training step consumes.

    python -m benchmarks.bench_data [--steps 30] [--threads N] [--config-args ...]

Everything runs on the default `make train` config (`--task lm`, resolved exactly as the CLI resolves it,
plus any `--config-args` flags): the embedded standard-library corpus, byte tokenizer, the task's model,
batch size, sequence length and precision. Measured in one process, alternating so machine load hits both
sides alike, reporting medians:
- loader: the training `DataLoader` as the engine iterates it (main process, `num_workers=0`);
- training: one optimizer step (forward, cross-entropy, backward, clip, AdamW) on those batches;
- cold start: building the token cache from scratch (byte and BPE) into a temporary cache directory.
The target is loader >= 10x training. This is a benchmark, not a test: numbers go to RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import tempfile
import time
from itertools import islice
from typing import Any

import torch

from llm.data.text import TextDataModule
from llm.training.train import parse_config


def build(extra: list[str]) -> tuple[Any, Any, TextDataModule]:
    config, task_class, _ = parse_config(["--task", "lm", *extra])
    task = task_class(config)
    dm = task.build_data_module()
    dm.prepare_data()
    dm.setup()
    return config, task, dm


def time_loader(dm: TextDataModule, batches: int) -> float:
    """Seconds per batch of a fresh training loader (includes creating the loader, as every epoch does)."""
    began = time.perf_counter()
    n = sum(1 for _ in islice(iter(dm.train_dataloader()), batches))
    return (time.perf_counter() - began) / n


def make_train_step(config: Any, task: Any, dm: TextDataModule) -> Any:
    torch.manual_seed(0)
    model = task.build_model()
    criterion = task.build_criterion()
    optimizer = task.build_optimizer(model)
    precision = config.training.precision
    autocast = (
        (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16" else contextlib.nullcontext
    )
    batches = iter(dm.train_dataloader())

    def step() -> float:
        batch = next(batches)
        began = time.perf_counter()
        with autocast():
            loss, _ = task.train_step(batch, model, criterion)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.training.grad_clip or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - began

    return step


def cold_start(extra: list[str]) -> dict[str, float]:
    """Seconds to build the token cache from nothing, byte and BPE."""
    out = {}
    for name, flags in (("byte", []), ("bpe-4096", ["--data-tokenizer", "bpe"])):
        with tempfile.TemporaryDirectory() as cache:
            began = time.perf_counter()
            build([*extra, *flags, "--data-cache-dir", cache])
            out[name] = time.perf_counter() - began
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="timed training steps (and loader rounds)")
    parser.add_argument("--loader-batches", type=int, default=200, help="batches per loader round")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--no-cold", action="store_true", help="skip the cold token-cache builds")
    parser.add_argument("--config-args", nargs=argparse.REMAINDER, default=[], help="extra train CLI flags")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config, task, dm = build(args.config_args)
    step = make_train_step(config, task, dm)
    for _ in range(3):  # warm-up: allocator, autocast caches, page cache of the memmap
        step()
    time_loader(dm, 20)
    train_s, loader_s = [], []
    for _ in range(args.steps):
        train_s.append(step())
        loader_s.append(time_loader(dm, args.loader_batches))
    batch, seq = config.training.batch_size, config.data.seq_len
    loader_w = batch / statistics.median(loader_s)
    train_w = batch / statistics.median(train_s)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"config: seq_len {seq}, batch {batch}, precision {config.training.precision}, "
          f"model hidden {config.model.hidden_size} x {config.model.num_layers} layers, "
          f"train windows {len(dm.train_set)}, tokens {dm.store.num_tokens}")
    print(f"loader:   {loader_w:12.0f} windows/s  ({loader_w * seq / 1e6:.1f} M tokens/s, "
          f"median of {args.steps} rounds of {args.loader_batches} batches)")
    print(f"training: {train_w:12.0f} windows/s  ({train_w * seq:.0f} tokens/s, median of {args.steps} steps)")
    print(f"ratio:    {loader_w / train_w:12.0f}x  (target >= 10x)")
    if not args.no_cold:
        for name, seconds in cold_start(args.config_args).items():
            print(f"cold token cache ({name}): {seconds:.1f} s")


if __name__ == "__main__":
    main()
