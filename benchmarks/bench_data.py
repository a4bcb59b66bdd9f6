"""Is the lm data loader ever the bottleneck? Windows/s it serves vs windows/s a training step consumes.
And how fast, in how much memory, does a large corpus prepare (`--prepare`)?

    python -m benchmarks.bench_data [--steps 30] [--threads N] [--config-args ...]
    python -m benchmarks.bench_data --prepare [--text-mb 300] [--jsonl-mb 200] [--bpe-mb 30] [--workers 0]

Everything runs on the default `make train` config (`--task lm`, resolved exactly as the CLI resolves it,
plus any `--config-args` flags): the embedded standard-library corpus, byte tokenizer, the task's model,
batch size, sequence length and precision. Measured in one process, alternating so machine load hits both
sides alike, reporting medians:
- loader: the training `DataLoader` as the engine iterates it (main process, `num_workers=0`);
- training: one optimizer step (forward, cross-entropy, backward, clip, AdamW) on those batches;
- cold start: building the token cache from scratch (byte and BPE) into a temporary cache directory.
The target is loader >= 10x training.

`--prepare` generates a large text file and a large JSONL file in a temporary directory under /tmp (the
standard library's sources repeated; deleted afterwards) and runs `python -m llm.data.prepare` on them in a child
process each, reporting wall time, MB/s and the peak RSS of the preparing process and of its largest worker
(targets: byte path >= 100 MB/s, peak RSS <= 1.5 GB). Then, in one child process and back to back, the Hugging
Face tokenizers library's raw `encode_batch` over the first `--bpe-mb` MB of the JSONL's documents (already in
memory) and our whole pipeline (read, parse, encode in workers, write shards) over a file of the same documents
(target: ours >= 90% of raw; ours runs first, before raw's documents are loaded, so its peak RSS is its own).
This is a benchmark, not a test: numbers go to RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import sysconfig
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


# --------------------------------------------------------------------------------------------- data preparation
def _stdlib_texts() -> list[str]:
    root = sysconfig.get_paths()["stdlib"]
    texts = []
    for dirpath, _, names in os.walk(root):
        for name in sorted(names):
            if name.endswith(".py"):
                with open(os.path.join(dirpath, name), encoding="utf-8", errors="replace") as f:
                    texts.append(f.read())
    return texts


def generate(directory: str, text_mb: int, jsonl_mb: int) -> tuple[str, str]:
    """A `text_mb` MB text file and a `jsonl_mb` MB JSONL file (one stdlib source per record), written in
    streaming fashion so the generator itself stays small."""
    texts = _stdlib_texts()
    text_path, jsonl_path = os.path.join(directory, "big.txt"), os.path.join(directory, "big.jsonl")
    for path, target, render in ((text_path, text_mb, lambda t: t), (jsonl_path, jsonl_mb,
                                                                     lambda t: json.dumps({"text": t}) + "\n")):
        written = 0
        with open(path, "w", encoding="utf-8") as f:
            while written < target * 1e6:
                for t in texts:
                    written += f.write(render(t))
                    if written >= target * 1e6:
                        break
    return text_path, jsonl_path


_RUN_PREPARE = """
import json, resource, sys
from llm.data.prepare import main
rc = main(sys.argv[1:])
use = [resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
cpu = sum(u.ru_utime + u.ru_stime for u in use)
# VmHWM is this process' own peak since exec; ru_maxrss would include the benchmark's RSS at fork time.
hwm = next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith("VmHWM")) / 1024
print(json.dumps({"rc": rc, "rss": [hwm, use[1].ru_maxrss / 1024], "cpu": cpu}))
"""


def run_prepare(argv: list[str]) -> dict[str, Any]:
    """`llm.data.prepare` with `argv` in a child process: wall seconds, CPU seconds (all processes: on a shared
    machine, MB per CPU-second is the load-independent number) and the peak RSS (MB) of it and of its largest
    worker."""
    began = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _RUN_PREPARE, *argv], capture_output=True, text=True)
    wall = time.perf_counter() - began
    if proc.returncode:
        raise RuntimeError(f"prepare failed: {proc.stderr.strip().splitlines()[-1:]}")
    return {"wall": wall, **json.loads(proc.stdout.strip().splitlines()[-1])}


_RAW_VS_OURS = """
import json, resource, sys, time
from tokenizers import Tokenizer
from llm.data.prepare import PrepareOptions, prepare
from llm.data.readers import ReadOptions
from llm.data.sources import resolve_files
src, limit, tok_path, out, workers = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5])
sub, size = out + ".jsonl", 0
with open(src, encoding="utf-8") as f, open(sub, "w", encoding="utf-8") as g:
    for line in f:
        g.write(line); size += len(json.loads(line)["text"].encode())
        if size >= limit: break
