"""Supervised fine-tuning data: instruction records rendered with one template, loss on the answers only.

Records (`data.path`: a JSONL file, a directory or a glob of them; one JSON object per line, blank lines skipped):

    {"prompt": "What is 2 + 3?", "response": "5"}
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello."}, ...]}

Roles are system, user and assistant; a record needs at least one assistant message, and a prompt/response record
is the chat [user: prompt, assistant: response]. A record that is not one of these (bad JSON, a missing field, an
unknown role, a non-string content) is a `ConfigError` naming the file and its line.

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

Batching: one example per row, right-padded to the longest row of the batch (pad labels are ignored). Examples are
not packed several to a window: `DecoderModel` takes a key-padding mask and one position vector for the whole
batch, not a block-diagonal mask, so packed examples would attend to each other. Right padding needs no attention
mask: under the causal mask no real token attends to a later pad. An example longer than `data.seq_len + 1`
tokens is cut to that length (its answer may be cut short); one with no answer token left is dropped, both counted
in a warning.

Without `data.path` the module generates a demo set (`demo_records`): `data.num_samples` arithmetic and
string-manipulation instructions with exact answers, seeded, so `python -m llm.training.train --task sft` runs
without a download and its validation loss on answers visibly falls. Records are split into training and
validation by a seeded shuffle (`data.val_fraction`).
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from llm.data.datamodule import SectionDataModule
from llm.data.sources import read_regular, resolve_files
from llm.data.tokenizers import ByteTokenizer, HFTokenizer, Tokenizer, copy_tokenizer
from llm.errors import ConfigError
from llm.registry import register_data_module

log = logging.getLogger("llm")

IGNORE_INDEX = -100  # nn.CrossEntropyLoss's default ignore_index, also linear_cross_entropy's
ROLES = ("system", "user", "assistant")
HEADERS = {"system": "### System:\n", "user": "### User:\n", "assistant": "### Assistant:\n"}
TURN_END = "\n\n"  # after a system or user message; an assistant message ends with EOS instead
# Beginning-of-sequence tokens of common tokenizer.json files; the first one present is used.
_BOS_CANDIDATES = ("<s>", "<|begin_of_text|>", "<|startoftext|>", "<bos>", "[CLS]")

Message = tuple[str, str]  # (role, content)


# --------------------------------------------------------------------------------------------------- records
def parse_record(obj: Any, where: str) -> list[Message]:
    """A record's messages; ``where`` ("file:line") prefixes the one-line error of a malformed record."""
    if not isinstance(obj, dict):
        raise ConfigError(f"data.path: {where}: expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        messages = obj["messages"]
        if not isinstance(messages, list) or not messages:
            raise ConfigError(f"data.path: {where}: 'messages' must be a non-empty list")
        out = []
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or message.get("role") not in ROLES:
                role = message.get("role") if isinstance(message, dict) else message
                raise ConfigError(f"data.path: {where}: messages[{i}] needs a role in {ROLES}, got {role!r}"[:300])
            if not isinstance(message.get("content"), str):
                raise ConfigError(f"data.path: {where}: messages[{i}] needs a string 'content'")
            out.append((message["role"], message["content"]))
        if not any(role == "assistant" for role, _ in out):
            raise ConfigError(f"data.path: {where}: the messages have no assistant turn to learn")
        return out
    if "prompt" in obj or "response" in obj:
        for key in ("prompt", "response"):
            if not isinstance(obj.get(key), str):
                raise ConfigError(f"data.path: {where}: {key!r} must be a string")
        return [("user", obj["prompt"]), ("assistant", obj["response"])]
    keys = ", ".join(sorted(map(str, obj)))[:200]
    raise ConfigError(f"data.path: {where}: expected 'prompt' and 'response', or 'messages'; found keys: {keys}")


def read_records(path: str, max_file_bytes: int = 0) -> list[list[Message]]:
    """Every record of the JSONL file(s) ``path`` names (file, directory or glob), in file and line order."""
    records = []
    for source in resolve_files(path, max_file_bytes=max_file_bytes):
        raw = read_regular(source.path, "data.path", max_file_bytes)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = raw[: exc.start].count(b"\n") + 1
            raise ConfigError(f"data.path: {source.path}:{line}: not UTF-8 text") from None
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            where = f"{source.path}:{number}"
            try:
                obj = json.loads(line)
            except ValueError as exc:
                raise ConfigError(f"data.path: {where}: not valid JSON ({exc.args[0] if exc.args else exc})") from None
            records.append(parse_record(obj, where))
    if not records:
        raise ConfigError(f"data.path: {path!r} holds no records")
    return records


# ------------------------------------------------------------------------------------------------- demo set
_WORDS = (
    "apple", "river", "stone", "cloud", "garden", "planet", "silver", "window", "forest", "candle", "bridge",
    "rocket", "pencil", "orange", "winter", "summer", "dragon", "castle", "butter", "mirror", "thunder", "island",
    "market", "coffee", "basket", "meadow", "violin", "harbor", "tiger", "lemon", "spring", "shadow", "feather",
    "copper", "anchor", "valley", "puzzle", "marble", "breeze", "lantern", "cactus", "rabbit", "honey", "falcon",
    "ocean", "cherry", "jungle", "velvet", "quiet", "bright",
)
_SYSTEM = "You answer with the exact result and nothing else."


def _demo_task(rng: random.Random) -> tuple[str, str]:
    """One instruction and its exact answer."""
    kind = rng.randrange(6)
    a, b = rng.randrange(100), rng.randrange(100)
    word = rng.choice(_WORDS)
    if kind == 0:
        return f"What is {a} + {b}?", str(a + b)
    if kind == 1:
        return f"What is {max(a, b)} - {min(a, b)}?", str(max(a, b) - min(a, b))
    if kind == 2:
        return f"What is {a % 10} * {b}?", str((a % 10) * b)
    if kind == 3:
        return f"Reverse the word '{word}'.", word[::-1]
    if kind == 4:
        words = f"{word} {rng.choice(_WORDS)}"
        return f"Write '{words}' in capital letters.", words.upper()
    return f"Sort the letters of '{word}'.", "".join(sorted(word))


def demo_records(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` seeded instruction records in both formats (prompt/response, and chats, some with a system turn)."""
    rng = random.Random(seed)
    records: list[dict[str, Any]] = []
    for _ in range(n):
        prompt, answer = _demo_task(rng)
        style = rng.randrange(3)
        if style == 0:
            records.append({"prompt": prompt, "response": answer})
        else:
            messages = [{"role": "system", "content": _SYSTEM}] if style == 2 else []
            messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
            records.append({"messages": messages})
    return records


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
        if isinstance(tokenizer, HFTokenizer):
            bos = next((i for i in map(tokenizer.tok.token_to_id, _BOS_CANDIDATES) if i is not None), None)
        return cls(bos, tokenizer.eos_id)


def _segments(messages: Sequence[Message]) -> list[tuple[str, bool]]:
    """The template as (text, is_answer) pieces; each answer's EOS comes after its piece."""
    out: list[tuple[str, bool]] = []
    for role, content in messages:
        out.append((HEADERS[role], False))
        out.append((content, role == "assistant") if role == "assistant" else (content + TURN_END, False))
    return out


def render(messages: Sequence[Message], tokenizer: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of a conversation and a bool mask of the answer tokens (each assistant content and its EOS)."""
    special = SpecialTokens.of(tokenizer)
    ids: list[int] = [special.bos] if special.bos is not None else []
    answer: list[bool] = [False] * len(ids)
    for text, is_answer in _segments(messages):
        piece = tokenizer.encode(text) if text else []
        ids += piece
        answer += [is_answer] * len(piece)
        if is_answer:
            ids.append(special.eos)
            answer.append(True)
    return np.asarray(ids, dtype=np.int64), np.asarray(answer, dtype=bool)


def render_prompt(messages: Sequence[Message], tokenizer: Tokenizer) -> list[int]:
    """Token ids that prompt for the next assistant turn: the conversation so far, then the assistant header."""
    if messages and messages[-1][0] == "assistant":
        raise ValueError("the conversation already ends with an assistant turn")
    ids, _ = render(messages, tokenizer)
    return ids.tolist() + tokenizer.encode(HEADERS["assistant"])


def to_example(ids: np.ndarray, answer: np.ndarray, max_tokens: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(input_ids, labels) for next-token prediction, cut to ``max_tokens`` tokens; None if no answer is left."""
    ids, answer = ids[:max_tokens], answer[:max_tokens]
    labels = np.where(answer[1:], ids[1:], IGNORE_INDEX)
    if not (labels != IGNORE_INDEX).any():
        return None
    return ids[:-1], labels


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
    records: Iterable[Sequence[Message]], tokenizer: Tokenizer, seq_len: int
) -> tuple[list[tuple[np.ndarray, np.ndarray]], int, int]:
    """Examples of at most ``seq_len`` inputs; also the counts of examples cut short and dropped (no answer left)."""
    examples, cut, dropped = [], 0, 0
    for messages in records:
        ids, answer = render(messages, tokenizer)
        cut += len(ids) > seq_len + 1
        example = to_example(ids, answer, seq_len + 1)
        if example is None:
            dropped += 1
        else:
            examples.append(example)
    return examples, cut, dropped


# ------------------------------------------------------------------------------------------------ data module
@register_data_module("sft")
class SFTDataModule(SectionDataModule):
    """Instruction records -> padded (input_ids, labels) batches, labels `IGNORE_INDEX` outside the answers."""

    def __init__(self, data: Any, *, batch_size: int, seed: int = 0, run_dir: str = "") -> None:
        super().__init__(data, batch_size=batch_size, seed=seed, run_dir=run_dir)
        self.tokenizer: Tokenizer = self._tokenizer()
        self.train_set: SFTExamples | None = None
        self.val_set: SFTExamples | None = None

    def _tokenizer(self) -> Tokenizer:
        spec = self.data.tokenizer
        if spec == "bpe":
            raise ConfigError("data.tokenizer: sft does not train a BPE tokenizer; use 'byte' or a tokenizer.json")
        return ByteTokenizer() if spec == "byte" else HFTokenizer.from_file(spec)

    def prepare_data(self) -> None:
        if self.run_dir:  # the run directory rebuilds its tokenizer after the source file is gone
            copy_tokenizer(self.tokenizer, self.run_dir)

    def save_tokenizer(self, directory: str) -> None:
        copy_tokenizer(self.tokenizer, directory)

    def records(self) -> list[list[Message]]:
        """The user's records (`data.path`), or the generated demo set."""
        d = self.data
        if d.path:
            return read_records(d.path, d.max_file_bytes)
        return [parse_record(r, f"demo record {i}") for i, r in enumerate(demo_records(d.num_samples, self.seed))]

    def setup(self, stage: str = "fit") -> None:
        d = self.data
        records = self.records()
        order = np.random.default_rng(self.seed).permutation(len(records))
        num_val = max(1, round(len(records) * d.val_fraction))
        if num_val >= len(records):
            raise ConfigError(f"data.val_fraction: {len(records)} records leave none for training at {d.val_fraction}")
        val, train = [records[i] for i in order[:num_val]], [records[i] for i in order[num_val:]]
        train_examples, cut, dropped = tokenize_records(train, self.tokenizer, d.seq_len)
        val_examples, val_cut, val_dropped = tokenize_records(val, self.tokenizer, d.seq_len)
        cut, dropped = cut + val_cut, dropped + val_dropped
        if (cut or dropped) and self.rank == 0:
            log.warning("data: %d of %d records are longer than data.seq_len + 1 = %d tokens and were cut; %d of "
                        "them kept no answer token and were dropped", cut, len(records), d.seq_len + 1, dropped)
        self.train_set, self.val_set = SFTExamples(train_examples), SFTExamples(val_examples)
        global_batch = self.batch_size * self.world_size
        if len(self.train_set) < global_batch:
            raise ConfigError(
                f"training.batch_size: {len(self.train_set)} training examples are fewer than one global batch "
                f"({global_batch}); use more records or a smaller batch"
            )
        if not len(self.val_set):
            raise ConfigError("data.seq_len: no validation example keeps an answer token; raise data.seq_len")

    def _collate(self) -> PadCollate:
        return PadCollate(SpecialTokens.of(self.tokenizer).eos)

    def train_dataloader(self) -> Iterable[Any]:
        assert self.train_set is not None, "call setup() first"
        return self.make_loader(self.train_set, self.batch_size, train=True, collate_fn=self._collate())

    def val_dataloader(self) -> Iterable[Any] | None:
        assert self.val_set is not None, "call setup() first"
        return self.make_loader(self.val_set, self.batch_size, train=False, collate_fn=self._collate())
