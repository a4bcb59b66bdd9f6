"""Sharded and single-file weights on disk: safetensors writes that keep tied names, the writer of a staged sharded
state (`write_shards`, an asynchronous save's background half), and safe readers of a `torch.distributed.checkpoint`
directory.

Every read of a DCP directory goes through `shard_reader` and `safe_load_planner`, never DCP's defaults: DCP unpickles
`.metadata` with plain `pickle` and non-tensor entries of the shards with `torch.load(weights_only=False)`, so a
crafted checkpoint would run code on load. Here the metadata is read by `checkpoint.load_shard_metadata` (only
DCP's metadata classes) and byte entries with `weights_only=True`.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llm import fs
from llm.artifacts.checkpoint import (
    FINAL_STEP_KEY,
    CheckpointError,
    load_shard_metadata,
    safe_torch_load,
)
from llm.errors import UserError

TIED_FILE = "tied_weights.json"  # names sharing one parameter (DCP stores each name separately)


def tied_groups(model: nn.Module) -> list[list[str]]:
    """Names that share one parameter object (e.g. tied embeddings), each group as listed by the model."""
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def _drop_tied_copies(state: dict[str, torch.Tensor], groups: list[list[str]]) -> dict[str, str]:
    """Store each tied group once, under the name safetensors' `save_model` keeps; returns its metadata.

    A gathered state dict holds an unshared copy per name, which `load_model(strict=True)` would reject
    as an unexpected key, so the copies are made to share and then deduplicated the way `save_model` does.
    """
    for names in groups:
        present = [n for n in names if n in state]
        for name in present[1:]:
            state[name] = state[present[0]]
    if not groups:
        return {}
    from safetensors.torch import _remove_duplicate_names

    metadata = {}
    for kept, removed in _remove_duplicate_names(state).items():
        for name in removed:
            metadata[name] = kept
            del state[name]
    return metadata


def write_safetensors(state: dict[str, torch.Tensor], path: Path, groups: list[list[str]] | None = None,
                      step: int | None = None) -> None:
    """Write `state` as one readable safetensors file, atomically (temp file, fsync, rename); `step` is recorded
    in its metadata as for a run's final weights (see `checkpoint.save_weights`)."""
    from safetensors.torch import save_file

    metadata = _drop_tied_copies(dict(state), list(groups)) if groups else {}
    state = {k: v for k, v in state.items() if k not in metadata}
    if step is not None:
        metadata[FINAL_STEP_KEY] = str(step)
    with fs.atomic_path(path) as tmp:  # `<name>.tmp` beside it
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata=metadata or None)


def write_shards(state: dict[str, Any], directory: Path, groups: list[list[str]], process_group: Any) -> None:
    """Write a sharded state staged in host memory (DTensors whose local shards are host copies) as a DCP directory,
    coordinating the ranks over `process_group` (a collective of that group: every rank calls it, in the same order).

    An asynchronous save calls this in its writer thread, so the group must be one the training thread never uses:
    DCP's plan exchange would otherwise interleave with training's collectives. `groups` (the model's tied names) go
    to `TIED_FILE`, written by the group's rank 0, as a synchronous save does."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    with plain_errors("saving the shards"):
        dcp.save(state, checkpoint_id=str(directory), process_group=process_group)
    if groups and dist.get_rank(process_group) == 0:
        fs.write_durable(directory / TIED_FILE, json.dumps(groups).encode())


@contextlib.contextmanager
def plain_errors(what: str) -> Iterator[None]:
    """Re-raise DCP's `CheckpointException` (a BaseException gathered from every rank, so all ranks raise it
    alike) as the first rank's CheckpointError or OSError, or a RuntimeError, which callers handle like any
    failed read or write."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        yield
    except CheckpointException as exc:
        failures = getattr(exc, "failures", {}) or {}
        first = next(iter(failures.values()))[0] if failures else exc
        if isinstance(first, (OSError, UserError)):
            raise first from None
        raise RuntimeError(f"{what} failed on rank(s) {sorted(failures)}: {first!r}") from None


def shard_reader(directory: str | os.PathLike) -> Any:
    """DCP's `FileSystemReader` for `directory`, with `.metadata` read by `checkpoint.load_shard_metadata` (no
    code can run, storage files confined to the directory) instead of `pickle.load`."""
    return _safe_dcp_classes()[0](str(directory))


def safe_load_planner() -> Any:
    """DCP's `DefaultLoadPlanner`, except that non-tensor entries load with `weights_only=True`.

    `DefaultLoadPlanner.load_bytes` reads them with `torch.load(weights_only=False)` (code execution from a shard
    file). Here the blob is read with `weights_only=True` and handed on re-serialized (so DCP's own placement
    logic runs on data known to be plain); a blob where the target expects a tensor is refused, so crafted
    metadata cannot swap a weight for an object.
    """
    return _safe_dcp_classes()[1]()


@functools.cache
def _safe_dcp_classes() -> tuple[type, type]:
    # Built on first use: importing torch.distributed.checkpoint costs every run about a second otherwise.
    from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class ShardReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            rank = kwargs.get("rank")  # set only for checkpoints saved without rank coordination (not ours)
            name = ".metadata" if rank is None else f"__{rank}.metadata"
            metadata = load_shard_metadata(Path(str(self.path)) / name)
            if metadata.storage_meta is None:  # as FileSystemReader does: the load id identifies this load
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = getattr(self, "load_id", None)
            return metadata

    class SafeLoadPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            fqn = read_item.dest_index.fqn
            if isinstance(getattr(self, "state_dict", {}).get(fqn), torch.Tensor):
                raise CheckpointError(f"checkpoint: the shards hold bytes where the tensor {fqn!r} belongs")
            plain = safe_torch_load(value, f"the shard entry {fqn!r}")
            buffer = io.BytesIO()
            torch.save(plain, buffer)
            buffer.seek(0)
            super().load_bytes(read_item, buffer)

    return ShardReader, SafeLoadPlanner
