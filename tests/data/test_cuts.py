"""BPE ids do not depend on how a document was cut: not on `--chunk-bytes`, not on `--num-shards`, not for the
BPE a preparation trains (its sample is cut the same way), and at a safe point they equal the ids of the whole
document (`llm/data/cuts.py`)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from llm.data import cuts
from llm.data import prepare as prepare_mod
from llm.data.cuts import CutRule, cut_rule, recut
from llm.data.prepare import PrepareOptions, main, prepare
from llm.data.readers import Piece, ReadOptions
from llm.data.shards import open_store
from llm.data.sources import resolve_files
from llm.data.tokenizers import ByteTokenizer, HFTokenizer

pytestmark = pytest.mark.usefixtures("own_cache")

WORDS = ["the", "tokenizer", "cut", "naïve", "中文", "don't", "x", "42", "3.14159", "éé", "🙂", "(a)", "--", "foo_bar",
         "if", "return", "Ünïcode", "'s", "''", "1234567"]
SPACES = [" ", " ", " ", "  ", "\n", "\n", "\n\n", "\t", "\r\n", " \n", ".\n", ",\n  ", "\n\n\n"]


def random_text(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(WORDS) + rng.choice(SPACES) for _ in range(n))


def write_corpus(root, seed=0):
    rng = random.Random(seed)
    root.mkdir()
    for i in range(3):
        (root / f"t{i}.txt").write_text(random_text(rng, 700), encoding="utf-8")
    records = [{"text": random_text(rng, rng.choice([3, 300]))} for _ in range(12)]
    (root / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return root


@pytest.fixture
def corpus_and_bpe(tmp_path):
    root = write_corpus(tmp_path / "corpus")
    argv = [str(root), str(tmp_path / "tok"), "--tokenizer", "bpe", "--vocab-size", "400", "--tokenizer-only"]
    assert main(argv) == 0
    return root, str(tmp_path / "tok" / "tokenizer.json")


def token_stream(tmp_path, root, tokenizer, chunk, slices, name):
    out = tmp_path / name
    files = resolve_files(str(root))
    for i in range(slices):
        prepare(files, out, PrepareOptions(tokenizer=tokenizer, num_slices=slices, slice_index=i,
                                           read=ReadOptions(chunk_bytes=chunk)))
    store = open_store(out)[0]
    return store.tokens().copy(), store.seg_bytes.sum()


@pytest.mark.parametrize("forced", [None, 300])  # no forced cut in these documents, and many
def test_ids_do_not_depend_on_chunk_bytes_or_num_shards(tmp_path, corpus_and_bpe, monkeypatch, forced):
    root, tok = corpus_and_bpe
    if forced:
        monkeypatch.setattr(cuts, "FORCED_CUT_BYTES", forced)
    ref, ref_bytes = token_stream(tmp_path, root, tok, 1 << 20, 1, "ref")
    for chunk, slices in [(16, 1), (37, 1), (64, 2), (113, 3), (1 << 20, 4), (16, 5)]:
        got, nbytes = token_stream(tmp_path, root, tok, chunk, slices, f"c{chunk}-s{slices}")
        np.testing.assert_array_equal(got, ref, err_msg=f"--chunk-bytes {chunk} --num-shards {slices}")
        assert nbytes == ref_bytes


def test_without_the_recut_the_ids_would_depend_on_the_chunks(tmp_path, corpus_and_bpe, monkeypatch):
    """The check above can fail: with pieces encoded as the readers cut them, the streams differ."""
    root, tok = corpus_and_bpe
    monkeypatch.setattr(prepare_mod, "recut", lambda pieces, rule: pieces)
    a, _ = token_stream(tmp_path, root, tok, 1 << 20, 1, "a")
    b, _ = token_stream(tmp_path, root, tok, 37, 1, "b")
    assert len(a) != len(b) or (a != b).any()


def test_without_forced_cuts_the_ids_are_the_whole_documents(tmp_path, corpus_and_bpe):
    root, tok = corpus_and_bpe
    tokenizer = HFTokenizer.from_file(tok)
    got, _ = token_stream(tmp_path, root, tok, 16, 3, "small")
    from llm.data.readers import iter_documents

    whole = [i for doc in iter_documents(resolve_files(str(root))) for i in tokenizer.encode(doc) + [tokenizer.eos_id]]
    np.testing.assert_array_equal(got, whole)


def test_a_trained_bpe_does_not_depend_on_chunk_bytes(tmp_path):
    root = write_corpus(tmp_path / "corpus", seed=1)
    prints = set()
    for chunk in (16, 53, 1 << 20):
        out = tmp_path / f"o{chunk}"
        argv = [str(root), str(out), "--tokenizer", "bpe", "--vocab-size", "350", "--chunk-bytes", str(chunk)]
        assert main(argv) == 0
        prints.add(HFTokenizer.from_file(out / "tokenizer.json").fingerprint)
    assert len(prints) == 1


@pytest.mark.parametrize("pattern", [cuts.GPT2_PATTERN, cuts.CL100K_PATTERN, cuts.QWEN2_PATTERN])
def test_every_safe_point_is_safe_for_the_accepted_pre_tokenizers(pattern):
    """Encoding the two sides of any safe point apart gives the whole text's ids, for each accepted regex."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    rng = random.Random(3)
    tok.train_from_iterator([random_text(rng, 300) for _ in range(5)], trainers.BpeTrainer(
        vocab_size=500, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    wrapped = HFTokenizer(tok)
    assert cut_rule(wrapped) is CutRule.SAFE_POINTS
    text = random_text(rng, 800)
    data = text.encode()
    whole = tok.encode(text, add_special_tokens=False).ids
    points = [m.end() for m in cuts._SAFE.finditer(data)]
    assert len(points) > 20
    for at in points[:80]:
        left, right = data[:at].decode(), data[at:].decode()
        assert tok.encode(left).ids + tok.encode(right).ids == whole, repr(data[at - 5: at + 5])


def test_cut_rules_by_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    assert cut_rule(ByteTokenizer()) is CutRule.ANYWHERE
    trained = HFTokenizer.train_bpe(["some text\nto train on\n"] * 3, 300)
    assert cut_rule(trained) is CutRule.SAFE_POINTS
    sentencepiece_like = Tokenizer(models.BPE())
    sentencepiece_like.pre_tokenizer = pre_tokenizers.Metaspace()  # prepends "▁" to every piece: never safe
    assert cut_rule(HFTokenizer(sentencepiece_like)) is CutRule.FORCED_ONLY
    stripping = Tokenizer(models.BPE())
    stripping.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    stripping.normalizer = normalizers.Strip()  # strips each piece's ends
    assert cut_rule(HFTokenizer(stripping)) is CutRule.FORCED_ONLY
    newline_token = HFTokenizer.train_bpe(["a\nb"], 300)
    newline_token.tok.add_tokens(["x\ny"])
    assert cut_rule(HFTokenizer(newline_token.tok)) is CutRule.FORCED_ONLY


def test_recut_is_a_function_of_the_text(monkeypatch):
    """The pieces recut gives, joined per document, are the documents; and where it cuts does not depend on the
    pieces it was given (forced cuts included)."""
    rng = random.Random(5)
    docs = [random_text(rng, 200).encode() for _ in range(3)] + [b"x" * 1000]  # the last: no safe point at all

    def pieces(size):
        for doc in docs:
            for i in range(0, len(doc), size):
                yield Piece(doc[i: i + size], i + size >= len(doc))

    def cut_set(rule, size):
        out, pos, ends = [], 0, []
        for p in recut(pieces(size), rule, limit=97):
            pos += len(p.data)
            out.append(pos)
            ends.append(p.end)
        assert sum(ends) == len(docs)
        return out

    for rule in (CutRule.SAFE_POINTS, CutRule.FORCED_ONLY):
        joined = b"".join(p.data for p in recut(pieces(10), rule, limit=97))
        assert joined == b"".join(docs)
        forced = set(cut_set(rule, 10_000))  # whole documents in: only forced cuts and documents' ends
        for size in (7, 16, 50):
            assert forced <= set(cut_set(rule, size))
        if rule is CutRule.FORCED_ONLY:  # no safe point: a cut at least every 97 bytes
            assert all(b - a <= 97 for a, b in zip([0] + sorted(forced), sorted(forced)))
