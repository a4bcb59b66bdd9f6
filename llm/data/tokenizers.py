"""Tokenizers for the `lm` task: raw bytes, or any Hugging Face `tokenizers` model (trained BPE or a file).

Every tokenizer has the same small surface: `vocab_size`, `eos_id` (the document separator, or None),
`encode`/`encode_batch`, `decode`, `fingerprint` (part of the token-cache key) and `save(directory)`.

Notable choices:
- The byte tokenizer has exactly 256 ids (one per byte), so loss in nats / ln 2 is bits per byte. Byte 0
  (NUL, which never occurs in text) doubles as its document separator: the model learns where files end and
  generation can stop there.
- Trained BPE is byte-level (GPT-2 style), so every string round-trips exactly, with one special token,
  `<|endoftext|>`, as the separator.
- `StreamDecoder` turns token ids into text as they arrive, holding back bytes of a character that is not
  complete yet, so a streaming CLI never prints a replacement character for half of a UTF-8 sequence.
"""

from __future__ import annotations

import codecs
import hashlib
import itertools
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from llm import fs
from llm.errors import ConfigError

TOKENIZER_FILE = "tokenizer.json"
EOS_TOKEN = "<|endoftext|>"
# Names a separator token goes by in common tokenizer.json files; the first one present is used.
_EOS_CANDIDATES = (EOS_TOKEN, "</s>", "<eos>", "<|end_of_text|>", "<|eot_id|>", "[SEP]")


