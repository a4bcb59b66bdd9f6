"""Token cache, sources, split and windows of `llm.data.text` on tiny corpora (each test well under a second)."""

from __future__ import annotations

import json
import os
import socket
import time

import numpy as np
import pytest
import torch

from llm.data import text as text_mod
from llm.data.text import TextDataModule, cache_root
from llm.errors import ConfigError
from llm.training.core.config import Config

CORPUS = [
    "def add(a, b):\n    return a + b\n" * 6,
    "class Point:\n    x: int = 0\n    y: int = 0\n" * 5,
    "Grüße aus Köln — 東京 🚀 naïve café\n" * 4,
    "import os\nprint(os.getcwd())\n" * 8,
]


pytestmark = pytest.mark.usefixtures("own_cache")  # each test its own token cache (tmp_path/cache)


def write_corpus(root, docs=CORPUS):
    root.mkdir(parents=True, exist_ok=True)
    for i, doc in enumerate(docs):
        (root / f"doc{i}.txt").write_text(doc, encoding="utf-8")
    return root


def make_config(path, **data) -> Config:
    config = Config(task="lm")
    config.data.path = str(path)
    config.data.seq_len = data.pop("seq_len", 16)
    config.data.val_fraction = data.pop("val_fraction", 0.2)
    for key, value in data.items():
        setattr(config.data, key, value)
    config.training.batch_size = 2
    return config


def setup_dm(config, rank=0, world_size=1) -> TextDataModule:
    dm = TextDataModule(config.data, batch_size=config.training.batch_size, seed=config.seed,
                        run_dir=config.logging.log_dir)
    dm.rank, dm.world_size = rank, world_size
    dm.prepare_data()
    dm.setup()
    return dm


def all_tokens(dm) -> np.ndarray:
    return np.asarray(dm.store.tokens())


# ------------------------------------------------------------------------------------------------------ the cache
def test_corpus_is_tokenized_once_and_reused(tmp_path, monkeypatch):
    config = make_config(write_corpus(tmp_path / "corpus"))
    first = setup_dm(config)
    tokens_file = first.cache_path / "tokens-00000-00000.bin"
    mtime = tokens_file.stat().st_mtime_ns
    assert first.cache_path.parent.parent == cache_root()

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("the corpus was tokenized again")

    monkeypatch.setattr(text_mod, "_write_cache", no_tokenizing)
    second = setup_dm(config)
    assert second.cache_path == first.cache_path
    assert tokens_file.stat().st_mtime_ns == mtime
    np.testing.assert_array_equal(all_tokens(second), all_tokens(first))
    # No temporary directory is left behind by the atomic write.
    assert [p.name for p in first.cache_path.parent.iterdir()] == [first.cache_path.name]


