"""Packed vs padded SFT: answer tokens per second of training steps (issue 21, `--data-packing`).

    OMP_NUM_THREADS=1 python -m benchmarks.bench_packing [--rounds 5] [--steps 4] [--threads 1] [--hidden 64]

Two data sets, each trained both ways with the sft task's own loss (`SFTTask._loss`: the model, its document mask
on packed rows, cross-entropy on answer tokens), AdamW steps on a small model (hidden `--hidden` 64, 4 heads, 2 layers,
byte vocabulary), fp32, the same batch size (rows per step) both ways:
- demo: the generated demo set as `--task sft` builds it (`SFTDataModule`, seq_len 160, byte tokenizer);
- long tail: synthetic examples whose lengths are lognormal (median 48 tokens, sigma 1.0, cut at seq_len 512), the
  second half of each example is the answer: the mix where one long example pads a whole batch.
Padded: one example per row, right-padded to the batch's longest (as `sft` batches without packing). Packed: rows of
seq_len by best-fit decreasing (`llm.data.packing`). The sides alternate within each round (order swapped every
round) so machine load hits both alike; each round trains `--steps` batches of its own per side and reports their
answer tokens/s, per wall-clock second and per CPU second of the process; the result is the ratio of the medians.
Also printed, independent of load: token positions computed per answer token over all of an epoch's batches.
This is a benchmark, not a test: numbers go to RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from typing import Any

import numpy as np
import torch

from llm.data.packing import PackCollate, PackedExamples
from llm.data.sft import IGNORE_INDEX, PadCollate, SFTDataModule
from llm.models.decoder import DecoderModel
from llm.training.core.config import Config
from llm.training.tasks.sft_task import SFTTask


def demo_examples(seq_len: int) -> list[tuple[np.ndarray, np.ndarray]]:
    config = Config(task="sft")
    config.data.seq_len = seq_len
    dm = SFTDataModule(config.data, batch_size=1, seed=0)
    dm.setup()
    assert dm.train_set is not None
    return list(dm.train_set.examples)  # type: ignore[union-attr]


def long_tail_examples(n: int, seq_len: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    lengths = np.clip(np.round(rng.lognormal(np.log(48), 1.0, n)), 8, seq_len).astype(int)
    out = []
    for length in lengths:
        ids = rng.integers(1, 256, length + 1)
        labels = ids[1:].copy()
        labels[: length // 2] = IGNORE_INDEX  # the prompt half
        out.append((ids[:-1].astype(np.int64), labels.astype(np.int64)))
    return out


def batches(examples: list[tuple[np.ndarray, np.ndarray]], seq_len: int, batch_size: int, packed: bool,
            count: int, seed: int = 0) -> list[tuple[torch.Tensor, ...]]:
    """`count` batches in a seeded random order, as the training loader would draw them."""
    items: Any = PackedExamples(examples, seq_len).rows if packed else examples
    collate: Any = PackCollate(0, IGNORE_INDEX, seq_len) if packed else PadCollate(0)  # as SFTDataModule's
    order = np.random.default_rng(seed).permutation(len(items))
    return [collate([items[i] for i in order[b * batch_size:(b + 1) * batch_size]]) for b in range(count)]


def throughput(task: SFTTask, model: torch.nn.Module, opt: torch.optim.Optimizer, data: list[tuple[torch.Tensor, ...]],
               criterion: torch.nn.Module) -> tuple[float, float]:
    """Answer tokens per second of training steps over ``data``: per wall-clock second and per CPU second of this
    process (the second depends less on what else the machine runs)."""
    answer = sum(int((b[1] != IGNORE_INDEX).sum()) for b in data)
    start, cpu = time.perf_counter(), time.process_time()
    for batch in data:
        loss = task._loss(batch, model, criterion)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return answer / (time.perf_counter() - start), answer / (time.process_time() - cpu)


def compare(name: str, examples: list[tuple[np.ndarray, np.ndarray]], seq_len: int, args: argparse.Namespace) -> None:
    task = SFTTask(Config(task="sft"))
    criterion = task.build_criterion()
    torch.manual_seed(0)
    model = DecoderModel(vocab_size=256, hidden_size=args.hidden, num_layers=2, num_heads=4, intermediate_multiple_of=8,
                         max_seq_len=seq_len)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    # Every round trains on its own `--steps` batches, so the medians span rounds x steps batches per side.
    sides = {packed: batches(examples, seq_len, args.batch_size, packed, args.steps * args.rounds, seed=1)
             for packed in (False, True)}
    fill = PackedExamples(examples, seq_len).fill()
    throughput(task, model, opt, sides[True][:1], criterion)  # warm-up of both paths
    throughput(task, model, opt, sides[False][:1], criterion)
    rates: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
    for r in range(args.rounds):
        for packed in ((False, True) if r % 2 == 0 else (True, False)):
            data = sides[packed][r * args.steps:(r + 1) * args.steps]
            rates[packed].append(throughput(task, model, opt, data, criterion))
    lengths = [len(x) for x, _ in examples]
    print(f"{name}: {len(examples)} examples, length median {int(np.median(lengths))} max {max(lengths)}, seq_len "
          f"{seq_len}, batch {args.batch_size}, packed rows {fill:.1%} filled")
    everything = {packed: batches(examples, seq_len, args.batch_size, packed,
                                  len(PackedExamples(examples, seq_len) if packed else examples) // args.batch_size)
                  for packed in (False, True)}
    slots = {side: sum(b[0].numel() for b in data) / sum(int((b[1] != IGNORE_INDEX).sum()) for b in data)
             for side, data in everything.items()}  # load-independent: positions computed per answer token, all batches
    print(f"  token positions per answer token: padded {slots[False]:.1f}, packed {slots[True]:.1f} "
          f"({slots[False] / slots[True]:.2f}x fewer packed)")
    for which, clock in ((0, "wall"), (1, "CPU")):
        padded = statistics.median(x[which] for x in rates[False])
        packed = statistics.median(x[which] for x in rates[True])
        print(f"  per {clock} second: padded {padded:.0f}, packed {packed:.0f} answer tokens/s; packed / padded = "
              f"{packed / padded:.2f}x (rounds: padded {', '.join(f'{x[which]:.0f}' for x in rates[False])}; "
              f"packed {', '.join(f'{x[which]:.0f}' for x in rates[True])})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4, help="training steps per side per round")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: no OpenMP spin-waits)")
    parser.add_argument("--hidden", type=int, default=64, help="model width (4 heads, 2 layers)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"{args.threads} threads")
    compare("demo", demo_examples(160), 160, args)
    compare("long tail", long_tail_examples(2000, 512), 512, args)


if __name__ == "__main__":
    main()
