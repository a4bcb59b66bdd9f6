"""Document masks: several documents packed into one row attend only within themselves, causally.

A packed row carries per-token document ids (B, T): equal ids are one document, and a document is a contiguous run
of them. From the ids this module derives what the decoder needs, without a host sync:

- `document_positions`: each token's position inside its document (rotary positions restart at 0 per document);
- the attention mask, through a small registry of backends, chosen once per forward by `build_document_mask`:

  ``sdpa``  a bool mask (B, 1, T, T), True = attend: same document, causal, real (unpadded) key. SDPA runs it with
            its math or memory-efficient kernel; the attention layer adds its sliding-window band itself. The CPU
            default, and the fallback wherever FlexAttention cannot run (dropout in training: flex has none).
  ``flex``  FlexAttention with a `BlockMask` built from the same rule (window and padding folded in); blocks of
            128 x 128 that lie wholly outside every document are skipped, so a row of many short documents costs
            about the sum of their squares, not T^2. The CUDA default; `flex_attention` is compiled there (eager it
            materialises the scores, which is what the CPU tests use to check it against ``sdpa``); heads
            narrower than 16 use ``sdpa``.

A backend returns either a bool tensor (the attention layer passes it to SDPA as before) or an object with
``attend(q, k, v, enable_gqa=...)`` that runs its own kernel (`FlexDocumentMask`). A query whose keys are all
masked (a padded position) is allowed to see itself, as the decoder's padding mask does, so no row is NaN.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["DOCUMENT_MASK_BACKENDS", "FlexDocumentMask", "build_document_mask", "check_document_ids",
           "default_backend", "document_positions", "register_document_mask_backend"]


def check_document_ids(document_ids: Any, shape: tuple[int, int]) -> Tensor:
    """``document_ids`` if it is an integer tensor of ``shape`` (B, T); else a one-line ValueError."""
    if not isinstance(document_ids, Tensor):
        raise ValueError(f"document_ids must be a (B, T) integer tensor, got {type(document_ids).__name__}")
    if document_ids.is_floating_point() or document_ids.is_complex() or document_ids.dtype == torch.bool:
        raise ValueError(f"document_ids must be an integer tensor (B, T), got dtype {document_ids.dtype}")
    if tuple(document_ids.shape) != tuple(shape):
        raise ValueError(f"document_ids has shape {tuple(document_ids.shape)}, the input is {tuple(shape)} (B, T)")
    return document_ids


def document_positions(document_ids: Tensor) -> Tensor:
    """Position of each token within its document (B, T) int64: 0 at every document start (where the id changes)."""
    B, T = document_ids.shape
    index = torch.arange(T, device=document_ids.device).expand(B, T)  # (B, T)
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]  # (B, T): a new document begins here
    first = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values  # (B, T): its first index
    return index - first


# -------------------------------------------------------------------------------------------------------- backends
MaskBuilder = Callable[..., Any]
DOCUMENT_MASK_BACKENDS: dict[str, MaskBuilder] = {}


def register_document_mask_backend(name: str, builder: MaskBuilder) -> MaskBuilder:
    """Add a backend: ``builder(document_ids, padding, *, causal, sliding_window)`` -> bool mask or `attend` object."""
    if name in DOCUMENT_MASK_BACKENDS:
        raise ValueError(f"document mask backend {name!r} is already registered")
    DOCUMENT_MASK_BACKENDS[name] = builder
    return builder


def _sdpa_mask(document_ids: Tensor, padding: Tensor | None, *, causal: bool, sliding_window: int | None) -> Tensor:
    # The sliding window is left to the attention layer, which bands any bool mask it is given.
    del sliding_window
    T = document_ids.shape[1]
    mask = document_ids[:, None, :, None] == document_ids[:, None, None, :]  # (B, 1, T, T)
    if causal:
        mask = mask & torch.ones(T, T, dtype=torch.bool, device=document_ids.device).tril()
    if padding is not None:
        mask = mask & padding.to(torch.bool)[:, None, None, :]
        mask = mask | torch.eye(T, dtype=torch.bool, device=document_ids.device)  # a padded query sees itself
    return mask


@dataclass(frozen=True)
class FlexDocumentMask:
    """A FlexAttention `BlockMask` for one forward, shared by every layer; ``attend`` runs the kernel."""

    block_mask: Any
    compiled: bool

    def attend(self, q: Tensor, k: Tensor, v: Tensor, *, enable_gqa: bool) -> Tensor:
        """Attention of q (B, n_heads, T, hd) over k, v (B, n_kv, T, hd) within the mask's documents."""
        from torch.nn.attention.flex_attention import flex_attention

        if torch.compiler.is_compiling():  # inside a compiled model: its graph compiles the kernel
            return flex_attention(q, k, v, block_mask=self.block_mask, enable_gqa=enable_gqa)
        if self.compiled:
            return _compiled_flex()(q, k, v, block_mask=self.block_mask, enable_gqa=enable_gqa)
        with warnings.catch_warnings():  # eager is the reference path of the tests, slow on purpose
            warnings.simplefilter("ignore", UserWarning)
            return flex_attention(q, k, v, block_mask=self.block_mask, enable_gqa=enable_gqa)


