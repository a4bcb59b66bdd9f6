"""Tokenizers for the `lm` task: raw bytes, or any Hugging Face `tokenizers` model (trained BPE or a file).

Every tokenizer has the same small surface: `vocab_size`, `eos_id` (the document separator, or None),
`encode`/`encode_batch`, `decode`, `fingerprint` (part of the token-cache key) and `save(directory)`.

Notable choices:
- The byte tokenizer has exactly 256 ids (one per byte), so loss in nats / ln 2 is bits per byte. Byte 0
  (NUL, which never occurs in text) doubles as its document separator: the model learns where files end and
  generation can stop there.
- Trained BPE is byte-level (GPT-2 style), so every string round-trips exactly, with one special token,
  `<|endoftext|>`, as the separator.
- A tokenizer.json of a Hugging Face model folder brings its files along (`TokenizerFiles`): the beginning-,
  end-of-sequence and padding tokens of its `tokenizer_config.json` (or `special_tokens_map.json`), the ids of its
  `generation_config.json` and `config.json` where the tokenizer names none, and its `chat_template`
  (`tokenizer_config.json`, or a `chat_template.jinja` file, which wins as in transformers). A bare tokenizer.json
  (one we trained, say) has none of them: its separator is the first of a few well-known names present.
- `StreamDecoder` turns token ids into text as they arrive, holding back bytes of a character that is not
  complete yet, so a streaming CLI never prints a replacement character for half of a UTF-8 sequence.
"""

from __future__ import annotations

import codecs
import hashlib
import itertools
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llm import fs, untrusted
from llm.errors import ConfigError

TOKENIZER_FILE = "tokenizer.json"
EOS_TOKEN = "<|endoftext|>"
# Names a separator token goes by in common tokenizer.json files; the first one present is used, for a bare
# tokenizer.json only (one with no tokenizer_config.json, generation_config.json or config.json to name it).
_EOS_CANDIDATES = (EOS_TOKEN, "</s>", "<eos>", "<|end_of_text|>", "<|eot_id|>", "[SEP]")
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
GENERATION_CONFIG = "generation_config.json"
MODEL_CONFIG = "config.json"
_MAX_META_BYTES = 16 << 20  # a tokenizer's side file larger than this is not one (templates are kilobytes)


