"""Mistral (sliding-window attention) and Qwen3-MoE (fine-grained experts, dense blocks, unnormalised gates) against
transformers' own models of tiny random configs: logits, greedy generation past the window, and the export."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import read_metrics
from safetensors.torch import load_file

from llm.data.text import TextDataModule
from llm.data.tokenizers import HFTokenizer
from llm.export import main as export_main
from llm.models import DecoderModel
from llm.models.hf import HFFormatError, _config_from_hf, load_hf, save_hf
from llm.models.layers import apply_rotary, sliding_window_mask
from llm.training.train import main as train_main
from llm.training.train import parse_config
from tests.models.test_init_from import TEXT, run_args

transformers = pytest.importorskip("transformers")

COMMON = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=48, max_position_embeddings=64, rms_norm_eps=1e-6)


def _randomize_norms(model) -> None:
    with torch.no_grad():  # HF initializes norms to 1: random values make a swapped or missing norm visible
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)


def _mistral(window: int | None = 8):
    torch.manual_seed(0)
    cfg = transformers.MistralConfig(**COMMON, sliding_window=window, rope_theta=1e4)
    model = transformers.MistralForCausalLM(cfg).eval()
    _randomize_norms(model)
    return model


def _logits(model, ids):
    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") else out


# ------------------------------------------------------------------------------------------------------ the mask
def test_sliding_window_attention_equals_attention_computed_by_hand():
    torch.manual_seed(0)
    T, window = 10, 3
    model = DecoderModel(vocab_size=16, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=16,
                         sliding_window=window).eval()
    attn = model.layers[0].self_attn
    x = torch.randn(1, T, 16)
    cos, sin = model.rotary(torch.arange(T))
    with torch.no_grad():
        got = attn(x, cos, sin)
        q = attn.q_proj(x).view(1, T, 2, 8).transpose(1, 2)
        k = attn.k_proj(x).view(1, T, 2, 8).transpose(1, 2)
        v = attn.v_proj(x).view(1, T, 2, 8).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = torch.zeros_like(q)
        for i in range(T):  # query i sees keys i-window+1 .. i, nothing else
            keys = range(max(0, i - window + 1), i + 1)
            scores = torch.stack([(q[:, :, i] * k[:, :, j]).sum(-1) for j in keys], -1) / math.sqrt(8)
            out[:, :, i] = (scores.softmax(-1)[..., None] * torch.stack([v[:, :, j] for j in keys], -2)).sum(-2)
        want = attn.o_proj(out.transpose(1, 2).reshape(1, T, 16))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # The band itself, and a sequence inside the window runs exactly as without the field (bitwise).
    band = sliding_window_mask(2, 5, 2)
    assert band.tolist() == [[False, False, True, True, False], [False, False, False, True, True]]
    plain = DecoderModel(vocab_size=16, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=16).eval()
    plain.load_state_dict(model.state_dict())
    ids = torch.randint(0, 16, (1, window))
    assert torch.equal(_logits(model, ids), _logits(plain, ids))
    longer = torch.randint(0, 16, (1, T))
    assert (_logits(model, longer) - _logits(plain, longer)).abs().max() > 1e-4


# ------------------------------------------------------------------------------------------------------- Mistral
def test_mistral_logits_generation_and_export_match_transformers(tmp_path):
    hf = _mistral(window=8)
    hf.save_pretrained(tmp_path / "hf")
    ids = torch.randint(0, 96, (2, 24))  # three windows long
    expected = _logits(hf, ids)
    ours = load_hf(tmp_path / "hf").eval()
    assert (ours.config.sliding_window, ours.config.hf_architecture) == (8, "MistralForCausalLM")
    torch.testing.assert_close(_logits(ours, ids), expected, atol=1e-4, rtol=1e-4)
    # Without the window the model is another one (the comparison above can fail).
    full = DecoderModel.from_state_dict(ours.state_dict(), ours.config, sliding_window=None).eval()
    assert (_logits(full, ids) - expected).abs().max() > 1e-3

    prompt = torch.randint(0, 96, (1, 6))
    want = hf.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
    got = ours.generate(prompt, 12, temperature=0)
    assert torch.equal(got, want)  # 18 positions: the cache attends only the last 8
    assert torch.equal(ours.generate(prompt, 12, temperature=0, use_cache=False), want)

    save_hf(ours, tmp_path / "ours")
    written = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert (written["architectures"], written["model_type"], written["sliding_window"]) == (
        ["MistralForCausalLM"], "mistral", 8)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    assert type(back).__name__ == "MistralForCausalLM"
    torch.testing.assert_close(_logits(back, ids), expected, atol=1e-4, rtol=1e-4)


def test_mistral_without_a_window_is_still_mistral(tmp_path):
    hf = _mistral(window=None)  # v0.3 and later: sliding_window null
    hf.save_pretrained(tmp_path / "hf")
    ours = load_hf(tmp_path / "hf").eval()
    assert ours.config.sliding_window is None
    save_hf(ours, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["architectures"] == ["MistralForCausalLM"]
    ids = torch.randint(0, 96, (1, 16))
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    torch.testing.assert_close(_logits(back, ids), _logits(hf, ids), atol=1e-4, rtol=1e-4)


def test_a_llama_config_with_a_window_is_refused(tmp_path):
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**COMMON))
    hf.save_pretrained(tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**cfg, "sliding_window": 8}))
    with pytest.raises(HFFormatError, match="whose sliding_window is 8: llama has no sliding window"):
        load_hf(tmp_path / "hf")
    model = DecoderModel.tiny(sliding_window=4)
    with pytest.raises(ValueError, match="LlamaForCausalLM has no sliding window"):
        save_hf(DecoderModel(model.config, hf_architecture="LlamaForCausalLM"), tmp_path / "x")


# ----------------------------------------------------------------------------------------------------- Qwen3-MoE
def _qwen3_moe():
    torch.manual_seed(0)
    cfg = transformers.Qwen3MoeConfig(**{**COMMON, "num_hidden_layers": 4}, head_dim=8, num_experts=6,
                                      num_experts_per_tok=2, moe_intermediate_size=16, norm_topk_prob=False,
                                      decoder_sparse_step=1, mlp_only_layers=[2], rope_theta=1e4)
    model = transformers.Qwen3MoeForCausalLM(cfg).eval()
    _randomize_norms(model)
    return model


def test_qwen3_moe_layers_gates_and_names_match_transformers(tmp_path):
    hf = _qwen3_moe()
    hf.save_pretrained(tmp_path / "hf")
    # The folder as transformers writes it: per-expert mlp.experts.E.{gate,up,down}_proj and mlp.gate.
    names = set(load_file(tmp_path / "hf" / "model.safetensors"))
    assert "model.layers.0.mlp.experts.5.up_proj.weight" in names and "model.layers.0.mlp.gate.weight" in names
    assert "model.layers.2.mlp.gate_proj.weight" in names  # mlp_only_layers: dense
    assert "model.layers.0.self_attn.q_norm.weight" in names  # Qwen3's QK-norm

    ours = load_hf(tmp_path / "hf").eval()
    c = ours.config
    assert (c.moe_intermediate_size, c.intermediate_size, c.moe_norm_topk_prob, c.moe_dense_layers) == (16, 48, False,
                                                                                                        [2])
    assert c.hf_architecture == "Qwen3MoeForCausalLM" and c.qk_norm
    assert [type(b.mlp).__name__ for b in ours.layers] == ["MoELayer", "MoELayer", "MLP", "MoELayer"]
    ids = torch.randint(0, 96, (2, 20))
    expected = _logits(hf, ids)
    torch.testing.assert_close(_logits(ours, ids), expected, atol=1e-4, rtol=1e-4)
    renormed = DecoderModel.from_state_dict(ours.state_dict(), c, moe_norm_topk_prob=True).eval()
    assert (_logits(renormed, ids) - expected).abs().max() > 1e-3  # the gates' normalisation is seen
    prompt = torch.randint(0, 96, (1, 5))
    assert torch.equal(ours.generate(prompt, 10, temperature=0),
                       hf.generate(prompt, max_new_tokens=10, do_sample=False, pad_token_id=0))

    # Export: transformers' names and config, and its model of the export computes the source's logits.
    save_hf(ours, tmp_path / "ours")
    written = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert (written["architectures"], written["model_type"], written["mlp_only_layers"], written["norm_topk_prob"],
            written["moe_intermediate_size"]) == (["Qwen3MoeForCausalLM"], "qwen3_moe", [2], False, 16)
    assert set(load_file(tmp_path / "ours" / "model.safetensors")) == names
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    assert type(back).__name__ == "Qwen3MoeForCausalLM"
    torch.testing.assert_close(_logits(back, ids), expected, atol=1e-4, rtol=1e-4)
    # Without QK-norm it is not a Qwen3-MoE: refused rather than written wrong.
    plain = DecoderModel.from_state_dict({k: v for k, v in ours.state_dict().items() if "_norm." not in k or
                                          "self_attn" not in k}, c, qk_norm=False)
    with pytest.raises(ValueError, match="qk_norm"):
        save_hf(plain, tmp_path / "plain")


def test_moe_layer_pattern_follows_sparse_step_and_dense_layers():
    with torch.device("meta"):
        model = DecoderModel.tiny(num_layers=4, use_moe=True, moe_dense_layers=[0, 3])
    assert [type(b.mlp).__name__ for b in model.layers] == ["MLP", "MoELayer", "MoELayer", "MLP"]
    # decoder_sparse_step 2 with mlp_only_layers [3] of 6 blocks: dense 0, 2, 3, 4 as in transformers
    cfg = transformers.Qwen3MoeConfig(**{**COMMON, "num_hidden_layers": 6}, head_dim=8, num_experts=4,
                                      num_experts_per_tok=2, moe_intermediate_size=16, decoder_sparse_step=2,
                                      mlp_only_layers=[3])
    with torch.device("meta"):
        hf = transformers.Qwen3MoeForCausalLM(cfg)
    assert _config_from_hf(cfg.to_dict())["moe_dense_layers"] == [0, 2, 3, 4]
    assert [type(b.mlp).__name__.endswith("MLP") for b in hf.model.layers] == [True, False, True, True, True, False]
    plain = DecoderModel.tiny(use_moe=True)
    assert all(type(b.mlp).__name__ == "MoELayer" and b.mlp.norm_topk_prob for b in plain.layers)


# ------------------------------------------------------------------------------------------------------ init_from
def test_init_from_a_mistral_folder_keeps_the_window_and_scores_as_transformers(tmp_path):
    tok = HFTokenizer.train_bpe([TEXT], 300)
    torch.manual_seed(0)
    hf = transformers.MistralForCausalLM(transformers.MistralConfig(**{**COMMON, "vocab_size": tok.vocab_size},
                                                                    sliding_window=4)).eval()
    _randomize_norms(hf)
    hf.save_pretrained(tmp_path / "hf")
    tok.save(tmp_path / "hf")
    args = run_args(tmp_path, tmp_path / "hf", "--training-eval-only")  # 16-token windows: four sliding windows
    config, _, _ = parse_config(args)
    assert (config.model.sliding_window, config.model.hf_architecture) == (4, "MistralForCausalLM")
    assert train_main(args) == 0
    [record] = read_metrics(tmp_path / "run")
    dm = TextDataModule(config.data, batch_size=config.training.batch_size, seed=config.seed)
    dm.prepare_data()
    dm.setup("fit")
    losses, weights = [], []
    with torch.no_grad():
        for inputs, targets in dm.val_dataloader():
            losses.append(torch.nn.functional.cross_entropy(hf(inputs).logits.flatten(0, 1), targets.flatten()))
            weights.append(len(inputs))
    assert record["val/loss"] == pytest.approx(sum(w * x.item() for w, x in zip(weights, losses)) / sum(weights),
                                               abs=1e-5)

    # One step at lr 1e-12, then the export: transformers' MistralForCausalLM of it computes the source's logits.
    assert train_main([*run_args(tmp_path, tmp_path / "hf", "--training-max-steps", "1", "--training-lr", "1e-12"),
                       "--logging-log-dir", str(tmp_path / "run1")]) == 0
    assert export_main([str(tmp_path / "run1"), "--to", "hf", str(tmp_path / "out")]) == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(back).__name__ == "MistralForCausalLM" and back.config.sliding_window == 4
    ids = torch.randint(0, tok.vocab_size, (2, 20))
    torch.testing.assert_close(_logits(back, ids), _logits(hf, ids), atol=1e-4, rtol=1e-4)


def test_qwen3_moe_through_init_from_one_step_and_export(tmp_path):
    """The acceptance path for Qwen3-MoE: --model-init-from, one step at lr 1e-12, llm.export, and transformers'
    model of the export computes the source's logits (QK-norm, fine-grained experts, a dense block)."""
    tok = HFTokenizer.train_bpe([TEXT], 300)
    torch.manual_seed(0)
    cfg = transformers.Qwen3MoeConfig(**{**COMMON, "num_hidden_layers": 3, "vocab_size": tok.vocab_size}, head_dim=8,
                                      num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                                      norm_topk_prob=True, mlp_only_layers=[1], rope_theta=1e4)
    hf = transformers.Qwen3MoeForCausalLM(cfg).eval()
    _randomize_norms(hf)
    hf.save_pretrained(tmp_path / "hf")
    tok.save(tmp_path / "hf")
    assert train_main([*run_args(tmp_path, tmp_path / "hf", "--training-max-steps", "1", "--training-lr", "1e-12"),
                       "--logging-log-dir", str(tmp_path / "run1")]) == 0
    assert export_main([str(tmp_path / "run1"), "--to", "hf", str(tmp_path / "out")]) == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(back).__name__ == "Qwen3MoeForCausalLM" and back.config.mlp_only_layers == [1]
    ids = torch.randint(0, tok.vocab_size, (2, 20))
    torch.testing.assert_close(_logits(back, ids), _logits(hf, ids), atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------------------------------------- presets
def test_mistral_preset_counts_as_transformers_model_of_its_config():
    from llm.models.presets import PRESETS

    cfg = transformers.MistralConfig(vocab_size=32768, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                                     num_key_value_heads=8, intermediate_size=14336, max_position_embeddings=32768,
                                     rope_theta=1e6, rms_norm_eps=1e-5, sliding_window=None, tie_word_embeddings=False)
    with torch.device("meta"):
        theirs = sum(p.numel() for p in transformers.MistralForCausalLM(cfg).parameters())
        ours = DecoderModel.from_preset("mistral-7b-v0.3")
    assert ours.num_parameters() == theirs == PRESETS["mistral-7b-v0.3"].parameters == 7_248_023_552
    assert ours.config.sliding_window is None and ours.config.hf_architecture == "MistralForCausalLM"


def test_a_window_shortens_the_attention_flops():
    dense, windowed = DecoderModel.tiny(), DecoderModel.tiny(sliding_window=16)
    attention = 12 * 2 * 32  # 12 * layers * (heads * head_dim)
    assert dense.flops_per_token(64) - windowed.flops_per_token(64) == attention * (64 - 16)
    assert dense.flops_per_token(16) == windowed.flops_per_token(16)


def test_window_with_left_padding_and_chunked_prefill():
    torch.manual_seed(0)
    model = DecoderModel.tiny(sliding_window=5).eval()
    ids = torch.randint(0, 256, (1, 12))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(1, 3), torch.ones(1, 12)], 1)
    with torch.no_grad():  # padding keys are masked, the band counts key slots as transformers' does
        full = model(ids)
        left = model(padded, attention_mask=mask, positions=torch.arange(-3, 12).clamp(min=0))[:, 3:]
    torch.testing.assert_close(left[:, 5:], full[:, 5:], atol=1e-5, rtol=1e-5)  # past the padding's reach
    want = model.generate(ids[0], 9, temperature=0, use_cache=False)
    assert torch.equal(model.generate(ids[0], 9, temperature=0, prefill_chunk_size=4), want)


def test_bad_window_or_dense_layers_are_one_line_config_errors():
    from llm.errors import ConfigError

    for flags, message in ((["--model-sliding-window", "0"], "model.sliding_window"),
                           (["--model-moe-dense-layers", "4"], "model.moe_dense_layers")):
        with pytest.raises(ConfigError, match=message):
            parse_config(["--task", "lm", "--model-preset", "tiny", *flags])
