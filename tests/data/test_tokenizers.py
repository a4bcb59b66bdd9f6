"""Tokenizers: byte and BPE round trips, streaming decode of partial UTF-8, vocabulary resolution, errors."""

from __future__ import annotations

import pytest

from llm.data.tokenizers import (
    ByteTokenizer,
    HFTokenizer,
    StreamDecoder,
    load_tokenizer,
    resolve_vocab_size,
)
from llm.errors import ConfigError

TEXTS = ["def f(x):\n    return x * 2\n", "naïve café — 東京 🚀", "tabs\tand  spaces  \n\n"]


@pytest.fixture(scope="module")
def bpe() -> HFTokenizer:
    return HFTokenizer.train_bpe(TEXTS * 20, vocab_size=290)


def test_byte_tokenizer_round_trips_and_has_256_ids():
    tok = ByteTokenizer()
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text
        assert tok.encode_array(text).tolist() == tok.encode(text)
    assert tok.vocab_size == 256 and tok.eos_id == 0


def test_bpe_round_trips_unseen_text(bpe):
    assert bpe.vocab_size <= 290 and bpe.eos_id == bpe.tok.token_to_id("<|endoftext|>")
    for text in [*TEXTS, "completely ünseen ⟨text⟩ with émojis 🙂 and\r\nCRLF"]:
        assert bpe.decode(bpe.encode(text)) == text
    assert len(bpe.encode(TEXTS[0])) < len(TEXTS[0].encode())


@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_stream_decoder_never_emits_half_a_character(kind, bpe):
    tok = ByteTokenizer() if kind == "byte" else bpe
    text = "é€🚀 ok 東京"
    decoder = StreamDecoder(tok)
    pieces = [decoder.feed(i) for i in tok.encode(text)] + [decoder.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    if kind == "byte":
        assert pieces[0] == ""  # the first byte of 'é' alone is not a character yet


def test_stream_decoder_flushes_an_incomplete_tail_as_replacement():
    decoder = StreamDecoder(ByteTokenizer())
    assert decoder.feed(0xE2) == "" and decoder.feed(0x82) == ""
    assert decoder.flush() == "\ufffd"


def test_vocab_resolution_and_loading(tmp_path, bpe):
    bpe.save(tmp_path)
    assert resolve_vocab_size("byte", 4096) == 256
    assert resolve_vocab_size("bpe", 4096) == 4096
    assert resolve_vocab_size(str(tmp_path / "tokenizer.json"), 4096) == bpe.vocab_size
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)
    assert load_tokenizer("bpe", [tmp_path / "elsewhere", tmp_path]).fingerprint == bpe.fingerprint
    with pytest.raises(ConfigError, match="needs a tokenizer.json"):
        load_tokenizer("bpe", [tmp_path / "elsewhere"])


def test_bad_tokenizer_files_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        HFTokenizer.from_file(tmp_path / "missing.json")
    broken = tmp_path / "broken.json"
    broken.write_text("{not a tokenizer")
    with pytest.raises(ConfigError, match="not a valid tokenizer.json"):
        HFTokenizer.from_file(broken)
