"""Sampling CLI: `python -m llm.generate --checkpoint RUN_OR_CHECKPOINT --prompt "def "`.

`--checkpoint` is a run directory (its final `model.safetensors`, or else its newest complete checkpoint), a
checkpoint directory (`RUN/checkpoints/step-XXXXXXXX/`, verified against its manifest) or a `model.safetensors`
file; `llm.artifacts.runs.load_run` reads it, as it does for every tool (see `resolve_run` there for
the rule). The model is rebuilt from the `config.yaml` next to the weights (or the run's), with the vocabulary
read from the weights themselves; the tokenizer is the run's `tokenizer.json` (or bytes). Text streams to
stdout as tokens arrive: the incremental decoder holds back the bytes of a character until it is complete, so
partial UTF-8 never shows. A user mistake (missing checkpoint, bad flag) is one line on stderr and exit status 2.

Inputs are checked before any work: the temperature must be finite and >= 0, and one below `GREEDY_BELOW` (1e-5)
means greedy decoding, its limit (dividing logits by 1e-45 overflows them to inf and NaN probabilities); top-k >= 1;
0 < top-p <= 1; the device must exist on this machine; the prompt (`--prompt`, or `--prompt-file`, read verbatim)
must be valid UTF-8. `--max-new-tokens` is at least 1; its default (256) is cut to what fits in the model's context
(`max_seq_len`) after the prompt, and the KV cache of the context (every layer) must fit in the device's memory.

Asking for more than fits in the context is allowed: the model never runs past its context (positions it was not
trained on turn the text into gibberish), the window slides instead, each further token predicted from the last
`max_seq_len` tokens (see `llm.models.generation`), and one warning line on stderr says from which generated
token on. A prompt longer than the context slides from the first token.

Chat: `--chat "question"` (or `--messages FILE.json`, a JSON list of {"role", "content"} messages, or an object
with such a "messages" list, ending with a user turn) renders the conversation with the run's chat template and
its generation prompt (the tokenizer's own `chat_template`, else the built-in SFT template, see `llm.data.sft`),
generates until the template's end-of-turn token or an eos id of the tokenizer's files (`chat_stop_ids`), and
prints only the answer. `--chat` without text reads the question from stdin when stdin is not a terminal; on a
terminal it starts a multi-turn conversation (an empty line or end of input ends it).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn, TextIO

import torch

from llm.artifacts.runs import load_run
from llm.errors import UserError, run_tool
from llm.training.parallel.distributed import resolve_device

# Temperatures below this sample as greedy decoding (their limit); see the module docstring.
GREEDY_BELOW = 1e-5
DEFAULT_MAX_NEW_TOKENS = 256


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UserError(message)


def build_parser() -> argparse.ArgumentParser:
    # Every option's help ends with its default in words (a None default means something different per option).
    p = _Parser(prog="python -m llm.generate", description="Sample text from a trained lm run or checkpoint.")
    p.add_argument("run", nargs="?", metavar="RUN",
                   help="run directory, checkpoint directory or model.safetensors; this or --checkpoint (required)")
    p.add_argument("--checkpoint", default=None,
                   help="the same as RUN (default: RUN)")
    prompt = p.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", default="", help="text to continue (default: empty, start a new document)")
    prompt.add_argument("--prompt-file",
                        help="read the prompt from this UTF-8 file, verbatim; '-': stdin (default: none, --prompt)")
    prompt.add_argument("--chat", nargs="?", const="", default=None, metavar="QUESTION",
                        help="ask QUESTION with the run's chat template and print only the answer; without QUESTION "
                        "read it from stdin, or talk turn by turn on a terminal (default: off, continue text)")
    prompt.add_argument("--messages", metavar="FILE.json",
                        help="answer the conversation of this JSON file (a list of role/content messages) with the "
                        "chat template (default: none)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help=f"tokens to generate; past the model's context the window slides, with a warning (default: "
                   f"{DEFAULT_MAX_NEW_TOKENS}, or fewer so that prompt and text fit the context)")
    p.add_argument("--temperature", type=float, default=0.8,
                   help=f"softmax temperature; 0 (or below {GREEDY_BELOW:g}) is greedy (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=None,
                   help="sample from the k most likely tokens only (default: off, every token)")
    p.add_argument("--top-p", type=float, default=None,
                   help="nucleus sampling: the smallest set of tokens with this probability mass (default: off, 1.0)")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible samples (default: random)")
    p.add_argument("--device", default="auto",
                   help="auto (cuda when present) | cpu | cuda | cuda:N (default: %(default)s)")
    return p


# ---------------------------------------------------------------------------------------------------- generation
def stream_text(
    model: Any, tokenizer: Any, prompt: str, max_new_tokens: int = 256, temperature: float = 0.8,
    top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
    warn: Callable[[str], None] | None = None,
) -> Iterator[str]:
    """Yield decoded text pieces of a continuation of `prompt` as the tokens are generated.

    A `temperature` below `GREEDY_BELOW` decodes greedily (see the module docstring). When the context window
    slides (prompt plus generated tokens past `max_seq_len`), `warn` receives one line saying from which token.
    """
    ids = tokenizer.encode(prompt)
    if not ids:
        if tokenizer.eos_id is None:
            raise UserError("prompt: empty, and this tokenizer has no end-of-text token to start from")
        ids = [tokenizer.eos_id]  # documents are separated by it, so it means "start of a document"
    stops = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    yield from stream_ids(model, tokenizer, ids, stops, max_new_tokens, temperature, top_k, top_p, seed, warn)


def stream_chat(
    model: Any, tokenizer: Any, messages: list[tuple[str, str]], max_new_tokens: int = 256, temperature: float = 0.8,
    top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
    warn: Callable[[str], None] | None = None,
) -> Iterator[str]:
    """Yield the text of the answer to ``messages`` ((role, content) pairs ending with a user turn): the chat
    template's prompt with its generation prompt, cut at the template's end-of-turn or an eos token."""
    from llm.data.sft import chat_stop_ids

    ids = chat_prompt_ids(messages, tokenizer)
    yield from stream_ids(model, tokenizer, ids, chat_stop_ids(tokenizer), max_new_tokens, temperature, top_k,
                          top_p, seed, warn)


def chat_prompt_ids(messages: list[tuple[str, str]], tokenizer: Any) -> list[int]:
    """The prompt ids of a conversation (a template error is a one-line user error)."""
    from llm.data.sft import render_prompt
    from llm.errors import ConfigError

    try:
        return render_prompt(messages, tokenizer)
    except ConfigError as exc:
        raise UserError(str(exc)) from None


def stream_ids(
    model: Any, tokenizer: Any, ids: list[int], stops: list[int], max_new_tokens: int, temperature: float,
    top_k: int | None, top_p: float | None, seed: int | None, warn: Callable[[str], None] | None,
) -> Iterator[str]:
    """Yield the decoded text generated after the prompt ``ids``, up to (not including) the first of ``stops``."""
    from llm.data.tokenizers import StreamDecoder

    temperature = 0.0 if temperature < GREEDY_BELOW else temperature
    decoder = StreamDecoder(tokenizer)

    def on_slide(index: int) -> None:
        if warn is not None:
            warn(slide_message(len(ids), int(model.max_seq_len), index))

    tokens = model.generate_stream(
        torch.tensor(ids, dtype=torch.long), max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
        stop_tokens=stops or None, seed=seed, on_slide=on_slide, vocab_limit=tokenizer.vocab_size,  # padding: no text
    )
    # The stop token is yielded by the model but is not text: decode up to it.
    yield from decoder.stream(itertools.takewhile(lambda token: int(token) not in stops, tokens))


def slide_message(prompt_tokens: int, context: int, index: int) -> str:
    """The warning of a slid window: generated token `index` (0-based) is the first predicted without the start."""
    return (f"the context window slides from generated token {index + 1} on: the prompt's {prompt_tokens} tokens plus "
            f"the generated ones pass the model's context of {context} tokens (max_seq_len), so each token from there "
            f"is predicted from the last {context} tokens only")


def _check_args(args: argparse.Namespace) -> None:
    if args.run is not None and args.checkpoint is not None and args.run != args.checkpoint:
        raise UserError(f"RUN {args.run!r} and --checkpoint {args.checkpoint!r} name two models; give one")
    args.checkpoint = args.checkpoint if args.checkpoint is not None else args.run
    if args.checkpoint is None:
        raise UserError("the run to sample from is required: python -m llm.generate RUN (or --checkpoint RUN)")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens: invalid value {args.max_new_tokens}; must be >= 1")
    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise UserError(f"--temperature: invalid value {args.temperature}; must be a finite number >= 0 (0 = greedy)")
    if args.top_k is not None and args.top_k < 1:
        raise UserError(f"--top-k: invalid value {args.top_k}; must be >= 1")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UserError(f"--top-p: invalid value {args.top_p}; must be in (0, 1]")


def _device(name: str) -> torch.device:
    """The device `name` names, checked to exist here (`cuda` on a CPU-only build or machine is a user error)."""
    try:
        device = resolve_device(name, 0)
    except RuntimeError as exc:  # torch's own message lists the valid device types
        raise UserError(f"--device: invalid value {name!r}: {str(exc).splitlines()[0]}") from None
    try:
        torch.empty(0, device=device)  # the one check that covers every backend (CUDA, MPS, XPU, ...)
    except (RuntimeError, AssertionError) as exc:
        raise UserError(f"--device: {name!r} is not available on this machine ({_first_line(exc)}); use --device cpu "
                        "or auto") from None
    return device


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def read_prompt(args: argparse.Namespace) -> str:
    """The prompt text of `--prompt` or `--prompt-file`, refused unless it is valid UTF-8."""
    if args.prompt_file is None:
        try:
            args.prompt.encode("utf-8")
        except UnicodeEncodeError as exc:  # argv bytes that were not UTF-8 arrive as lone surrogates
            char = args.prompt[exc.start]
            what = f"byte 0x{ord(char) - 0xDC00:02x}" if 0xDC80 <= ord(char) <= 0xDCFF else f"{char!r}"
            raise UserError(f"--prompt: not valid UTF-8 text ({what} at character {exc.start}); pass UTF-8 text, or "
                            "--prompt-file") from None
        return args.prompt
    name = args.prompt_file
    try:
        data = sys.stdin.buffer.read() if name == "-" else Path(name).read_bytes()
    except OSError as exc:
        raise UserError(f"--prompt-file: cannot read {name!r}: {exc.strerror or exc}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"--prompt-file: {name!r} is not valid UTF-8 (byte 0x{data[exc.start]:02x} at offset "
                        f"{exc.start})") from None


def read_messages(name: str) -> list[tuple[str, str]]:
    """The conversation of a `--messages` file: a JSON list of {"role", "content"} (or {"messages": [...]}),
    roles system/user/assistant, ending with a user turn."""
    from llm.data.sft_records import ROLES

    try:
        data = json.loads(Path(name).read_bytes().decode("utf-8"))
    except OSError as exc:
        raise UserError(f"--messages: cannot read {name!r}: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise UserError(f"--messages: {name!r} is not valid UTF-8 JSON: {_first_line(exc)}") from None
    if isinstance(data, dict):
        data = data.get("messages")
    if not isinstance(data, list) or not data:
        raise UserError(f"--messages: {name!r} must hold a non-empty list of messages (or {{\"messages\": [...]}})")
    messages = []
    for i, message in enumerate(data):
        role = message.get("role") if isinstance(message, dict) else None
        content = message.get("content") if isinstance(message, dict) else None
        if role not in ROLES or not isinstance(content, str):
            raise UserError(f"--messages: {name!r}: messages[{i}] needs a role in {ROLES} and a string content")
        messages.append((role, content))
    if messages[-1][0] == "assistant":
        raise UserError(f"--messages: {name!r}: the conversation ends with an assistant turn; end it with the user's")
    return messages


def _device_memory(device: torch.device) -> int | None:
    """Total memory of `device` in bytes (None where it cannot be told)."""
    try:
        if device.type == "cuda":
            return torch.cuda.get_device_properties(device).total_memory
        if device.type == "cpu":
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, RuntimeError, AttributeError):
        pass
    return None


def check_max_new_tokens(model: Any, prompt_tokens: int, requested: int | None, device: torch.device) -> int:
    """The number of tokens to generate: `requested`, or the default fitted to the context after the prompt (a
    prompt that fills the context alone gets the default cut to the context, and slides). Refuses (one-line
    UserError) a model whose KV cache, at most `max_seq_len` positions as the window slides, exceeds the device."""
    context = int(model.max_seq_len)
    # Token i is predicted from prompt + i tokens: prompt + count - 1 of them must fit for no slide at all.
    room = context - prompt_tokens + 1
    count = min(DEFAULT_MAX_NEW_TOKENS, room if room >= 1 else context) if requested is None else requested
    positions = min(prompt_tokens + count, context)
    weight = model.embed_tokens.weight
    per_position = sum(2 * b.self_attn.num_kv_heads * b.self_attn.head_dim for b in model.layers)
    need, have = positions * per_position * weight.element_size(), _device_memory(device)
    if have is not None and need > have:
        raise UserError(f"--max-new-tokens: {count} tokens need a {need / 1e9:.3g} GB KV cache ({positions} "
                        f"positions of the model's context of {context}), more than the {have / 1e9:.3g} GB of "
                        f"{device}; use a device with more memory")
    return count


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _chat(args: argparse.Namespace, out: TextIO, stdin: TextIO) -> None:
    """`--chat` / `--messages`: one answer, or a conversation turn by turn on a terminal."""
    interactive = args.messages is None and not args.chat and stdin.isatty()
    if args.chat:
        read_prompt(argparse.Namespace(prompt=args.chat, prompt_file=None))  # refuses text that is not UTF-8
    if args.messages is not None:
        messages = read_messages(args.messages)
    elif args.chat or interactive:
        messages = [("user", args.chat)] if args.chat else []
    else:
        question = stdin.read()
        if not question.strip():
            raise UserError("--chat: no question given (none on the command line, stdin empty)")
        messages = [("user", question.rstrip("\n"))]
    device = _device(args.device)
    run = load_run(args.checkpoint, device=device, warn=_warn)
    model, tokenizer = run.model, run.tokenizer
    while True:
        if interactive:
            out.write("> ")
            out.flush()
            line = stdin.readline()
            if not line.strip():
                return
            messages.append(("user", line.rstrip("\n")))
        count = check_max_new_tokens(model, len(chat_prompt_ids(messages, tokenizer)), args.max_new_tokens, device)
        answer = []
        for piece in stream_chat(model, tokenizer, messages, count, args.temperature, args.top_k, args.top_p,
                                 args.seed, warn=_warn):
            answer.append(piece)
            out.write(piece)
            out.flush()
        out.write("\n")
        if not interactive:
            return
        messages.append(("assistant", "".join(answer)))


def main(argv: list[str] | None = None, out: TextIO | None = None, stdin: TextIO | None = None) -> int:
    out = out or sys.stdout

    def body() -> None:
        args = build_parser().parse_args(argv)
        _check_args(args)
        if args.chat is not None or args.messages is not None:
            _chat(args, out, stdin or sys.stdin)
            return
        prompt = read_prompt(args)
        device = _device(args.device)
        run = load_run(args.checkpoint, device=device, warn=_warn)
        model, tokenizer = run.model, run.tokenizer
        count = check_max_new_tokens(model, len(tokenizer.encode(prompt)) or 1, args.max_new_tokens, device)
        out.write(prompt)
        out.flush()
        for piece in stream_text(
            model, tokenizer, prompt, count, args.temperature, args.top_k, args.top_p, args.seed, warn=_warn
        ):
            out.write(piece)
            out.flush()
        out.write("\n")

    return run_tool(body)

if __name__ == "__main__":
    sys.exit(main())
