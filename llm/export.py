"""Export a trained DecoderModel run, checkpoint or weights file to another format.

    python -m llm.export RUN_OR_CKPT --to hf OUT_DIR [--dtype bf16] [--max-shard-size 2GB] [--overwrite]
    python -m llm.export RUN_OR_CKPT --to gguf OUT.gguf [--dtype f32|f16|bf16|q8_0] [--overwrite]

(``--to gguf``: one llama.cpp file, see `llm.export_gguf`; the rest of this docstring is about ``--to hf``.)

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
``<|endoftext|>``, which is bos, eos and pad), so transformers encodes and decodes the same text. A tokenizer that
came from a model folder (`llm.data.tokenizers.TokenizerFiles`) is written with the tokens and ids that folder had
(bos/eos/pad, generation_config.json's eos ids, its tokenizer_config.json) and its ``chat_template``, so
``apply_chat_template`` on the export renders the same text as on the source. Every file gets the
mode an ordinary ``open()`` gives (0644 under umask 022; safetensors alone would write 0600).

An export never mixes models and never loses the previous one. It is written into a temp directory beside
``OUT_DIR`` (``.OUT.export-tmp-*``) and swapped in whole at the end (`llm.fs.replace_dir`: on Linux one atomic
exchange), so ``OUT_DIR`` holds the old export or the new one at every instant, also when the export fails half-way
(a full disk, a kill): a failed export removes its temp directory, a killed one leaves it to the next export into
the same folder, which removes it once its writer is gone. Two exports into one folder at once take turns for the
swap (a lock on the parent directory): the last one wins, whole.

``OUT_DIR`` must be empty (or not exist) unless ``--overwrite`` is given, and ``--overwrite`` replaces only a
*previous export*: a folder holding a ``config.json`` and model weights (``model.safetensors`` or its shard index)
whose entries are all plain files. Files in it that an export does not write (a ``README.md``, a ``LICENSE``) are
carried over into the new export unchanged; those an export writes (`EXPORT_FILES`: weights, shard index, configs,
tokenizer files, and other formats' weights, which a loader could pick up with ours) come from the new export
only. A folder of anything else (no config.json or weights, a subdirectory, a symbolic link) is refused, with or
without ``--overwrite``: replacing it would delete files that are not an export's. ``OUT_DIR`` is refused too when
it is a symbolic link, or is, contains or lies inside the source (its run directory, checkpoint or the folder of
its weights file), however it is spelt: the paths are compared after resolving links and ``..``. The folder that
holds ``OUT_DIR`` must be writable (the temp directory is made there).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import torch

from llm import fs
from llm.artifacts.runs import RunFiles, load_run, resolve_run
from llm.data.tokenizers import ByteTokenizer, HFTokenizer, Tokenizer, byte_level_tokenizer
from llm.errors import UserError
from llm.models.decoder import DecoderModel
from llm.models.hf import INDEX_NAME, save_hf

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}
# What an HF export writes, or what another exporter leaves next to it that a loader would read with ours (other
# formats' weights, a PEFT adapter): `--overwrite` never carries these over from the previous export.
EXPORT_FILES = ("model*.safetensors", INDEX_NAME, "config.json", "generation_config.json", "tokenizer.json",
                "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt",
                "pytorch_model*.bin", "pytorch_model.bin.index.json", "tf_model.h5", "flax_model.msgpack",
                "adapter_model.safetensors", "adapter_model.bin", "adapter_config.json")
TEMP_MARK = ".export-tmp-"  # `.OUT.export-tmp-<pid>-<n>`: an export being written beside OUT
ASIDE_MARK = ".export-old"  # `.OUT.export-old`: the previous export between the two renames of a swap


# Names a start-of-text and a padding token go by in common tokenizer.json files, for a bare tokenizer.json only
# (one without a model folder's files to name them); without one, eos stands in. ChatML's <|im_start|> starts a
# turn, not a sequence: it is no bos.
BOS_CANDIDATES = ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>")
PAD_CANDIDATES = ("<pad>", "<|pad|>", "[PAD]", "<|finetune_right_pad_id|>")


class ExportError(UserError):
    """A user-facing problem with the export's inputs (reported as one line, exit status 2)."""


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def load_model(source: str | Path, dtype: torch.dtype | None = None) -> DecoderModel:
    """The DecoderModel of a run, checkpoint or weights file, weights loaded, in the stored dtype by default."""
    return load_run(source, dtype=dtype, tokenizer=False, warn=_warn).model


