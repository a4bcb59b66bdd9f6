"""Document masks (`llm.models.masks`): packed documents attend only within themselves, positions restart per
document, and a forward without document ids runs exactly as before."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llm.models import masks
from llm.models.decoder import DecoderModel
from llm.models.generation import KVCache

LENGTHS = (5, 9, 3, 7)  # four documents packed into one row of 24 tokens


def _packed(lengths=LENGTHS, vocab=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    docs = [torch.randint(0, vocab, (n,), generator=g) for n in lengths]
    ids = torch.cat(docs)[None]  # (1, T)
    doc_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]  # (1, T)
    return docs, ids, doc_ids


def test_document_positions_restart_at_every_document():
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 2], [7, 7, 7, 7, 3, 3]])
    assert masks.document_positions(doc_ids).tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 1]]


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
@pytest.mark.parametrize("fields", [
    pytest.param({}, id="gqa"),
    pytest.param({"qk_norm": True, "sliding_window": 4}, id="qknorm-window"),
    pytest.param({"use_moe": True}, id="moe"),
])
def test_packed_forward_equals_each_document_alone(backend, fields):
    torch.manual_seed(0)
    model = DecoderModel.tiny(**fields).eval()
    model.document_mask_backend = backend
    docs, ids, doc_ids = _packed()
    with torch.no_grad():
        packed = model(ids, document_ids=doc_ids)[0]  # (T, vocab)
        alone = torch.cat([model(d[None])[0] for d in docs])
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=0)


def test_padding_and_document_ids_compose():
    """Two rows: one left-padded (attention_mask 0 on the pads) holding two documents, one of three documents."""
    torch.manual_seed(0)
    model = DecoderModel.tiny().eval()
    a, b, c, d, e = (torch.randint(0, 256, (n,)) for n in (4, 6, 5, 3, 4))
    ids = torch.stack([torch.cat([torch.zeros(2, dtype=torch.long), a, b]), torch.cat([c, d, e])])  # (2, 12)
    doc_ids = torch.tensor([[0] * 2 + [1] * 4 + [2] * 6, [0] * 5 + [1] * 3 + [2] * 4])
    pad = torch.ones(2, 12, dtype=torch.long)
    pad[0, :2] = 0
    with torch.no_grad():
        out = model(ids, attention_mask=pad, document_ids=doc_ids)
        expected = [(out[0, 2:6], a), (out[0, 6:], b), (out[1, :5], c), (out[1, 5:8], d), (out[1, 8:], e)]
        for got, doc in expected:
            torch.testing.assert_close(got, model(doc[None])[0], atol=1e-5, rtol=0)
    assert torch.isfinite(out).all()  # the padded queries see themselves: no NaN row


def test_gradients_with_activation_checkpointing_equal_without():
    torch.manual_seed(0)
    model = DecoderModel.tiny()
    _, ids, doc_ids = _packed()
    grads = []
    for checkpointing in (False, True):
        for layer in model.layers:
            layer.activation_checkpointing = checkpointing
        model.zero_grad()
        model(ids, document_ids=doc_ids).float().logsumexp(-1).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for g0, g1 in zip(*grads):
        torch.testing.assert_close(g0, g1, atol=1e-6, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention's backward and its compiled kernel need CUDA")
def test_flex_backend_on_cuda_equals_sdpa_in_forward_and_gradients():
    """The CUDA default (compiled FlexAttention with a block mask) against the bool-mask SDPA path, fp32."""
    torch.manual_seed(0)
    model = DecoderModel.tiny(hidden_size=64, sliding_window=6).cuda()  # head_dim 16: flex's narrowest
    _, ids, doc_ids = _packed(lengths=(40, 200, 3, 13, 100))
    ids, doc_ids = ids.cuda(), doc_ids.cuda()
    assert masks.default_backend(ids.device) == "flex"
    outs, grads = [], []
    for backend in ("sdpa", "flex"):
        model.document_mask_backend = backend
        model.zero_grad()
        out = model(ids, document_ids=doc_ids).float()
        out.logsumexp(-1).sum().backward()
        outs.append(out.detach())
        grads.append([p.grad.clone() for p in model.parameters()])
    torch.testing.assert_close(outs[0], outs[1], atol=1e-4, rtol=1e-4)
    for g0, g1 in zip(*grads):
        torch.testing.assert_close(g0, g1, atol=1e-4, rtol=1e-3)


def test_without_document_ids_the_forward_is_unchanged(monkeypatch):
    """No document ids: the rotary tables are the 1-D ones bitwise and SDPA gets is_causal with no mask (the same
    kernel as before document masks existed)."""
    torch.manual_seed(0)
    model = DecoderModel.tiny().eval()
    positions = torch.arange(24)
    freqs = positions.float()[:, None] * model.rotary.inv_freq[None, :]
    emb = torch.cat((freqs, freqs), -1)
    cos, sin = model.rotary(positions)
    assert torch.equal(cos, emb.cos()) and torch.equal(sin, emb.sin())
    calls = []
    sdpa = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append((kwargs.get("attn_mask"), kwargs.get("is_causal")))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    _, ids, doc_ids = _packed()
    with torch.no_grad():
        plain = model(ids)
        again = model(ids, document_ids=None)
    assert torch.equal(plain, again)
    assert calls and all(mask is None and causal for mask, causal in calls)
    calls.clear()
    with torch.no_grad():
        model(ids, document_ids=doc_ids)
    assert all(mask is not None and mask.shape == (1, 1, 24, 24) for mask, _ in calls)


@pytest.mark.parametrize("bad, message", [
    (torch.zeros(1, 23, dtype=torch.long), r"document_ids has shape \(1, 23\), the input is \(1, 24\)"),
    (torch.zeros(1, 24), "document_ids must be an integer tensor"),
    ([0] * 24, "document_ids must be a \\(B, T\\) integer tensor, got list"),
])
def test_bad_document_ids_are_refused_in_one_line(bad, message):
    _, ids, _ = _packed()
    with pytest.raises(ValueError, match=message) as info:
        DecoderModel.tiny()(ids, document_ids=bad)
    assert "\n" not in str(info.value)


def test_document_ids_with_a_kv_cache_are_refused():
    model = DecoderModel.tiny()
    cache = KVCache.for_model(model, 1, 32)
    _, ids, doc_ids = _packed()
    with pytest.raises(ValueError, match="document_ids cannot be combined with a KV cache"):
        model(ids, document_ids=doc_ids, cache=cache)
