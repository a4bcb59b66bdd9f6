"""Evaluate a language model on text: loss, perplexity and bits per byte.

    python -m llm.evaluate SOURCE --data-path FILE_OR_DIR [--data-seq-len N] [--training-batch-size B]
                                  [--split all|val] [--json]

SOURCE is what ``--model-init-from`` takes (`llm.artifacts.runs.read_init_source`): a run directory, a
checkpoint directory or a Hugging Face Llama/Mixtral folder. The text is tokenized with the source's tokenizer
and cut into windows of ``--data-seq-len`` tokens (default: the run's training window; for an HF folder its context,
at most 2048) exactly as training cuts validation windows; ``--split all`` (the default) evaluates every window of
the data, ``--split val`` only the validation split a run with ``--data-val-fraction`` would hold out.

The default split, ``all``, scores the training text too when ``--data-path`` is the run's own corpus: pass
held-out text, or ``--split val`` for the split the run validated on. The precision is the run's own
(``training.precision`` in its config: a bf16 run is scored under bf16 autocast, an fp32 run in fp32; ``auto``
resolves on this device as training did); an HF folder is scored with ``auto``; ``--training-precision`` overrides.

The numbers are the lm task's own validation: its `validation_step` per batch and its `reduce_metrics`, so loss is
the token-weighted mean cross-entropy in nats per token, perplexity its exp, and bits per byte is
``llm.data.text.bits_per_byte`` with the split's tokens per UTF-8 byte. Errors print one ``error: ...`` line and
exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any, NoReturn, TextIO

import torch

from llm.artifacts.runs import read_init_source
from llm.config import freeze, replace_values
from llm.data.text import TokenWindows
from llm.errors import UserError, run_tool
from llm.models.decoder import DecoderModel
from llm.models.init_from import InitSource
from llm.training.core.config import Config, validate_config
from llm.training.observers.metrics import MetricAccumulator
from llm.training.optim.precision import PRECISIONS, autocast, resolve_precision
from llm.training.parallel.distributed import resolve_device
from llm.training.tasks.lm_task import LMTask

HF_DEFAULT_SEQ_LEN = 2048  # an HF folder records its context, which may be far longer than is useful here
SPLITS = ("all", "val")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line instead of usage + message
        raise UserError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m llm.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("source", help="run directory, checkpoint directory or Hugging Face Llama/Mixtral folder")
    p.add_argument("--data-path", required=True, help="text file, directory, glob, .jsonl or pre-tokenized .bin")
    p.add_argument("--data-seq-len", type=int, help="tokens per window (default: the run's; HF: its context, <= 2048)")
    p.add_argument("--data-val-fraction", type=float, default=0.05, help="--split val: the share held out")
    p.add_argument("--data-cache-dir", default="", help="token cache directory (default: ~/.cache/llm)")
    p.add_argument("--training-batch-size", type=int, default=8, help="windows per forward pass")
    p.add_argument("--training-device", default="auto", help="auto (cuda when present) | cpu | cuda | cuda:N")
    p.add_argument("--training-precision", default=None, choices=PRECISIONS,
                   help="default: the run's training.precision (an HF folder: auto); auto (bf16 where fast) | fp32 | "
                        "bf16 | fp16")
    p.add_argument("--split", default="all", choices=SPLITS,
                   help="all (the default): every window of --data-path, whatever the run trained on; val: only the "
                        "validation split a run with --data-val-fraction holds out")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return p


def eval_config(source: InitSource, args: argparse.Namespace) -> Config:
    """The lm task's config for evaluating ``source`` on ``args``' data, validated as a run's would be."""
    config = Config(task="lm")
    for name, value in source.model.items():
        setattr(config.model, name, value)
    d, t = config.data, config.training
    d.path, d.cache_dir, d.val_fraction = args.data_path, args.data_cache_dir, args.data_val_fraction
    d.tokenizer = source.tokenizer
    if not d.tokenizer:
        raise UserError(f"source: {str(source.path)!r} has no tokenizer.json to tokenize the data with")
    default_len = source.seq_len or min(HF_DEFAULT_SEQ_LEN, config.model.max_seq_len)
    d.seq_len = args.data_seq_len if args.data_seq_len is not None else min(default_len, config.model.max_seq_len)
    t.batch_size, t.device = args.training_batch_size, args.training_device
    t.precision = args.training_precision or source.precision or "auto"  # the run's own, unless overridden
    config = replace_values(config, LMTask.resolved_values(config))  # the tokenizer within the model's vocabulary
    LMTask.validate_config(config)  # seq_len within the context
    validate_config(config, check_names=False)
    return freeze(config)


