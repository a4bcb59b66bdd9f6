"""Export a trained DecoderModel run, checkpoint or weights file to another format.

    python -m llm.export RUN_OR_CKPT --to hf OUT_DIR [--dtype bf16] [--max-shard-size 2GB] [--overwrite]

The source is read by `llm.artifacts.runs.load_run`, as by every tool: a run directory (its final
``model.safetensors``, else its newest complete checkpoint; never a half-written ``.tmp-*`` one), a checkpoint
directory (verified against its manifest; FSDP's sharded checkpoints too) or a ``model.safetensors`` file, with
the ``config.yaml`` next to it or in its run directory. Errors print one ``error: ...`` line to stderr and exit
with status 2; a broken checkpoint skipped on the way prints a ``warning: ...`` line.

The export is complete for transformers: ``config.json`` (with bos/eos/pad ids), ``generation_config.json``
(the same ids, ``max_length`` = the model's ``max_seq_len``), the weights, and the run's tokenizer as
``tokenizer.json`` + ``tokenizer_config.json`` + ``special_tokens_map.json``, so ``AutoTokenizer`` and
``pipeline("text-generation")`` work on the folder. A byte-level run gets a byte-level ``tokenizer.json`` built here
whose ids are our ByteTokenizer's (id = byte value; id 0, the document separator, is the special token
``<|endoftext|>``, which is bos, eos and pad), so transformers encodes and decodes the same text. Every file gets the
mode an ordinary ``open()`` gives (0644 under umask 022; safetensors alone would write 0600).

An export never mixes models: ``OUT_DIR`` must be empty (or not exist) unless ``--overwrite`` is given, which first
deletes the files an export writes there (``model*.safetensors``, the shard index, ``config.json``,
``generation_config.json`` and tokenizer files; a stale shard or index would otherwise be loaded with the new
weights) and leaves anything else alone. The source's own directories (the run, the checkpoint, the folder of the
weights file) and anything under the run's ``checkpoints/`` are refused as targets, with or without it.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any, NoReturn

import torch

from llm.artifacts.checkpoint import CHECKPOINTS_DIR
from llm.artifacts.runs import RunFiles, load_run, resolve_run
from llm.data.tokenizers import EOS_TOKEN, ByteTokenizer, Tokenizer
from llm.errors import UserError
from llm.fs import make_readable
from llm.models.decoder import DecoderModel
from llm.models.hf import INDEX_NAME, save_hf

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}
# What an HF export writes (or what another exporter leaves next to it): `--overwrite` deletes exactly these.
EXPORT_FILES = ("model*.safetensors", INDEX_NAME, "config.json", "generation_config.json", "tokenizer.json",
                "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt")


# Names a start-of-text and a padding token go by in common tokenizer.json files; without one, eos stands in.
BOS_CANDIDATES = ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>", "<|im_start|>")
PAD_CANDIDATES = ("<pad>", "<|pad|>", "[PAD]", "<|finetune_right_pad_id|>")


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


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte: what the `tokenizers` ByteLevel pre-tokenizer and decoder use."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def byte_level_tokenizer() -> Any:
    """A `tokenizers.Tokenizer` whose ids are ByteTokenizer's: id = byte value, no merges; id 0 (the document
    separator) is the special token ``<|endoftext|>`` instead of the NUL byte."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {char: byte for byte, char in _byte_to_unicode().items() if byte != 0}
    vocab[EOS_TOKEN] = ByteTokenizer.eos_id
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(EOS_TOKEN, special=True, normalized=False)])
    return tok


def write_tokenizer(tokenizer: Tokenizer, out_dir: str | Path, max_length: int) -> dict[str, int | None]:
    """The run's tokenizer as transformers reads it (tokenizer.json, tokenizer_config.json, special_tokens_map.json);
    returns the bos/eos/pad ids for config.json and generation_config.json."""
    out = Path(out_dir)
    tok = byte_level_tokenizer() if isinstance(tokenizer, ByteTokenizer) else tokenizer.tok
    tok.save(str(out / "tokenizer.json"))
    eos_id = tokenizer.eos_id

    def first(candidates: tuple[str, ...]) -> int | None:
        return next((i for i in (tok.token_to_id(name) for name in candidates) if i is not None), eos_id)

    ids = {"bos_token_id": first(BOS_CANDIDATES), "eos_token_id": eos_id, "pad_token_id": first(PAD_CANDIDATES)}
    special = {name.removesuffix("_id"): tok.id_to_token(i) for name, i in ids.items() if i is not None}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_length,
              "clean_up_tokenization_spaces": False, **special}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    return ids


def export_hf(source: str | Path, out_dir: str | Path, dtype: torch.dtype | None = None,
              max_shard_bytes: int | None = None, overwrite: bool = False) -> Path:
    """Write the model of ``source`` as a Hugging Face Llama/Mixtral directory; returns ``out_dir``.

    ``out_dir`` must be empty unless ``overwrite`` (then the files of an earlier export are deleted first), and
    never a directory of the source (`check_target`).
    """
    # Checked before the (possibly long) load, and again on the weights the load verified and chose.
    check_target(out_dir, resolve_run(source, verify=False, warn=lambda _: None), overwrite)
    run = load_run(source, dtype=dtype, warn=_warn)
    check_target(out_dir, RunFiles(run.weights_path, None, run.run_dir, run.checkpoint_dir), overwrite)
    model = run.model
    if overwrite:
        clear_export_files(out_dir)  # only once the source has loaded: a failed export keeps the old one
    try:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        token_ids = write_tokenizer(run.tokenizer, out_dir, model.config.max_seq_len)
        save_hf(model, out_dir, max_shard_bytes=max_shard_bytes, token_ids=token_ids)
    except ValueError as e:
        raise ExportError(str(e)) from None
    for pattern in EXPORT_FILES:  # safetensors writes 0600; the directory is for sharing (0644 under umask 022)
        for path in Path(out_dir).glob(pattern):
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