_COMPILED: dict[str, Any] = {}


def _compiled_flex() -> Any:
    if "flex" not in _COMPILED:
        from torch.nn.attention.flex_attention import flex_attention

        _COMPILED["flex"] = torch.compile(flex_attention)
    return _COMPILED["flex"]


def _flex_mask(document_ids: Tensor, padding: Tensor | None, *, causal: bool, sliding_window: int | None,
               compiled: bool | None = None) -> FlexDocumentMask:
    from torch.nn.attention.flex_attention import create_block_mask

    B, T = document_ids.shape
    docs = document_ids
    keys = padding.to(torch.bool) if padding is not None else None

    def mask_mod(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        keep = docs[b, q] == docs[b, kv]
        if causal:
            keep = keep & (kv <= q)
        if sliding_window is not None:
            keep = keep & (q - kv < sliding_window)
        if keys is not None:
            keep = (keep & keys[b, kv]) | (q == kv)
        return keep

    if compiled is None:  # a compiled model compiles the mask's construction with its own graph
        compiled = document_ids.is_cuda and not torch.compiler.is_compiling()
    block_mask = create_block_mask(mask_mod, B, None, T, T, device=document_ids.device, _compile=compiled)
    return FlexDocumentMask(block_mask, compiled)


register_document_mask_backend("sdpa", _sdpa_mask)
register_document_mask_backend("flex", _flex_mask)


def default_backend(device: torch.device, dropout: bool = False, head_dim: int = 64) -> str:
    """``flex`` on CUDA (compiled FlexAttention) unless attention dropout is on or the heads are narrower than its
    kernels take (16); ``sdpa`` elsewhere."""
    if device.type == "cuda" and not dropout and head_dim >= 16:
        try:
            import torch.nn.attention.flex_attention  # noqa: F401
        except ImportError:  # pragma: no cover - torch builds without it
            return "sdpa"
        return "flex"
    return "sdpa"


def build_document_mask(document_ids: Tensor, padding: Tensor | None = None, *, causal: bool = True,
                        sliding_window: int | None = None, backend: str | None = None,
                        dropout: bool = False, head_dim: int = 64) -> Any:
    """The attention mask of packed documents for ``backend`` (None: `default_backend` of the ids' device).

    ``padding`` (B, T): 1/True = real key; ``dropout``: attention dropout will run (only ``sdpa`` has it). Returns a
    bool tensor (B, 1, T, T) or an object with ``attend``."""
    name = backend or default_backend(document_ids.device, dropout, head_dim)
    if name not in DOCUMENT_MASK_BACKENDS:
        raise ValueError(f"unknown document mask backend {name!r}: expected one of {', '.join(DOCUMENT_MASK_BACKENDS)}")
    if dropout and name != "sdpa":
        raise ValueError(f"document mask backend {name!r} has no attention dropout; use 'sdpa' or dropout 0")
    return DOCUMENT_MASK_BACKENDS[name](document_ids, padding, causal=causal, sliding_window=sliding_window)
