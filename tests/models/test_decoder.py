"""Decoder tests: parity with a naive reference implementation, API contract, masks, init, and the tiny preset."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from llm.models import DecoderModel, RMSNorm, RotaryEmbedding, TransformerBlock, collect_aux_loss
from llm.models.config import ModelConfig
from llm.models.decoder import causal_mask, default_intermediate_size


def naive_forward(model: DecoderModel, ids: torch.Tensor, causal: bool = True, pad: torch.Tensor | None = None):
    """Independent reference: explicit loops over rotary pairs, repeated KV heads, softmax(QK^T) with a mask."""
    cfg = model.config
    H, nh, nkv = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads
    hd = H // nh
    B, T = ids.shape
    x = model.embed_tokens.weight[ids]

    def rms(v, w, eps):
        return w * (v / torch.sqrt((v * v).mean(-1, keepdim=True) + eps))

    # rotation of pair (i, i + hd/2) by angle pos * theta^(-2i/hd)
    ang = torch.tensor([[p * cfg.rope_theta ** (-2 * i / hd) for i in range(hd // 2)] for p in range(T)],
                       dtype=torch.float64).float()

    def rope(t):  # (B, n, T, hd)
        a, b = t[..., : hd // 2], t[..., hd // 2:]
        c, s = ang.cos(), ang.sin()
        return torch.cat([a * c - b * s, a * s + b * c], dim=-1)

    allowed = torch.ones(T, T, dtype=torch.bool)
    if causal:
        allowed = torch.tril(allowed)
    allowed = allowed.expand(B, 1, T, T)
    if pad is not None:
        allowed = allowed & pad.bool()[:, None, None, :] | torch.eye(T, dtype=torch.bool)
    for layer in model.layers:
        a = layer.self_attn
        h = rms(x, layer.input_layernorm.weight, cfg.norm_eps)
        q = (h @ a.q_proj.weight.T).view(B, T, nh, hd).transpose(1, 2)
        k = (h @ a.k_proj.weight.T).view(B, T, nkv, hd).transpose(1, 2)
        v = (h @ a.v_proj.weight.T).view(B, T, nkv, hd).transpose(1, 2)
        q, k = rope(q), rope(k)
        rep = nh // nkv
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
        scores = scores.masked_fill(~allowed, float("-inf"))
        o = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, H)
        x = x + o @ a.o_proj.weight.T
        h = rms(x, layer.post_attention_layernorm.weight, cfg.norm_eps)
        m = layer.mlp
        x = x + (F.silu(h @ m.gate_proj.weight.T) * (h @ m.up_proj.weight.T)) @ m.down_proj.weight.T
    x = rms(x, model.norm.weight, cfg.norm_eps)
    return x @ model.lm_head.weight.T


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("num_kv_heads", [4, 2, 1])
def test_matches_naive_reference(causal, num_kv_heads):
    torch.manual_seed(0)
    model = DecoderModel.tiny(causal=causal, num_kv_heads=num_kv_heads, rope_theta=500.0)
    ids = torch.randint(0, 256, (2, 9))
    torch.testing.assert_close(model(ids), naive_forward(model, ids, causal), atol=1e-5, rtol=1e-5)


def test_causal_differs_from_bidirectional_and_is_causal():
    torch.manual_seed(0)
    model = DecoderModel.tiny()
    ids = torch.randint(0, 256, (1, 8))
    out = model(ids)
    changed = ids.clone()
    changed[0, -1] = (changed[0, -1] + 1) % 256
    # a causal model's earlier positions cannot see the last token
    torch.testing.assert_close(model(changed)[:, :-1], out[:, :-1])
    bidir = DecoderModel.tiny(causal=False)
    bidir.load_state_dict(model.state_dict())
    assert not torch.allclose(bidir(ids), out, atol=1e-4)
    assert not torch.allclose(bidir(changed)[:, :-1], bidir(ids)[:, :-1], atol=1e-6)


def test_padding_mask_matches_reference():
    torch.manual_seed(0)
    model = DecoderModel.tiny()
    ids = torch.randint(0, 256, (2, 7))
    pad = torch.ones(2, 7, dtype=torch.long)
    pad[1, :3] = 0  # left padding on row 1
    out = model(ids, attention_mask=pad)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, naive_forward(model, ids, True, pad), atol=1e-5, rtol=1e-5)


def test_inputs_embeds_equals_input_ids():
    torch.manual_seed(0)
    model = DecoderModel.tiny()
    ids = torch.randint(0, 256, (2, 5))
    torch.testing.assert_close(model(inputs_embeds=model.embed_tokens(ids)), model(ids))
    with pytest.raises(ValueError):
        model()


def test_chunked_causal_mask_is_bottom_right_aligned():
    m = causal_mask(2, 5)
    assert m.tolist() == [[True, True, True, True, False], [True, True, True, True, True]]


def test_rmsnorm_and_rotary_basics():
    norm = RMSNorm(8, eps=1e-6)
    x = torch.randn(3, 8) * 5
    torch.testing.assert_close(norm(x).pow(2).mean(-1), torch.ones(3), atol=1e-4, rtol=1e-4)
    rot = RotaryEmbedding(8, max_seq_len=16, theta=10000.0)
    cos, sin = rot(torch.arange(4))
    assert cos.shape == sin.shape == (4, 8)
    torch.testing.assert_close(cos[0], torch.ones(8))
    torch.testing.assert_close(cos[:, :4], cos[:, 4:])  # half-rotation layout: angles repeat
    torch.testing.assert_close(cos[2, 1], torch.tensor(math.cos(2 * 10000 ** (-2 / 8))))
    rot = rot.to(torch.bfloat16)
    assert rot.inv_freq.dtype == torch.float32


def test_tied_embeddings_share_storage():
    model = DecoderModel.tiny(tie_embeddings=True)
    assert model.lm_head.weight is model.embed_tokens.weight
    untied = DecoderModel.tiny()
    assert untied.num_parameters() - model.num_parameters() == 256 * 32


def test_defaults_and_config_field_names():
    model = DecoderModel(vocab_size=64, hidden_size=48, num_layers=1, num_heads=4)
    assert model.config.num_kv_heads == 4
    assert model.config.intermediate_size == default_intermediate_size(48) == 256
    assert default_intermediate_size(4096) == 11008  # Llama-7B
    assert model.config.moe_intermediate_size == 256

    # The training config's model section: its fields are the constructors' keywords.
    cfg = dataclasses.asdict(ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, max_seq_len=64, use_moe=True,
                                         num_experts=4, num_shared_experts=1))
    model = DecoderModel(**cfg)
    block = TransformerBlock(**cfg)  # model-level fields are accepted and ignored
    assert block.mlp.shared_experts is not None
    with pytest.raises(TypeError, match="hidden_sise.*did you mean 'hidden_size'"):
        TransformerBlock(hidden_size=32, num_heads=4, hidden_sise=3)
    with pytest.raises(TypeError, match="ModelConfig or keyword arguments"):
        DecoderModel(cfg)  # a mapping is not a config
    out = model(torch.randint(0, 64, (2, 6)))
    assert out.shape == (2, 6, 64)
    assert model.aux_loss is not None and model.aux_loss.requires_grad


def test_block_standalone_and_aux_loss_collection():
    torch.manual_seed(0)
    blocks = torch.nn.Sequential()
    for _ in range(2):
        blocks.append(TransformerBlock(
            hidden_size=32, num_heads=4, num_kv_heads=2, use_moe=True, num_experts=4, top_k=2, moe_intermediate_size=16
        ))
    rot = RotaryEmbedding(8)
    cos, sin = rot(torch.arange(6))
    x = torch.randn(2, 6, 32)
    for b in blocks:
        x = b(x, cos, sin)
    assert x.shape == (2, 6, 32)
    expected = blocks[0].mlp.aux_loss + blocks[1].mlp.aux_loss
    torch.testing.assert_close(collect_aux_loss(blocks), expected)
    assert collect_aux_loss(DecoderModel.tiny()) is None


def test_scaled_init():
    torch.manual_seed(0)
    model = DecoderModel(vocab_size=512, hidden_size=256, num_layers=8, num_heads=4)
    o_std = model.layers[0].self_attn.o_proj.weight.std().item()
    q_std = model.layers[0].self_attn.q_proj.weight.std().item()
    assert abs(q_std - 0.02) < 1e-3
    assert abs(o_std - 0.02 / 4) < 5e-4
    assert torch.all(model.layers[0].input_layernorm.weight == 1)


def test_dropout_only_in_training():
    torch.manual_seed(0)
    model = DecoderModel.tiny(dropout=0.5)
    ids = torch.randint(0, 256, (1, 6))
    model.eval()
    torch.testing.assert_close(model(ids), model(ids))
    model.train()
    assert not torch.allclose(model(ids), model(ids))


def test_activation_checkpointing_gives_the_same_gradients():
    def grads(checkpointing: bool) -> tuple[dict[str, torch.Tensor], int]:
        torch.manual_seed(0)
        model = DecoderModel.tiny(use_moe=True)
        calls = []
        for block in model.layers:
            block.activation_checkpointing = checkpointing
            block.mlp.register_forward_pre_hook(lambda *_: calls.append(1))
        ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(1))
        (model(ids).logsumexp(-1).mean() + model.aux_loss).backward()
        return {n: p.grad for n, p in model.named_parameters()}, len(calls)

    (plain, plain_calls), (ckpt, ckpt_calls) = grads(False), grads(True)
    assert (plain_calls, ckpt_calls) == (2, 4)  # each block ran again in backward
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-5, atol=1e-7)
