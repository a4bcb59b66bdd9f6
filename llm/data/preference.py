"""Preference data: (prompt, chosen, rejected) records, the demo set, and batches of token-aligned pairs.

Records (`data.path`: a JSONL file, a directory or a glob of them; one JSON object per line, blank lines skipped):

    {"prompt": "12+7=", "chosen": "19", "rejected": "18"}
    {"prompt": [{"role": "system", "content": "Be exact."}, {"role": "user", "content": "12+7="}],
     "chosen": [{"role": "assistant", "content": "19"}], "rejected": [{"role": "assistant", "content": "18"}]}

A string prompt is the chat [user: prompt]; a message prompt is any conversation (roles system, user, assistant)
that does not end with an assistant turn; a completion is a string or a list of one assistant message. Other keys
are ignored (data sets carry scores and ids). Each side is rendered exactly as the `sft` task renders a chat
(`llm.data.sft.render`: the tokenizer's own chat template, else the built-in one), so a model fine-tuned with `sft`
sees the text it was trained on. Reading is `llm.data.sft_records`' (lines split at "\\n" only, a size cap per
record, bad JSON, a key given twice or a lone surrogate refused): every bad record is one `ConfigError` naming its
file:line and field, and a run refuses it before any work (exit status 2).

Tokens: a side is (input_ids, labels) for next-token prediction, labels `IGNORE_INDEX` everywhere but the final
answer (its content and the end-of-turn token): a completion's log-prob is the sum over exactly its own tokens,
the prompt masked (earlier assistant turns of a message prompt are prompt, too). A side longer than
`data.seq_len + 1` tokens is cut to it; a pair either of whose completions is cut away entirely is dropped, both
counted in a warning.

Batches: `(input_ids, labels)`, each (B, 2, T) int64 with the chosen side at [:, 0] and the rejected at [:, 1],
right-padded to the longest side of the batch (pad labels ignored); with reference log-probs attached to the data
set (`PreferencePairs.set_reference`, the task's `--training-dpo-precompute-ref`) a third tensor `ref_logps` (B, 2)
float32 follows. The engine counts B pairs as B samples.

Without `data.path` the module generates `data.num_samples` demo records (`demo_records`): additions of two small
numbers, chosen the sum and rejected a near miss, in both formats, seeded; so `python -m llm.training.train --task
dpo` runs without a download. Records are split by a seeded shuffle (`data.val_fraction`), as sft's.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

from llm.data.sft import IGNORE_INDEX, SFTDataModule, SpecialTokens, kept, render, to_example, val_split
from llm.data.sft_records import (
    ROLES,
    Message,
    _check_text,
    _describe,
    _lines,
    _load_line,
    max_record_bytes,
)
from llm.data.sources import resolve_files
from llm.data.tokenizers import Tokenizer
from llm.errors import ConfigError, shorten
from llm.registry import register_data_module

log = logging.getLogger("llm")

KEYS = ("prompt", "chosen", "rejected")
Pair = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # chosen (ids, labels), rejected (ids, labels)


# --------------------------------------------------------------------------------------------------- records
class PreferenceRecord(NamedTuple):
    """A checked record: the prompt's messages, both completions, where it was read ("file:line") and the field
    each prompt message came from ("prompt", "prompt[1].content"), for the errors of what only rendering refuses."""

    prompt: list[Message]
    chosen: str
    rejected: str
    where: str
    fields: tuple[str, ...]


def _prompt(value: Any, where: str) -> tuple[list[Message], tuple[str, ...]]:
    if isinstance(value, str):
        return [("user", _check_text(value, where, "prompt"))], ("prompt",)
    if not isinstance(value, list) or not value:
        raise ConfigError(f"data.path: {where}: 'prompt' must be a string or a non-empty list of messages, got "
                          f"{_describe(value)}")
    messages, fields = [], []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise ConfigError(f"data.path: {where}: prompt[{i}] must be an object with 'role' and 'content', got "
                              f"{_describe(message)}")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or role not in ROLES:
            raise ConfigError(f"data.path: {where}: prompt[{i}] needs a role in {ROLES}, got {_describe(role)}")
        if not isinstance(content, str):
            raise ConfigError(f"data.path: {where}: prompt[{i}] needs a string 'content', got {_describe(content)}")
        field = f"prompt[{i}].content"
        messages.append((role, _check_text(content, where, field)))
        fields.append(field)
    if messages[-1][0] == "assistant":
        raise ConfigError(f"data.path: {where}: the prompt ends with an assistant turn; the completions answer it, "
                          "so it must end with a user (or system) turn")
    return messages, tuple(fields)


def _completion(value: Any, key: str, where: str) -> str:
    if isinstance(value, str):
        return _check_text(value, where, key)
    if (isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict)
            and value[0].get("role") == "assistant" and isinstance(value[0].get("content"), str)):
        return _check_text(value[0]["content"], where, f"{key}[0].content")
    raise ConfigError(f"data.path: {where}: {key!r} must be a string or a list of one assistant message "
                      f"({{\"role\": \"assistant\", \"content\": ...}}), got {_describe(value)}")


def parse_preference_record(obj: Any, where: str) -> PreferenceRecord:
    """A record (one parsed JSON line) checked; ``where`` ("file:line") prefixes the one-line error of a bad one."""
    if not isinstance(obj, dict):
        raise ConfigError(f"data.path: {where}: expected a JSON object, got {_describe(obj)}")
    missing = [key for key in KEYS if key not in obj]
    if missing:
        keys = shorten(", ".join(sorted(map(str, obj)))) or "none"
        raise ConfigError(f"data.path: {where}: a preference record needs 'prompt', 'chosen' and 'rejected'; "
                          f"missing {', '.join(map(repr, missing))} (found keys: {keys})")
    prompt, fields = _prompt(obj["prompt"], where)
    return PreferenceRecord(prompt, _completion(obj["chosen"], "chosen", where),
                            _completion(obj["rejected"], "rejected", where), where, fields)


def read_preference_records(path: str, max_file_bytes: int = 0, max_line: int = 1 << 20) -> list[PreferenceRecord]:
    """Every record of the JSONL file(s) ``path`` names (file, directory or glob), in file and line order."""
    records = []
    for source in resolve_files(path, max_file_bytes=max_file_bytes):
        for number, line in _lines(source, max_file_bytes, max_line):
            where = f"{source.path}:{number}"
            records.append(parse_preference_record(_load_line(line, where), where))
    if not records:
        raise ConfigError(f"data.path: {path!r} holds no records")
    return records


# ------------------------------------------------------------------------------------------------- demo set
def demo_records(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` seeded records "a+b=" (2 <= a <= 9, b <= 9): chosen the sum, rejected the classic slip of writing the
    operands side by side ("4+8=" -> "48" instead of "12"); a third of them in the chat-message format (rendered to
    the same tokens). (With a = 1 a slip "1b" would begin as the sums from 10 up do, which a from-scratch demo
    model confuses for a few dozen steps.)"""
    rng = random.Random(seed)
    records: list[dict[str, Any]] = []
    for _ in range(n):
        a, b = rng.randrange(2, 10), rng.randrange(10)
        prompt, right, wrong = f"{a}+{b}=", str(a + b), f"{a}{b}"
        if rng.randrange(3):
            records.append({"prompt": prompt, "chosen": right, "rejected": wrong})
        else:
            records.append({"prompt": [{"role": "user", "content": prompt}],
                            "chosen": [{"role": "assistant", "content": right}],
                            "rejected": [{"role": "assistant", "content": wrong}]})
    return records


