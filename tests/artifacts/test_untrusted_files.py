"""No file of a checkpoint is trusted: a payload planted in any of them never runs, malformed ones are errors.

Each payload, if unpickled (or YAML-constructed) naively, would create a marker file; every test asserts the
marker is absent, and a control shows the same payload does run through the naive loader (so the refusal is what
protects). The manifest is re-hashed after each change: a checksum cannot vouch for content. Under
`checkpoint.resume=auto` a malformed checkpoint is skipped for the next older one; a payload stops the run.
"""

from __future__ import annotations

import io
import json
import logging
import pickle
import shutil
import warnings
from hashlib import sha256
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from helpers import CKPT, tiny_engine

from llm.artifacts import checkpoint as ckpt
from llm.artifacts.checkpoint import CheckpointError, UnsafeCheckpointError
from llm.artifacts.consolidate import main as consolidate_main
from llm.artifacts.runs import load_sharded_weights
from llm.artifacts.sharded import plain_errors, safe_load_planner, shard_reader
from llm.training.core.callbacks import Callback
from llm.training.core.engine import TrainingEngine

STEP2, STEP4 = "step-00000002", "step-00000004"


class Payload:
    """Unpickling this calls open(marker, 'w'): a stand-in for arbitrary code run by a crafted file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


class RecordLoad(Callback):
    def __init__(self) -> None:
        self.loaded: list[dict[str, Any]] = []

    def on_load_checkpoint(self, logs: dict[str, Any] | None = None) -> None:
        self.loaded.append(dict(logs or {}))


def train(workdir: Path, max_steps: int, extra: tuple[Callback, ...] = (), *args: str) -> TrainingEngine:
    return tiny_engine(workdir, *CKPT, "--training-max-steps", str(max_steps), "--checkpoint-interval", "2",
                       "--checkpoint-keep-last", "5", *args, extra_callbacks=extra, run=True)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """A run with complete checkpoints at steps 2 and 4."""
    workdir = tmp_path_factory.mktemp("pristine")
    train(workdir, 4)
    return workdir


@pytest.fixture
def work(pristine: Path, tmp_path: Path) -> Path:
    shutil.copytree(pristine / "run", tmp_path / "run")
    return tmp_path


def ckpt_dir(work: Path, name: str = STEP4) -> Path:
    return work / "run" / "checkpoints" / name


def rehash(directory: Path, name: str) -> None:
    manifest = json.loads((directory / ckpt.MANIFEST).read_text())
    data = (directory / name).read_bytes()
    manifest["files"][name] = {"sha256": sha256(data).hexdigest(), "bytes": len(data)}
    (directory / ckpt.MANIFEST).write_text(json.dumps(manifest))


def edit_manifest(directory: Path, **changes: Any) -> None:
    manifest = json.loads((directory / ckpt.MANIFEST).read_text())
    manifest.update(changes)
    (directory / ckpt.MANIFEST).write_text(json.dumps(manifest))


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def resume_auto(work: Path, caplog: pytest.LogCaptureFixture) -> tuple[list[dict[str, Any]], list[str]]:
    """Resume the run (auto) to step 6; returns what was loaded and the skip warnings."""
    record = RecordLoad()
    with caplog.at_level(logging.WARNING, logger="llm"):
        train(work, 6, (record,))
    return record.loaded, [r.getMessage() for r in caplog.records if "skipping checkpoint" in r.getMessage()]


# ---------------------------------------------------------------------------------------------
# A payload in each file type of a checkpoint
# ---------------------------------------------------------------------------------------------


def test_payload_in_a_trainer_state_stops_auto_resume_and_never_runs(work):
    marker, step4 = work / "pwned", ckpt_dir(work)
    torch.save({"state": Payload(str(marker))}, step4 / ckpt.trainer_state_name(0))
    rehash(step4, ckpt.trainer_state_name(0))
    before = snapshot(work / "run" / "checkpoints")
    with pytest.raises(UnsafeCheckpointError, match="refusing to load .*trainer_state_rank0.pt"):
        train(work, 6)
    assert not marker.exists()
    assert snapshot(work / "run" / "checkpoints") == before  # the evidence is kept, nothing overwritten


def test_payload_in_config_yaml_never_runs(work, tmp_path):
    marker, control, step4 = work / "pwned", tmp_path / "control", ckpt_dir(work)
    tag = "!!python/object/apply:builtins.open [{}, w]\n"
    (step4 / ckpt.CONFIG).write_text(tag.format(json.dumps(str(marker))))
    rehash(step4, ckpt.CONFIG)
    with pytest.raises(UnsafeCheckpointError, match="YAML tags that build Python objects"):
        ckpt.inspect_checkpoint(step4)
    with pytest.raises(UnsafeCheckpointError):
        train(work, 6)
    assert not marker.exists()
    yaml.unsafe_load(tag.format(json.dumps(str(control))))  # the payload is live for a naive loader
    assert control.exists()


@pytest.mark.parametrize("target", [ckpt.MANIFEST, ckpt.WEIGHTS])
def test_payload_in_manifest_or_weights_is_skipped_under_auto(work, caplog, target):
    marker, step4 = work / "pwned", ckpt_dir(work)
    (step4 / target).write_bytes(pickle.dumps(Payload(str(marker))))
    if target != ckpt.MANIFEST:
        rehash(step4, target)
    with pytest.raises(CheckpointError, match="unreadable" if target == ckpt.MANIFEST else "cannot read"):
        ckpt.inspect_checkpoint(step4)
    loaded, skipped = resume_auto(work, caplog)
    assert [entry["step"] for entry in loaded] == [2]
    assert len(skipped) == 1 and STEP4 in skipped[0]
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# Sharded (FSDP) checkpoints: `.metadata` and the `.distcp` shards
# ---------------------------------------------------------------------------------------------


def write_shards(directory: Path) -> None:
    """A torch.distributed.checkpoint directory holding tensors and, like an optimizer's param_groups, plain data."""
    import torch.distributed.checkpoint as dcp

    state = {"model": {"w": torch.arange(6.0).reshape(2, 3)}, "optimizer": {"param_groups": [{"lr": 0.5}]}}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(state, checkpoint_id=str(directory), no_dist=True)


