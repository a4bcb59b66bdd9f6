"""A LoRA checkpoint that holds only the adapters names the base they were trained on, and refuses another.

A LoRA run on ``model.init_from`` saves only its adapters (llm.models.lora): the base is rebuilt from the source
each time the checkpoint is read, by a resume or by ``llm.export`` / ``llm.generate`` / ``llm.evaluate``. Adapters
are deltas to one particular set of weights, so a source that changed since (re-exported, fine-tuned further, a run
that saved a newer checkpoint) would silently give another model. The checkpoint's ``manifest.json`` therefore
records ``"lora_base": {"path", "sha256"}``: the path as configured and `llm.models.lora.base_sha256` of the base's
tensors as they were loaded. Reading it back recomputes the digest of the base just loaded and refuses a different
one with one line naming the base path and both digests.

A checkpoint written before this record existed (or a loose adapters file without its checkpoint's manifest) cannot
be checked: it loads, with one warning saying so. Refusing it would strand every earlier LoRA run; the warning says
what is not known.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from llm.artifacts.checkpoint import MANIFEST, CheckpointError
from llm.models.lora import base_pin

MANIFEST_KEY = "lora_base"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def record(model: nn.Module) -> dict[str, Any]:
    """The manifest entries that pin ``model``'s base: ``{"lora_base": {...}}`` for an adapters-only LoRA model
    built on ``model.init_from``, nothing for any other model."""
    pin = base_pin(model)
    return {MANIFEST_KEY: pin} if pin is not None else {}


def check(manifest: dict[str, Any] | None, model: nn.Module, where: Path, warn: Callable[[str], None]) -> None:
    """Refuse to put the adapters of the checkpoint ``where`` (its ``manifest``; None: a loose weights file) on
    ``model``'s base unless it is the base they were trained on. ``model`` is the adapted model with its base loaded
    (`llm.models.lora.pin_base` recorded it); a model whose checkpoint holds its own base is not checked."""
    pin = base_pin(model)
    if pin is None:
        return
    recorded = (manifest or {}).get(MANIFEST_KEY)
    if recorded is None:
        source = f"its {MANIFEST}" if manifest is not None else "no manifest (a loose weights file)"
        warn(f"{where} holds LoRA adapters without their base and {source} records no checksum of that base (written "
             f"before bases were pinned): they are applied to {pin['path']} (sha256 {pin['sha256']}) unchecked")
        return
    if not isinstance(recorded, dict) or not isinstance(recorded.get("sha256"), str) \
            or not _SHA256.match(recorded["sha256"]) or not isinstance(recorded.get("path"), str):
        raise CheckpointError(f"checkpoint: {where / MANIFEST}: {MANIFEST_KEY!r} is not "
                              '{"path": str, "sha256": 64 hex digits}')
    if recorded["sha256"] != pin["sha256"]:
        raise CheckpointError(
            f"checkpoint: {where} holds LoRA adapters trained on the base {recorded['path']} (sha256 "
            f"{recorded['sha256']}), but model.init_from {pin['path']} now holds other weights (sha256 "
            f"{pin['sha256']}); the adapters would change another model: restore that base, or start a new run"
        )