def _windows(task: LMTask, split: str) -> tuple[int, int]:
    """Point the data module's validation set at the windows to evaluate; returns (windows, tokens)."""
    dm = task.data_module
    if split == "val":
        dm.setup("fit")
    else:  # every window of the data: the whole token store is the evaluation set
        dm.prepare_data()
        store = dm.store
        dm.val_set = TokenWindows(store, 0, store.num_tokens, task.config.data.seq_len)
        dm.val_tokens_per_byte = store.num_tokens / max(1e-9, store.bytes_between(0, store.num_tokens))
        if len(dm.val_set) == 0:
            raise UserError(f"--data-seq-len: the data ({store.num_tokens} tokens) is shorter than one window of "
                            f"{task.config.data.seq_len + 1} tokens")
    return len(dm.val_set), len(dm.val_set) * task.config.data.seq_len


def evaluate(source_path: str, args: argparse.Namespace) -> dict[str, Any]:
    """Loss, perplexity and bits per byte of the model ``source_path`` names on ``args``' data."""
    source = read_init_source(source_path)
    config = eval_config(source, args)
    device = resolve_device(config.training.device, 0)
    precision = resolve_precision(config.training.precision, device)[0]
    task = LMTask(config)
    task.build_data_module()
    windows, tokens = _windows(task, args.split)
    model = DecoderModel.from_state_dict(source.read_weights(), **source.model).to(device).eval()
    criterion, meter = task.build_criterion(), MetricAccumulator()
    with torch.no_grad(), autocast(precision, device):
        for inputs, targets in task.data_module.val_dataloader():
            batch = (inputs.to(device), targets.to(device))
            loss, metrics = task.validation_step(batch, model, criterion)
            meter.add({**metrics, "loss": loss}, weight=targets.numel())  # token-weighted
    values = task.reduce_metrics(meter.compute(device, reduce=False), "val")
    return {"source": str(source_path), "data": args.data_path, "split": args.split, "windows": windows,
            "tokens": tokens, "seq_len": config.data.seq_len, "precision": precision, "loss": values["loss"],
            "perplexity": values["ppl"],
            "bits_per_byte": values["bpb"]}


def format_table(result: dict[str, Any]) -> str:
    rows = [
        ("source", result["source"]),
        ("data", f"{result['data']} ({result['split']}: {result['windows']} windows of {result['seq_len']} tokens, "
                 f"{result['precision']})"),
        ("loss", f"{result['loss']:.4f} nats/token"),
        ("perplexity", f"{result['perplexity']:.4f}" if math.isfinite(result["perplexity"]) else "inf"),
        ("bits per byte", f"{result['bits_per_byte']:.4f}"),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def main(argv: list[str] | None = None, out: TextIO | None = None) -> int:
    out = out or sys.stdout

    def body() -> None:
        args = build_parser().parse_args(argv)
        if args.training_batch_size < 1:
            raise UserError(f"--training-batch-size: invalid value {args.training_batch_size}; must be >= 1")
        result = evaluate(args.source, args)
        out.write((json.dumps(result) if args.json else format_table(result)) + "\n")

    return run_tool(body)


if __name__ == "__main__":
    sys.exit(main())
