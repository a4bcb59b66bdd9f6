"""Supervised fine-tuning data: instruction records rendered with one template, loss on the answers only.

Records (`data.path`: a JSONL file, a directory or a glob of them; one JSON object per line, blank lines skipped):

    {"prompt": "What is 2 + 3?", "response": "5"}
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello."}, ...]}

Roles are system, user and assistant; a record needs at least one assistant message, and a prompt/response record
is the chat [user: prompt, assistant: response]. Reading and checking records (file:line errors, the size cap per
record that bounds its memory) and the demo set are `llm.data.sft_records`'; this module re-exports them. What only
the tokenizer can refuse is refused here, naming the record's file, line and field: a content that holds one of the
template's special tokens. The byte tokenizer's end-of-sequence token is the NUL character, and a tokenizer.json
finds its added special tokens ("</s>") in any text, so such a content would end an answer (or start a sequence)
there without a word. Rendering tokenizes no more of a record than its window holds.

The template (`render`): each message is a header line and its content,

    [BOS]### System:\\n{content}\\n\\n### User:\\n{content}\\n\\n### Assistant:\\n{content}[EOS]...

system and user turns end with a blank line, an assistant turn ends with the tokenizer's end-of-sequence token,
which the model learns to emit and generation stops at. BOS is the tokenizer's beginning-of-sequence token when its
tokenizer.json has one (`<s>`, `<|begin_of_text|>`, ...); the byte tokenizer has none and uses byte 0, its document
separator, as EOS (see tokenizers.py). To prompt a trained model, `render_prompt(messages)` renders the
conversation so far followed by the assistant header.

Labels: the loss covers the assistant contents and their EOS, nothing else: every other label is `IGNORE_INDEX`
(-100, the ignore index of `nn.CrossEntropyLoss` and `llm.models.loss.linear_cross_entropy`). Text is tokenized
segment by segment, so the answer spans are exact for any tokenizer.

The model's own template: when the tokenizer's files hold a `chat_template` (tokenizer_config.json or
chat_template.jinja beside tokenizer.json, see `llm.data.tokenizers.TokenizerFiles`), conversations are rendered
with it instead, as transformers' `apply_chat_template` renders them (`llm.data.chat_template`: a sandboxed jinja2,
bounded output), and the whole text is tokenized once, so the ids equal `apply_chat_template(..., tokenize=True)`.
The loss then covers each assistant message's tokens from its content through the template's end-of-turn token
(`<|im_end|>`), found by rendering prefixes of the conversation (`assistant_spans`), whether or not the template
marks `{% generation %}` blocks; the template writes BOS itself if it wants one. A content that holds any of the
tokenizer's special tokens (`<|im_start|>`) is refused. The built-in template above is the fallback for tokenizers
without one (bytes, a BPE trained here); the run's log says which one it used.

Batching: one example per row, right-padded to the longest row of the batch (pad labels are ignored). Right
padding needs no attention mask: under the causal mask no real token attends to a later pad. With `data.packing`
(`--data-packing`) examples are packed several to a row of `data.seq_len` tokens instead (best-fit decreasing,
`llm.data.packing`), and batches are (input_ids, labels, document_ids): the model attends only within each example
and restarts its positions there (`DecoderModel(..., document_ids=...)`), so each example's loss and gradients are
the ones it gets alone, and a batch of rows holds several times the answer tokens of a padded one. Validation is
packed too; its metrics are sums over the split's answer tokens, so they do not change. An example longer than
`data.seq_len + 1` tokens is cut to that length (its answer may be cut short); one with no answer token left is
dropped, both counted in a warning (packed or not).

Without `data.path` the module generates a demo set (`demo_records`): `data.num_samples` arithmetic and
string-manipulation instructions with exact answers, seeded, so `python -m llm.training.train --task sft` runs
without a download and its validation loss on answers visibly falls. Records are split into training and
validation by a seeded shuffle (`data.val_fraction`).
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from llm.data.chat_template import ChatTemplate, assistant_spans
from llm.data.datamodule import SectionDataModule
from llm.data.packing import PackCollate, PackedExamples
from llm.data.sft_records import (  # noqa: F401  (the records' API, re-exported: callers import it from here)
    BYTES_PER_TOKEN,
    MIN_RECORD_BYTES,
    ROLES,
    Message,
    SFTRecord,
    demo_records,
    max_record_bytes,
    parse_located_record,
    parse_record,
    read_located_records,
    read_records,
)
from llm.data.tokenizers import ByteTokenizer, HFTokenizer, Tokenizer, copy_tokenizer
from llm.errors import ConfigError, show
from llm.registry import register_data_module

log = logging.getLogger("llm")

IGNORE_INDEX = -100  # nn.CrossEntropyLoss's default ignore_index, also linear_cross_entropy's
HEADERS = {"system": "### System:\n", "user": "### User:\n", "assistant": "### Assistant:\n"}
TURN_END = "\n\n"  # after a system or user message; an assistant message ends with EOS instead
# Beginning-of-sequence tokens of common tokenizer.json files; the first one present is used.
_BOS_CANDIDATES = ("<s>", "<|begin_of_text|>", "<|startoftext|>", "<bos>", "[CLS]")



# ---------------------------------------------------------------------------------------------- the template
@dataclass(frozen=True)
class SpecialTokens:
    """The ids the template adds: beginning of sequence (None: none) and end of sequence (ends each answer)."""

    bos: int | None
    eos: int

    @classmethod
    def of(cls, tokenizer: Tokenizer) -> SpecialTokens:
        if tokenizer.eos_id is None:
            raise ConfigError(
                f"data.tokenizer: {getattr(tokenizer, 'source', '') or tokenizer.name!r} has no end-of-sequence "
                "token (e.g. </s>, <|endoftext|>); sft ends every answer with one"
            )
        bos = None
        if isinstance(tokenizer, HFTokenizer) and tokenizer.files is not None:
            bos = tokenizer.bos_id  # what the model's own files say (None: it has none)
        elif isinstance(tokenizer, HFTokenizer):  # a bare tokenizer.json names no bos: its well-known names
            bos = next((i for i in map(tokenizer.tok.token_to_id, _BOS_CANDIDATES) if i is not None), None)
        return cls(bos, tokenizer.eos_id)


@dataclass(frozen=True)
class TemplateInfo:
    """A tokenizer's own chat template, its end-of-turn token and the texts of its special tokens."""

    template: ChatTemplate
    end_of_turn: str | None
    specials: tuple[str, ...]