def _read_json(path: Path) -> dict[str, Any] | None:
    """A side file's JSON object (None when nothing is at its name), read as untrusted input (`llm.untrusted`: a
    regular file only, capped, plain JSON); anything else there is a one-line `ConfigError`."""
    if not untrusted.exists(path):
        return None
    try:
        value = untrusted.read_json(path, _MAX_META_BYTES)
    except untrusted.UntrustedFileError as exc:
        raise ConfigError(f"data.tokenizer: {exc}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"data.tokenizer: {str(path)!r} must hold a JSON object")
    return value


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, an AddedToken object ({"content": ...}) or
    null."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _ids(value: Any) -> tuple[int, ...]:
    """An id field of a (generation) config: an int, a list of them, or null."""
    values = value if isinstance(value, list) else [value]
    return tuple(v for v in values if isinstance(v, int) and not isinstance(v, bool) and v >= 0)


@dataclass(frozen=True)
class TokenizerFiles:
    """What the files beside a tokenizer.json say about it (see the module docstring); ids not yet checked against
    the vocabulary (`HFTokenizer` does that)."""

    tokens: dict[str, str | None] = field(default_factory=dict)  # bos_token/eos_token/pad_token: the tokenizer's
    ids: dict[str, tuple[int, ...]] = field(default_factory=dict)  # bos/eos/pad_token_id: generation_config/config
    chat_template: str | None = None
    config: dict[str, Any] = field(default_factory=dict)  # tokenizer_config.json as read, for the export

    @classmethod
    def read(cls, directory: str | os.PathLike) -> TokenizerFiles | None:
        """The side files of ``directory``; None when it holds none of them (a bare tokenizer.json)."""
        d = Path(directory)
        config = _read_json(d / TOKENIZER_CONFIG)
        special_map = _read_json(d / SPECIAL_TOKENS_MAP)
        generation, model = _read_json(d / GENERATION_CONFIG), _read_json(d / MODEL_CONFIG)
        jinja = d / CHAT_TEMPLATE_FILE
        has_jinja = untrusted.exists(jinja)
        if config is None and special_map is None and generation is None and model is None and not has_jinja:
            return None
        tokens = {}
        for name in ("bos_token", "eos_token", "pad_token"):
            source = config if config is not None and name in config else special_map or {}
            tokens[name] = _token_text(source.get(name))
        ids = {}
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            # generation_config.json lists every id that ends a turn (Qwen: <|im_end|> and <|endoftext|>).
            ids[name] = _ids((generation or {}).get(name)) or _ids((model or {}).get(name))
        template = (config or {}).get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        if has_jinja:  # transformers lets the file win over tokenizer_config.json's template
            try:
                template = untrusted.read_capped(jinja, _MAX_META_BYTES).decode("utf-8")
            except untrusted.UntrustedFileError as exc:
                raise ConfigError(f"data.tokenizer: {exc}") from None
            except UnicodeDecodeError as exc:
                raise ConfigError(f"data.tokenizer: {str(jinja)!r} is not UTF-8 text (byte {exc.start})") from None
        return cls(tokens, ids, template if isinstance(template, str) and template else None, dict(config or {}))


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

    def __init__(self, tokenizer: object, source: str = "", files: TokenizerFiles | None = None) -> None:
        self.tok = tokenizer
        self.source = source
        self.files = files
        self.vocab_size: int = self.tok.get_vocab_size(with_added_tokens=True)
        guessed = next((i for i in (self.tok.token_to_id(n) for n in _EOS_CANDIDATES) if i is not None), None)
        self.bos_id: int | None = self._special("bos", None)
        self.eos_id: int | None = self._special("eos", guessed)
        self.pad_id: int | None = self._special("pad", None)
        self.fingerprint = "hf-" + hashlib.sha256(self.tok.to_str().encode("utf-8")).hexdigest()[:16]
        if self.eos_id != guessed:  # the separator is part of a token cache: another one is another cache
            self.fingerprint += f"-eos{self.eos_id}"

    def _special(self, kind: str, default: int | None) -> int | None:
        """The id of the ``kind`` (bos/eos/pad) token the tokenizer's files name: its token, else the first id of
        generation_config.json / config.json; ``default`` for a bare tokenizer.json. A name the vocabulary lacks
        is refused: a guess would be a wrong token."""
        if self.files is None:
            return default
        token = self.files.tokens.get(f"{kind}_token")
        if token is not None:
            found = self.tok.token_to_id(token)
            if found is None:
                raise ConfigError(f"data.tokenizer: {self.source!r}: its {kind}_token {token!r} is not in the "
                                  "vocabulary")
            return found
        ids = [i for i in self.files.ids.get(f"{kind}_token_id", ()) if i < self.vocab_size]
        return ids[0] if ids else None

    @property
    def chat_template(self) -> str | None:
        """The template source of the tokenizer's files (None: the built-in SFT template is used)."""
        return self.files.chat_template if self.files is not None else None

    def token_text(self, token_id: int | None) -> str | None:
        """The text of a special token id (None for None)."""
        return None if token_id is None else self.tok.id_to_token(token_id)

    def stop_ids(self) -> list[int]:
        """Ids that end a generated turn: the eos id and every eos id of generation_config.json / config.json."""
        ids = [self.eos_id] if self.eos_id is not None else []
        if self.files is not None:
            ids += [i for i in self.files.ids.get("eos_token_id", ()) if i < self.vocab_size and i not in ids]
        return ids

    @classmethod
    def from_file(cls, path: str | os.PathLike, field: str = "data.tokenizer") -> HFTokenizer:
        from tokenizers import Tokenizer

        if not os.path.isfile(path):
            raise ConfigError(f"{field}: tokenizer file not found: {str(path)!r}")
        files = TokenizerFiles.read(Path(path).parent)
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as exc:  # the Rust side raises a bare Exception on malformed files
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(f"{field}: {str(path)!r} is not a valid tokenizer.json: {first}") from None
        return cls(tok, source=str(path), files=files)

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
        self.save_files(directory)

    def save_files(self, directory: str | os.PathLike) -> None:
        """The side files as a run keeps them: tokenizer_config.json (the chat template inlined) and a
        generation_config.json of the resolved ids, so that the run's tokenizer reads back the same tokens."""
        if self.files is None:
            return
        config = {**self.files.config, **self.files.tokens}
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        ids = {"bos_token_id": self.bos_id, "eos_token_id": self.stop_ids() or None, "pad_token_id": self.pad_id}
        for name, value in ((TOKENIZER_CONFIG, config), (GENERATION_CONFIG, ids)):
            fs.atomic_write(Path(directory) / name, (json.dumps(value, indent=2, ensure_ascii=False) + "\n").encode())


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
            tokenizer.save_files(directory)
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
