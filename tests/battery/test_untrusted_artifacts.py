"""Issue 22, kind 5, for model and artifact files: an untrusted value in an HF `config.json`, a shard index, a
source run's `config.yaml` or a run lock is one line naming the field and value (exit status 2), before anything is
written, in bounded time and memory; FIFOs where weights, configs or locks are expected never hang; deeply nested
JSON, lone surrogates, NaN/Infinity and numbers beyond float32 are refused like any other bad value.

Each refusal goes through a real command-line entry point (`llm.training.train --model-init-from`, `llm.export`,
`llm.generate`) in this process and checks that no run directory, data cache or export target appeared and that the
source is byte-for-byte unchanged. The lock cases use the lock itself (`RunLock`), as a run takes it.
"""

from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path

import pytest
from helpers import TINY_REGRESSION, call_main

from battery.model_files import (
    CONFIG_NAME,
    INDEX_NAME,
    SINGLE_NAME,
    copy_of,
    hf_folder,
    lm_run,
    one_line,
    refused,
    snapshot,
)
from llm.artifacts.lock import LOCK_NAME, LockHolder, RunDirInUse, RunLock, live_holder
from llm.export import main as export_main
from llm.generate import main as generate_main
from llm.training.train import main as train_main


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """A tiny HF Llama folder and a sharded copy of it (model-0000i-of-0000n.safetensors + index)."""
    root = tmp_path_factory.mktemp("hf")
    hf_folder(root / "single")
    hf_folder(root / "sharded", shard_bytes=20_000)
    return root


@pytest.fixture
def hf(pristine: Path, tmp_path: Path) -> Path:
    return copy_of(pristine / "single", tmp_path / "hf")


@pytest.fixture
def sharded(pristine: Path, tmp_path: Path) -> Path:
    folder = copy_of(pristine / "sharded", tmp_path / "hf")
    assert len({*json.loads((folder / INDEX_NAME).read_text())["weight_map"].values()}) > 1
    return folder


def set_raw(path: Path, key: str, raw: str) -> None:
    """Set a top-level key of a JSON file to `raw`, written as it is (NaN, 1e999, huge integers...)."""
    data = json.loads(path.read_text())
    data[key] = "@@RAW@@"
    path.write_text(json.dumps(data).replace('"@@RAW@@"', raw))


def test_the_pristine_folder_starts_a_run(hf, tmp_path):
    """The control: the same folder, unedited, is accepted (so each refusal below is the edit's)."""
    from battery.model_files import init_from

    assert init_from(tmp_path, hf).returncode == 0
    assert (tmp_path / "run" / "metrics.jsonl").is_file()


# -------------------------------------------------------------------------------------------- config.json values
CONFIG_VALUES = [
    # (field, raw JSON value, what the line must say)
    ("num_attention_heads", "4.0", "num_attention_heads is 4.0: must be an integer"),
    ("num_attention_heads", "4.5", "num_attention_heads is 4.5: must be an integer"),
    ("num_attention_heads", "true", "num_attention_heads is True: must be an integer"),
    ("num_attention_heads", '"4"', "num_attention_heads is '4': must be an integer"),
    ("num_hidden_layers", "0", "num_hidden_layers is 0: must be in [1, 2147483647]"),
    ("num_hidden_layers", "-2", "num_hidden_layers is -2: must be in [1, 2147483647]"),
    ("num_hidden_layers", "1000000000000", "num_hidden_layers is 1000000000000: must be in [1, 2147483647]"),
    ("num_hidden_layers", "1e12", "num_hidden_layers is 1000000000000.0: must be an integer"),
    ("num_hidden_layers", "9" * 5000, "holds a value that cannot be read"),
    ("vocab_size", "null", "vocab_size is None: must be an integer"),
    ("num_key_value_heads", "0", "num_key_value_heads is 0: must be in [1, 2147483647]"),
    ("num_key_value_heads", "3", "num_key_value_heads is 3: must divide num_attention_heads=4"),
    ("hidden_size", "34", "hidden_size is 34: must be divisible by num_attention_heads=4"),
    ("rope_theta", "1e39", "rope_theta is 1e+39: must lie in the float32 range"),
    ("rope_theta", "NaN", "holds NaN, which is not a JSON number"),
    ("rope_theta", "1e999", "holds the number 1e999, beyond the range of a double"),
    ("rope_theta", "-1", "rope_theta is -1: must be a finite number > 0"),
    ("rope_theta", '"10000"', "rope_theta is '10000': must be a number"),
    ("rms_norm_eps", "0", "rms_norm_eps is 0: must be a finite number > 0"),
    ("rms_norm_eps", "1e-50", "rms_norm_eps is 1e-50: must lie in the float32 range"),
    ("rms_norm_eps", "-Infinity", "holds -Infinity, which is not a JSON number"),
    ("tie_word_embeddings", '"false"', "tie_word_embeddings is 'false': must be true or false"),
    ("max_position_embeddings", "0", "max_position_embeddings is 0: must be in [1, 2147483647]"),
    ("intermediate_size", "48.0", "intermediate_size is 48.0: must be an integer"),
    ("rope_parameters", "[1, 2]", "rope_parameters is [1, 2]: must be an object"),
    ("architectures", '"LlamaForCausalLM"', "architectures is 'LlamaForCausalLM': must be a list of class names"),
    ("model_type", '"\\ud800"', "holds a lone surrogate escape"),
    ("sliding_window", "8", "sliding_window is 8: llama has no sliding window"),  # never silently dropped
]


