"""Sampling CLI: `python -m llm.generate --checkpoint RUN_OR_CHECKPOINT --prompt "def "`.

`--checkpoint` is a run directory (its final `model.safetensors`, or else its newest complete checkpoint), a
checkpoint directory (`RUN/checkpoints/step-XXXXXXXX/`, verified against its manifest) or a `model.safetensors`
file; `llm.training.core.runs.load_run` reads it, as it does for every tool (see `resolve_run` there for
the rule). The model is rebuilt from the `config.yaml` next to the weights (or the run's), with the vocabulary
read from the weights themselves; the tokenizer is the run's `tokenizer.json` (or bytes). Text streams to
stdout as tokens arrive: the incremental decoder holds back the bytes of a character until it is complete, so
partial UTF-8 never shows. A user mistake (missing checkpoint, bad flag) is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Iterator
from typing import Any, NoReturn, TextIO

import torch

from llm.errors import UserError
from llm.training.core.distributed import resolve_device
from llm.training.core.runs import load_run


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


def _device(name: str) -> torch.device:
    try:
        return resolve_device(name, 0)
    except RuntimeError as exc:  # torch's own message lists the valid device types
        raise UserError(f"--device: invalid value {name!r}: {str(exc).splitlines()[0]}") from None


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    try:
        args = build_parser().parse_args(argv)
        _check_args(args)
        run = load_run(args.checkpoint, device=_device(args.device), warn=_warn)
        model, tokenizer = run.model, run.tokenizer
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