@functools.lru_cache(maxsize=16)
def chat_template_of(tokenizer: Tokenizer) -> TemplateInfo | None:
    """The tokenizer's own chat template (None: it has none, the built-in template is used)."""
    if not isinstance(tokenizer, HFTokenizer) or tokenizer.chat_template is None:
        return None
    where = f"data.tokenizer: {tokenizer.source}" if tokenizer.source else "data.tokenizer"
    template = ChatTemplate(tokenizer.chat_template, tokenizer.token_text(tokenizer.bos_id),
                            tokenizer.token_text(tokenizer.eos_id), where)
    specials = tuple(sorted({t.content for t in tokenizer.tok.get_added_tokens_decoder().values()
                             if t.special and t.content}, key=len, reverse=True))
    return TemplateInfo(template, template.end_of_turn(specials), specials)


def template_name(tokenizer: Tokenizer) -> str:
    """Which template renders conversations for ``tokenizer``, in words (for the run's log)."""
    if chat_template_of(tokenizer) is None:
        return "the built-in '### User:' template (the tokenizer has no chat_template)"
    return f"the tokenizer's own chat_template ({getattr(tokenizer, 'source', '') or 'tokenizer.json'})"


def chat_stop_ids(tokenizer: Tokenizer) -> list[int]:
    """The ids that end an answer: the template's end-of-turn token and the tokenizer's eos ids."""
    if not isinstance(tokenizer, HFTokenizer):
        return [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    ids = tokenizer.stop_ids()
    info = chat_template_of(tokenizer)
    if info is not None and info.end_of_turn is not None:
        end = tokenizer.tok.token_to_id(info.end_of_turn)
        if end is not None and end not in ids:
            ids.insert(0, end)
    return ids


@functools.lru_cache(maxsize=16)
def _template_tokens(tokenizer: Tokenizer) -> tuple[SpecialTokens, dict[str, str]]:
    """The special tokens of ``tokenizer`` and their texts (`_reserved_texts`), worked out once per tokenizer, not
    once per record."""
    special = SpecialTokens.of(tokenizer)
    return special, _reserved_texts(tokenizer, special)


def _reserved_texts(tokenizer: Tokenizer, special: SpecialTokens) -> dict[str, str]:
    """{text: what it is} for the template's special tokens that a content could spell out: the byte tokenizer's
    EOS is the NUL character; a tokenizer.json matches its added tokens' text ("</s>") inside any text. (A token of
    the plain vocabulary is only found by its id, in `_refuse_special`.)"""
    if isinstance(tokenizer, ByteTokenizer):
        return {chr(special.eos): "end-of-sequence token (the NUL character, \\u0000)"}
    added = tokenizer.tok.get_added_tokens_decoder()
    texts = {}
    for token_id, name in ((special.eos, "end-of-sequence token"), (special.bos, "beginning-of-sequence token")):
        if token_id in added and added[token_id].content:
            texts[added[token_id].content] = f"{name} {show(added[token_id].content)}"
    return texts


def _refuse_special(content: str, piece: list[int], special: SpecialTokens, texts: dict[str, str], where: str,
                    fields: Sequence[str] | None, index: int) -> None:
    """A content that holds a special token of the template (it would end an answer, or start a sequence, there
    without a word) is refused, naming the record and the field."""
    found = next(((content.find(text), name) for text, name in texts.items() if text in content), None)
    if found is None and piece and (special.eos in piece or (special.bos is not None and special.bos in piece)):
        found = (-1, "end-of-sequence or beginning-of-sequence token")
    if found is None:
        return
    at = f" at character {found[0]}" if found[0] >= 0 else ""
    prefix = f"data.path: {where}: " if where else ""
    field = fields[index] if fields is not None else f"messages[{index}].content"
    raise ConfigError(f"{prefix}{field} holds the tokenizer's {found[1]}{at}; the sequence would end or restart "
                      "there without a word: remove it from the data")


def render(messages: Sequence[Message], tokenizer: Tokenizer, max_tokens: int | None = None, *, where: str = "",
           fields: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of a conversation and a bool mask of the answer tokens (each assistant content and its EOS).

    With ``max_tokens``, the first that many only: no more text than they need is tokenized, so a long record costs
    the memory of a window. A content that holds one of the template's special tokens is refused (`ConfigError`);
    ``where`` ("file:line") and ``fields`` (each message's field, "messages[1].content" by default) name it."""
    info = chat_template_of(tokenizer)
    if info is not None:
        return _render_own_template(messages, tokenizer, info, max_tokens, where, fields)
    special, texts = _template_tokens(tokenizer)
    limit = max_tokens if max_tokens is not None else float("inf")
    ids: list[int] = [special.bos] if special.bos is not None else []
    answer: list[bool] = [False] * len(ids)
    for index, (role, content) in enumerate(messages):
        if len(ids) >= limit:
            break
        header = tokenizer.encode(HEADERS[role])
        ids += header
        answer += [False] * len(header)
        is_answer = role == "assistant"
        text = content if is_answer else content + TURN_END
        if isinstance(tokenizer, ByteTokenizer) and len(text) > limit - len(ids):
            # Every character is at least one byte, one token: the cut text still fills the window exactly.
            text = text[: max(0, int(limit - len(ids)))]
        piece = tokenizer.encode(text) if text else []
        # The byte tokenizer's ids are the bytes: its text check is exact, and the ids need no second look.
        _refuse_special(content, [] if isinstance(tokenizer, ByteTokenizer) else piece, special, texts, where, fields,
                        index)
        ids += piece
        answer += [is_answer] * len(piece)
        if is_answer:
            ids.append(special.eos)
            answer.append(True)
    end = None if max_tokens is None else max_tokens
    return np.asarray(ids[:end], dtype=np.int64), np.asarray(answer[:end], dtype=bool)


def _refuse_template_specials(messages: Sequence[Message], info: TemplateInfo, where: str = "",
                              fields: Sequence[str] | None = None) -> None:
    """A content that spells one of the tokenizer's special tokens (`<|im_start|>`) would open or end a turn of the
    template there without a word: refused, naming the record and field."""
    for index, (_, content) in enumerate(messages):
        found = next((token for token in info.specials if token in content), None)
        if found is not None:
            prefix = f"data.path: {where}: " if where else ""
            field = fields[index] if fields is not None else f"messages[{index}].content"
            raise ConfigError(f"{prefix}{field} holds the tokenizer's special token {show(found)} at character "
                              f"{content.find(found)}; the template's turns would break there: remove it from the data")


def _render_own_template(
    messages: Sequence[Message], tokenizer: Tokenizer, info: TemplateInfo, max_tokens: int | None, where: str,
    fields: Sequence[str] | None,
) -> tuple[np.ndarray, np.ndarray]:
    """`render` with the tokenizer's own chat template: the whole text tokenized at once (as transformers does),
    the answer mask from the characters of each assistant span."""
    assert isinstance(tokenizer, HFTokenizer)
    _refuse_template_specials(messages, info, where, fields)
    text, spans = assistant_spans(info.template, messages, info.end_of_turn, where)
    encoding = tokenizer.tok.encode(text, add_special_tokens=False)
    ids = np.asarray(encoding.ids, dtype=np.int64)
    starts = np.fromiter((start for start, _ in encoding.offsets), np.int64, len(ids))
    answer = np.zeros(len(ids), dtype=bool)
    for start, end in spans:
        answer |= (starts >= start) & (starts < end)
    return ids[:max_tokens], answer[:max_tokens]


def render_prompt(messages: Sequence[Message], tokenizer: Tokenizer) -> list[int]:
    """Token ids that prompt for the next assistant turn: the conversation so far, then the assistant header (the
    tokenizer's own template with its generation prompt, where it has one)."""
    if messages and messages[-1][0] == "assistant":
        raise ValueError("the conversation already ends with an assistant turn")
    info = chat_template_of(tokenizer)
    if info is not None:
        _refuse_template_specials(messages, info)
        return tokenizer.encode(info.template.render(messages, add_generation_prompt=True))
    ids, _ = render(messages, tokenizer)
    return ids.tolist() + tokenizer.encode(HEADERS["assistant"])


def to_example(ids: np.ndarray, answer: np.ndarray, max_tokens: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(input_ids, labels) for next-token prediction, cut to ``max_tokens`` tokens; None if no answer is left.
    Both are copies: a view would keep the whole rendered record alive."""
    ids, answer = ids[:max_tokens], answer[:max_tokens]
    labels = np.where(answer[1:], ids[1:], IGNORE_INDEX)
    if not (labels != IGNORE_INDEX).any():
        return None
    return ids[:-1].copy(), labels


class SFTExamples(Dataset):
    """Tokenized examples: each item is (input_ids, labels), 1-D int64 of the example's own length."""

    def __init__(self, examples: list[tuple[np.ndarray, np.ndarray]]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        return self.examples[index]


class PadCollate:
    """Right-pads a list of examples to the longest one: (input_ids, labels), each (B, T) int64."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, items: list[tuple[np.ndarray, np.ndarray]]) -> tuple[torch.Tensor, torch.Tensor]:
        length = max(len(ids) for ids, _ in items)
        input_ids = np.full((len(items), length), self.pad_id, dtype=np.int64)  # (B, T)
        labels = np.full((len(items), length), IGNORE_INDEX, dtype=np.int64)  # (B, T)
        for row, (ids, lab) in enumerate(items):
            input_ids[row, : len(ids)] = ids
            labels[row, : len(lab)] = lab
        return torch.from_numpy(input_ids), torch.from_numpy(labels)


def tokenize_records(
    records: Iterable[Sequence[Message] | SFTRecord], tokenizer: Tokenizer, seq_len: int
) -> tuple[list[tuple[np.ndarray, np.ndarray]], int, int]:
    """Examples of at most ``seq_len`` inputs; also the counts of examples cut short and dropped (no answer left).
    An `SFTRecord` names its file, line and field in the errors of `render`."""
    examples, cut, dropped = [], 0, 0
    for record in records:
        messages, where, fields = record if isinstance(record, SFTRecord) else (record, "", None)
        ids, answer = render(messages, tokenizer, seq_len + 2, where=where, fields=fields)  # one more: cut or not
        cut += len(ids) > seq_len + 1
        example = to_example(ids, answer, seq_len + 1)
        if example is None:
            dropped += 1
        else:
            examples.append(example)
    return examples, cut, dropped


# ------------------------------------------------------------------------------------------------ data module
@register_data_module("sft")
def val_split(n: int, seed: int, val_fraction: float) -> tuple[np.ndarray, int]:
    """The seeded order of ``n`` records and how many of its first go to validation (at least one); a fraction that
    leaves no record for training is refused."""
    order = np.random.default_rng(seed).permutation(n)
    num_val = max(1, round(n * val_fraction))
    if num_val >= n:
        raise ConfigError(f"data.val_fraction: {n} records leave none for training at {val_fraction}")
    return order, num_val


def kept(items: list[Any], indices: Any) -> list[Any]:
    """``items`` at ``indices``, leaving out the records tokenization dropped (None)."""
    return [items[i] for i in indices if items[i] is not None]


class SFTDataModule(SectionDataModule):
    """Instruction records -> padded (input_ids, labels) batches, labels `IGNORE_INDEX` outside the answers; with
    `data.packing`, packed (input_ids, labels, document_ids) batches."""

    def __init__(self, data: Any, *, batch_size: int, seed: int = 0, run_dir: str = "") -> None:
        super().__init__(data, batch_size=batch_size, seed=seed, run_dir=run_dir)
        self.tokenizer: Tokenizer = self._tokenizer()
        self.train_set: SFTExamples | PackedExamples | None = None
        self.val_set: SFTExamples | PackedExamples | None = None
        self.packing = bool(getattr(data, "packing", False))  # rows of several examples, document ids per token
        self._told_template = False

    def _tokenizer(self) -> Tokenizer:
        spec = self.data.tokenizer
        if spec == "bpe":
            raise ConfigError("data.tokenizer: sft does not train a BPE tokenizer; use 'byte' or a tokenizer.json")
        return ByteTokenizer() if spec == "byte" else HFTokenizer.from_file(spec)

    def save_tokenizer(self, directory: str | os.PathLike) -> None:
        copy_tokenizer(self.tokenizer, directory)

    def records(self) -> list[SFTRecord]:
        """The user's records (`data.path`), or the generated demo set."""
        d = self.data
        if d.path:
            return read_located_records(d.path, d.max_file_bytes, max_record_bytes(d.seq_len))
        demo = demo_records(d.num_samples, self.seed)
        return [parse_located_record(r, f"demo record {i}") for i, r in enumerate(demo)]

    def setup(self, stage: str = "fit") -> None:
        d = self.data
        records = self.records()
        order, num_val = val_split(len(records), self.seed, d.val_fraction)
        # Tokenized in file order, so that the first bad record of the file is the one reported.
        examples, cut, dropped = [], 0, 0
        for record in records:
            example, was_cut, was_dropped = tokenize_records([record], self.tokenizer, d.seq_len)
            examples.append(example[0] if example else None)
            cut, dropped = cut + was_cut, dropped + was_dropped
        if (cut or dropped) and self.rank == 0:
            log.warning("data: %d of %d records are longer than data.seq_len + 1 = %d tokens and were cut; %d of "
                        "them kept no answer token and were dropped", cut, len(records), d.seq_len + 1, dropped)
        val_examples, train_examples = kept(examples, order[:num_val]), kept(examples, order[num_val:])
        if self.packing:  # packed once, before sharding: every rank and world size sees the same rows
            self.train_set = PackedExamples(train_examples, d.seq_len)
            self.val_set = PackedExamples(val_examples, d.seq_len)
            if self.rank == 0:
                log.info("data: packed %d training examples into %d rows of %d tokens (%.1f%% filled)",
                         len(train_examples), len(self.train_set), d.seq_len, 100 * self.train_set.fill())
        else:
            self.train_set, self.val_set = SFTExamples(train_examples), SFTExamples(val_examples)
        global_batch = self.batch_size * self.world_size
        if len(self.train_set) < global_batch:
            what = "packed rows" if self.packing else "training examples"
            raise ConfigError(
                f"training.batch_size: {len(self.train_set)} {what} are fewer than one global batch "
                f"({global_batch}); use more records or a smaller batch"
            )
        if not len(self.val_set):
            raise ConfigError("data.seq_len: no validation example keeps an answer token; raise data.seq_len")

    def _collate(self) -> PadCollate | PackCollate:
        pad = SpecialTokens.of(self.tokenizer).eos
        return PackCollate(pad, IGNORE_INDEX, self.data.seq_len) if self.packing else PadCollate(pad)

    def train_dataloader(self) -> Iterable[Any]:
        assert self.train_set is not None, "call setup() first"
        if self.rank == 0 and not self._told_template:  # once training starts: a refused run stays one line
            log.info("data: sft renders conversations with %s", template_name(self.tokenizer))
            self._told_template = True
        return self.make_loader(self.train_set, self.batch_size, train=True, collate_fn=self._collate())

    def val_dataloader(self) -> Iterable[Any] | None:
        assert self.val_set is not None, "call setup() first"
        return self.make_loader(self.val_set, self.batch_size, train=False, collate_fn=self._collate())