def _is_export_file(name: str) -> bool:
    return any(Path(name).match(pattern) for pattern in EXPORT_FILES)


def _relation(target: Path, source: Path) -> str | None:
    """How the resolved `target` lies to the resolved `source`: 'is', 'inside', 'contains' or None."""
    if target == source:
        return "is"
    if source in target.parents:
        return "inside"
    if target in source.parents:
        return "contains"
    return None


def check_target(out_dir: str | Path, files: RunFiles, overwrite: bool = False) -> None:
    """Refuse an export target that is, contains or lies inside the source, that is a link or not a directory, or
    that is not empty without ``overwrite`` / not a previous export with it (see the module docstring)."""
    out = Path(out_dir)
    target = Path(os.path.realpath(out))
    sources = [files.run_dir, files.weights.parent, files.checkpoint_dir, files.weights if files.sharded else None]
    for source in sources:
        if source is None:
            continue
        relation = _relation(target, Path(os.path.realpath(source)))
        if relation == "is":
            raise ExportError(f"{out} is the source's own directory ({source}): exporting there would overwrite "
                              "or mix with the weights being read; pick another directory")
        if relation == "inside":
            raise ExportError(f"{out} is inside the source's own directory {source} (a run's files, which training "
                              "writes, prunes and resumes from); pick a directory outside it")
        if relation == "contains":
            raise ExportError(f"{out} contains the source {source}: replacing it would delete the run; "
                              "pick another directory")
    if target == target.parent:
        raise ExportError(f"{out} is the root directory; pick another directory")
    if out.is_symlink():
        raise ExportError(f"{out} is a symbolic link: an export replaces the folder itself and never writes "
                          "through a link; name the directory it points to")
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ExportError(f"{out} is not empty: a stale shard or index there would be loaded with the new "
                              "weights; pick an empty directory, or pass --overwrite to replace a previous export")
        previous_export_extras(out)


def previous_export_extras(out_dir: str | Path) -> list[Path]:
    """The files of the previous export in ``out_dir`` that an export does not write (a README): `--overwrite`
    carries them over. Raises `ExportError` when ``out_dir`` is not recognisably a previous export."""
    out = Path(out_dir)
    entries = sorted(out.iterdir())
    for entry in entries:
        if entry.is_symlink() or not entry.is_file():
            kind = "a symbolic link" if entry.is_symlink() else "a directory" if entry.is_dir() else "not a file"
            raise ExportError(f"{out} holds {entry.name}, {kind}, which an export does not write: --overwrite "
                              "replaces only a previous export's folder; move it away or pick another directory")
    names = {entry.name for entry in entries}
    if "config.json" not in names or not ({"model.safetensors", INDEX_NAME} & names):
        raise ExportError(f"{out} is not a previous export (it holds no config.json and model weights): "
                          "--overwrite replaces only a previous export; pick an empty directory")
    return [entry for entry in entries if not _is_export_file(entry.name)]


def _names(out: Path) -> tuple[Path, Path]:
    """(the directory, the name) of the resolved export target."""
    real = Path(os.path.realpath(out))
    return real.parent, real


def _aside(target: Path) -> Path:
    return target.with_name(f".{target.name}{ASIDE_MARK}")