class ByteTokenizer:
    """UTF-8 bytes as tokens: 256 ids, nothing to train; byte 0 separates documents."""

    name = "byte"
    vocab_size = 256
    eos_id: int | None = 0
    fingerprint = "byte-v1"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_array(self, text: str) -> np.ndarray:
        """The fast path the token cache uses: no Python list in between."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [self.encode_array(t) for t in texts]

    def encode_pieces(self, pieces: list[bytes], dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
        """UTF-8 byte strings -> (their ids concatenated, each one's id count): the bytes themselves."""
        return np.frombuffer(b"".join(pieces), dtype=np.uint8), np.fromiter(map(len, pieces), np.int64, len(pieces))

    def worker_spec(self) -> tuple[str, str]:
        """What a preparation worker process rebuilds this tokenizer from (`from_worker_spec`)."""
        return ("byte", "")

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def save(self, directory: str | os.PathLike) -> None:
        """Nothing to save: `data.tokenizer: byte` in the run's config.yaml is enough to rebuild it."""


class HFTokenizer:
    """A Hugging Face `tokenizers.Tokenizer` (loaded from tokenizer.json or trained as byte-level BPE)."""

    name = "hf"

    def __init__(self, tokenizer: object, source: str = "") -> None:
        self.tok = tokenizer
        self.source = source
        self.vocab_size: int = self.tok.get_vocab_size(with_added_tokens=True)
        self.eos_id: int | None = next(
            (i for i in (self.tok.token_to_id(n) for n in _EOS_CANDIDATES) if i is not None), None
        )
        self.fingerprint = "hf-" + hashlib.sha256(self.tok.to_str().encode("utf-8")).hexdigest()[:16]

    @classmethod
    def from_file(cls, path: str | os.PathLike, field: str = "data.tokenizer") -> HFTokenizer:
        from tokenizers import Tokenizer

        if not os.path.isfile(path):
            raise ConfigError(f"{field}: tokenizer file not found: {str(path)!r}")
        try:
            return cls(Tokenizer.from_file(str(path)), source=str(path))
        except Exception as exc:  # the Rust side raises a bare Exception on malformed files
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(f"{field}: {str(path)!r} is not a valid tokenizer.json: {first}") from None

    @classmethod
    def train_bpe(cls, texts: Iterable[str], vocab_size: int) -> HFTokenizer:
        """Train byte-level BPE with `vocab_size` ids (256 bytes + merges + the separator)."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        # add_prefix_space=False keeps encode(decode(x)) == x exactly (GPT-2 style byte-level BPE).
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOS_TOKEN],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok, source="bpe")

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        # encode_batch runs in parallel in Rust; that is where the time of a BPE token cache goes.
        encodings = self.tok.encode_batch(texts, add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int64) for e in encodings]

    def encode_pieces(self, pieces: list[bytes], dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
        """UTF-8 byte strings -> (their ids concatenated as `dtype`, each one's id count).

        `encode_batch_fast` (tokenizers >= 0.20) skips the character offsets nobody here reads; the ids come
        back as Python lists, which one `np.fromiter` over the chained lists turns into a single array.
        """
        texts = [p.decode("utf-8") for p in pieces]
        encode = getattr(self.tok, "encode_batch_fast", self.tok.encode_batch)
        ids = [e.ids for e in encode(texts, add_special_tokens=False)]
        lengths = np.fromiter(map(len, ids), np.int64, len(ids))
        flat = np.fromiter(itertools.chain.from_iterable(ids), dtype, int(lengths.sum()))
        return flat, lengths

    def worker_spec(self) -> tuple[str, str]:
        """What a preparation worker process rebuilds this tokenizer from (`from_worker_spec`)."""
        return ("hf", self.tok.to_str())

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def save(self, directory: str | os.PathLike) -> None:
        with fs.atomic_path(Path(directory) / TOKENIZER_FILE) as tmp:  # never through a link at the name
            self.tok.save(str(tmp))


Tokenizer = ByteTokenizer | HFTokenizer


def from_worker_spec(spec: tuple[str, str]) -> Tokenizer:
    """Rebuild a tokenizer in a worker process from its `worker_spec()` (a name, or a tokenizer.json string)."""
    kind, payload = spec
    if kind == "byte":
        return ByteTokenizer()
    from tokenizers import Tokenizer as RustTokenizer

    return HFTokenizer(RustTokenizer.from_str(payload), source="worker")


def resolve_vocab_size(tokenizer_spec: str, bpe_vocab_size: int) -> int:
    """The vocabulary a tokenizer spec will have, without reading the corpus (for model sizing)."""
    if tokenizer_spec == "byte":
        return ByteTokenizer.vocab_size
    if tokenizer_spec == "bpe":
        # A small corpus may stop BPE short of this size; the spare rows of the embedding are harmless.
        return bpe_vocab_size
    return HFTokenizer.from_file(tokenizer_spec).vocab_size


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte: what the `tokenizers` ByteLevel pre-tokenizer and decoder use."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def byte_level_tokenizer() -> Any:  # a tokenizers.Tokenizer (imported lazily)
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


def load_tokenizer(spec: str, search_dirs: Iterable[str | os.PathLike] = ()) -> Tokenizer:
    """Rebuild a run's tokenizer: `byte`, or a tokenizer.json found in `search_dirs`, or `spec` as a path."""
    if spec == "byte":
        return ByteTokenizer()
    for directory in search_dirs:
        candidate = Path(directory) / TOKENIZER_FILE
        if candidate.is_file():
            return HFTokenizer.from_file(candidate)
    if spec != "bpe" and os.path.isfile(spec):
        return HFTokenizer.from_file(spec)
    where = ", ".join(str(d) for d in search_dirs) or "(nowhere)"
    raise ConfigError(f"data.tokenizer: {spec!r} needs a {TOKENIZER_FILE}, found none in {where}")


def copy_tokenizer(tokenizer: Tokenizer, directory: str | os.PathLike) -> None:
    """Put the tokenizer next to a run's weights so the run directory is self-contained."""
    if isinstance(tokenizer, ByteTokenizer):
        return
    Path(directory).mkdir(parents=True, exist_ok=True)
    target = Path(directory) / TOKENIZER_FILE
    if tokenizer.source and os.path.isfile(tokenizer.source):
        if target.is_symlink() or not target.exists() or not os.path.samefile(tokenizer.source, target):
            with fs.atomic_path(target) as tmp:  # replaces the file (or a link at its name), never its target
                shutil.copyfile(tokenizer.source, tmp)
    else:
        tokenizer.save(directory)


class StreamDecoder:
    """Incremental detokenizer: `feed(token_id)` returns the text that became final with this token.

    Subword tokens are decoded with one token of left context (the "prefix/read offset" scheme), because
    decoders such as SentencePiece's drop a leading space at the start of a sequence; output is held back
    while it ends in a replacement character, i.e. in the middle of a UTF-8 sequence.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._bytes = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._ids: list[int] = []
        self._prefix = 0  # start of the context window
        self._read = 0  # end of what was already returned

    def feed(self, token_id: int) -> str:
        if isinstance(self.tokenizer, ByteTokenizer):
            return self._bytes.decode(bytes([int(token_id)]))
        self._ids.append(int(token_id))
        done = self.tokenizer.decode(self._ids[self._prefix : self._read])
        text = self.tokenizer.decode(self._ids[self._prefix :])
        if len(text) <= len(done) or text.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(done) :]

    def flush(self) -> str:
        if isinstance(self.tokenizer, ByteTokenizer):
            return self._bytes.decode(b"", final=True)
        done = self.tokenizer.decode(self._ids[self._prefix : self._read])
        text = self.tokenizer.decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return text[len(done) :]

    def stream(self, ids: Iterable[int]) -> Iterator[str]:
        for i in ids:
            piece = self.feed(i)
            if piece:
                yield piece
        tail = self.flush()
        if tail:
            yield tail


def vocab_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype holding every id of a vocabulary."""
    if vocab_size <= 1 << 8:
        return np.dtype(np.uint8)
    if vocab_size <= 1 << 16:
        return np.dtype(np.uint16)
    return np.dtype(np.uint32)
