"""Sampling CLI: `python -m llm.generate --checkpoint RUN_OR_CHECKPOINT --prompt "def "`.

`--checkpoint` is a run directory (its final `model.safetensors`, or else its newest checkpoint), a
checkpoint directory (`RUN/checkpoints/step-XXXXXXXX/`) or a `model.safetensors` file. The model is rebuilt
from the `config.yaml` next to the weights (or the run's), with the vocabulary read from the weights
themselves; the tokenizer is the run's `tokenizer.json` (or bytes). Text streams to stdout as tokens arrive:
the incremental decoder holds back the bytes of a character until it is complete, so partial UTF-8 never
shows. A user mistake (missing checkpoint, bad flag) is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn, TextIO

import torch

from llm.training.core.errors import UserError

WEIGHTS = "model.safetensors"
CONFIG = "config.yaml"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UserError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m llm.generate", description="Sample text from a trained lm run or checkpoint.")
    p.add_argument("--checkpoint", required=True, help="run directory, checkpoint directory or model.safetensors")
    p.add_argument("--prompt", default="", help="text to continue (empty: start a new document)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="tokens to generate")
    p.add_argument("--temperature", type=float, default=0.8, help="softmax temperature (0 = greedy)")
    p.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens only")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling: smallest set with this mass")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible samples (default: random)")
    p.add_argument("--device", default="auto", help="auto (cuda when present) | cpu | cuda | cuda:N")
    return p


# ------------------------------------------------------------------------------------------------------- loading
def find_weights(path: str | Path) -> Path:
    """The weights file a `--checkpoint` argument names (see the module docstring for what is accepted)."""
    p = Path(path)
    if p.is_file():
        return p
    if not p.exists():
        raise UserError(f"checkpoint: no such file or directory: {str(path)!r}")
    if (p / WEIGHTS).is_file():
        return p / WEIGHTS
    # A run stopped before its end has no final weights; its newest complete checkpoint (one whose manifest was
    # written, the last act of a save) is the next best thing.
    from llm.training.core.checkpoint import MANIFEST, list_checkpoints

    for _, ckpt in reversed(list_checkpoints(p / "checkpoints")):
        if (ckpt / MANIFEST).is_file() and (ckpt / WEIGHTS).is_file():
            return ckpt / WEIGHTS
    raise UserError(
        f"checkpoint: {str(path)!r} holds no {WEIGHTS} (and no complete checkpoints/step-*/ with one; "
        "an FSDP run's sharded checkpoints load only through training)"
    )


def _search_dirs(weights: Path) -> list[Path]:
    # A checkpoint sits at RUN/checkpoints/step-X/, so the run directory is two levels up.
    here = weights.parent
    return [here, here.parent.parent] if here.parent.name == "checkpoints" else [here]


def load_config(weights: Path) -> Any:
    from llm.training.core.config import config_from_dict, load_yaml

    for directory in _search_dirs(weights):
        if (directory / CONFIG).is_file():
            return config_from_dict(load_yaml(str(directory / CONFIG)))
    raise UserError(f"checkpoint: no {CONFIG} next to {str(weights)!r} or in its run directory")


def load_model(weights: Path, config: Any, device: torch.device) -> torch.nn.Module:
    """Rebuild `DecoderModel` from the config and load the weights (vocabulary size taken from them)."""
    from safetensors import safe_open

    from llm.models.decoder import DecoderModel
    from llm.training.core.checkpoint import load_weights

    kwargs = dataclasses.asdict(config.model)
    try:
        with safe_open(str(weights), framework="pt") as f:
            if "embed_tokens.weight" in f.keys():
                kwargs["vocab_size"] = f.get_slice("embed_tokens.weight").get_shape()[0]
        model = DecoderModel(**kwargs)
        load_weights(model, weights)
    except UserError:
        raise
    except Exception as exc:  # a corrupt or foreign file: the user's input, not a bug
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"checkpoint: cannot load {str(weights)!r} as this run's model: {first}") from None
    return model.to(device).eval()


def load_run(checkpoint: str | Path, device: str = "cpu") -> tuple[torch.nn.Module, Any, Any]:
    """(model, tokenizer, config) of a run or checkpoint, ready for `generate`."""
    from llm.data.tokenizers import load_tokenizer
    from llm.training.core.distributed import resolve_device

    weights = find_weights(checkpoint)
    config = load_config(weights)
    tokenizer = load_tokenizer(config.data.tokenizer, _search_dirs(weights))
    model = load_model(weights, config, resolve_device(device, 0))
    return model, tokenizer, config


# ---------------------------------------------------------------------------------------------------- generation
def stream_text(
    model: Any, tokenizer: Any, prompt: str, max_new_tokens: int = 256, temperature: float = 0.8,
    top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
) -> Iterator[str]:
    """Yield decoded text pieces of a continuation of `prompt` as the tokens are generated."""
    from llm.data.tokenizers import StreamDecoder

    ids = tokenizer.encode(prompt)
    if not ids:
        if tokenizer.eos_id is None:
            raise UserError("prompt: empty, and this tokenizer has no end-of-text token to start from")
        ids = [tokenizer.eos_id]  # documents are separated by it, so it means "start of a document"
    ids = ids[-model.max_seq_len :]
    stops = [tokenizer.eos_id] if tokenizer.eos_id is not None else None
    decoder = StreamDecoder(tokenizer)
    tokens = model.generate_stream(
        torch.tensor(ids, dtype=torch.long), max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
        stop_tokens=stops, seed=seed,
    )
    # The stop token is yielded by the model but is not text: decode up to it.
    yield from decoder.stream(itertools.takewhile(lambda token: not stops or token != stops[0], tokens))


def _check_args(args: argparse.Namespace) -> None:
    if args.max_new_tokens < 0:
        raise UserError(f"--max-new-tokens: invalid value {args.max_new_tokens}; must be >= 0")
    if args.temperature < 0:
        raise UserError(f"--temperature: invalid value {args.temperature}; must be >= 0")
    if args.top_k is not None and args.top_k < 1:
        raise UserError(f"--top-k: invalid value {args.top_k}; must be >= 1")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UserError(f"--top-p: invalid value {args.top_p}; must be in (0, 1]")


def main(argv: list[str] | None = None, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    try:
        args = build_parser().parse_args(argv)
        _check_args(args)
        model, tokenizer, _ = load_run(args.checkpoint, args.device)
        out.write(args.prompt)
        out.flush()
        for piece in stream_text(
            model, tokenizer, args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed
        ):
            out.write(piece)
            out.flush()
        out.write("\n")
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
