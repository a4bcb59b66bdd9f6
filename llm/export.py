"""Export a trained DecoderModel run, checkpoint or weights file to another format.

    python -m llm.export RUN_OR_CKPT --to hf OUT_DIR [--dtype bf16] [--max-shard-size 2GB]

The source is read by `llm.training.core.runs.load_run`, as by every tool: a run directory (its final
``model.safetensors``, else its newest complete checkpoint; never a half-written ``.tmp-*`` one), a checkpoint
directory (verified against its manifest; FSDP's sharded checkpoints too) or a ``model.safetensors`` file, with
the ``config.yaml`` next to it or in its run directory. Errors print one ``error: ...`` line to stderr and exit
with status 2; a broken checkpoint skipped on the way prints a ``warning: ...`` line.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import NoReturn

import torch

from llm.errors import UserError
from llm.models.decoder import DecoderModel
from llm.models.hf import save_hf
from llm.training.core.checkpoint import make_readable
from llm.training.core.runs import load_run

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


class ExportError(UserError):
    """A user-facing problem with the export's inputs (reported as one line, exit status 2)."""


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def load_model(source: str | Path, dtype: torch.dtype | None = None) -> DecoderModel:
    """The DecoderModel of a run, checkpoint or weights file, weights loaded, in the stored dtype by default."""
    return load_run(source, dtype=dtype, tokenizer=False, warn=_warn).model


def export_hf(source: str | Path, out_dir: str | Path, dtype: torch.dtype | None = None,
              max_shard_bytes: int | None = None) -> Path:
    """Write the model of ``source`` as a Hugging Face Llama/Mixtral directory; returns ``out_dir``."""
    model = load_model(source, dtype)
    try:
        save_hf(model, out_dir, max_shard_bytes=max_shard_bytes)
    except ValueError as e:
        raise ExportError(str(e)) from None
    for path in Path(out_dir).glob("model*.safetensors"):  # safetensors writes 0600; the directory is for sharing
        make_readable(path)
    return Path(out_dir)


def _parse_size(text: str) -> int:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMG]?B?)", text.strip().upper())
    if not m:
        raise ExportError(f"bad size {text!r}: use e.g. 500MB or 2GB")
    scale = {"": 1, "B": 1, "K": 1e3, "KB": 1e3, "M": 1e6, "MB": 1e6, "G": 1e9, "GB": 1e9}[m[2]]
    return int(float(m[1]) * scale)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line instead of usage + message
        raise ExportError(message)


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="python -m llm.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="run directory, checkpoint directory or model.safetensors file")
    parser.add_argument("--to", required=True, choices=["hf"], help="target format (hf: Llama/Mixtral layout)")
    parser.add_argument("out_dir", help="directory to write")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="cast weights before writing (default: as stored)")
    parser.add_argument("--max-shard-size", help="split weights into shards of at most this size, e.g. 2GB")
    try:
        args = parser.parse_args(argv)
        shard = _parse_size(args.max_shard_size) if args.max_shard_size else None
        out = export_hf(args.source, args.out_dir, DTYPES.get(args.dtype or ""), shard)
    except (UserError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
