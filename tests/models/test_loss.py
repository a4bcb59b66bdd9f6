"""Chunked linear + cross-entropy equals the plain ``F.cross_entropy(hidden @ weight.T, targets)``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llm.models import DecoderModel
from llm.models.loss import linear_cross_entropy


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("chunk_size", [1, 7, 1024])
def test_matches_cross_entropy_loss_and_grads(reduction, chunk_size):
    torch.manual_seed(0)
    h = torch.randn(3, 13, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=True)
    t = torch.randint(0, 50, (3, 13))
    t[0, :4] = -100
    loss = linear_cross_entropy(h, w, t, chunk_size=chunk_size, reduction=reduction)
    (2.5 * loss).backward()
    gh, gw = h.grad, w.grad
    h.grad = w.grad = None
    ref = F.cross_entropy((h @ w.T).view(-1, 50), t.view(-1), reduction=reduction)
    (2.5 * ref).backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(gh, h.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gw, w.grad, atol=1e-5, rtol=1e-5)


def test_with_model_hidden_states_and_tied_head():
    torch.manual_seed(0)
    model = DecoderModel.tiny(tie_embeddings=True)
    ids = torch.randint(0, 256, (2, 9))
    hidden = model(ids[:, :-1], return_hidden=True)
    loss = linear_cross_entropy(hidden, model.lm_head.weight, ids[:, 1:], chunk_size=5)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    ref = F.cross_entropy(model(ids[:, :-1]).reshape(-1, 256), ids[:, 1:].reshape(-1))
    ref.backward()
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(g, p.grad, atol=1e-5, rtol=1e-4)


def test_no_grad_and_bf16_autocast():
    torch.manual_seed(0)
    h, w, t = torch.randn(20, 16), torch.randn(40, 16), torch.randint(0, 40, (20,))
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(h, w, t), F.cross_entropy(h @ w.T, t))
    w.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(h, w, t, chunk_size=8)
    loss.backward()
    assert w.grad.dtype == torch.float32
    torch.testing.assert_close(loss, F.cross_entropy(h @ w.T, t), atol=0.05, rtol=0.02)