# ---------------------------------------------------------------------------------------------------- tokens
def _final_answer(answer: np.ndarray, turns: int) -> np.ndarray | None:
    """The mask of the ``turns``-th answer run of ``answer`` (the completion; earlier runs are the prompt's own
    assistant turns), or None when the cut left fewer runs (the completion was cut away)."""
    starts = np.flatnonzero(answer & ~np.concatenate(([False], answer[:-1])))
    if len(starts) < turns:
        return None
    mask = np.zeros_like(answer)
    mask[starts[turns - 1]:] = answer[starts[turns - 1]:]
    return mask


def encode_side(record: PreferenceRecord, completion: str, field: str, tokenizer: Tokenizer,
                seq_len: int) -> tuple[tuple[np.ndarray, np.ndarray] | None, bool]:
    """(input_ids, labels) of the prompt followed by ``completion`` (None: no completion token left) and whether
    the side was cut to ``seq_len + 1`` tokens."""
    messages = [*record.prompt, ("assistant", completion)]
    ids, answer = render(messages, tokenizer, seq_len + 2, where=record.where, fields=(*record.fields, field))
    turns = sum(role == "assistant" for role, _ in messages)
    mask = _final_answer(answer, turns)
    return (None if mask is None else to_example(ids, mask, seq_len + 1)), len(ids) > seq_len + 1


def encode_pair(record: PreferenceRecord, tokenizer: Tokenizer, seq_len: int) -> tuple[Pair | None, bool]:
    """Both sides of a record (None: a completion was cut away) and whether either was cut."""
    chosen, cut_chosen = encode_side(record, record.chosen, "chosen", tokenizer, seq_len)
    rejected, cut_rejected = encode_side(record, record.rejected, "rejected", tokenizer, seq_len)
    pair = None if chosen is None or rejected is None else (*chosen, *rejected)
    return pair, cut_chosen or cut_rejected


