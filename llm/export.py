"""Export a trained DecoderModel run or checkpoint to another format.

    python -m llm.export RUN_OR_CKPT --to hf OUT_DIR [--dtype bf16] [--max-shard-size 2GB]

A run directory or checkpoint directory holds ``config.yaml`` (the resolved config; its ``model:`` mapping is the
``ModelConfig`` fields, i.e. DecoderModel's keywords) and ``model.safetensors`` (the DecoderModel state_dict). For
a run directory the final ``RUN/model.safetensors`` wins, else the newest ``RUN/checkpoints/*/model.safetensors``.
Errors print one ``error: ...`` line to stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import inspect
import re
import sys
from pathlib import Path
from typing import Any, NoReturn

import torch
import yaml
from safetensors.torch import load_file

from llm.models.decoder import DecoderModel
from llm.models.hf import save_hf

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}
# Name parts a state_dict picks up when saved from a wrapped model (torch.compile, activation checkpointing, DDP).
_WRAPPER_PARTS = ("_orig_mod.", "_checkpoint_wrapped_module.")


class ExportError(Exception):
    """A user-facing problem with the export's inputs (reported as one line, exit status 2)."""


def _newest_last(weights: Path) -> tuple[float, list[tuple[int, int | str]]]:
    # mtime first; equal times (copied runs) fall back to the step number in the name ("step_900" < "step_1000")
    parts = re.split(r"(\d+)", weights.parent.name)
    return weights.stat().st_mtime, [(0, int(p)) if p.isdigit() else (1, p) for p in parts]


def resolve_checkpoint(source: str | Path) -> tuple[Path, Path]:
    """(config.yaml, model.safetensors) for a run directory or a checkpoint directory."""
    source = Path(source)
    if not source.is_dir():
        raise ExportError(f"{source} is not a directory (expected a run or checkpoint directory)")
    weights = source / "model.safetensors"
    if not weights.exists():
        candidates = sorted((source / "checkpoints").glob("*/model.safetensors"), key=_newest_last)
        if not candidates:
            raise ExportError(f"no model.safetensors in {source} or {source / 'checkpoints'}/*")
        weights = candidates[-1]
    for config in (weights.parent / "config.yaml", source / "config.yaml"):
        if config.exists():
            return config, weights
    raise ExportError(f"no config.yaml next to {weights} or in {source}")


def model_kwargs(config_path: Path) -> dict[str, Any]:
    """DecoderModel keywords from a resolved config YAML's ``model:`` mapping."""
    try:
        config = yaml.safe_load(config_path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ExportError(f"cannot parse {config_path}: {str(e).splitlines()[0]}") from None
    task = config.get("task")
    if isinstance(task, str) and task != "lm":
        raise ExportError(f"{config_path} is a {task!r} run, not a decoder language model")
    model_cfg = config.get("model")
    if not isinstance(model_cfg, dict):
        raise ExportError(f"{config_path} has no 'model:' mapping")
    accepted = set(inspect.signature(DecoderModel).parameters)
    required = {"vocab_size", "hidden_size", "num_layers", "num_heads"}
    if missing := sorted(required - model_cfg.keys()):
        raise ExportError(f"{config_path} 'model:' lacks {', '.join(missing)}: not a decoder LM config")
    return {k: v for k, v in model_cfg.items() if k in accepted}


def load_model(source: str | Path) -> DecoderModel:
    """Rebuild the DecoderModel of a run or checkpoint directory, weights loaded, in the stored dtype."""
    config_path, weights_path = resolve_checkpoint(source)
    kwargs = model_kwargs(config_path)
    state = load_file(str(weights_path))
    for part in _WRAPPER_PARTS:
        state = {k.replace(part, ""): v for k, v in state.items()}
    if state and all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    try:
        return DecoderModel.from_state_dict(state, **kwargs)
    except (TypeError, ValueError) as e:
        raise ExportError(f"invalid model config in {config_path}: {e}") from None
    except RuntimeError as e:
        raise ExportError(f"{weights_path} does not match its config: {str(e).splitlines()[0]}") from None


def export_hf(source: str | Path, out_dir: str | Path, dtype: torch.dtype | None = None,
              max_shard_bytes: int | None = None) -> Path:
    """Write the model of ``source`` as a Hugging Face Llama/Mixtral directory; returns ``out_dir``."""
    model = load_model(source)
    if dtype is not None:
        model = model.to(dtype)
    try:
        save_hf(model, out_dir, max_shard_bytes=max_shard_bytes)
    except ValueError as e:
        raise ExportError(str(e)) from None
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
    parser.add_argument("source", help="run directory or checkpoint directory")
    parser.add_argument("--to", required=True, choices=["hf"], help="target format (hf: Llama/Mixtral layout)")
    parser.add_argument("out_dir", help="directory to write")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="cast weights before writing (default: as stored)")
    parser.add_argument("--max-shard-size", help="split weights into shards of at most this size, e.g. 2GB")
    try:
        args = parser.parse_args(argv)
        shard = _parse_size(args.max_shard_size) if args.max_shard_size else None
        out = export_hf(args.source, args.out_dir, DTYPES.get(args.dtype or ""), shard)
    except (ExportError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
