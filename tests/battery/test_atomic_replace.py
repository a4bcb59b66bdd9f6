"""Issue 22, kind 3: replacing is atomic.

`python -m llm.export RUN --to hf OUT --overwrite` and a re-run that rewrites a run's `config.yaml` leave the old
state or the new one, never a mix and never nothing, also when they fail half-way: a full disk (a write raising
ENOSPC in the middle), an exception between two steps, a process SIGKILLed mid-write. Two exports into one folder
at once leave one whole export. Each case compares file hashes with the old and the new state.
"""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from helpers import CKPT, TINY_REGRESSION, call_main, disk_filling_open
from safetensors.torch import save_model

from llm import export, fs
from llm.artifacts import checkpoint as ckpt
from llm.export import main as export_main
from llm.models import DecoderModel
from llm.training.train import main as train_main

TINY_MODEL = dict(vocab_size=256, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64,
                  max_seq_len=64)
SHARDS = ["--max-shard-size", "20KB"]  # several weight files: a failure can land between two of them


class Killed(BaseException):
    """Stands for the process dying at this point: nothing above catches it."""


def hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _source(tmp_path: Path, name: str, seed: int) -> Path:
    src = tmp_path / name
    src.mkdir()
    torch.manual_seed(seed)
    (src / "config.yaml").write_text(yaml.safe_dump({"task": "lm", "model": TINY_MODEL}))
    save_model(DecoderModel(**TINY_MODEL), str(src / "model.safetensors"))
    return src


@pytest.fixture
def exports(tmp_path):
    """Two models' sources, their reference exports (hashes), and OUT holding model a's export."""
    refs = tmp_path / "refs"
    sources, expected = {}, {}
    for name, seed in (("a", 1), ("b", 2)):
        sources[name] = _source(tmp_path, name, seed)
        export.export_hf(sources[name], refs / name, max_shard_bytes=20_000)
        expected[name] = hashes(refs / name)
    assert expected["a"] != expected["b"]
    out = tmp_path / "out"
    export.export_hf(sources["a"], out, max_shard_bytes=20_000)
    return sources, expected, out


def _siblings(out: Path) -> list[str]:
    """What lies beside OUT apart from the test's own folders: an export's temp or aside, if any was left."""
    return sorted(p.name for p in out.parent.iterdir() if p.name not in ("a", "b", "c", "refs", "out", "src"))


def _export(source: Path, out: Path, *flags: str):
    return call_main(export_main, [str(source), "--to", "hf", str(out), *SHARDS, *flags], out.parent)


# -- a full disk half-way ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["first-shard", "second-shard", "index", "tokenizer", "config"])
def test_a_full_disk_half_way_keeps_the_old_export(exports, monkeypatch, where):
    sources, expected, out = exports
    import llm.models.hf as hf

    real_save, real_write = hf.save_file, Path.write_text
    calls = []

    def half_then_full(data: bytes, path: Path) -> None:
        with open(path, "wb") as f:
            f.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def save_file(tensors, filename, metadata=None):
        calls.append(filename)
        if (where == "first-shard" and len(calls) == 1) or (where == "second-shard" and len(calls) == 2):
            half_then_full(b"x" * 1000, Path(filename))
        real_save(tensors, filename, metadata=metadata)

    def write_text(self, text, *args, **kwargs):
        doomed = {"index": "model.safetensors.index.json", "tokenizer": "tokenizer_config.json",
                  "config": "config.json"}.get(where)
        if self.name == doomed:
            half_then_full(text.encode(), self)
        return real_write(self, text, *args, **kwargs)

    monkeypatch.setattr(hf, "save_file", save_file)
    monkeypatch.setattr(Path, "write_text", write_text)
    result = _export(sources["b"], out, "--overwrite")
    monkeypatch.undo()
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "No space left on device" in result.stderr, result.stderr
    assert hashes(out) == expected["a"]
    assert _siblings(out) == []


def test_a_full_disk_on_a_first_export_leaves_no_folder(tmp_path, monkeypatch):
    src = _source(tmp_path, "a", 1)
    import llm.models.hf as hf

    def full(tensors, filename, metadata=None):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(hf, "save_file", full)
    result = _export(src, tmp_path / "out")
    assert result.returncode == 2 and "No space left on device" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


