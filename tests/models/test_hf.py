"""Hugging Face parity: random-init Llama (GQA, tied and untied) and Mixtral saved with ``save_pretrained``
load into DecoderModel with the same logits, and ``save_hf`` output loads back into transformers unchanged."""

from __future__ import annotations

import json

import pytest
import torch

from llm.models import DecoderModel
from llm.models.hf import load_hf, save_hf

transformers = pytest.importorskip("transformers")

COMMON = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=48, max_position_embeddings=64)


def _llama(tie: bool):
    cfg = transformers.LlamaConfig(**COMMON, tie_word_embeddings=tie, rope_theta=500.0, rms_norm_eps=1e-6)
    return transformers.LlamaForCausalLM(cfg).eval()


def _mixtral():
    cfg = transformers.MixtralConfig(**COMMON, num_local_experts=8, num_experts_per_tok=2, rope_theta=1e6)
    return transformers.MixtralForCausalLM(cfg).eval()


def _hf_logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _randomize_norms(model):
    # HF initializes norms to 1; random values make the test see a swapped/missing norm weight.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)


@pytest.mark.parametrize("build", [lambda: _llama(False), lambda: _llama(True), _mixtral],
                         ids=["llama", "llama-tied", "mixtral"])
def test_roundtrip_logits_match_transformers(tmp_path, build):
    torch.manual_seed(0)
    hf = build()
    _randomize_norms(hf)
    hf.save_pretrained(tmp_path / "hf")
    ids = torch.randint(0, 96, (2, 11))
    expected = _hf_logits(hf, ids)

    ours = load_hf(tmp_path / "hf").eval()
    assert ours.config.tie_embeddings == hf.config.tie_word_embeddings
    assert (ours.lm_head.weight is ours.embed_tokens.weight) == hf.config.tie_word_embeddings
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), expected, atol=1e-4, rtol=1e-4)

    save_hf(ours, tmp_path / "ours")
    back = type(hf).from_pretrained(tmp_path / "ours").eval()
    torch.testing.assert_close(_hf_logits(back, ids), expected, atol=1e-4, rtol=1e-4)


def test_sharded_checkpoints_both_ways(tmp_path):
    torch.manual_seed(0)
    hf = _mixtral()
    hf.save_pretrained(tmp_path / "hf", max_shard_size="40KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    ours = load_hf(tmp_path / "hf")
    ids = torch.randint(0, 96, (1, 6))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), _hf_logits(hf, ids), atol=1e-4, rtol=1e-4)
    save_hf(ours, tmp_path / "ours", max_shard_bytes=40_000)
    index = json.loads((tmp_path / "ours" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert "model.layers.0.block_sparse_moe.experts.7.w2.weight" in index["weight_map"]
    back = transformers.MixtralForCausalLM.from_pretrained(tmp_path / "ours").eval()
    torch.testing.assert_close(_hf_logits(back, ids), _hf_logits(hf, ids), atol=1e-4, rtol=1e-4)


def test_fused_on_disk_expert_names_are_accepted(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    hf = _mixtral()
    hf.save_pretrained(tmp_path / "hf")
    # a raw dump of transformers 5's in-memory (fused) state_dict
    (tmp_path / "hf" / "model.safetensors").unlink()
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(tmp_path / "hf" / "model.safetensors"))
    ours = load_hf(tmp_path / "hf")
    ids = torch.randint(0, 96, (1, 6))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), _hf_logits(hf, ids), atol=1e-4, rtol=1e-4)


def test_our_model_exports_and_loads_back_bf16(tmp_path):
    torch.manual_seed(0)
    model = DecoderModel.tiny(use_moe=True, num_experts=4, top_k=2, rope_theta=1234.0).to(torch.bfloat16)
    save_hf(model, tmp_path / "out")
    again = load_hf(tmp_path / "out")
    assert again.embed_tokens.weight.dtype == torch.bfloat16
    for (n, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), n
    ids = torch.randint(0, 256, (1, 5))
    torch.testing.assert_close(again.float()(ids), model.float()(ids))


def test_unsupported_models_raise(tmp_path):
    with pytest.raises(ValueError, match="shared experts"):
        save_hf(DecoderModel.tiny(use_moe=True, num_shared_experts=1), tmp_path / "a")
    with pytest.raises(ValueError, match="causal"):
        save_hf(DecoderModel.tiny(causal=False), tmp_path / "b")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match="unsupported architecture"):
        load_hf(tmp_path / "c")
