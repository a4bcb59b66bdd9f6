"""Sharded preparation: the same batches whatever the sharding and slicing, crash safety, the CLI's errors,
bounded memory through the whole pipeline, and worker processes giving the same tokens as one process."""

from __future__ import annotations

import json
import logging
import os
import tracemalloc

import numpy as np
import pytest

from llm.data import prepare as prepare_mod
from llm.data.encode import Progress
from llm.data.prepare import PrepareOptions, main, prepare
from llm.data.readers import ReadOptions
from llm.data.shards import index_files, open_store, verify_checksums
from llm.data.sources import resolve_files
from llm.data.text import TextDataModule
from llm.errors import ConfigError
from tests.data.test_text import CORPUS, make_config, setup_dm, write_corpus

pytestmark = pytest.mark.usefixtures("own_cache")  # each test its own token cache (tmp_path/cache)


def corpus_files(tmp_path):
    root = write_corpus(tmp_path / "corpus", [d * 3 for d in CORPUS])
    (root / "big.txt").write_text("a long document\n" * 120, encoding="utf-8")
    (root / "recs.jsonl").write_text("".join(json.dumps({"text": f"record {i}\n" * 3}) + "\n" for i in range(30)))
    return root, resolve_files(str(root))


def prepared(tmp_path, name, files, chunk=40, **kw):
    out = tmp_path / name
    num = kw.pop("num_slices", 1)
    for i in range(num):
        prepare(files, out, PrepareOptions(num_slices=num, slice_index=i, read=ReadOptions(chunk_bytes=chunk), **kw))
    return out


def batches(config, epochs=(0, 1), start=None):
    dm = TextDataModule(config.data, batch_size=config.training.batch_size, seed=config.seed)
    if start is not None:
        dm.load_state_dict(start)
    dm.prepare_data()
    dm.setup()
    out = []
    for epoch in epochs:
        if start is None:
            dm.set_epoch(epoch)
        out += [x for x, _ in dm.train_dataloader()]
    return dm, out + [x for x, _ in dm.val_dataloader()]


def test_shards_and_slices_give_exactly_the_batches_of_one_shard(tmp_path):
    root, files = corpus_files(tmp_path)
    one = prepared(tmp_path, "one", files, chunk=1 << 20)
    many = prepared(tmp_path, "many", files, shard_min_tokens=97)  # windows cross shard boundaries
    sliced = prepared(tmp_path, "sliced", files, shard_min_tokens=300, num_slices=3)
    assert len(index_files(sliced)) == 3 and len(open_store(many)[0].paths) > 10
    ref_dm, ref = batches(make_config(one, seq_len=16))
    assert ref_dm.store.tokens().tobytes() == b"".join(d.encode() + b"\0" for d in
                                                       resolve_docs(files))  # the byte tokens are the text
    for out in (many, sliced):
        dm, got = batches(make_config(out, seq_len=16))
        assert dm.val_set.start == ref_dm.val_set.start
        assert dm.train_tokens_per_byte == pytest.approx(ref_dm.train_tokens_per_byte)
        assert len(got) == len(ref) and all((a == b).all() for a, b in zip(got, ref))
        # Resume mid-epoch: the rest of epoch 1 equals the single-shard run's.
        _, rest = batches(make_config(out, seq_len=16), epochs=(1,), start={"epoch": 1, "batch": 2})
        n1 = len(rest) - len([x for x, _ in ref_dm.val_dataloader()])
        assert n1 > 0
        epoch1 = ref[len(ref) - len(rest) - 2: len(ref) - len(rest) + n1]
        assert all((a == b).all() for a, b in zip(rest[:n1], epoch1[2:]))
    assert verify_checksums(many) == []


def resolve_docs(files):
    from llm.data.readers import iter_documents

    return list(iter_documents(files))


def test_a_killed_preparation_leaves_nothing_a_run_would_use(tmp_path, monkeypatch):
    root, files = corpus_files(tmp_path)
    out = tmp_path / "out"
    real_finish, calls = prepare_mod.ShardWriter._finish_shard, []

    def dying_finish(self):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # as a Ctrl-C or a kill lands in the third shard
        return real_finish(self)

    monkeypatch.setattr(prepare_mod.ShardWriter, "_finish_shard", dying_finish)
    with pytest.raises(KeyboardInterrupt):
        prepare(files, out, PrepareOptions(shard_min_tokens=50, read=ReadOptions(chunk_bytes=40)))
    assert "tokens-00000-00001.bin" in os.listdir(out)  # two complete shards, but no index lists them
    assert index_files(out) == [] and not [p for p in os.listdir(out) if ".tmp-" in p]
    with pytest.raises(ConfigError, match="no index"):
        setup_dm(make_config(out))
    # A SIGKILL leaves temporaries behind (no `except` runs): the next preparation of the slice removes them.
    (out / "tokens-00000-00009.bin.tmp-999999").write_bytes(b"half")
    monkeypatch.setattr(prepare_mod.ShardWriter, "_finish_shard", real_finish)
    prepare(files, out, PrepareOptions(shard_min_tokens=50, read=ReadOptions(chunk_bytes=40)))
    assert not [p for p in os.listdir(out) if ".tmp-" in p]
    assert setup_dm(make_config(out)).store.num_tokens > 0