# -- killed between two steps -------------------------------------------------------------------------------------
@pytest.mark.parametrize("step", ["after-writing", "after-carrying-files", "after-the-exchange", "before-cleanup"])
def test_an_export_killed_between_steps_leaves_the_old_or_the_new(exports, monkeypatch, step):
    sources, expected, out = exports
    (out / "README.md").write_text("kept\n")  # a user file the swap carries over
    old = hashes(out)
    new = {**expected["b"], "README.md": old["README.md"]}
    real_save, real_exchange, real_rmtree = export.save_hf, fs.exchange, fs.shutil.rmtree
    real_link = os.link

    def die(*args, **kwargs):
        raise Killed

    if step == "after-writing":
        monkeypatch.setattr(export, "save_hf", lambda *a, **k: (real_save(*a, **k), die()))
    elif step == "after-carrying-files":
        monkeypatch.setattr(export.os, "link", lambda a, b: (real_link(a, b), die()))
    elif step == "after-the-exchange":
        monkeypatch.setattr(fs, "exchange", lambda a, b: (real_exchange(a, b), die()))
    else:
        monkeypatch.setattr(fs.shutil, "rmtree", lambda *a, **k: die() if ".export-old" in str(a[0])
                            else real_rmtree(*a, **k))
    with pytest.raises(Killed):
        export.export_hf(sources["b"], out, max_shard_bytes=20_000, overwrite=True)
    monkeypatch.undo()
    assert hashes(out) in (old, new)
    assert hashes(out) == (old if step in ("after-writing", "after-carrying-files") else new)
    # The next export cleans up whatever the dead one left beside OUT.
    assert _export(sources["a"], out, "--overwrite").returncode == 0
    assert hashes(out) == {**expected["a"], "README.md": old["README.md"]} and _siblings(out) == []


def test_a_crash_between_the_fallback_renames_is_undone(exports, monkeypatch):
    """Where directories cannot be exchanged: an error in the second rename puts the old one back; a kill there
    (the old export renamed aside, OUT absent) is undone by the next export before anything else."""
    sources, expected, out = exports
    monkeypatch.setattr(fs, "exchange", lambda a, b: False)
    real_replace = os.replace

    def replace(src, dst):
        if Path(dst) == out and export.TEMP_MARK in Path(src).name:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real_replace(src, dst)

    monkeypatch.setattr(fs.os, "replace", replace)
    assert _export(sources["b"], out, "--overwrite").returncode == 2
    monkeypatch.undo()
    assert hashes(out) == expected["a"] and _siblings(out) == []

    real_replace(out, out.with_name(".out.export-old"))  # what a kill between the two renames leaves
    result = _export(sources["b"], out)  # no --overwrite: refused, but only once the old export is back
    assert result.returncode == 2 and "is not empty" in result.stderr
    assert hashes(out) == expected["a"] and _siblings(out) == []


def test_an_export_sigkilled_mid_write_leaves_the_old_one_and_its_leftover_is_cleaned(exports, tmp_path):
    """A forked copy of this process (torch already loaded: no second start-up) exports model b and is SIGKILLed
    once its first weight file is written."""
    sources, expected, out = exports
    marker = tmp_path / "refs" / "halfway"  # refs/: not beside OUT
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            import llm.models.hf as hf

            real = hf.save_file

            def save_file(tensors, filename, metadata=None):
                real(tensors, filename, metadata=metadata)
                marker.touch()
                time.sleep(60)

            hf.save_file = save_file
            export.export_hf(sources["b"], out, max_shard_bytes=20_000, overwrite=True)
        finally:
            os._exit(0)
    deadline = time.monotonic() + 60
    while not marker.exists():
        assert os.waitpid(pid, os.WNOHANG) == (0, 0), "the exporting child ended before it was killed"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    assert hashes(out) == expected["a"]
    leftover = _siblings(out)
    assert len(leftover) == 1 and export.TEMP_MARK in leftover[0]  # the dead export's half-written temp
    assert _export(sources["b"], out, "--overwrite").returncode == 0
    assert hashes(out) == expected["b"] and _siblings(out) == []