def test_changed_source_gets_a_new_cache(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    first = setup_dm(make_config(corpus))
    (corpus / "doc0.txt").write_text(CORPUS[0] + "# more\n", encoding="utf-8")
    second = setup_dm(make_config(corpus))
    assert second.cache_path != first.cache_path
    assert second.store.num_tokens == first.store.num_tokens + len("# more\n")


def test_byte_cache_holds_the_documents_with_separators(tmp_path):
    dm = setup_dm(make_config(write_corpus(tmp_path / "corpus")))
    expected = b"".join(doc.encode("utf-8") + b"\0" for doc in CORPUS)
    assert all_tokens(dm).tobytes() == expected
    assert dm.train_tokens_per_byte == pytest.approx(1.0)
    assert dm.val_tokens_per_byte == pytest.approx(1.0)


def test_bpe_tokenizer_is_trained_cached_copied_and_round_trips(tmp_path):
    config = make_config(write_corpus(tmp_path / "corpus"), tokenizer="bpe", vocab_size=300)
    config.logging.log_dir = str(tmp_path / "run")
    os.makedirs(config.logging.log_dir)
    dm = setup_dm(config)
    tok = dm.tokenizer
    assert 257 <= tok.vocab_size <= 300 and tok.eos_id is not None
    for text in [*CORPUS, "unseen: ∮ E⋅da = Q, ✓ \t\n  spaces  "]:
        assert tok.decode(tok.encode(text)) == text
    assert (dm.cache_path / "tokenizer.json").is_file()
    assert not (tmp_path / "run" / "tokenizer.json").exists()  # set-up writes nothing into the run directory
    dm.save_tokenizer(tmp_path / "run")  # the engine's call once the run starts
    assert (tmp_path / "run" / "tokenizer.json").is_file()  # the run is self-contained
    # BPE merges make fewer tokens than bytes; bpb accounting knows by how much.
    assert dm.store.num_tokens < sum(len(d.encode()) + 1 for d in CORPUS)
    assert 0 < dm.train_tokens_per_byte < 1


def test_tokenizer_json_by_path_is_used_and_copied(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    trained = setup_dm(make_config(corpus, tokenizer="bpe", vocab_size=280)).tokenizer
    trained.save(tmp_path)
    config = make_config(corpus, tokenizer=str(tmp_path / "tokenizer.json"))
    config.logging.log_dir = str(tmp_path / "run")
    dm = setup_dm(config)
    assert dm.tokenizer.fingerprint == trained.fingerprint
    dm.save_tokenizer(tmp_path / "run")
    assert (tmp_path / "run" / "tokenizer.json").read_text() == (tmp_path / "tokenizer.json").read_text()


def test_embedded_corpus_respects_max_bytes(tmp_path):
    config = make_config("", max_bytes=20_000, seq_len=32)
    dm = setup_dm(config)
    meta = json.loads((dm.cache_path / "index-00000-of-00001.json").read_text())
    assert meta["num_bytes"] - meta["num_docs"] <= 20_000  # separators are not part of the cap
    assert meta["num_tokens"] >= 19_000
    assert b"import" in all_tokens(dm).tobytes()


# ---------------------------------------------------------------------------------------------- split and windows
def window_starts(dataset) -> np.ndarray:
    return dataset.start + dataset.phase + np.arange(len(dataset)) * dataset.seq_len


def test_train_and_validation_windows_never_overlap(tmp_path):
    dm = setup_dm(make_config(write_corpus(tmp_path / "corpus"), seq_len=8))
    train, val = dm.train_set, dm.val_set
    tokens = all_tokens(dm)
    for epoch in range(6):  # every epoch cuts at another phase
        train.set_epoch(epoch)
        last_train_token = window_starts(train).max() + train.seq_len
        assert last_train_token < val.start
    assert window_starts(val).min() == val.start and window_starts(val).max() + val.seq_len < len(tokens)
    x, y = train[3]
    start = window_starts(train)[3]
    np.testing.assert_array_equal(x.numpy(), tokens[start : start + 8])
    np.testing.assert_array_equal(y.numpy(), tokens[start + 1 : start + 9])


def test_split_lands_on_a_document_boundary(tmp_path):
    dm = setup_dm(make_config(write_corpus(tmp_path / "corpus"), val_fraction=0.25))
    # A boundary lies within 25% of the requested size, so no document is cut in two.
    assert dm.val_set.start in dm.store.doc_ends[:-1]
    assert abs(dm.store.num_tokens - dm.val_set.start - 0.25 * dm.store.num_tokens) <= 0.25 * 0.25 * dm.store.num_tokens


def test_random_sampling_changes_the_phase_per_epoch_sequential_does_not(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    dm = setup_dm(make_config(corpus, seq_len=8))
    phases = set()
    for epoch in range(8):
        dm.train_set.set_epoch(epoch)
        phases.add(dm.train_set.phase)
    assert len(phases) > 1
    seq = setup_dm(make_config(corpus, seq_len=8, sampling="sequential"))
    first = [x for x, _ in seq.train_dataloader()]
    seq.set_epoch(1)
    again = [x for x, _ in seq.train_dataloader()]
    assert all((a == b).all() for a, b in zip(first, again))
    assert (first[0][0].numpy() == all_tokens(seq)[:8]).all()


def test_loader_resumes_exactly_from_its_position(tmp_path):
    dm = setup_dm(make_config(write_corpus(tmp_path / "corpus"), seq_len=8))
    dm.set_epoch(2)
    full = [x for x, _ in dm.train_dataloader()]
    resumed = TextDataModule(dm.data, batch_size=dm.batch_size, seed=dm.seed)
    resumed.load_state_dict({"epoch": 2, "batch": 3})
    resumed.setup()
    rest = [x for x, _ in resumed.train_dataloader()]
    assert len(rest) == len(full) - 3
    assert all((a == b).all() for a, b in zip(full[3:], rest))


def test_ranks_get_disjoint_windows(tmp_path):
    config = make_config(write_corpus(tmp_path / "corpus"), seq_len=8)
    seen = []
    for rank in range(2):
        dm = setup_dm(config, rank=rank, world_size=2)
        seen.append({i for batch in dm.train_dataloader().batch_sampler for i in batch})
    assert seen[0] and seen[1] and not seen[0] & seen[1]


def test_batches_are_int64_input_target_pairs(tmp_path):
    dm = setup_dm(make_config(write_corpus(tmp_path / "corpus"), seq_len=8))
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == y.shape == (2, 8) and x.dtype == y.dtype == torch.int64
    assert (x[:, 1:] == y[:, :-1]).all()
    xv, yv = next(iter(dm.val_dataloader()))
    assert xv.shape[1] == 8


# -------------------------------------------------------------------------------------------------------- sources
def test_jsonl_directory_and_glob_sources(tmp_path):
    records = [{"text": "first record\n"}, {"text": "second: ünïcode\n"}, {"text": ""}, {"text": "third\n" * 40}]
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in records) + "\n\n", encoding="utf-8")
    dm = setup_dm(make_config(jsonl, seq_len=4, val_fraction=0.3))
    expected = b"".join(r["text"].encode() + b"\0" for r in records if r["text"])
    assert all_tokens(dm).tobytes() == expected

    corpus = write_corpus(tmp_path / "dir")
    (corpus / "sub").mkdir()
    (corpus / "sub" / "nested.md").write_text("# nested\n" * 10, encoding="utf-8")
    (corpus / ".hidden").write_text("skipped", encoding="utf-8")
    by_dir = setup_dm(make_config(corpus))
    assert by_dir.store.doc_ends.shape[0] == len(CORPUS) + 1
    assert b"skipped" not in all_tokens(by_dir).tobytes()

    by_glob = setup_dm(make_config(str(corpus / "doc*.txt")))
    assert all_tokens(by_glob).tobytes() == b"".join(d.encode() + b"\0" for d in CORPUS)


def write_bin(path, ids, dtype, sidecar=None):
    np.asarray(ids, dtype=dtype).tofile(path)
    if sidecar is not None:
        path.with_suffix(".json").write_text(json.dumps(sidecar))
    return path


def test_pretokenized_bin_with_and_without_sidecar(tmp_path):
    ids = np.arange(400) % 256
    plain = setup_dm(make_config(write_bin(tmp_path / "plain.bin", ids, np.uint16)))
    np.testing.assert_array_equal(all_tokens(plain), ids)
    assert plain.cache_path is None  # read in place
    side = write_bin(tmp_path / "side.bin", ids, np.uint32, {"dtype": "uint32", "num_bytes": 800})
    dm = setup_dm(make_config(side))
    np.testing.assert_array_equal(all_tokens(dm), ids)
    assert dm.val_tokens_per_byte == pytest.approx(0.5)


# --------------------------------------------------------------------------------------------------------- errors
def expect_error(config, *fragments):
    with pytest.raises(ConfigError) as info:
        setup_dm(config)
    message = str(info.value)
    assert message.startswith("data.") and "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_missing_and_empty_paths_are_clear_errors(tmp_path):
    expect_error(make_config(tmp_path / "nope.txt"), "nope.txt", "no such file")
    (tmp_path / "empty_dir").mkdir()
    expect_error(make_config(tmp_path / "empty_dir"), "holds no files")
    expect_error(make_config(str(tmp_path / "*.none")), "matched no files")
    (tmp_path / "empty.txt").write_text("")
    expect_error(make_config(tmp_path / "empty.txt"), "holds no text")


def test_unreadable_files_are_clear_errors(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    (corpus / "zz.bin.txt").write_bytes(b"ok\xff\xfe\x00binary")
    expect_error(make_config(corpus), "zz.bin.txt", "not UTF-8")
    os.remove(corpus / "zz.bin.txt")
    os.symlink(tmp_path / "gone", corpus / "dangling.txt")
    expect_error(make_config(corpus), "dangling.txt", "cannot read")
    os.remove(corpus / "dangling.txt")
    if os.geteuid() != 0:  # root reads anything
        locked = corpus / "locked.txt"
        locked.write_text("secret")
        locked.chmod(0)
        expect_error(make_config(corpus), "locked.txt", "cannot read")


def test_bad_jsonl_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    expect_error(make_config(bad), "line 2", "'text'")
    bad.write_text('{"text": "ok"}\nnot json\n')
    expect_error(make_config(bad), "line 2", "not JSON")


def test_bin_with_the_wrong_dtype_is_a_clear_error(tmp_path):
    odd = write_bin(tmp_path / "odd.bin", np.arange(101) % 200, np.uint8)
    expect_error(make_config(odd), "not a multiple of 2", "uint16")
    # uint16 data declared as uint32: pairs of ids fuse into huge ids.
    fused = write_bin(tmp_path / "fused.bin", np.arange(400) % 200 + 1, np.uint16, {"dtype": "uint32"})
    expect_error(make_config(fused), "uint32", "outside the tokenizer's 256 ids")
    mismatch = write_bin(tmp_path / "mm.bin", np.arange(400) % 200, np.uint16, {"dtype": "uint16", "vocab_size": 50257})
    expect_error(make_config(mismatch), "tokenizer/vocab mismatch")


def test_corpus_too_small_for_one_batch_is_a_clear_error(tmp_path):
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("x" * 40)
    expect_error(make_config(tiny, seq_len=16), "fewer than one global batch")


# ------------------------------------------------------------------------------------- a cache that does not check out
INDEX = "index-00000-of-00001.json"


def _truncate_tokens(cache):
    with open(cache / "tokens-00000-00000.bin", "r+b") as f:
        f.truncate(10)


def _garbage_meta(cache):
    (cache / INDEX).write_text("{not json")


def _other_key(cache):
    meta = json.loads((cache / INDEX).read_text())
    (cache / INDEX).write_text(json.dumps({**meta, "key": "0" * 20}))


def _drop_docs(cache):
    os.remove(cache / "docs-00000-00000.npy")


def _wrong_count(cache):
    meta = json.loads((cache / INDEX).read_text())
    meta["shards"][0]["tokens"] += 7
    (cache / INDEX).write_text(json.dumps(meta))


def _drop_index(cache):
    os.remove(cache / INDEX)


@pytest.mark.parametrize("spoil", [_truncate_tokens, _garbage_meta, _other_key, _drop_docs, _wrong_count, _drop_index])
def test_a_damaged_cache_is_rebuilt_with_a_warning(tmp_path, spoil, caplog):
    config = make_config(write_corpus(tmp_path / "corpus"))
    first = setup_dm(config)
    expected = all_tokens(first).copy()
    spoil(first.cache_path)
    with caplog.at_level("WARNING", logger="llm"):
        again = setup_dm(config)
    assert again.cache_path == first.cache_path
    np.testing.assert_array_equal(all_tokens(again), expected)
    assert any("damaged" in r.getMessage() and "rebuilding" in r.getMessage() for r in caplog.records)
    assert [p.name for p in again.cache_path.parent.iterdir()] == [again.cache_path.name]  # nothing left aside


def _leave_temporary(parent, name, pid, host=None, age_s=0.0):
    tmp = parent / name
    tmp.mkdir(parents=True)
    (tmp / "tokens.bin").write_bytes(b"\0" * 8)
    (tmp / "owner.json").write_text(json.dumps({"host": host or socket.gethostname(), "pid": pid}))
    if age_s:
        old = time.time() - age_s
        for path in (tmp / "tokens.bin", tmp / "owner.json", tmp):
            os.utime(path, (old, old))
    return tmp


def test_temporaries_of_killed_preparations_are_removed_live_ones_kept(tmp_path):
    parent = cache_root() / "tokens"
    dead = os.fork()
    if dead == 0:
        os._exit(0)
    os.waitpid(dead, 0)  # a pid that surely no longer runs
    killed = _leave_temporary(parent, ".abc.tmp-11111111", dead)
    live = _leave_temporary(parent, ".abc.tmp-22222222", os.getpid())
    elsewhere = _leave_temporary(parent, ".abc.tmp-33333333", dead, host="another-host")
    abandoned = _leave_temporary(parent, ".abc.tmp-44444444", os.getpid(), host="another-host", age_s=2 * 86400)
    aside = parent / ".abc.stale-55555555"
    aside.mkdir()
    dm = setup_dm(make_config(write_corpus(tmp_path / "corpus")))
    assert not killed.exists() and not abandoned.exists() and not aside.exists()
    assert live.exists() and elsewhere.exists()  # a live preparation here, or one on another host sharing the cache
    assert dm.store.num_tokens > 0


def test_special_files_and_the_size_cap_in_a_corpus(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    os.mkfifo(corpus / "pipe.txt")
    expect_error(make_config(corpus), "pipe.txt", "not a regular file (a FIFO)")
    os.remove(corpus / "pipe.txt")
    expect_error(make_config(corpus, max_file_bytes=20), "over data.max_file_bytes=20")
    expect_error(make_config("/dev/zero"), "a character device")
    fifo_bin = tmp_path / "pipe.bin"
    os.mkfifo(fifo_bin)
    expect_error(make_config(fifo_bin), "pipe.bin", "a FIFO")
    side = write_bin(tmp_path / "side.bin", np.arange(400) % 256, np.uint16)
    os.mkfifo(side.with_suffix(".json"))  # a FIFO sidecar would block the read forever
    expect_error(make_config(side), "side.json", "a FIFO")


def test_validation_bytes_are_the_split_texts_own_when_the_split_cuts_a_document(tmp_path):
    """One document whose tail packs far more bytes per token than its head (issue 22): the validation split's
    tokens per byte is its own text's, not the document's average."""
    rng = np.random.default_rng(0)
    head = "".join(f"{w} " for w in rng.integers(0, 10**6, 1500).tolist())  # digits: few merges
    tail = "東京タワー東京タワー " * 250  # repeated multi-byte words: long merged tokens
    root = tmp_path / "corpus"
    root.mkdir()
    (root / "one.txt").write_text(head + tail, encoding="utf-8")
    dm = setup_dm(make_config(root, tokenizer="bpe", vocab_size=400, val_fraction=0.1))
    split = dm.val_set.start
    tokens = all_tokens(dm)
    assert len(dm.store.seg_ends) == 1  # one segment: the split cuts it
    val_ids = tokens[split:].tolist()
    true_bytes = len(dm.tokenizer.decode(val_ids).encode("utf-8")) - len("<|endoftext|>") + 1  # separator: 1 byte
    assert dm.tokenizer.decode(val_ids[-1:]) == "<|endoftext|>"
    assert dm.val_tokens_per_byte == pytest.approx(len(val_ids) / true_bytes, rel=1e-9)
    pro_rata = len(val_ids) / dm.store.bytes_between(split, len(tokens))
    assert dm.val_tokens_per_byte < 0.5 * pro_rata  # what the pro-rata count reported: far too many tokens per byte
    train_bytes = len(dm.tokenizer.decode(tokens[:split].tolist()).encode("utf-8"))
    assert dm.train_tokens_per_byte == pytest.approx(split / train_bytes, rel=1e-9)


def test_byte_level_token_lengths_match_decoding(tmp_path):
    from llm.data.bytecount import token_byte_lengths
    from llm.data.tokenizers import ByteTokenizer, HFTokenizer

    assert token_byte_lengths(ByteTokenizer()).tolist() == [1] * ByteTokenizer().vocab_size
    tok = HFTokenizer.train_bpe(CORPUS * 3, 320)
    lengths = token_byte_lengths(tok)
    for text in CORPUS:
        ids = tok.encode(text)
        assert int(lengths[ids].sum()) == len(text.encode("utf-8"))
    assert lengths[tok.eos_id] == 1