t = time.perf_counter()
index = prepare(resolve_files(sub), out, PrepareOptions(tokenizer=tok_path, workers=workers, read=ReadOptions(),
                                                        min_parallel_bytes=0))
ours = time.perf_counter() - t
hwm = next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith("VmHWM")) / 1024
rss = [hwm, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024]
with open(sub, encoding="utf-8") as f:
    docs = [json.loads(line)["text"] for line in f]
tok = Tokenizer.from_file(tok_path)
t = time.perf_counter(); enc = tok.encode_batch(docs, add_special_tokens=False); raw = time.perf_counter() - t
print(json.dumps({"mb": size / 1e6, "raw_s": raw, "ours_s": ours, "raw_tokens": sum(len(e.ids) for e in enc),
                  "our_tokens": index["num_tokens"] - index["num_docs"], "rss": rss}))
"""


def prepare_bench(args: argparse.Namespace) -> None:
    tmp = tempfile.mkdtemp(prefix="bench_data_", dir="/tmp")
    try:
        began = time.perf_counter()
        text, jsonl = generate(tmp, args.text_mb, args.jsonl_mb)
        print(f"generated {args.text_mb} MB text + {args.jsonl_mb} MB JSONL in {time.perf_counter() - began:.0f} s")
        tok_dir = os.path.join(tmp, "tok")
        r = run_prepare([jsonl, tok_dir, "--tokenizer", "bpe", "--tokenizer-only", "--bpe-sample-bytes",
                         str(args.bpe_sample_mb * 10**6)])
        if r["rc"]:
            raise RuntimeError("training the BPE tokenizer failed")
        print(f"BPE training on a {args.bpe_sample_mb} MB sample: {r['wall']:.1f} s")
        tok = os.path.join(tok_dir, "tokenizer.json")
        workers = ["--workers", str(args.workers)]
        for name, src, mb, extra in (("byte, text", text, args.text_mb, []),
                                     ("byte, JSONL", jsonl, args.jsonl_mb, [])):
            out = os.path.join(tmp, "out-" + name.replace(", ", "-").lower())
            r = run_prepare([src, out, *workers, *extra])
            shutil.rmtree(out)
            print(f"prepare {name:12s} {mb:5d} MB: {r['wall']:6.1f} s  {mb / r['wall']:6.1f} MB/s  "
                  f"({mb / r['cpu']:.1f} MB per CPU-second)  peak RSS {r['rss'][0]:.0f} MB (largest worker "
                  f"<= {r['rss'][1]:.0f} MB)")
        out = os.path.join(tmp, "raw-vs-ours")
        proc = subprocess.run([sys.executable, "-c", _RAW_VS_OURS, jsonl, str(args.bpe_mb * 10**6), tok, out,
                               str(args.workers)], capture_output=True, text=True, check=True)
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        raw, ours = res["mb"] / res["raw_s"], res["mb"] / res["ours_s"]
        print(f"BPE on {res['mb']:.0f} MB of JSONL documents: raw encode_batch {raw:.2f} MB/s, ours (read + parse + "
              f"encode + write) {ours:.2f} MB/s = {100 * ours / raw:.0f}% of raw (tokens {res['raw_tokens']} vs "
              f"{res['our_tokens']}); ours peak RSS {res['rss'][0]:.0f} MB, largest worker <= {res['rss'][1]:.0f} MB")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="timed training steps (and loader rounds)")
    parser.add_argument("--loader-batches", type=int, default=200, help="batches per loader round")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--no-cold", action="store_true", help="skip the cold token-cache builds")
    parser.add_argument("--prepare", action="store_true", help="benchmark data preparation instead (see above)")
    parser.add_argument("--text-mb", type=int, default=300, help="--prepare: size of the text file")
    parser.add_argument("--jsonl-mb", type=int, default=200, help="--prepare: size of the JSONL file")
    parser.add_argument("--bpe-mb", type=int, default=10, help="--prepare: MB of documents for raw vs ours")
    parser.add_argument("--bpe-sample-mb", type=int, default=20, help="--prepare: BPE training sample")
    parser.add_argument("--workers", type=int, default=0, help="--prepare: tokenizer processes (0 = cores)")
    parser.add_argument("--config-args", nargs=argparse.REMAINDER, default=[], help="extra train CLI flags")
    args = parser.parse_args()
    if args.prepare:
        prepare_bench(args)
        return
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