@pytest.mark.parametrize("field, raw, message", CONFIG_VALUES,
                         ids=[f"{f}={r[:12]}" for f, r, _ in CONFIG_VALUES])
def test_config_json_values_are_one_line_before_anything_is_written(hf, tmp_path, field, raw, message):
    set_raw(hf / CONFIG_NAME, field, raw)
    started = time.monotonic()
    refused(tmp_path, hf, f"model.init_from: '{hf}'", CONFIG_NAME, message)
    assert time.monotonic() - started < 30  # bounded: nothing of the claimed size is built


# -------------------------------------------------------------------------------------------- config.json as a file
def _deep(path: Path) -> None:
    path.write_text('{"model_type": "llama", "x": ' + "[" * 200_000 + "]" * 200_000 + "}")


def _fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


def _huge(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(65 * 2**20)  # sparse: costs no disk, and must not be read


CONFIG_FILES = {
    "nested-200000-deep": (_deep, "is nested too deeply to be read"),
    "a-fifo": (_fifo, "config.json that is not a regular file (a FIFO)"),
    "65-MiB": (_huge, "is 68,157,440 bytes, more than the 67,108,864"),
    "not-utf8": (lambda p: p.write_bytes(b'{"model_type": "ll\xffama"}'), "is not UTF-8 text"),
    "a-json-list": (lambda p: p.write_text("[1, 2]"), "config.json that is a JSON list, not an object"),
    "a-directory": (lambda p: (p.unlink(), p.mkdir()), "is not a regular file (a directory)"),
    "repeated-key": (lambda p: p.write_text(p.read_text().rstrip()[:-1] + ', "hidden_size": 64}'),
                     "repeats the key 'hidden_size'"),
}


@pytest.mark.parametrize("spoil, message", CONFIG_FILES.values(), ids=CONFIG_FILES.keys())
def test_config_json_files_that_are_not_plain_json_are_one_line(hf, tmp_path, spoil, message):
    spoil(hf / CONFIG_NAME)
    refused(tmp_path, hf, f"model.init_from: '{hf}'", message)


# -------------------------------------------------------------------------------------------- shard indexes, weights
def _index(folder: Path) -> dict:
    return json.loads((folder / INDEX_NAME).read_text())


def _first_shard(folder: Path) -> str:
    return sorted(set(_index(folder)["weight_map"].values()))[0]


def _set_index(folder: Path, index: dict) -> None:
    (folder / INDEX_NAME).write_text(json.dumps(index))


def _escape(folder: Path) -> None:
    index = _index(folder)
    (folder.parent / "outside.safetensors").write_bytes((folder / _first_shard(folder)).read_bytes())
    index["weight_map"] = {k: "../outside.safetensors" for k in index["weight_map"]}
    _set_index(folder, index)


def _int_tensor(folder: Path) -> None:
    from safetensors.torch import load_file, save_file

    path = folder / SINGLE_NAME
    state = load_file(path)
    state["model.norm.weight"] = state["model.norm.weight"].long()
    save_file(state, path)


INDEXES = {
    "weight-map-a-list": (lambda f: _set_index(f, {"weight_map": list(_index(f)["weight_map"])}),
                          "model.safetensors.index.json without a weight_map object"),
    "nested-deep": (lambda f: (f / INDEX_NAME).write_text('{"weight_map": ' + "[" * 200_000 + "]" * 200_000 + "}"),
                    "model.safetensors.index.json that is nested too deeply"),
    "file-outside": (_escape, "in '../outside.safetensors', which is not the name of a file in the folder"),
    "total-size-negative": (lambda f: _set_index(f, {**_index(f), "metadata": {"total_size": -1}}),
                            "metadata.total_size is -1: must be an integer >= 0"),
    "total-size-nan": (lambda f: (f / INDEX_NAME).write_text(
        (f / INDEX_NAME).read_text().replace('"total_size": ', '"total_size": NaN, "x": ')),
        "holds NaN, which is not a JSON number"),
    "index-a-fifo": (lambda f: _fifo(f / INDEX_NAME),
                     "model.safetensors.index.json that is not a regular file (a FIFO)"),
    "shard-a-fifo": (lambda f: _fifo(f / _first_shard(f)), "that is not a regular file (a FIFO)"),
    "tensor-name-surrogate": (lambda f: _set_index(f, {**_index(f), "weight_map": {
        **_index(f)["weight_map"], "x\ud800": _first_shard(f)}}), "holds a lone surrogate escape"),
}


@pytest.mark.parametrize("spoil, message", INDEXES.values(), ids=INDEXES.keys())
def test_shard_indexes_are_checked_before_anything_is_written(sharded, tmp_path, spoil, message):
    spoil(sharded)
    refused(tmp_path, sharded, f"model.init_from: '{sharded}'", message)


WEIGHTS = {
    "single-file-a-fifo": (lambda f: _fifo(f / SINGLE_NAME), "weight file model.safetensors that is not a regular "
                                                              "file (a FIFO)"),
    "not-safetensors": (lambda f: (f / SINGLE_NAME).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage"),
                        "weight file model.safetensors that is not safetensors"),
    "integer-tensor": (_int_tensor, "tensor 'model.norm.weight' of dtype I64 in model.safetensors"),
}


@pytest.mark.parametrize("spoil, message", WEIGHTS.values(), ids=WEIGHTS.keys())
def test_weight_files_are_checked_before_anything_is_written(hf, tmp_path, spoil, message):
    spoil(hf)
    refused(tmp_path, hf, f"model.init_from: '{hf}'", message)


# -------------------------------------------------------------------------------------------- source runs' config.yaml
RUN_VALUES = [
    # (model field, YAML value, what the line must say)
    ("num_heads", 4.5, "model.num_heads: expected int, got 4.5"),
    ("num_heads", True, "model.num_heads: expected int, got True"),
    ("num_layers", 0, "model.num_layers is 0: must be an integer in [1, 2147483647]"),
    ("num_layers", 10**12, "model.num_layers is 1000000000000: must be an integer in [1, 2147483647]"),
    ("num_layers", 3, "model.num_layers is 3 but the weights hold 2 layer(s)"),
    ("rope_theta", 1e39, "model.rope_theta is 1e+39: must be a finite float32 number > 0"),
    ("norm_eps", float("nan"), "model.norm_eps is nan: must be a finite float32 number > 0"),
    ("norm_eps", 1e-300, "model.norm_eps is 1e-300: must be a finite float32 number > 0"),
]


@pytest.mark.parametrize("field, value, message", RUN_VALUES, ids=[f"{f}={v}" for f, v, _ in RUN_VALUES])
def test_a_source_runs_config_values_are_one_line(tmp_path, field, value, message):
    source = lm_run(tmp_path / "source", **{field: value})
    refused(tmp_path, source, f"model.init_from: '{source}'", message)


def test_a_source_runs_deeply_nested_config_is_one_line(tmp_path):
    source = lm_run(tmp_path / "source")
    (source / "config.yaml").write_text("model: " + "[" * 1_500 + "]" * 1_500 + "\n")
    refused(tmp_path, source, "config.yaml is nested too deeply to be a run config")


@pytest.mark.parametrize("main", ["export", "generate"])
def test_export_and_generate_refuse_a_run_claiming_a_trillion_layers(tmp_path, main):
    source = lm_run(tmp_path / "source", num_layers=10**12)
    before = snapshot(source)
    if main == "export":
        result = call_main(export_main, [str(source), "--to", "hf", str(tmp_path / "out")], tmp_path)
    else:
        result = call_main(lambda a: generate_main(a, out=io.StringIO()),
                           ["--checkpoint", str(source), "--prompt", "x", "--max-new-tokens", "2"], tmp_path)
    one_line(result, "model.num_layers is 1000000000000: must be an integer in [1, 2147483647]")
    assert not (tmp_path / "out").exists() and snapshot(source) == before


# -------------------------------------------------------------------------------------------- run locks
def _old_lock(run: Path, text: str) -> Path:
    run.mkdir(parents=True, exist_ok=True)
    path = run / LOCK_NAME
    path.write_text(text)
    old = time.time() - 3600
    os.utime(path, (old, old))
    return path


def _record(**changes: object) -> str:
    record = json.loads(LockHolder.this_process().to_json())
    record.update(changes)
    return json.dumps(record)


LOCKS = {
    "pid-a-string": (_record(pid="123"), "its pid is '123', not a process id"),
    "pid-a-float": (_record(pid=4.5), "its pid is 4.5, not a process id"),
    "pid-a-bool": (_record(pid=True), "its pid is True, not a process id"),
    "pid-negative": (_record(pid=-1), "its pid is -1, not a process id"),
    "pid-zero": (_record(pid=0), "its pid is 0, not a process id"),
    "pid-huge": (_record(pid=10**30), "its pid is 1000000000000000000000000000000, not a process id"),
    "host-a-number": (_record(host=5), "its host is 5, not a host name"),
    "started-nan": (_record(started=0).replace('"started": 0', '"started": NaN'), "holds NaN"),
    "started-huge": (_record(started=1e300), "its started is 1e+300, not a time in seconds since 1970"),
    "proc-start-a-string": (_record(proc_start="x"), "its proc_start is 'x', not a process start time"),
    "nested-deep": ("[" * 30_000 + "]" * 30_000, "nested too deeply"),
}


@pytest.mark.parametrize("text, reason", LOCKS.values(), ids=LOCKS.keys())
def test_a_malformed_lock_is_unreadable_and_named_when_taken_over(tmp_path, text, reason):
    """A lock record no run wrote is unreadable, never half-believed (a pid of 0 or -1 would make the liveness check
    ask about a process group; 4.5 would become another process's pid): old, it is taken over with a warning that
    names the bad field; young, it is a run starting now (one line)."""
    run = tmp_path / "run"
    path = _old_lock(run, text)
    assert live_holder(run) is None
    lock = RunLock(run)
    lock.acquire()
    try:
        assert lock.replaced is not None and "its lock file is unreadable" in lock.replaced and reason in lock.replaced
        assert json.loads(path.read_text())["pid"] == os.getpid()
    finally:
        lock.release()
    path.write_text(text)  # young now: refused, and left as it is
    with pytest.raises(RunDirInUse, match="is in use by a run that is starting now") as info:
        RunLock(run).acquire()
    assert "\n" not in str(info.value) and path.read_text() == text


@pytest.mark.parametrize("kind", ["fifo", "directory", "65-MiB"])
def test_a_lock_that_is_no_lock_file_is_one_line_and_left_alone(tmp_path, kind):
    run = tmp_path / "run"
    run.mkdir()
    path = run / LOCK_NAME
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    else:
        with open(path, "wb") as f:
            f.truncate(65 * 2**10)
    result = call_main(train_main, [*TINY_REGRESSION, "--logging-log-dir", str(run), "--training-max-steps", "1"],
                       tmp_path)
    why = {"fifo": "is not a regular file (a FIFO)", "directory": "is not a regular file (a directory)",
           "65-MiB": "is 66,560 bytes, more than the 65,536"}[kind]
    one_line(result, f"logging.log_dir: its lock '{path}' {why}")
    assert sorted(p.name for p in run.iterdir()) == [LOCK_NAME]  # nothing else written, the lock left in place
    assert live_holder(run) is None


# -------------------------------------------------------------------------------------------- checkpoints
def _rehashed(step_dir: Path, name: str, text: str) -> None:
    from llm.artifacts import checkpoint as ckpt

    (step_dir / name).write_text(text)
    manifest = json.loads((step_dir / ckpt.MANIFEST).read_text())
    manifest["files"][name] = {"sha256": ckpt.sha256_file(step_dir / name), "bytes": (step_dir / name).stat().st_size}
    (step_dir / ckpt.MANIFEST).write_text(json.dumps(manifest))


CHECKPOINT_FILES = {
    "manifest-nested-deep": (lambda d: (d / "manifest.json").write_text("[" * 50_000 + "]" * 50_000),
                             "manifest.json is unreadable: it is nested too deeply to be read"),
    "manifest-step-nan": (lambda d: (d / "manifest.json").write_text(
        (d / "manifest.json").read_text().replace('"step": 4', '"step": NaN')), "it holds NaN"),
    "manifest-step-twice": (lambda d: (d / "manifest.json").write_text(
        (d / "manifest.json").read_text().replace('"step": 4', '"step": 4, "step": 2')), "repeats the key 'step'"),
    "manifest-a-fifo": (lambda d: _fifo(d / "manifest.json"), "it is not a regular file (a FIFO)"),
    "manifest-surrogate": (lambda d: (d / "manifest.json").write_text(
        (d / "manifest.json").read_text().replace('"created": "', '"created": "\\udfff')), "lone surrogate escape"),
    "config-nested-deep": (lambda d: _rehashed(d, "config.yaml", "model: " + "[" * 1_500 + "]" * 1_500 + "\n"),
                           "config.yaml is nested too deeply to be a run config"),
}


@pytest.mark.parametrize("case", CHECKPOINT_FILES)
def test_untrusted_checkpoint_files_are_one_line_when_named_and_skipped_by_auto(tmp_path, case):
    from battery.model_files import tiny_model
    from llm.artifacts import checkpoint as ckpt
    from llm.artifacts.runs import load_run

    spoil, message = CHECKPOINT_FILES[case]
    run = lm_run(tmp_path / "run", tiny_model(), steps=(2, 4))
    (run / "model.safetensors").unlink()
    step4 = run / "checkpoints" / "step-00000004"
    spoil(step4)
    before = snapshot(run)
    result = call_main(export_main, [str(step4), "--to", "hf", str(tmp_path / "out")], tmp_path)
    one_line(result, message)
    assert not (tmp_path / "out").exists() and snapshot(run) == before
    warned: list[str] = []
    assert ckpt.find_latest_checkpoint(step4.parent, warned.append, check=ckpt.inspect_checkpoint).name == \
        "step-00000002"
    assert len(warned) == 1 and message in warned[0]
    if case.startswith("manifest"):  # a run directory resolves past a checkpoint whose manifest fails, as auto does
        assert load_run(run, tokenizer=False, warn=lambda _: None).checkpoint_dir.name == "step-00000002"
    else:  # the manifest vouches for it, so the run directory names it: its unreadable config is one line
        with pytest.raises(ckpt.CheckpointError, match=message.replace(".", r"\.")):
            load_run(run, tokenizer=False, warn=lambda _: None)


# -------------------------------------------------------------------------------------------- FIFOs as weights
def _shards(directory: Path) -> None:
    """A torch.distributed.checkpoint directory of a tiny model's weights, as an FSDP save writes one."""
    import warnings

    import torch.distributed.checkpoint as dcp

    from battery.model_files import tiny_model

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save({"model": tiny_model().state_dict()}, checkpoint_id=str(directory), no_dist=True)


def test_a_fifo_named_as_the_weights_is_one_line(tmp_path):
    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)
    result = call_main(export_main, [str(fifo), "--to", "hf", str(tmp_path / "out")], tmp_path)
    one_line(result, f"'{fifo}' is not a regular file or a directory (a FIFO)")
    assert not (tmp_path / "out").exists()


def test_a_fifo_as_a_shard_or_as_shard_metadata_never_hangs(tmp_path):
    from llm.artifacts import checkpoint as ckpt
    from llm.artifacts.consolidate import main as consolidate_main

    shards = tmp_path / "sharded"
    _shards(shards)
    storage = sorted(p for p in shards.iterdir() if p.suffix == ".distcp")[0]
    storage.unlink()
    os.mkfifo(storage)
    result = call_main(consolidate_main, [str(shards), str(tmp_path / "out.safetensors")], tmp_path)
    one_line(result, f"storage file '{storage.name}' is not a regular file")
    assert not (tmp_path / "out.safetensors").exists()
    (shards / ".metadata").unlink()
    os.mkfifo(shards / ".metadata")
    with pytest.raises(ckpt.CheckpointError, match=r"\.metadata is not a regular file \(a FIFO\)"):
        ckpt.load_shard_metadata(shards / ".metadata")
