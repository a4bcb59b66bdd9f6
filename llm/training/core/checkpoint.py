"""Checkpoint files: weights, RNG state, and the atomic checkpoint directory format.

A checkpoint is a directory `RUN_DIR/checkpoints/step-XXXXXXXX/` holding

- `model.safetensors`: the weights (rank 0; safetensors, so no code can run on load; tied weights once),
- `trainer_state_rank{r}.pt`: `engine.state_dict()` of rank r (optimizer, schedule, counters, RNG, data
  position, callback states), written with `torch.save` and read back only with `weights_only=True`,
- `config.yaml`: the resolved run config (it rebuilds the model),
- `manifest.json`: written last, with the sha256 of every other file; its presence marks the checkpoint
  complete.

With FSDP (`distributed.strategy=fsdp`) `model.safetensors` is replaced by `sharded/`, a
`torch.distributed.checkpoint` directory of every rank's weight and optimizer shards (fsdp.py), and the
trainer states hold no optimizer; the shard files are listed in the manifest like the others.

Files are written into `checkpoints/.tmp-step-XXXXXXXX/`, fsynced, and the directory is renamed into place,
so a crash leaves either the previous state or a complete checkpoint, never a half-written one that looks
complete. This module holds the file-level pieces; the `ModelCheckpoint` callback (checkpointing.py)
decides when to save and what to resume from.

Reading a run back is here too, next to the format: `load_run` (used by `llm.generate`, `llm.export` and the
FSDP consolidation) turns a run directory, a checkpoint directory or a weights file into config, model and
tokenizer, and only ever picks a complete checkpoint (see `resolve_run` for the rule).

Files are written readable like any other file the user creates (mode 0666 minus the umask): safetensors
creates its files 0600, which would hide a run's weights from the rest of a team sharing a machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_model, save_model
from torch import nn

from llm.errors import UserError

CHECKPOINTS_DIR = "checkpoints"
MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
SHARDED_DIR = "sharded"  # FSDP checkpoints: the torch.distributed.checkpoint directory of the shards
SHARDED_METADATA = f"{SHARDED_DIR}/.metadata"
CONFIG = "config.yaml"
TMP_PREFIX = ".tmp-"
FORMAT_VERSION = 1
FINAL_STEP_KEY = "step"  # safetensors metadata of a run's final weights: the step they were saved at
_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(UserError):
    """A checkpoint cannot be written or read (disk full, corrupt, unsafe, incompatible): one line, exit 2."""


# ---------------------------------------------------------------------------------------------
# Weights and RNG (the engine uses these directly)
# ---------------------------------------------------------------------------------------------


def save_weights(model: nn.Module, path: str | os.PathLike, step: int | None = None) -> None:
    """Write `model`'s weights as safetensors, atomically (temp file, fsync, rename).

    `step` (a run's final weights) is recorded in the file's metadata, so that `resolve_run` can tell a final
    file from before a resume apart from the newer checkpoints the resumed run has written since.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_model(model, str(tmp), metadata=None if step is None else {FINAL_STEP_KEY: str(step)})
    make_readable(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_weights(model: nn.Module, path: str | os.PathLike, strict: bool = True) -> None:
    load_model(model, str(path), strict=strict)


def rng_state() -> dict[str, Any]:
    """Every RNG of this process, as plain ints, floats, strings and tensors.

    Python's and NumPy's native states are tuples holding a NumPy array; they are converted so the
    trainer state loads with `torch.load(weights_only=True)` (no arbitrary unpickling).
    """
    version, mt, gauss_next = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss_next": gauss_next},
        "numpy": {
            "name": str(np_name),
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` returned (also accepts the native tuples of older states)."""
    py = state["python"]
    if isinstance(py, dict):
        py = (py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss_next"])
    random.setstate(py)
    npy = state["numpy"]
    if isinstance(npy, dict):
        keys = npy["keys"].numpy().astype(np.uint32)
        npy = (npy["name"], keys, npy["pos"], npy["has_gauss"], npy["cached_gaussian"])
    np.random.set_state(npy)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------
# Durable file writes
# ---------------------------------------------------------------------------------------------


def _umask() -> int:
    try:  # Linux reports it without changing it (os.umask can only read by setting, racing other threads)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def make_readable(path: str | os.PathLike) -> None:
    """Give a file the mode an ordinary `open()` would (0666 minus the umask, e.g. 0644).

    safetensors creates its files 0600; the rest of a run (config, metrics, trainer states) follows the umask.
    """
    os.chmod(path, 0o666 & ~_umask())


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in `path` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes(path: Path, data: bytes | memoryview) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def save_trainer_state(state: dict[str, Any], path: Path) -> None:
    """`torch.save` to `path`, fsynced. The state must hold only weights_only-loadable types."""
    with open(path, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint_weights(model: nn.Module, path: Path) -> None:
    save_model(model, str(path))
    make_readable(path)
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# The checkpoint directory
# ---------------------------------------------------------------------------------------------


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def trainer_state_name(rank: int) -> str:
    return f"trainer_state_rank{rank}.pt"


def checkpoint_step(path: Path) -> int | None:
    match = _STEP_DIR.match(path.name)
    return int(match.group(1)) if match else None


def write_manifest(ckpt_dir: Path, step: int, world_size: int, extra: dict[str, Any] | None = None) -> None:
    """Hash every file of `ckpt_dir` and write `manifest.json` (temp file, fsync, rename): the commit marker."""
    files = {}
    for path in sorted(ckpt_dir.iterdir()):
        if path.is_file() and path.name != MANIFEST and not path.name.endswith(".tmp"):
            files[path.name] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    if (ckpt_dir / SHARDED_DIR).is_dir():  # FSDP shards, one level down, are covered like every other file
        for path in sorted((ckpt_dir / SHARDED_DIR).iterdir()):
            if path.is_file():
                files[f"{SHARDED_DIR}/{path.name}"] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    manifest = {
        "format": FORMAT_VERSION,
        "step": step,
        "world_size": world_size,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "files": files,
        **(extra or {}),
    }
    tmp = ckpt_dir / (MANIFEST + ".tmp")
    write_bytes(tmp, json.dumps(manifest, indent=1).encode())
    os.replace(tmp, ckpt_dir / MANIFEST)
    fsync_dir(ckpt_dir)


def read_manifest(ckpt_dir: Path) -> dict[str, Any]:
    """The manifest of a checkpoint; raises CheckpointError when it is missing or unreadable."""
    path = ckpt_dir / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"checkpoint: {ckpt_dir} is incomplete (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint: {path} is unreadable: {exc}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"checkpoint: {path} is not a checkpoint manifest")
    return manifest


def verify_checkpoint(ckpt_dir: Path) -> dict[str, Any]:
    """Check the manifest and every file's size and sha256; returns the manifest or raises CheckpointError."""
    manifest = read_manifest(ckpt_dir)
    for name, entry in manifest["files"].items():
        path = ckpt_dir / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint: {ckpt_dir} is missing {name}")
        if path.stat().st_size != entry.get("bytes") or sha256_file(path) != entry.get("sha256"):
            raise CheckpointError(f"checkpoint: {path} fails its checksum (corrupt or modified)")
    weights = SHARDED_METADATA if SHARDED_METADATA in manifest["files"] else WEIGHTS
    for required in (weights, trainer_state_name(0)):
        if required not in manifest["files"]:
            raise CheckpointError(f"checkpoint: {ckpt_dir} has no {required}")
    return manifest


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, path) of every `step-*` directory under `root`, oldest first (complete or not)."""
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        step = checkpoint_step(path)
        if step is not None and path.is_dir() and not path.is_symlink():
            found.append((step, path))
    return sorted(found)


def find_latest_checkpoint(
    root: Path, warn: Callable[[str], None], *, after: int = -1,
    check: Callable[[Path], Any] = verify_checkpoint,
) -> Path | None:
    """The newest checkpoint under `root` (of a step > `after`) that passes `check` (by default it verifies);
    each one skipped is reported through `warn`."""
    for step, path in reversed(list_checkpoints(root)):
        if step <= after:
            break
        try:
            check(path)
        except CheckpointError as exc:
            warn(f"skipping checkpoint {path}: {str(exc).removeprefix('checkpoint: ')}")
            continue
        return path
    return None


def commit_checkpoint(tmp: Path, final: Path) -> None:
    """Rename the finished temp directory into place; an existing `final` (an older save of the same
    step, e.g. a corrupt one that resume skipped) is moved aside first and removed after."""
    trash = None
    if final.exists():
        trash = final.with_name(f"{TMP_PREFIX}old-{final.name}")
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(final, trash)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


def remove_stale_temps(root: Path) -> list[Path]:
    """Delete temp directories left by a crash during a save; returns what was removed."""
    removed = []
    if root.is_dir():
        for path in root.iterdir():
            if path.name.startswith(TMP_PREFIX) and path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


def prune_checkpoints(
    root: Path, keep_last: int, up_to_step: int, protect: set[str], remove: Callable[[Path], None] | None = None
) -> list[Path]:
    """Delete complete checkpoints older than the newest `keep_last` (counting those <= `up_to_step`),
    never one named in `protect` (the best). Returns the deleted directories.

    Each is first renamed to a temp name (instant, and a crash mid-delete cannot leave a directory that
    still looks complete); `remove` then deletes it, by default right away.
    """
    complete = [(s, p) for s, p in list_checkpoints(root) if s <= up_to_step and (p / MANIFEST).is_file()]
    deleted = []
    for _, path in complete[:-keep_last] if keep_last > 0 else complete:
        if path.name in protect:
            continue
        doomed = path.with_name(f"{TMP_PREFIX}del-{path.name}")
        shutil.rmtree(doomed, ignore_errors=True)
        os.replace(path, doomed)
        (remove or _remove_tree)(doomed)
        deleted.append(path)
    return deleted


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def load_trainer_state(path: Path) -> dict[str, Any]:
    """Read a trainer state with `weights_only=True`: tensors and plain containers only, never code."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"checkpoint: refusing to load {path}: it holds objects other than tensors and plain data, "
            f"which could run code on load ({first})"
        ) from None
    except (OSError, RuntimeError, EOFError) as exc:
        raise CheckpointError(f"checkpoint: cannot read {path}: {exc}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint: {path} does not hold a trainer state")
    return state


def weight_mismatches(model: nn.Module, path: Path) -> list[str]:
    """Tensors whose name or shape differ between `model` and the safetensors file (empty if compatible)."""
    with safe_open(str(path), framework="pt") as f:
        saved = {key: list(f.get_slice(key).get_shape()) for key in f.keys()}
    return shape_mismatches(model, saved)


def shape_mismatches(model: nn.Module, saved: dict[str, list[int]]) -> list[str]:
    params = model.state_dict(keep_vars=True)
    problems = []
    for name, tensor in params.items():
        if name in saved:
            if saved[name] != list(tensor.shape):
                problems.append(f"{name} (checkpoint {saved[name]}, model {list(tensor.shape)})")
            continue
        # Tied weights are stored once under one of their names. They are one Parameter object; comparing
        # storage pointers instead would call every tensor of a meta-device model tied.
        if not any(other in saved and t is tensor for other, t in params.items() if other != name):
            problems.append(f"{name} (not in checkpoint)")
    problems += [f"{name} (not in model)" for name in saved if name not in params]
    return problems


def summarize_mismatches(problems: list[str]) -> str:
    return ", ".join(problems[:6]) + (f", and {len(problems) - 6} more" if len(problems) > 6 else "")


def load_checkpoint_weights(model: nn.Module, path: Path) -> None:
    """Load weights after checking every tensor's name and shape; a mismatch names the tensors."""
    problems = weight_mismatches(model, path)
    if problems:
        raise CheckpointError(
            f"checkpoint: the model does not match {path}: {summarize_mismatches(problems)}; resume with the model "
            "config the checkpoint was written with (its config.yaml), or use --checkpoint-resume none"
        )
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    load_model(model, str(path), strict=True, device=str(device))