def test_a_missing_or_foreign_slice_is_refused(tmp_path):
    root, files = corpus_files(tmp_path)
    out = tmp_path / "out"
    for i in (0, 2):
        prepare(files, out, PrepareOptions(num_slices=3, slice_index=i))
    with pytest.raises(ConfigError, match=r"missing \[1\]"):
        setup_dm(make_config(out))
    with pytest.raises(ConfigError, match="another preparation"):
        prepare(files[:2], out, PrepareOptions(num_slices=3, slice_index=1))
    with pytest.raises(ConfigError, match="data.tokenizer"):
        prepare(files, out, PrepareOptions(num_slices=3, slice_index=1))
        setup_dm(make_config(out, tokenizer="bpe"))


def test_pipeline_memory_is_bounded(tmp_path):
    """64 MB of text (a sparse file) through read -> encode -> shard: peak traced memory stays a few MB."""
    path = tmp_path / "sparse.txt"
    with open(path, "wb") as f:
        f.truncate(64 << 20)
    files = resolve_files(str(path))
    tracemalloc.start()
    try:
        index = prepare(files, tmp_path / "out", PrepareOptions(read=ReadOptions(chunk_bytes=256 << 10)))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert index["num_tokens"] == (64 << 20) + 1 and len(index["shards"]) == 1
    assert peak < 8 << 20, f"peak {peak / 1e6:.1f} MB"


def test_worker_processes_give_the_tokens_of_one_process(tmp_path):
    root, files = corpus_files(tmp_path)
    tok = tmp_path / "tok"
    assert main([str(root), str(tok), "--tokenizer", "bpe", "--vocab-size", "300", "--tokenizer-only"]) == 0
    spec = str(tok / "tokenizer.json")
    serial = prepared(tmp_path, "serial", files, tokenizer=spec, workers=1)
    pooled = prepared(tmp_path, "pooled", files, tokenizer=spec, workers=2, min_parallel_bytes=0)
    a, b = open_store(serial)[0], open_store(pooled)[0]
    np.testing.assert_array_equal(a.tokens(), b.tokens())
    assert a.seg_bytes.sum() == b.seg_bytes.sum()


def test_cli_prepares_and_the_lm_task_trains_on_it(tmp_path, capsys):
    root, files = corpus_files(tmp_path)
    out = tmp_path / "out"
    assert main([str(root), str(out), "--shard-min-tokens", "500"]) == 0
    assert "tokens in" in capsys.readouterr().out
    assert main([str(root), str(out), "--verify"]) == 0
    dm = setup_dm(make_config(out))
    assert dm.cache_path == out and len(dm.store.paths) > 1


@pytest.mark.parametrize("args, fragment", [
    (["{tmp}/nope", "{tmp}/out"], "SOURCE: invalid value"),
    (["{root}", "{tmp}/out", "--num-shards", "2", "--shard-index", "2"], "--shard-index: invalid value 2"),
    (["{root}", "{tmp}/out", "--num-shards", "2", "--tokenizer", "bpe"], "--tokenizer-only"),
    (["{root}", "{tmp}/out", "--shard-min-tokens", "0"], "--shard-min-tokens: invalid value 0"),
    (["{root}", "{tmp}/out", "--tokenizer", "{tmp}/none.json"], "tokenizer file not found"),
    (["{root}", "{tmp}/out", "--workers", "x"], "--workers"),
    (["{root}", "{root}/doc0.txt"], "OUT:"),
])
def test_cli_bad_inputs_exit_2_with_one_line(tmp_path, capsys, args, fragment):
    root, _ = corpus_files(tmp_path)
    argv = [a.format(tmp=tmp_path, root=root) for a in args]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and fragment in err, err


@pytest.mark.parametrize("kind, why", [("fifo", "is not a regular file (a FIFO)"),
                                       ("directory", "is not a regular file (a directory)")])
def test_a_slice_lock_that_is_no_lock_file_is_one_line_and_left_alone(tmp_path, capsys, kind, why):
    """Read as the run lock is (llm/pidlock.py): a FIFO is never opened (that would hang), nothing is removed."""
    root, _ = corpus_files(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    lock = out / ".prepare-00000.lock"
    if kind == "fifo":
        os.mkfifo(lock)
    else:
        lock.mkdir()
    assert main([str(root), str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: OUT: its lock {str(lock)!r} {why}, not a lock file a preparation writes; remove it if no " \
        "preparation is using the directory", err
    assert os.listdir(out) == [lock.name]


def test_progress_logs_rates_and_eta_without_a_terminal(caplog):
    progress = Progress(1000, "data: tokenizing", every_s=0.0, bar=False)
    with caplog.at_level(logging.INFO, logger="llm"):
        progress.update(250, 100)
    line = caplog.records[-1].getMessage()
    assert "25%" in line and "MB/s" in line and "tokens/s" in line and "ETA" in line