# -- two exports at once -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overwrite", [True, False])
def test_two_exports_at_once_leave_one_whole_export(exports, monkeypatch, overwrite):
    sources, expected, out = exports
    if not overwrite:
        out = out.with_name("c")  # a new folder: the first one to finish takes it, the other is refused
    both_written = threading.Barrier(2, timeout=60)
    real_save = export.save_hf

    def save_then_wait(*args, **kwargs):
        real_save(*args, **kwargs)
        both_written.wait()  # both are half-way (written, not yet swapped) at the same time

    monkeypatch.setattr(export, "save_hf", save_then_wait)
    outcomes: dict[str, BaseException | None] = {}

    def run(name: str) -> None:
        try:
            export.export_hf(sources[name], out, max_shard_bytes=20_000, overwrite=overwrite)
            outcomes[name] = None
        except BaseException as exc:  # noqa: BLE001  (reported below)
            outcomes[name] = exc

    threads = [threading.Thread(target=run, args=(name,)) for name in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert hashes(out) in (expected["a"], expected["b"])
    if overwrite:
        assert outcomes == {"a": None, "b": None}
    else:
        failed = [exc for exc in outcomes.values() if exc is not None]
        assert len(failed) == 1 and isinstance(failed[0], export.ExportError) and "is not empty" in str(failed[0])
        winner = next(name for name, exc in outcomes.items() if exc is None)
        assert hashes(out) == expected[winner]
    assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith(".")) == []


def test_two_export_processes_at_once_leave_one_whole_export(exports, tmp_path):
    """Two forked processes export models a and b over OUT; both wait, written and not yet swapped, until the
    other is too, then swap at once: OUT is one model's export, whole, and nothing is left beside it."""
    sources, expected, out = exports
    marks = tmp_path / "refs"
    children, real_save = [], export.save_hf
    for name in ("a", "b"):
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                def save_then_wait(*args, name=name, **kwargs):
                    real_save(*args, **kwargs)
                    (marks / f"written-{name}").touch()
                    deadline = time.monotonic() + 60
                    while len(list(marks.glob("written-*"))) < 2 and time.monotonic() < deadline:
                        time.sleep(0.01)

                export.save_hf = save_then_wait
                export.export_hf(sources[name], out, max_shard_bytes=20_000, overwrite=True)
                status = 0
            finally:
                os._exit(status)
        children.append(pid)
    statuses = [os.waitpid(pid, 0)[1] for pid in children]
    assert statuses == [0, 0]
    assert hashes(out) in (expected["a"], expected["b"])
    assert _siblings(out) == []


# -- the swap itself (llm.fs.replace_dir, which checkpoints use too) ------------------------------------------------
def _dirs(tmp_path: Path) -> tuple[Path, Path, Path]:
    final, tmp, aside = tmp_path / "step-1", tmp_path / ".tmp-step-1", tmp_path / ".tmp-old-step-1"
    for path, text in ((final, "old"), (tmp, "new")):
        path.mkdir()
        (path / "weights").write_text(text)
    return final, tmp, aside


@pytest.mark.parametrize("exchange", [True, False])
def test_replace_dir_is_old_or_new_at_every_step(tmp_path, monkeypatch, exchange):
    final, tmp, aside = _dirs(tmp_path)
    if not exchange:
        monkeypatch.setattr(fs, "exchange", lambda a, b: False)
    seen = []
    real_replace = os.replace

    def replace(src, dst):  # look at `final` after every rename the swap makes
        real_replace(src, dst)
        seen.append((final / "weights").read_text() if final.exists() else None)

    monkeypatch.setattr(fs.os, "replace", replace)
    fs.replace_dir(tmp, final, aside)
    monkeypatch.undo()
    assert (final / "weights").read_text() == "new" and sorted(os.listdir(tmp_path)) == ["step-1"]
    assert seen == (["new"] if exchange else [None, "new"])  # the fallback's window: closed by the recovery below


def test_a_checkpoint_left_aside_by_a_kill_is_restored_not_deleted(tmp_path):
    final, tmp, aside = _dirs(tmp_path)
    os.replace(final, aside)  # killed between the fallback's two renames
    assert ckpt.remove_stale_temps(tmp_path) == [tmp]  # the unfinished new save goes, the old checkpoint stays
    assert (final / "weights").read_text() == "old" and sorted(os.listdir(tmp_path)) == ["step-1"]