def _recover(target: Path) -> None:
    """Restore a previous export left aside by a crash mid-swap, and remove temp directories of exports into
    ``target`` whose writer is gone (`llm.fs.is_abandoned`). Called holding the parent's `fs.dir_lock`."""
    fs.recover_replaced_dir(target, _aside(target))
    for path in target.parent.glob(f".{glob_escape(target.name)}{TEMP_MARK}*"):
        if path.is_dir() and not path.is_symlink() and fs.is_abandoned(path, fs.read_owner(path)):
            shutil.rmtree(path, ignore_errors=True)


def glob_escape(name: str) -> str:
    """`name` with glob's special characters taken literally."""
    return re.sub(r"([*?\[])", r"[\1]", name)


@contextlib.contextmanager
def staging(out_dir: str | Path) -> Iterator[Path]:
    """A temp directory beside ``out_dir`` to write the export into (its writer recorded, see `llm.fs.write_owner`);
    removed when the block raises, so a failed export leaves ``out_dir`` as it was."""
    parent, target = _names(Path(out_dir))
    parent.mkdir(parents=True, exist_ok=True)
    with fs.dir_lock(parent):
        _recover(target)
    tmp = parent / f".{target.name}{TEMP_MARK}{os.getpid()}-{next(_SERIAL)}"
    tmp.mkdir()
    fs.write_owner(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


_SERIAL = iter(range(1 << 62))  # two exports of one process (threads) get distinct temp names


def commit(tmp: Path, out_dir: str | Path, files: RunFiles, overwrite: bool) -> None:
    """Swap the finished export ``tmp`` in as ``out_dir``: the target is checked again under the parent's lock
    (another export may have filled it meanwhile), the previous export's own files are carried over, every file is
    flushed to disk, and `llm.fs.replace_dir` swaps the directories."""
    parent, target = _names(Path(out_dir))
    with fs.dir_lock(parent):
        _recover(target)
        check_target(out_dir, files, overwrite)
        if target.is_dir():
            os.chmod(tmp, target.stat().st_mode & 0o7777)  # the folder keeps the permissions the user gave it
            for extra in previous_export_extras(target) if any(target.iterdir()) else []:
                try:
                    os.link(extra, tmp / extra.name)  # the old export stays intact until the swap
                except OSError:
                    shutil.copy2(extra, tmp / extra.name)
        (tmp / fs.OWNER_FILE).unlink()
        for path in tmp.iterdir():
            fs.make_readable(path)  # safetensors writes 0600; the directory is for sharing (0644 under umask 022)
            fs.fsync_file(path)
        fs.replace_dir(tmp, target, _aside(target))


def write_tokenizer(tokenizer: Tokenizer, out_dir: str | Path, max_length: int) -> dict[str, int | None]:
    """The run's tokenizer as transformers reads it (tokenizer.json, tokenizer_config.json, special_tokens_map.json);
    returns the bos/eos/pad ids for config.json and generation_config.json."""
    out = Path(out_dir)
    tok = byte_level_tokenizer() if isinstance(tokenizer, ByteTokenizer) else tokenizer.tok
    tok.save(str(out / "tokenizer.json"))
    if isinstance(tokenizer, HFTokenizer) and tokenizer.files is not None:
        return _write_source_tokenizer_files(tokenizer, out, max_length)
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


def _write_source_tokenizer_files(tokenizer: HFTokenizer, out: Path, max_length: int) -> dict[str, Any]:
    """tokenizer_config.json and special_tokens_map.json as the source folder had them (its tokens, its chat
    template); returns its ids (eos: every id of its generation_config.json, the first one in config.json)."""
    files = tokenizer.files
    assert files is not None
    tokens = {name: value for name, value in files.tokens.items() if value is not None}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_length, **files.config,
              **files.tokens}
    if tokenizer.chat_template is not None:
        config["chat_template"] = tokenizer.chat_template
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(tokens, indent=2, ensure_ascii=False) + "\n")
    stops = tokenizer.stop_ids()
    eos: Any = stops if len(stops) > 1 else tokenizer.eos_id
    return {"bos_token_id": tokenizer.bos_id, "eos_token_id": eos, "pad_token_id": tokenizer.pad_id}


