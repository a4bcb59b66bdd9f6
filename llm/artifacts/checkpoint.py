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
complete. This module holds the file-level pieces; the `Checkpointer` service (llm/training/checkpointer.py)
decides when to save and what to resume from.

Reading a run back is here too, next to the format: `load_run` (used by `llm.generate`, `llm.export` and the
FSDP consolidation) turns a run directory, a checkpoint directory or a weights file into config, model and
tokenizer, and only ever picks a complete checkpoint (see `resolve_run` for the rule).

Nothing read back from a checkpoint is trusted, even when its checksum matches (whoever can change a file can
re-hash the manifest): manifests are checked field by field and may only name files inside their checkpoint
directory; trainer states load with `weights_only=True` and must have the engine's layout; the DCP `.metadata`
pickle (which torch itself reads with plain `pickle`) goes through a restricted unpickler that can only build
DCP's metadata classes. `inspect_checkpoint` checks all of that cheaply, so `resume=auto` can skip a bad checkpoint
instead of failing on it after choosing it.

Files are written by the package's one file rule (`llm.fs`): readable like any other file the user creates (mode
0666 minus the umask; safetensors alone creates its files 0600), fsynced, and renamed into place.
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
from collections.abc import Callable, Iterable
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import numpy as np
import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model, save_model
from torch import nn

from llm import fs, untrusted
from llm.errors import UserError

CHECKPOINTS_DIR = "checkpoints"
MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
SHARDED_DIR = "sharded"  # FSDP checkpoints: the torch.distributed.checkpoint directory of the shards
SHARDED_METADATA = f"{SHARDED_DIR}/.metadata"
CONFIG = "config.yaml"
TMP_PREFIX = ".tmp-"
FORMAT_VERSION = 1
MAX_CONFIG_BYTES = 8 * 2**20  # a run's config.yaml is a few kilobytes
FINAL_STEP_KEY = "step"  # safetensors metadata of a run's final weights: the step they were saved at
_STEP_DIR = re.compile(r"^step-(\d{1,18})$")  # more digits: not a step of ours (nor an int to parse)


class CheckpointError(UserError):
    """A checkpoint cannot be written or read (disk full, corrupt, unsafe, incompatible): one line, exit 2."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file holds what could run code if loaded naively (a pickle naming other classes, a YAML tag
    that builds objects): someone modified the run directory. `resume=auto` stops on it rather than skipping,
    so that the evidence is neither hidden nor overwritten by the new saves."""


# ---------------------------------------------------------------------------------------------
# Weights and RNG (the engine uses these directly)
# ---------------------------------------------------------------------------------------------


def save_weights(model: nn.Module, path: str | os.PathLike, step: int | None = None) -> None:
    """Write `model`'s weights as safetensors, atomically (temp file, fsync, rename).

    `step` (a run's final weights) is recorded in the file's metadata, so that `resolve_run` can tell a final
    file from before a resume apart from the newer checkpoints the resumed run has written since.
    """
    with fs.atomic_path(path) as tmp:  # `model.safetensors.tmp` beside it
        save_model(model, str(tmp), metadata=None if step is None else {FINAL_STEP_KEY: str(step)})


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
# Checkpoint files (written into the temp directory that `commit_checkpoint` renames into place)
# ---------------------------------------------------------------------------------------------


