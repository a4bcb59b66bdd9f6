"""The UTF-8 bytes each split of a token store stands for, exactly: what bits per byte divides by.

The index of a prepared directory records the bytes of every segment (a document, or its part in one shard). A
split point inside a segment used to count that segment's bytes pro rata to its tokens, which is wrong wherever
the text's bytes per token change along the document (a file of one document whose tail is another script or
language: 3.75 bits per byte reported for 6.03 true). Here the part of the cut segment on the validation side is
counted from its own tokens: each token id's byte length, read from the tokenizer (the byte tokenizer: 1;
byte-level BPE: one byte per character of the token's byte-level spelling; the document separator counts 1 byte,
as preparation counts it). A tokenizer without byte-level tokens (e.g. a SentencePiece tokenizer.json) has its
tokens decoded in chunks instead. The training side of the cut segment is the segment's recorded bytes less that
(pro rata only when the segment's bytes are an estimate that the exact part exceeds, a `.bin` without a sidecar).
A `.bin` whose sidecar declares `num_bytes` keeps that declaration, pro rata.
"""

from __future__ import annotations

import json
from functools import lru_cache

import numpy as np

from llm.data.shards import TokenStore
from llm.data.tokenizers import ByteTokenizer, HFTokenizer, Tokenizer

_CHUNK = 1 << 22  # tokens counted at a time: bounded memory for a long cut segment


def token_byte_lengths(tokenizer: Tokenizer) -> np.ndarray | None:
    """UTF-8 bytes of each token id (int64, one per id), or None where a token's bytes are not its own."""
    if isinstance(tokenizer, ByteTokenizer):
        return np.ones(tokenizer.vocab_size, np.int64)
    if isinstance(tokenizer, HFTokenizer):
        return _byte_level_lengths(tokenizer.tok.to_str())
    return None


@lru_cache(maxsize=4)
def _byte_level_lengths(spec: str) -> np.ndarray | None:
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import pre_tokenizers

    if '"ByteLevel"' not in json.dumps(json.loads(spec).get("decoder")):
        return None
    tok = RustTokenizer.from_str(spec)
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())  # the 256 characters that spell the 256 bytes
    added = tok.get_added_tokens_decoder()
    lengths = np.zeros(tok.get_vocab_size(with_added_tokens=True), np.int64)
    for i in range(len(lengths)):
        if i in added:  # a special token (the separator) stands for a boundary: 1 byte, as preparation counts it
            token = added[i]
            lengths[i] = 1 if token.special else len(token.content.encode("utf-8"))
            continue
        spelling = tok.id_to_token(i)
        if spelling is None:
            continue  # a hole in the vocabulary: never produced
        if not set(spelling) <= alphabet:
            return None  # not a byte-level vocabulary after all
        lengths[i] = len(spelling)
    return lengths


def range_bytes(store: TokenStore, start: int, stop: int, tokenizer: Tokenizer) -> int:
    """UTF-8 bytes of the tokens [start, stop) of `store`, counted token by token."""
    table = token_byte_lengths(tokenizer)
    total = 0
    for a in range(start, stop, _CHUNK):
        ids = store.gather(np.arange(a, min(stop, a + _CHUNK), dtype=np.int64))
        if table is not None:
            total += int(table[np.minimum(ids.astype(np.int64), len(table) - 1)].sum())
        else:
            total += len(tokenizer.decode(ids.tolist()).encode("utf-8"))
    return total


def split_bytes(store: TokenStore, split: int, tokenizer: Tokenizer | None) -> tuple[float, float]:
    """(bytes of the tokens [0, split), bytes of [split, end)): whole segments from the index, the one segment the
    split cuts from its tokens (pro rata without a `tokenizer`: a `.bin` whose sidecar declares its bytes)."""
    ends = store.seg_ends
    starts = np.concatenate([[0], ends[:-1]])
    cut = np.flatnonzero((starts < split) & (ends > split))
    if tokenizer is None or not len(cut):  # the split is at a segment boundary: the index is exact
        return store.bytes_between(0, split), store.bytes_between(split, 2**62)
    i = int(cut[0])
    before, after = float(store.seg_bytes[:i].sum()), float(store.seg_bytes[i + 1:].sum())
    val_part = range_bytes(store, split, int(ends[i]), tokenizer)
    whole = float(store.seg_bytes[i])
    train_part = whole - val_part
    if train_part <= 0:  # the segment's bytes were estimated (a .bin) and the estimate was short
        train_part = whole * (split - int(starts[i])) / max(1, int(ends[i] - starts[i]))
    return before + train_part, val_part + after