def export_hf(source: str | Path, out_dir: str | Path, dtype: torch.dtype | None = None,
              max_shard_bytes: int | None = None, overwrite: bool = False) -> Path:
    """Write the model of ``source`` as a Hugging Face Llama/Mixtral directory; returns ``out_dir``.

    ``out_dir`` must be empty unless ``overwrite`` (then it must be a previous export, replaced whole), and never
    the source, inside it or above it (`check_target`). Written beside ``out_dir`` and swapped in at the end.
    """
    # Checked before the (possibly long) load, and again on the weights the load verified and chose.
    check_target(out_dir, resolve_run(source, verify=False, warn=lambda _: None), overwrite)
    run = load_run(source, dtype=dtype, warn=_warn)
    files = RunFiles(run.weights_path, None, run.run_dir, run.checkpoint_dir)
    check_target(out_dir, files, overwrite)
    model = run.model
    refuse_unexportable(model)
    try:
        with staging(out_dir) as tmp:
            token_ids = write_tokenizer(run.tokenizer, tmp, model.config.max_seq_len)
            eos = token_ids.get("eos_token_id")
            # config.json names one eos (the tokenizer's), generation_config.json every id that ends a turn.
            save_hf(model, tmp, max_shard_bytes=max_shard_bytes,
                    token_ids={**token_ids, "eos_token_id": eos[0] if isinstance(eos, list) else eos})
            if isinstance(eos, list):
                generation = json.loads((tmp / "generation_config.json").read_text())
                (tmp / "generation_config.json").write_text(json.dumps({**generation, "eos_token_id": eos},
                                                                       indent=2) + "\n")
            commit(tmp, out_dir, files, overwrite)
    except ValueError as e:
        raise ExportError(str(e)) from None
    except (OSError, RuntimeError) as exc:
        if fs.write_errno(exc) is None:
            raise
        raise ExportError(fs.write_failure(exc, out_dir)) from None
    except Exception as exc:
        if "safetensor" not in type(exc).__module__.lower() or fs.write_errno(exc) is None:
            raise
        raise ExportError(fs.write_failure(exc, out_dir)) from None
    return Path(out_dir)


def refuse_unexportable(model: DecoderModel) -> None:
    """Refuse a model trained with a lever no stock transformers class represents (`ModelConfig.export_blockers`):
    the export would load without it and generate other text."""
    blockers = model.config.export_blockers()
    if blockers:
        raise ExportError(f"the model has {', '.join(blockers)}, which no Llama/Qwen/Mistral/Mixtral class of "
                          "transformers represents; it cannot be exported (train without it to export)")


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
    parser.add_argument("--to", required=True, choices=["hf", "gguf"],
                        help="target format (hf: Llama/Mixtral directory; gguf: one llama.cpp file)")
    parser.add_argument("out_dir", help="directory to write (--to gguf: the .gguf file)")
    parser.add_argument("--dtype", help=f"cast weights before writing (default: as stored); hf: "
                        f"{', '.join(sorted(DTYPES))}; gguf: f32, f16, bf16, q8_0")
    parser.add_argument("--max-shard-size", help="split weights into shards of at most this size, e.g. 2GB")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a previous export in OUT_DIR (its other files, e.g. a README, are kept)")
    try:
        args = parser.parse_args(argv)
        if args.to == "gguf":
            from llm.export_gguf import export_gguf  # the gguf package is an optional extra

            if args.max_shard_size:
                raise ExportError("--max-shard-size applies to --to hf; a GGUF export is one file")
            out = export_gguf(args.source, args.out_dir, args.dtype, args.overwrite)
        else:
            if args.dtype is not None and args.dtype not in DTYPES:
                raise ExportError(f"argument --dtype: invalid choice: {args.dtype!r} (choose from "
                                  f"{', '.join(sorted(DTYPES))})")
            shard = _parse_size(args.max_shard_size) if args.max_shard_size else None
            out = export_hf(args.source, args.out_dir, DTYPES.get(args.dtype or ""), shard, args.overwrite)
    except (UserError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