def dcp_load(directory: Path, safe: bool = True) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    state = {"model": {"w": torch.zeros(2, 3)}, "optimizer": {"param_groups": [{"lr": 0.0}]}}
    reader, planner = (shard_reader(directory), safe_load_planner()) if safe else (FileSystemReader(directory), None)
    with warnings.catch_warnings(), plain_errors("loading"):  # as fsdp.load_sharded and runs.py call it
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, storage_reader=reader, planner=planner, no_dist=True)
    return state


def read_metadata_naively(directory: Path) -> Any:
    with open(directory / ".metadata", "rb") as f:
        return pickle.load(f)


def write_metadata(directory: Path, metadata: Any) -> None:
    (directory / ".metadata").write_bytes(pickle.dumps(metadata))


def append_to_shard(directory: Path, fqn: str, blob: bytes) -> None:
    """Point the storage record of `fqn` at `blob`, appended to the shard file (what an attacker would do)."""
    metadata = read_metadata_naively(directory)
    index = next(i for i in metadata.storage_data if i.fqn == fqn)
    info = metadata.storage_data[index]
    shard = directory / info.relative_path
    offset = shard.stat().st_size
    with open(shard, "ab") as f:
        f.write(blob)
    info.offset, info.length = offset, len(blob)
    write_metadata(directory, metadata)