# -- a re-run rewriting config.yaml --------------------------------------------------------------------------------
@pytest.fixture
def finished(tmp_path):
    run = tmp_path / "run"
    result = call_main(train_main, [*TINY_REGRESSION, *CKPT, "--training-max-steps", "2", "--logging-log-dir",
                                    str(run)], tmp_path)
    assert result.returncode == 0, result.stderr
    return run


def _rerun(run: Path):
    return call_main(train_main, [*TINY_REGRESSION, *CKPT, "--training-max-steps", "3", "--logging-log-dir",
                                  str(run)], run.parent)


def test_a_rerun_rewrites_config_yaml_whole(finished):
    assert _rerun(finished).returncode == 0
    assert yaml.safe_load((finished / "config.yaml").read_text())["training"]["max_steps"] == 3
    assert not (finished / "config.yaml.tmp").exists()


@pytest.mark.parametrize("failure", ["disk-full", "killed-before-rename"])
def test_a_rerun_failing_while_it_rewrites_config_yaml_keeps_the_old_one(finished, monkeypatch, failure):
    old = (finished / "config.yaml").read_bytes()
    real_publish = fs.publish
    half_open = disk_filling_open(lambda path, mode: path.endswith("config.yaml.tmp"))

    def publish(tmp, target, **kwargs):
        if Path(target).name == "config.yaml":
            raise Killed
        real_publish(tmp, target, **kwargs)

    if failure == "disk-full":
        monkeypatch.setattr("builtins.open", half_open)
        result = _rerun(finished)
        monkeypatch.undo()
        assert result.returncode == 2
        last = result.stderr.splitlines()[-1]
        assert last.startswith("error: logging: cannot write") and "config.yaml: No space left on device" in last
    else:
        monkeypatch.setattr(fs, "publish", publish)
        with pytest.raises(Killed):
            _rerun(finished)
    assert (finished / "config.yaml").read_bytes() == old
    assert not (finished / "config.yaml.tmp").exists()


def test_a_rerun_sigkilled_while_it_rewrites_config_yaml_keeps_the_old_one(finished):
    """A forked copy of this process re-runs the finished run and is SIGKILLed with the new config.yaml written
    beside the old one, not yet renamed; the next re-run takes over the dead run's lock and writes it whole."""
    old = (finished / "config.yaml").read_bytes()
    marker = finished.parent / "halfway"
    pid = os.fork()
    if pid == 0:
        try:
            real_publish = fs.publish

            def publish(tmp, target, **kwargs):
                if Path(target).name == "config.yaml":
                    marker.touch()
                    time.sleep(60)
                real_publish(tmp, target, **kwargs)

            fs.publish = publish
            _rerun(finished)
        finally:
            os._exit(0)
    deadline = time.monotonic() + 60
    while not marker.exists():
        assert os.waitpid(pid, os.WNOHANG) == (0, 0), "the re-run ended before it was killed"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    assert (finished / "config.yaml").read_bytes() == old
    result = _rerun(finished)
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load((finished / "config.yaml").read_text())["training"]["max_steps"] == 3
    assert not (finished / "config.yaml.tmp").exists()


# -- a GGUF export: one file, renamed over the old one ------------------------------------------------------------
@pytest.mark.parametrize("failure", ["full-disk", "killed"])
def test_a_gguf_export_failing_half_way_keeps_the_old_file(tmp_path, monkeypatch, failure):
    gguf = pytest.importorskip("gguf")
    from llm import export_gguf

    out = tmp_path / "out.gguf"
    assert call_main(export_main, [str(_source(tmp_path, "a", 1)), "--to", "gguf", str(out)], tmp_path).returncode == 0
    old = out.read_bytes()
    real = gguf.GGUFWriter.write_tensors_to_file

    def half_then_fail(self, *args, **kwargs):
        real(self, *args, **kwargs)
        self.fout[0].truncate(self.fout[0].tell() // 2)  # half the file is on disk when the failure comes
        if failure == "killed":
            raise Killed
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", half_then_fail)
    if failure == "killed":
        with pytest.raises(Killed):
            export_gguf.export_gguf(_source(tmp_path, "b", 2), out, overwrite=True)
    else:
        result = call_main(export_main, [str(_source(tmp_path, "b", 2)), "--to", "gguf", str(out), "--overwrite"],
                           tmp_path)
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
        assert "No space left on device" in result.stderr
    assert out.read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "out.gguf"]  # no temp file left
