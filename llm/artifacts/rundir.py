"""Where a run may write: the files the framework writes into a run directory, and the check that keeps them there.

A run writes only its own files, under names it chooses (`RUN_FILES`, plus `checkpoints/` and what is in it), and
never through a path the user (or anyone with write access to the directory) planted. `check_run_dir` refuses,
with one line and before anything is written:

- a run directory at or inside another run's `checkpoints/`, or inside a checkpoint directory, however the path is
  spelt (`.` from inside it, `../..`, a link): that run would prune it, resume from it or mix its files with ours;
- a symbolic link at any name the run writes (`train.log`, `metrics.jsonl`, `config.yaml`, `tokenizer.json`, the
  lock, `checkpoints/`, a checkpoint in it, ...): the run would append to, replace or delete what it points to.
  A link there is refused rather than replaced: the framework never makes one (`checkpoints/best` excepted, which
  it replaces itself), so one found there was put by someone else, and removing it by hand is the user's call.

The writers do not rely on this check alone: logs are opened with `O_NOFOLLOW` (`llm.fs.open_append`) and every
other file is written beside its target and renamed over it (`llm.fs.atomic_write`), which replaces a link itself.
"""

from __future__ import annotations

import os
from pathlib import Path

from llm.artifacts.checkpoint import CHECKPOINTS_DIR, CONFIG, MANIFEST, WEIGHTS, checkpoint_step
from llm.artifacts.lock import LOCK_NAME
from llm.data.tokenizers import TOKENIZER_FILE
from llm.errors import ConfigError

# Every name the framework writes directly in a run directory (`<name>.tmp` is the atomic writers' temp name).
RUN_FILES = (CONFIG, f"{CONFIG}.tmp", "train.log", "metrics.jsonl", "metrics.csv", TOKENIZER_FILE, WEIGHTS,
             f"{WEIGHTS}.tmp", LOCK_NAME, CHECKPOINTS_DIR)
# Links the framework makes itself inside `checkpoints/` (to a sibling checkpoint, by name).
OWN_LINKS = ("best", ".best.tmp")


def _is_checkpoints_of_a_run(path: Path) -> bool:
    """Whether `path` (named `checkpoints`) is a run's: its parent holds a run's lock or log, or it holds a
    checkpoint (a user's own folder named `checkpoints` in a project directory is neither)."""
    if os.path.lexists(path.parent / LOCK_NAME) or (path.parent / "train.log").is_file():
        return True
    try:
        return any((entry / MANIFEST).is_file() for entry in path.iterdir() if checkpoint_step(entry) is not None)
    except OSError:
        return False


def _is_checkpoint(path: Path) -> bool:
    """A `step-N` directory in a `checkpoints/` folder, or one holding a checkpoint manifest."""
    return checkpoint_step(path) is not None and (path.parent.name == CHECKPOINTS_DIR or (path / MANIFEST).is_file())


def _link_line(path: Path, field: str, shown: str) -> str:
    try:
        target = os.readlink(path)
    except OSError:
        target = "?"
    return (f"{field}: {shown} is a symbolic link (to {target}): a run writes its files itself and never through a "
            "link; remove the link (or pick another directory)")


def check_run_dir(path: str | os.PathLike, field: str = "logging.log_dir") -> None:
    """Refuse (one-line `ConfigError` naming `field`) a run directory inside another run's checkpoints or a
    checkpoint, or holding a symbolic link where the run writes (see the module docstring). Nothing is written."""
    shown = os.fspath(path)
    real = Path(os.path.realpath(path))
    for place in (real, *real.parents):
        if place.name == CHECKPOINTS_DIR and _is_checkpoints_of_a_run(place):
            raise ConfigError(f"{field}: {shown} is inside {place}, the checkpoints of the run {place.parent}: that "
                              "run prunes and resumes from there; pick a directory outside it")
        if _is_checkpoint(place):
            raise ConfigError(f"{field}: {shown} is inside the checkpoint {place}: it would no longer match its "
                              "manifest; pick a directory outside it")
    base = Path(path)
    for name in RUN_FILES:
        if (base / name).is_symlink():
            raise ConfigError(_link_line(base / name, field, os.path.join(shown, name)))
    checkpoints = base / CHECKPOINTS_DIR
    if checkpoints.is_dir():
        for entry in sorted(checkpoints.iterdir()):
            if entry.is_symlink() and not (entry.name in OWN_LINKS and os.sep not in os.readlink(entry)):
                raise ConfigError(_link_line(entry, field, os.path.join(shown, CHECKPOINTS_DIR, entry.name)))