def save_trainer_state(state: dict[str, Any], path: Path) -> None:
    """`torch.save` to `path`, fsynced. The state must hold only weights_only-loadable types."""
    with open(path, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint_weights(model: nn.Module, path: Path) -> None:
    save_model(model, str(path))
    fs.make_readable(path)
    fs.fsync_file(path)


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
    fs.atomic_write(ckpt_dir / MANIFEST, json.dumps(manifest, indent=1))  # via `manifest.json.tmp`


def read_manifest(ckpt_dir: Path) -> dict[str, Any]:
    """The manifest of a checkpoint, checked field by field; raises CheckpointError when it is missing, unreadable
    or malformed, or names a file outside `ckpt_dir`."""
    path = ckpt_dir / MANIFEST
    if not os.path.lexists(path):  # anything else at the name (a FIFO, a directory) is an error, never opened
        raise CheckpointError(f"checkpoint: {ckpt_dir} is incomplete (no {MANIFEST})")
    try:
        manifest = untrusted.read_json(path)
    except untrusted.UntrustedFileError as exc:
        raise CheckpointError(f"checkpoint: {path} is unreadable: it {exc.why}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"checkpoint: {path} is not a checkpoint manifest")
    version = manifest.get("format")
    if not _is_int(version) or version != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint: {path} has format {version!r}; this version reads format {FORMAT_VERSION}")
    for key, least in (("step", 0), ("world_size", 1)):
        if not _is_int(manifest.get(key)) or manifest[key] < least:
            raise CheckpointError(f"checkpoint: {path}: {key} must be an integer >= {least}, not {manifest.get(key)!r}")
    named = checkpoint_step(ckpt_dir)
    if named is not None and named != manifest["step"]:  # a renamed or copied checkpoint: which step is it?
        raise CheckpointError(f"checkpoint: {ckpt_dir} is named for step {named} but its {MANIFEST} records step "
                              f"{manifest['step']}; rename it {step_dir_name(manifest['step'])} if that is its step")
    root = ckpt_dir.resolve()
    for name, entry in manifest["files"].items():
        _check_manifest_name(path, root, name)
        if not isinstance(entry, dict) or not _is_int(entry.get("bytes")) or entry["bytes"] < 0 \
                or not isinstance(entry.get("sha256"), str) or not _SHA256.match(entry["sha256"]):
            raise CheckpointError(f"checkpoint: {path}: the entry of {name!r} is not {{\"sha256\": hex, \"bytes\": n}}")
    return manifest


_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_manifest_name(manifest: Path, root: Path, name: Any) -> None:
    """A manifest entry must be a relative path below the checkpoint, also once symbolic links are followed:
    otherwise hashing or loading it would read any file the user can read."""
    plain = isinstance(name, str) and name and "\\" not in name and "\0" not in name \
        and not PurePosixPath(name).is_absolute() and not PureWindowsPath(name).drive \
        and all(part not in ("", ".", "..") for part in name.split("/"))
    if not plain:
        raise CheckpointError(f"checkpoint: {manifest} names {name!r}, which is not a path inside the checkpoint")
    if not (root / name).resolve().is_relative_to(root):
        raise CheckpointError(f"checkpoint: {manifest} names {name!r}, which leads outside the checkpoint directory")


def verify_checkpoint(ckpt_dir: Path) -> dict[str, Any]:
    """Check the manifest and every file's size and sha256; returns the manifest or raises CheckpointError."""
    manifest = read_manifest(ckpt_dir)
    for name, entry in manifest["files"].items():
        path = ckpt_dir / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint: {ckpt_dir} is missing {name}")
        if path.stat().st_size != entry["bytes"] or sha256_file(path) != entry["sha256"]:
            raise CheckpointError(f"checkpoint: {path} fails its checksum (corrupt or modified)")
    weights = SHARDED_METADATA if SHARDED_METADATA in manifest["files"] else WEIGHTS
    for required in (weights, trainer_state_name(0)):
        if required not in manifest["files"]:
            raise CheckpointError(f"checkpoint: {ckpt_dir} has no {required}")
    return manifest


def inspect_checkpoint(ckpt_dir: Path, ranks: Iterable[int] = (0,)) -> dict[str, Any]:
    """`verify_checkpoint`, then parse what a resume of `ranks` will read, without loading any tensor data:
    the trainer states (with their tensors memory-mapped), the weights' safetensors header or the shards'
    metadata, and the config. Returns the manifest; any malformed file is a CheckpointError, so `resume=auto`
    skips this checkpoint rather than choosing it and failing.

    Ranks the checkpoint was not written with are not looked for: a world-size change is reported when loading.
    """
    manifest = verify_checkpoint(ckpt_dir)
    files = manifest["files"]
    for rank in ranks:
        name = trainer_state_name(rank)
        if rank < manifest["world_size"]:
            if name not in files:
                raise CheckpointError(f"checkpoint: {ckpt_dir} has no {name} in its {MANIFEST}")
            counted = load_trainer_state(ckpt_dir / name, mmap=True)["state"].get("step", manifest["step"])
            if counted != manifest["step"]:
                raise CheckpointError(f"checkpoint: {ckpt_dir / name} counts step {counted} but the {MANIFEST} "
                                      f"records step {manifest['step']}")
    if SHARDED_METADATA in files:
        load_shard_metadata(ckpt_dir / SHARDED_METADATA)
    else:
        try:
            with safe_open(str(ckpt_dir / WEIGHTS), framework="pt") as f:
                f.keys()
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"checkpoint: cannot read {ckpt_dir / WEIGHTS}: {_first_line(exc)}") from None
    if CONFIG in files:
        read_checkpoint_config(ckpt_dir / CONFIG)
    return manifest


MAX_CONFIG_DEPTH = 64  # a run config is three levels deep; PyYAML's scanner slows quadratically with depth


class _TooDeep(Exception):
    pass


class _RunConfigLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that stops at `MAX_CONFIG_DEPTH` levels of nesting, before the parser's own recursion
    limit (which a crafted file reaches only after seconds of scanning)."""

    _depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self._depth += 1
        try:
            if self._depth > MAX_CONFIG_DEPTH:
                raise _TooDeep
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def read_checkpoint_config(path: Path) -> dict[str, Any]:
    """A checkpoint's config.yaml as a plain mapping (`yaml.safe_load`: tags that build objects are refused)."""
    try:
        data = yaml.load(untrusted.read_capped(path, MAX_CONFIG_BYTES).decode("utf-8"),  # noqa: S506
                         Loader=_RunConfigLoader)  # a SafeLoader
    except yaml.constructor.ConstructorError as exc:
        raise UnsafeCheckpointError(
            f"checkpoint: refusing to load {path}: it uses YAML tags that build Python objects ({_first_line(exc)})"
        ) from None
    except untrusted.UntrustedFileError as exc:
        raise CheckpointError(f"checkpoint: {path} {exc.why}") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise CheckpointError(f"checkpoint: cannot read {path}: {_first_line(exc)}") from None
    except (_TooDeep, RecursionError):
        raise CheckpointError(f"checkpoint: {path} is nested too deeply to be a run config") from None
    except ValueError as exc:  # e.g. an integer of more digits than Python converts
        raise CheckpointError(f"checkpoint: {path} holds a value that cannot be read: {_first_line(exc)}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"checkpoint: {path} is not a run config (expected a mapping)")
    return data


def refusal_reason(exc: BaseException) -> str:
    """The line of torch's weights_only refusal that names the global (its first line is advice, in ANSI bold)."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(exc).splitlines()]
    named = next((line for line in lines if "Unsupported global" in line), None)
    return named.split(" was not an allowed")[0] if named else _first_line(exc)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


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
    each one skipped is reported through `warn`. An `UnsafeCheckpointError` is raised, never skipped."""
    for step, path in reversed(list_checkpoints(root)):
        if step <= after:
            break
        try:
            check(path)
        except UnsafeCheckpointError:
            raise
        except CheckpointError as exc:
            warn(f"skipping checkpoint {path}: {str(exc).removeprefix('checkpoint: ')}")
            continue
        return path
    return None


def commit_checkpoint(tmp: Path, final: Path) -> None:
    """Rename the finished temp directory into place; an existing `final` (an older save of the same
    step, e.g. a corrupt one that resume skipped) is moved aside first (to a temp name, so a crash leaves it to
    `remove_stale_temps`) and removed after."""
    fs.replace_dir(tmp, final, aside=final.with_name(f"{TMP_PREFIX}old-{final.name}"))


def remove_stale_temps(root: Path) -> list[Path]:
    """Delete temp directories left by a crash during a save; returns what was removed.

    Only for a caller that knows their writer is gone: the checkpointer calls it when the run directory's lock has
    no other live holder (the lock is the owner record of every temp in the run; see `llm.fs.is_abandoned`)."""
    removed = []
    if root.is_dir():
        for path in root.iterdir():
            if not path.name.startswith(TMP_PREFIX) or not path.is_dir() or path.is_symlink():
                continue  # a link is not the framework's temp: never followed, never removed
            old = path.name.removeprefix(f"{TMP_PREFIX}old-")
            if old != path.name and fs.recover_replaced_dir(root / old, path):
                continue  # a crash between `replace_dir`'s renames: the old checkpoint is back under its name
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def prune_checkpoints(
    root: Path, keep_last: int, up_to_step: int, protect: set[str], remove: Callable[[Path], None] | None = None,
    foreign: Iterable[str] = (),
) -> list[Path]:
    """Delete complete checkpoints older than the newest `keep_last` (counting those <= `up_to_step`),
    never one named in `protect` (the best). Returns the deleted directories.

    Checkpoints after `up_to_step` and those named in `foreign` (another trajectory's, in a run directory a
    branch was started in) are neither counted nor deleted: pruning only ever removes this run's own history.
    Each is first renamed to a temp name (instant, and a crash mid-delete cannot leave a directory that
    still looks complete); `remove` then deletes it, by default right away.
    """
    skip = set(foreign)
    complete = [(s, p) for s, p in list_checkpoints(root)
                if s <= up_to_step and p.name not in skip and (p / MANIFEST).is_file()]
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


def safe_torch_load(source: Any, what: str, **kwargs: Any) -> Any:
    """`torch.load(source, weights_only=True)`: tensors and plain containers only, never code. A file holding
    anything else is an `UnsafeCheckpointError`, an unreadable one a `CheckpointError`, both naming `what`."""
    try:
        return torch.load(source, map_location="cpu", weights_only=True, **kwargs)
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpointError(
            f"checkpoint: refusing to load {what}: it holds objects other than tensors and plain data, "
            f"which could run code on load ({refusal_reason(exc)})"
        ) from None
    except (OSError, RuntimeError, EOFError, ValueError) as exc:
        raise CheckpointError(f"checkpoint: cannot read {what}: {_first_line(exc)}") from None


def load_trainer_state(path: Path, *, mmap: bool = False) -> dict[str, Any]:
    """Read a trainer state with `safe_torch_load` and check that it has the engine's layout
    (`check_trainer_state`). `mmap=True` leaves the tensor data on disk, which is how `inspect_checkpoint` checks a
    state cheaply."""
    state = safe_torch_load(path, str(path), mmap=mmap)
    check_trainer_state(state, path)
    return state


# The trainer state's layout, the one definition of its entries: entry -> the types its value may have. The
# engine's `StatefulComponents` (llm/training/state.py) accepts exactly these names.
TRAINER_STATE_LAYOUT: dict[str, tuple[type, ...]] = {
    "state": (dict,), "optimizer": (dict, type(None)), "lr_schedule": (dict,), "data": (dict,),
    "callbacks": (dict,), "rng": (dict,),
}
TRAINER_STATE_OPTIONAL: dict[str, tuple[type, ...]] = {
    "scaler": (dict, type(None)), "meter": (dict, type(None)), "checkpointer": (dict, type(None)),
    "spike": (dict, type(None)),  # loss-spike recovery (training.spike_policy=rollback): its window and skip list
}


def check_trainer_state(state: Any, path: Path) -> None:
    """Raise CheckpointError unless `state` has the layout of a trainer state: its entries and their types, the
    run counters as integers, the optimizer's `state`/`param_groups`, the RNG states with their shapes. What only
    applying it can tell (an optimizer of another model) is left to `engine.load_state_dict`."""

    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"checkpoint: {path} is not a valid trainer state: {what}")

    if not isinstance(state, dict):
        raise bad(f"a {type(state).__name__}, not a mapping")
    missing = [key for key in TRAINER_STATE_LAYOUT if key not in state]
    if missing:
        raise bad(f"no {', '.join(missing)}")
    for key, types in {**TRAINER_STATE_LAYOUT, **TRAINER_STATE_OPTIONAL}.items():
        if key in state and not isinstance(state[key], types):
            raise bad(f"{key} is a {type(state[key]).__name__}")
    counters = [k for k, v in state["state"].items() if not isinstance(k, str) or not _is_int(v)]
    if counters:
        raise bad(f"state.{counters[0]} is not an integer counter")
    optimizer = state["optimizer"]
    if optimizer is not None and (not isinstance(optimizer.get("state"), dict)
                                  or not isinstance(optimizer.get("param_groups"), list)
                                  or not all(isinstance(g, dict) for g in optimizer["param_groups"])):
        raise bad("optimizer has no state mapping and param_groups list")
    problem = _rng_problem(state["rng"])
    if problem:
        raise bad(f"rng.{problem}")


def _rng_problem(rng: dict[str, Any]) -> str | None:
    """What is wrong with the RNG states `rng_state` wrote (None: nothing), so that restoring them cannot fail."""

    def tensor(value: Any, dtype: torch.dtype, numel: int | None = None) -> bool:
        return isinstance(value, torch.Tensor) and value.dtype == dtype and value.dim() == 1 \
            and (numel is None or value.numel() == numel)

    py, npy, cpu = rng.get("python"), rng.get("numpy"), rng.get("torch")
    if isinstance(py, dict):
        if not _is_int(py.get("version")) or not tensor(py.get("state"), torch.int64, 625) \
                or not isinstance(py.get("gauss_next"), (float, type(None))):
            return "python is not a Python RNG state"
    elif not (isinstance(py, tuple) and len(py) == 3):  # the native tuple of older states
        return "python is missing"
    if isinstance(npy, dict):
        if not isinstance(npy.get("name"), str) or not tensor(npy.get("keys"), torch.int64, 624) \
                or not all(_is_int(npy.get(k)) for k in ("pos", "has_gauss")) \
                or not isinstance(npy.get("cached_gaussian"), (float, int)):
            return "numpy is not a NumPy RNG state"
    elif not (isinstance(npy, tuple) and len(npy) == 5):
        return "numpy is missing"
    if not tensor(cpu, torch.uint8):
        return "torch is not a torch RNG state"
    cuda = rng.get("cuda", [])
    if not isinstance(cuda, (list, tuple)) or not all(tensor(t, torch.uint8) for t in cuda):
        return "cuda is not a list of CUDA RNG states"
    return None


# ---------------------------------------------------------------------------------------------
# Sharded (FSDP) checkpoint metadata, without pickle's code execution
# ---------------------------------------------------------------------------------------------

_DCP_METADATA = "torch.distributed.checkpoint.metadata"
# Every global a DCP `.metadata` pickle refers to (collected from the FSDP checkpoints this framework writes, torch
# 2.11-2.13): the metadata dataclasses, tensor sizes, dtypes and layouts, and the Path of the checkpoint id. None
# of them runs anything when built. Python 3.13 moved the concrete path classes to `pathlib._local`.
_SHARD_METADATA_GLOBALS = frozenset({
    *((_DCP_METADATA, name) for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorStorageMetadata", "BytesStorageMetadata",
        "ChunkStorageMetadata", "TensorProperties", "_MEM_FORMAT_ENCODING",
    )),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
    ("pathlib._local", "PosixPath"), ("pathlib._local", "PurePosixPath"),
})


