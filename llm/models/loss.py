"""Fused output layer + cross-entropy, computed in row chunks so the (N, vocab) logits never exist in full.

For a language model the output layer and its softmax are the largest activations of the step: (B*T, vocab)
fp32 logits, their log-softmax and its gradient, each allocated (and page-faulted) anew every step. Here each
chunk of rows computes its logits, loss and the gradients with respect to the hidden states and the output
weight right away (d loss / d logits = softmax - onehot is known in the forward), then drops the logits. The
backward only scales the stored gradients by the incoming scalar. Same math as
``F.cross_entropy(hidden @ weight.T, targets)``; the logits are computed in fp32.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def _chunk_loss_and_grads(
    h: Tensor, weight: Tensor, targets: Tensor, ignore_index: int, scale: float,
    grad_h: Tensor | None, grad_w: Tensor | None,
) -> Tensor:
    """Summed loss of one chunk; writes d(scale * loss)/dh into ``grad_h`` and adds d/dweight to ``grad_w``."""
    logits = (h @ weight.T).float()  # (n, V)
    valid = targets != ignore_index  # (n,)
    safe_targets = targets.masked_fill(~valid, 0)
    lse = torch.logsumexp(logits, dim=-1)  # (n,)
    target_logit = logits.gather(1, safe_targets[:, None]).squeeze(1)  # (n,)
    loss = ((lse - target_logit) * valid).sum()
    if grad_h is not None or grad_w is not None:
        # softmax - onehot, times the mean's 1/n_valid, zero on ignored rows; reuses the logits buffer
        probs = logits.sub_(lse[:, None]).exp_()  # (n, V)
        probs.scatter_add_(1, safe_targets[:, None], -valid[:, None].to(probs.dtype))
        probs.mul_((valid.to(probs.dtype) * scale)[:, None])
        g = probs.to(h.dtype)  # (n, V)
        if grad_h is not None:
            grad_h.copy_(g @ weight)  # (n, H)
        if grad_w is not None:
            if grad_w.dtype == g.dtype:
                grad_w.addmm_(g.T, h)  # (V, H)
            else:  # low-precision matmul, fp32 accumulation across chunks
                grad_w.add_(g.T @ h)
    return loss


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int, chunk_size: int,
                reduction: str) -> Tensor:
        n_valid = int((targets != ignore_index).sum().clamp(min=1))
        scale = 1.0 / n_valid if reduction == "mean" else 1.0
        # Under autocast, run the matmuls in the autocast dtype explicitly (autocast does not reach in-place ops).
        device_type = hidden.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
        with torch.autocast(device_type, enabled=False):
            h, w = hidden.to(dtype), weight.to(dtype)
            grad_h = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
            grad_w = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            for start in range(0, h.shape[0], chunk_size):
                end = min(start + chunk_size, h.shape[0])
                total += _chunk_loss_and_grads(
                    h[start:end], w, targets[start:end], ignore_index, scale,
                    grad_h[start:end] if grad_h is not None else None, grad_w,
                )
        ctx.grads = (grad_h, grad_w.to(weight.dtype) if grad_w is not None else None)
        return total * scale

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, Tensor | None, None, None, None, None]:
        grad_h, grad_w = ctx.grads
        ctx.grads = None
        grad_h = grad_h * grad_out if grad_h is not None else None
        grad_w = grad_w * grad_out if grad_w is not None else None
        return grad_h, grad_w, None, None, None, None


def linear_cross_entropy(
    hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int = -100, chunk_size: int = 1024,
    reduction: str = "mean",
) -> Tensor:
    """``F.cross_entropy(hidden @ weight.T, targets)`` without materializing the logits.

    ``hidden`` (..., H), ``weight`` (V, H) (e.g. ``model.lm_head.weight``), ``targets`` (...) long with
    ``ignore_index`` for positions to skip. ``reduction``: "mean" over non-ignored positions, or "sum".
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    h = hidden.reshape(-1, hidden.shape[-1])  # (N, H)
    t = targets.reshape(-1)  # (N,)
    if h.shape[0] != t.shape[0]:
        raise ValueError(f"{h.shape[0]} hidden rows but {t.shape[0]} targets")
    return _LinearCrossEntropy.apply(h, weight, t, ignore_index, chunk_size, reduction)