def torch_saved(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def test_real_shard_metadata_round_trips_through_the_safe_reader(tmp_path):
    write_shards(tmp_path / "s")
    state = dcp_load(tmp_path / "s")
    assert torch.equal(state["model"]["w"], torch.arange(6.0).reshape(2, 3))
    assert state["optimizer"]["param_groups"][0]["lr"] == 0.5  # a bytes entry, read with weights_only


def test_payload_as_shard_metadata_never_runs(tmp_path, capsys):
    shards, marker, control = tmp_path / "ckpt" / "sharded", tmp_path / "pwned", tmp_path / "control"
    write_shards(shards)
    (shards / ".metadata").write_bytes(pickle.dumps(Payload(str(marker))))
    with pytest.raises(UnsafeCheckpointError, match=r"refusing to load .*\.metadata.*io.open"):
        ckpt.load_shard_metadata(shards / ".metadata")
    with pytest.raises(UnsafeCheckpointError):
        load_sharded_weights(shards)
    assert consolidate_main([str(shards), str(tmp_path / "out.safetensors")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: checkpoint: refusing to load")
    assert not marker.exists()
    (shards / ".metadata").write_bytes(pickle.dumps(Payload(str(control))))
    read_metadata_naively(shards)  # what torch's FileSystemReader.read_metadata does: the payload runs
    assert control.exists()


def test_payload_hidden_inside_valid_metadata_never_runs(tmp_path):
    shards, marker = tmp_path / "sharded", tmp_path / "pwned"
    write_shards(shards)
    metadata = read_metadata_naively(shards)
    metadata.planner_data = {"model.w": Payload(str(marker))}
    write_metadata(shards, metadata)
    with pytest.raises(UnsafeCheckpointError, match="io.open is not part of checkpoint metadata"):
        ckpt.load_shard_metadata(shards / ".metadata")
    assert not marker.exists()


def test_payload_in_a_shard_file_never_runs(tmp_path):
    shards, marker, control = tmp_path / "sharded", tmp_path / "pwned", tmp_path / "control"
    write_shards(shards)
    append_to_shard(shards, "optimizer.param_groups.0.lr", torch_saved(Payload(str(marker))))
    with pytest.raises(UnsafeCheckpointError, match="refusing to load the shard entry 'optimizer.param_groups.0.lr'"):
        dcp_load(shards)
    assert not marker.exists()
    append_to_shard(shards, "optimizer.param_groups.0.lr", torch_saved(Payload(str(control))))
    dcp_load(shards, safe=False)  # torch's DefaultLoadPlanner.load_bytes uses weights_only=False: it runs
    assert control.exists()


def test_payload_in_a_tensor_entry_of_a_shard_never_runs(tmp_path):
    shards, marker = tmp_path / "sharded", tmp_path / "pwned"
    write_shards(shards)
    append_to_shard(shards, "model.w", torch_saved(Payload(str(marker))))
    with pytest.raises(CheckpointError, match="cannot read the shards"):
        load_sharded_weights(shards)
    assert not marker.exists()


def test_metadata_cannot_swap_a_tensor_for_an_object_or_read_outside(tmp_path):
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

    shards = tmp_path / "ckpt" / "sharded"
    write_shards(shards)
    metadata = read_metadata_naively(shards)
    metadata.state_dict_metadata["model.w"] = BytesStorageMetadata()
    lr = next(i for i in metadata.storage_data if i.fqn == "optimizer.param_groups.0.lr")
    metadata.storage_data[MetadataIndex("model.w")] = metadata.storage_data[lr]  # a blob that loads as 0.5
    write_metadata(shards, metadata)
    with pytest.raises(CheckpointError, match="bytes where the tensor 'model.w' belongs"):
        dcp_load(shards)

    write_shards(tmp_path / "fresh")
    metadata = read_metadata_naively(tmp_path / "fresh")
    (tmp_path / "outside.distcp").write_bytes((tmp_path / "fresh" / "__0_0.distcp").read_bytes())
    for info in metadata.storage_data.values():
        info.relative_path = "../outside.distcp"
    write_metadata(shards, metadata)
    with pytest.raises(CheckpointError, match="storage file '../outside.distcp' is not a file of its directory"):
        load_sharded_weights(shards)


# ---------------------------------------------------------------------------------------------
# Manifests: names confined to the checkpoint, fields checked; auto skips the malformed
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../step-00000002/model.safetensors", "/etc/hostname", "sharded/../../x",
                                  "a\\..\\b", "C:x", "./model.safetensors", "", "sharded//.metadata"])
def test_manifest_names_outside_the_checkpoint_are_refused(work, name):
    step4 = ckpt_dir(work)
    manifest = json.loads((step4 / ckpt.MANIFEST).read_text())
    manifest["files"][name] = {"sha256": "0" * 64, "bytes": 0}
    (step4 / ckpt.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="not a path inside the checkpoint"):
        ckpt.read_manifest(step4)


def test_a_symlink_out_of_the_checkpoint_is_refused(work):
    step4, outside = ckpt_dir(work), work / "secret.txt"
    outside.write_text("not yours")
    (step4 / "notes.txt").symlink_to(outside)
    rehash(step4, "notes.txt")  # the checksum matches: only the confinement check refuses it
    with pytest.raises(CheckpointError, match="'notes.txt', which leads outside the checkpoint directory"):
        ckpt.verify_checkpoint(step4)


MALFORMED_MANIFESTS = {
    "files-a-list": dict(files=["model.safetensors"]),
    "entry-not-a-dict": dict(files={"model.safetensors": "abc"}),
    "bytes-a-string": dict(files={"model.safetensors": {"sha256": "0" * 64, "bytes": "12"}}),
    "sha-not-hex": dict(files={"model.safetensors": {"sha256": "xyz", "bytes": 1}}),
    "other-format": dict(format=2),
    "format-a-bool": dict(format=True),
    "no-format": dict(format=None),
    "step-a-string": dict(step="4"),
    "no-world-size": dict(world_size=None),
    "world-size-zero": dict(world_size=0),
}


@pytest.mark.parametrize("change", MALFORMED_MANIFESTS.values(), ids=MALFORMED_MANIFESTS.keys())
def test_malformed_manifests_are_one_line_checkpoint_errors(work, change):
    step4 = ckpt_dir(work)
    edit_manifest(step4, **change)
    with pytest.raises(CheckpointError) as info:
        ckpt.verify_checkpoint(step4)
    assert "\n" not in str(info.value) and str(step4) in str(info.value)
    warned: list[str] = []
    assert ckpt.find_latest_checkpoint(step4.parent, warned.append, check=ckpt.inspect_checkpoint).name == STEP2
    assert len(warned) == 1 and STEP4 in warned[0]


# ---------------------------------------------------------------------------------------------
# Trainer states that load but are malformed
# ---------------------------------------------------------------------------------------------


def _spoil_state(change: str) -> Any:
    def spoil(state: dict[str, Any]) -> Any:
        if change == "a-list":
            return [state]
        if change == "no-rng":
            del state["rng"]
        elif change == "step-a-string":
            state["state"]["step"] = "4"
        elif change == "optimizer-groups-a-dict":
            state["optimizer"]["param_groups"] = {}
        elif change == "python-rng-short":
            state["rng"]["python"]["state"] = state["rng"]["python"]["state"][:10]
        elif change == "torch-rng-float":
            state["rng"]["torch"] = state["rng"]["torch"].float()
        elif change == "callbacks-a-list":
            state["callbacks"] = []
        return state

    return spoil


STATE_CHANGES = ["a-list", "no-rng", "step-a-string", "optimizer-groups-a-dict", "python-rng-short",
                 "torch-rng-float", "callbacks-a-list"]


@pytest.mark.parametrize("change", STATE_CHANGES)
def test_malformed_trainer_states_are_checkpoint_errors(work, change):
    path = ckpt_dir(work) / ckpt.trainer_state_name(0)
    torch.save(_spoil_state(change)(ckpt.load_trainer_state(path)), path)
    with pytest.raises(CheckpointError, match="is not a valid trainer state"):
        ckpt.load_trainer_state(path)


AUTO_SKIPS = {
    "malformed-state": lambda d: (torch.save(_spoil_state("python-rng-short")(
        ckpt.load_trainer_state(d / ckpt.trainer_state_name(0))), d / ckpt.trainer_state_name(0)),
        rehash(d, ckpt.trainer_state_name(0))),
    "manifest-escape": lambda d: edit_manifest(d, files={"../step-00000002/config.yaml": {"sha256": "0" * 64,
                                                                                          "bytes": 1}}),
    "manifest-other-format": lambda d: edit_manifest(d, format=7),
    "config-not-a-mapping": lambda d: ((d / ckpt.CONFIG).write_text("- a\n"), rehash(d, ckpt.CONFIG)),
}


@pytest.mark.parametrize("spoil", AUTO_SKIPS.values(), ids=AUTO_SKIPS.keys())
def test_auto_resume_skips_a_malformed_checkpoint_for_the_older_one(work, caplog, spoil):
    spoil(ckpt_dir(work))
    loaded, skipped = resume_auto(work, caplog)
    assert [entry["step"] for entry in loaded] == [2]
    assert len(skipped) == 1 and STEP4 in skipped[0]


def test_a_malformed_checkpoint_named_explicitly_is_an_error(work):
    AUTO_SKIPS["malformed-state"](ckpt_dir(work))
    with pytest.raises(CheckpointError, match="is not a valid trainer state: rng.python"):
        train(work / "branch", 6, (), "--checkpoint-resume", str(ckpt_dir(work)))
