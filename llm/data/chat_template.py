"""A model's own chat template (the Jinja source of its ``tokenizer_config.json``), rendered as transformers does.

The template is untrusted input (it comes with a downloaded folder), so it runs in jinja2's immutable sandbox (no
attribute access to Python internals, no mutation of the messages, ``range`` capped by jinja2) and its output is
bounded (`ChatTemplate.render` stops a template that writes more than `output_limit` characters). The environment
is the one transformers builds: ``trim_blocks``/``lstrip_blocks``, the loop-control extension, ``raise_exception``,
``strftime_now``, a ``tojson`` that keeps non-ASCII text, and the ``{% generation %}`` block (rendered as its body:
answer spans are found without it, see `assistant_spans`). Variables: ``messages`` (dicts with ``role`` and
``content``), ``bos_token``, ``eos_token``, ``add_generation_prompt``.

Answer spans (for the SFT loss mask) are found by rendering prefixes of the conversation, whether or not the template
marks generation blocks: assistant message i starts where the conversation before it, rendered with the generation
prompt, ends; it ends with the template's end-of-turn token (`end_of_turn`: the first special token the template
writes after an answer, ``<|im_end|>`` for ChatML), or where the conversation up to it ends when the template writes
none. A template that renders an earlier part of the conversation differently once more messages follow (so the
start cannot be found in the whole text) is refused with one line.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from llm.errors import ConfigError

Message = tuple[str, str]  # (role, content), as llm.data.sft_records has it
MIN_OUTPUT_LIMIT = 1 << 20  # characters a rendering may always write; see `output_limit`
OUTPUT_PER_CHAR = 8  # ... and this many per character of the messages (headers, a default system prompt)
_PROBE = "\u2063probe\u2063"  # an answer no template writes by itself, to find what follows an answer


class TemplateOutputError(ConfigError):
    """A template wrote more than its output bound."""


def output_limit(messages: Sequence[Message]) -> int:
    """The most characters a rendering of ``messages`` may have: a template adds headers, not text per character."""
    return MIN_OUTPUT_LIMIT + OUTPUT_PER_CHAR * sum(len(content) for _, content in messages)


@functools.lru_cache(maxsize=1)
def _environment() -> Any:
    from jinja2 import nodes
    from jinja2.exceptions import TemplateError
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(Extension):
        """``{% generation %}...{% endgeneration %}``: rendered as its body."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body).set_lineno(lineno)

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlock, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


class ChatTemplate:
    """A compiled chat template with the tokenizer's bos/eos token texts."""

    def __init__(self, source: str, bos_token: str | None = None, eos_token: str | None = None,
                 where: str = "chat_template") -> None:
        from jinja2.exceptions import TemplateError

        self.source, self.where = source, where
        self.bos_token, self.eos_token = bos_token or "", eos_token or ""
        try:
            self.template = _environment().from_string(source)
        except TemplateError as exc:
            raise ConfigError(f"{where}: the chat template does not compile: {_first_line(exc)}") from None

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
        """The text of ``messages``; a template error (``raise_exception``, an undefined name) or an output past
        `output_limit` is a one-line `ConfigError`."""
        from jinja2.exceptions import TemplateError

        limit = output_limit(messages)
        dicts = [{"role": role, "content": content} for role, content in messages]
        pieces, size = [], 0
        try:
            for piece in self.template.generate(messages=dicts, bos_token=self.bos_token, eos_token=self.eos_token,
                                                add_generation_prompt=add_generation_prompt):
                size += len(piece)
                if size > limit:
                    raise TemplateOutputError(f"{self.where}: the chat template wrote more than {limit} characters "
                                              f"for {len(messages)} messages; refusing it")
                pieces.append(piece)
        except TemplateError as exc:
            raise ConfigError(f"{self.where}: the chat template failed: {_first_line(exc)}") from None
        except (TypeError, ValueError, KeyError, IndexError, AttributeError, RecursionError) as exc:
            raise ConfigError(f"{self.where}: the chat template failed: {type(exc).__name__}: "
                              f"{_first_line(exc)}") from None
        return "".join(pieces)

    def end_of_turn(self, special_tokens: Sequence[str]) -> str | None:
        """The special token the template writes right after an answer (``<|im_end|>``, ``<|eot_id|>``, ``</s>``),
        found by rendering a probe answer; None when none of ``special_tokens`` follows it."""
        probe = [("user", "hello"), ("assistant", _PROBE)]
        try:
            text = self.render(probe)
        except ConfigError:  # a template that wants a system turn first, say
            text = self.render([("system", "hello"), *probe])
        tail = text[text.rfind(_PROBE) + len(_PROBE):] if _PROBE in text else ""
        found = [(tail.find(token), token) for token in special_tokens if token and token in tail]
        return min(found)[1] if found else None


def assistant_spans(template: ChatTemplate, messages: Sequence[Message], end_of_turn: str | None,
                    where: str = "") -> tuple[str, list[tuple[int, int]]]:
    """The rendered text of ``messages`` and the character span of each assistant message's tokens in it (its
    content and its end-of-turn token; the header before it belongs to the prompt). See the module docstring."""
    full = template.render(messages)
    spans = []
    prefix = f"{where}: " if where else ""
    for index, (role, _) in enumerate(messages):
        if role != "assistant":
            continue
        head = template.render(messages[:index], add_generation_prompt=True) if index else ""
        if not full.startswith(head):
            raise ConfigError(f"{prefix}the chat template renders the conversation before messages[{index}] "
                              "differently once more messages follow, so its answer cannot be located; use a "
                              "template that renders earlier turns unchanged")
        start = len(head)
        turn = template.render(messages[: index + 1])
        cut = full.find(end_of_turn, start) if end_of_turn else -1
        if cut >= 0 and (not full.startswith(turn) or cut < len(turn)):
            end = cut + len(end_of_turn or "")
        elif full.startswith(turn) and len(turn) > start:
            end = len(turn)
        else:
            raise ConfigError(f"{prefix}cannot tell where messages[{index}] ends in the chat template's text (no "
                              "end-of-turn token after it); use a template that ends answers with a special token")
        spans.append((start, end))
    return full, spans


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
