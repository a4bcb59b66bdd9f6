"""Export a trained DecoderModel run, checkpoint or weights file to another format.

    python -m llm.export RUN_OR_CKPT --to hf OUT_DIR [--dtype bf16] [--max-shard-size 2GB] [--overwrite]

The source is read by `llm.training.core.runs.load_run`, as by every tool: a run directory (its final
``model.safetensors``, else its newest complete checkpoint; never a half-written ``.tmp-*`` one), a checkpoint
directory (verified against its manifest; FSDP's sharded checkpoints too) or a ``model.safetensors`` file, with
the ``config.yaml`` next to it or in its run directory. Errors print one ``error: ...`` line to stderr and exit
with status 2; a broken checkpoint skipped on the way prints a ``warning: ...`` line.

An export never mixes models: ``OUT_DIR`` must be empty (or not exist) unless ``--overwrite`` is given, which first
deletes the files an export writes there (``model*.safetensors``, the shard index, ``config.json``,
``generation_config.json`` and tokenizer files; a stale shard or index would otherwise be loaded with the new
weights) and leaves anything else alone. The source's own directories (the run, the checkpoint, the folder of the
weights file) and anything under the run's ``checkpoints/`` are refused as targets, with or without it.
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
from llm.models.hf import INDEX_NAME, save_hf
from llm.training.core.checkpoint import CHECKPOINTS_DIR, make_readable
from llm.training.core.runs import RunFiles, load_run, resolve_run

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}
# What an HF export writes (or what another exporter leaves next to it): `--overwrite` deletes exactly these.
EXPORT_FILES = ("model*.safetensors", INDEX_NAME, "config.json", "generation_config.json", "tokenizer.json",
                "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt")


class ExportError(UserError):
    """A user-facing problem with the export's inputs (reported as one line, exit status 2)."""


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def load_model(source: str | Path, dtype: torch.dtype | None = None) -> DecoderModel:
    """The DecoderModel of a run, checkpoint or weights file, weights loaded, in the stored dtype by default."""
    return load_run(source, dtype=dtype, tokenizer=False, warn=_warn).model


def check_target(out_dir: str | Path, files: RunFiles, overwrite: bool = False) -> None:
    """Refuse an export target that is one of the source's directories, or that is not empty without
    ``overwrite`` (see the module docstring)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a directory")
    target = out.resolve()
    sources = [files.run_dir, files.weights.parent, files.checkpoint_dir, files.weights if files.sharded else None]
    for source in sources:
        if source is not None and target == source.resolve():
            raise ExportError(f"{out} is the source's own directory ({source}): exporting there would overwrite "
                              "or mix with the weights being read; pick another directory")
    checkpoints = (files.run_dir / CHECKPOINTS_DIR).resolve()
    if target == checkpoints or checkpoints in target.parents:
        raise ExportError(f"{out} is inside the run's {CHECKPOINTS_DIR}/ directory, which training prunes and "
                          "resume reads; pick another directory")
    if not overwrite and out.is_dir() and any(out.iterdir()):
        raise ExportError(f"{out} is not empty: a stale shard or index there would be loaded with the new weights; "
                          "pick an empty directory, or pass --overwrite to replace the model files in it")


def clear_export_files(out_dir: str | Path) -> list[Path]:
    """Delete the files an export writes (`EXPORT_FILES`) from ``out_dir``; returns them."""
    removed = []
    for pattern in EXPORT_FILES:
        for path in sorted(Path(out_dir).glob(pattern)):
            if path.is_file() or path.is_symlink():
                path.unlink()
                removed.append(path)
    return removed


def export_hf(source: str | Path, out_dir: str | Path, dtype: torch.dtype | None = None,
              max_shard_bytes: int | None = None, overwrite: bool = False) -> Path:
    """Write the model of ``source`` as a Hugging Face Llama/Mixtral directory; returns ``out_dir``.

    ``out_dir`` must be empty unless ``overwrite`` (then the files of an earlier export are deleted first), and
    never a directory of the source (`check_target`).
    """
    # Checked before the (possibly long) load, and again on the weights the load verified and chose.
    check_target(out_dir, resolve_run(source, verify=False, warn=lambda _: None), overwrite)
    run = load_run(source, dtype=dtype, tokenizer=False, warn=_warn)
    check_target(out_dir, RunFiles(run.weights_path, None, run.run_dir, run.checkpoint_dir), overwrite)
    model = run.model
    if overwrite:
        clear_export_files(out_dir)  # only once the source has loaded: a failed export keeps the old one
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
    size = int(float(m[1]) * scale)
    if size < 1:
        raise ExportError(f"--max-shard-size: invalid value {text!r}; must be at least 1 byte")
    return size


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
    parser.add_argument("--overwrite", action="store_true",
                        help="export into a non-empty directory, deleting the model files of an earlier export first")
    try:
        args = parser.parse_args(argv)
        shard = _parse_size(args.max_shard_size) if args.max_shard_size else None
        out = export_hf(args.source, args.out_dir, DTYPES.get(args.dtype or ""), shard, args.overwrite)
    except (UserError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