class PreferencePairs(Dataset):
    """Tokenized pairs; each item is (chosen ids, chosen labels, rejected ids, rejected labels), plus the pair's
    reference log-probs (a float32 array of 2) once `set_reference` attached them."""

    def __init__(self, pairs: list[Pair]) -> None:
        self.pairs = pairs
        self.reference: np.ndarray | None = None  # (N, 2) float32

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[np.ndarray, ...]:
        if self.reference is None:
            return self.pairs[index]
        return (*self.pairs[index], self.reference[index])

    def set_reference(self, logps: np.ndarray) -> None:
        """Attach the reference model's summed log-probs of each pair's (chosen, rejected) completion: (N, 2)."""
        logps = np.asarray(logps, dtype=np.float32)
        if logps.shape != (len(self.pairs), 2):
            raise ValueError(f"expected reference log-probs of shape ({len(self.pairs)}, 2), got {logps.shape}")
        self.reference = logps


class PairCollate:
    """Right-pads both sides of every pair to the longest one: input_ids and labels (B, 2, T) int64, and the
    reference log-probs (B, 2) float32 when the items carry them."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, items: Sequence[tuple[np.ndarray, ...]]) -> tuple[torch.Tensor, ...]:
        length = max(max(len(item[0]), len(item[2])) for item in items)
        input_ids = np.full((len(items), 2, length), self.pad_id, dtype=np.int64)  # (B, 2, T)
        labels = np.full((len(items), 2, length), IGNORE_INDEX, dtype=np.int64)  # (B, 2, T)
        for row, item in enumerate(items):
            for side in (0, 1):
                ids, lab = item[2 * side], item[2 * side + 1]
                input_ids[row, side, : len(ids)] = ids
                labels[row, side, : len(lab)] = lab
        batch = (torch.from_numpy(input_ids), torch.from_numpy(labels))
        if len(items[0]) == 5:
            batch += (torch.from_numpy(np.stack([item[4] for item in items])),)  # (B, 2)
        return batch


def tokenize_pairs(records: Iterable[PreferenceRecord], tokenizer: Tokenizer,
                   seq_len: int) -> tuple[list[Pair | None], int, int]:
    """Each record's pair (None where dropped), in record order; and the counts of pairs cut and dropped."""
    pairs, cut, dropped = [], 0, 0
    for record in records:
        pair, was_cut = encode_pair(record, tokenizer, seq_len)
        pairs.append(pair)
        cut, dropped = cut + was_cut, dropped + (pair is None)
    return pairs, cut, dropped


# ------------------------------------------------------------------------------------------------ data module
@register_data_module("preference")
class PreferenceDataModule(SFTDataModule):
    """Preference records -> padded (input_ids, labels[, ref_logps]) batches of (chosen, rejected) pairs. The
    tokenizer, its saving and the loaders are the sft module's."""

    def records(self) -> list[PreferenceRecord]:  # type: ignore[override]
        """The user's records (`data.path`), or the generated demo set."""
        d = self.data
        if d.path:
            return read_preference_records(d.path, d.max_file_bytes, max_record_bytes(d.seq_len))
        return [parse_preference_record(r, f"demo record {i}") for i, r in enumerate(demo_records(d.num_samples,
                                                                                                  self.seed))]

    def setup(self, stage: str = "fit") -> None:
        d = self.data
        records = self.records()
        order, num_val = val_split(len(records), self.seed, d.val_fraction)
        pairs, cut, dropped = tokenize_pairs(records, self.tokenizer, d.seq_len)  # file order: first bad one named
        if (cut or dropped) and self.rank == 0:
            log.warning("data: %d of %d preference pairs have a side longer than data.seq_len + 1 = %d tokens and "
                        "were cut; %d of them lost a whole completion and were dropped", cut, len(records),
                        d.seq_len + 1, dropped)
        val, train = kept(pairs, order[:num_val]), kept(pairs, order[num_val:])
        self.train_set, self.val_set = PreferencePairs(train), PreferencePairs(val)  # type: ignore[assignment]
        global_batch = self.batch_size * self.world_size
        if len(self.train_set) < global_batch:
            raise ConfigError(f"training.batch_size: {len(self.train_set)} training pairs are fewer than one global "
                              f"batch ({global_batch}); use more records or a smaller batch")
        if not len(self.val_set):
            raise ConfigError("data.seq_len: no validation pair keeps both completions; raise data.seq_len")

    def _collate(self) -> PairCollate:  # type: ignore[override]
        return PairCollate(SpecialTokens.of(self.tokenizer).eos)