class _ForbiddenGlobal(pickle.UnpicklingError):
    """The pickle names a global outside the allowed set: what a payload does, never what DCP writes."""


class _ShardMetadataUnpickler(pickle.Unpickler):
    """An unpickler that can name only the globals of DCP metadata (torch dtypes included), nothing callable else."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _SHARD_METADATA_GLOBALS or (
            module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        ):
            return super().find_class(module, name)
        raise _ForbiddenGlobal(f"{module}.{name} is not part of checkpoint metadata")


def load_shard_metadata(path: Path) -> Any:
    """The `torch.distributed.checkpoint` `Metadata` in `path` (a `.metadata` file), read without running code.

    torch's `FileSystemReader.read_metadata` unpickles this file with plain `pickle`, so a crafted one would run
    code; here only DCP's metadata classes can be built. The result is checked too: each entry describes a tensor
    or a byte blob, and every storage file is a plain name in the same directory (no path out of it).
    """
    try:
        untrusted.check_regular(path)  # a FIFO would block the open forever
        with open(path, "rb") as f:
            metadata = _ShardMetadataUnpickler(f).load()
    except untrusted.UntrustedFileError as exc:
        raise CheckpointError(f"checkpoint: {path} {exc.why}") from None
    except _ForbiddenGlobal as exc:
        raise UnsafeCheckpointError(
            f"checkpoint: refusing to load {path}: it is not torch.distributed.checkpoint metadata, and loading "
            f"it could run code ({_first_line(exc)})"
        ) from None
    except OSError as exc:
        raise CheckpointError(f"checkpoint: cannot read {path}: {_first_line(exc)}") from None
    except Exception as exc:  # noqa: BLE001  (any failure of the allowed classes on crafted arguments)
        raise CheckpointError(f"checkpoint: {path} is not valid shard metadata: {_first_line(exc)}") from None
    problem = _shard_metadata_problem(metadata, path.parent)
    if problem:
        raise CheckpointError(f"checkpoint: {path} is not valid shard metadata: {problem}")
    return metadata


def _shard_metadata_problem(metadata: Any, directory: Path) -> str | None:
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (
        BytesStorageMetadata,
        ChunkStorageMetadata,
        Metadata,
        MetadataIndex,
        StorageMeta,
        TensorProperties,
        TensorStorageMetadata,
    )

    if not isinstance(metadata, Metadata):
        return f"a {type(metadata).__name__}"
    entries = getattr(metadata, "state_dict_metadata", None)
    if not isinstance(entries, dict):
        return "no state_dict_metadata mapping"
    for key, entry in entries.items():
        if isinstance(entry, TensorStorageMetadata):
            ok = isinstance(entry.size, torch.Size) and isinstance(entry.properties, TensorProperties) \
                and isinstance(entry.properties.dtype, torch.dtype) and isinstance(entry.chunks, list) \
                and all(isinstance(c, ChunkStorageMetadata) and isinstance(c.offsets, torch.Size)
                        and isinstance(c.sizes, torch.Size) for c in entry.chunks)
        else:
            ok = isinstance(entry, BytesStorageMetadata)
        if not isinstance(key, str) or not ok:
            return f"the entry {key!r} describes neither a tensor nor bytes"
    if not isinstance(getattr(metadata, "storage_meta", None), (StorageMeta, type(None))):
        return "storage_meta is not a StorageMeta"
    storage = getattr(metadata, "storage_data", None)
    if not isinstance(storage, dict):
        return "no storage_data mapping"
    root = directory.resolve()
    for index, info in storage.items():
        if not isinstance(index, MetadataIndex) or not isinstance(info, _StorageInfo):
            return "storage_data holds something other than storage records"
        name = info.relative_path
        if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name \
                or not (root / name).resolve().is_relative_to(root):
            return f"storage file {name!r} is not a file of its directory"
        if not untrusted.is_regular(root / name):  # DCP would open it blocking: a FIFO would hang the load
            return f"storage file {name!r} is not a regular file"
        if not _is_int(info.offset) or not _is_int(info.length) or info.offset < 0 or info.length < 0:
            return f"storage record of {index.fqn!r} has a bad offset or length"
    return None


def weight_mismatches(model: nn.Module, path: Path) -> list[str]:
    """Tensors whose name or shape differ between `model` and the safetensors file (empty if compatible)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            saved = {key: list(f.get_slice(key).get_shape()) for key in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:  # truncated, corrupt or not safetensors
        raise CheckpointError(f"checkpoint: cannot read {path}: {_first_line(exc)}") from None
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
    try:
        load_model(model, str(path), strict=True, device=str(device))
    except (SafetensorError, OSError, ValueError) as exc:  # a header that lies about its data
        raise CheckpointError(f"checkpoint: cannot read {path}: {_first_line(exc)}") from None
