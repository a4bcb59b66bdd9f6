"""Consolidate a sharded (FSDP) checkpoint into one safetensors file, in one process, without a GPU:

    python -m llm.artifacts.consolidate RUN/checkpoints/step-00000100 model.safetensors

The source is resolved like every other reader of a run (`runs.resolve_run`): a checkpoint directory
(verified against its manifest first), its `sharded/` folder, or a run directory (its newest complete
checkpoint, when the run has no final `model.safetensors`). The file holds the same tensor names as a run's
`model.safetensors`, tied weights stored once, and loads into the task's model with
`safetensors.torch.load_model(model, path, strict=True)`. `llm.generate` and `llm.export` read sharded
checkpoints directly; this is for everything else that wants one file.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import NoReturn

from llm import untrusted
from llm.artifacts.checkpoint import CheckpointError
from llm.artifacts.runs import load_sharded_weights, resolve_run
from llm.artifacts.sharded import TIED_FILE, write_safetensors
from llm.errors import UserError

__all__ = ["export_sharded", "load_sharded_weights", "main"]


def export_sharded(checkpoint: str | os.PathLike, out: str | os.PathLike, *, verify: bool = True) -> Path:
    """Write the full weights of the sharded checkpoint `checkpoint` names to the safetensors file `out`."""
    files = resolve_run(checkpoint, verify=verify, warn=_warn)
    if not files.sharded:
        raise CheckpointError(
            f"checkpoint: {files.weights} is already one safetensors file; name a sharded checkpoint "
            "(RUN/checkpoints/step-*) to consolidate"
        )
    state = load_sharded_weights(files.weights)
    tied = files.weights / TIED_FILE
    try:  # anything at that name is read (a FIFO is an error, not a file that is absent)
        groups = untrusted.read_json(tied) if untrusted.exists(tied) else []
    except untrusted.UntrustedFileError as exc:
        raise CheckpointError(f"checkpoint: {tied} {exc.why}") from None
    is_list = isinstance(groups, list)
    if not (is_list and all(isinstance(g, list) and all(isinstance(n, str) for n in g) for g in groups)):
        raise CheckpointError(f"checkpoint: {tied} is not a list of groups of weight names")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_safetensors(state, out, groups)  # readable: the one file rule (llm.fs)
    return out


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, like every other user error
        raise UserError(message)


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(
        prog="python -m llm.artifacts.consolidate",
        description="Export a sharded (FSDP) checkpoint to one safetensors file, in one process.",
    )
    parser.add_argument("checkpoint", help="checkpoint directory (RUN/checkpoints/step-N), its sharded/ folder, "
                        "or a run directory (its newest complete checkpoint)")
    parser.add_argument("out", help="the safetensors file to write")
    parser.add_argument("--no-verify", action="store_true", help="skip the manifest checksums (faster on big runs)")
    try:
        args = parser.parse_args(argv)
        path = export_sharded(args.checkpoint, args.out, verify=not args.no_verify)
    except (UserError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
