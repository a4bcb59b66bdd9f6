"""The Hugging Face families beside plain Llama, in and out: Llama 3 (``llama3``/``linear`` rope scaling), Qwen2
(q/k/v biases) and Qwen3 (QK-norm, its own head width).

Each tiny random model is built from transformers' own config class (no download) and saved with
``save_pretrained``; ``load_hf`` must give transformers' logits and greedy continuation, and ``save_hf`` must write
a folder that ``AutoModelForCausalLM`` loads as the source's class with the same logits. The CLI path
(``--model-init-from`` -> one step at lr 1e-12 -> ``llm.export``) is checked for each family.
"""

from __future__ import annotations

import json

import pytest
import torch

from llm.data.tokenizers import HFTokenizer
from llm.export import main as export_main
from llm.models import DecoderModel
from llm.models.hf import HFFormatError, load_hf, save_hf
from llm.training.train import main as train_main

transformers = pytest.importorskip("transformers")

BASE = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=96, max_position_embeddings=256, rms_norm_eps=1e-6)
LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=64)
FAMILIES = {  # name -> (config class, extra config fields, class name)
    "llama3-rope": ("LlamaConfig", dict(rope_parameters=LLAMA3_ROPE), "LlamaForCausalLM"),
    "linear-rope": ("LlamaConfig", dict(rope_parameters=dict(rope_type="linear", rope_theta=1e4, factor=4.0)),
                    "LlamaForCausalLM"),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True, rope_parameters=dict(rope_type="default",
                                                                                 rope_theta=1e6)), "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", dict(head_dim=32, rope_parameters=dict(rope_type="default", rope_theta=1e6)),
              "Qwen3ForCausalLM"),
}


def hf_model(family: str, vocab_size: int = 128):
    config_class, extra, class_name = FAMILIES[family]
    config = getattr(transformers, config_class)(**{**BASE, "vocab_size": vocab_size}, **extra)
    torch.manual_seed(0)
    model = getattr(transformers, class_name)(config).eval()
    with torch.no_grad():  # HF starts norms at 1 and biases at 0: random values catch a dropped or swapped one
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.5)
    return model


def hf_logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_family_loads_generates_and_exports_as_transformers_has_it(tmp_path, family):
    ref = hf_model(family)
    ref.save_pretrained(tmp_path / "src")
    ours = load_hf(tmp_path / "src").eval()
    ids = torch.randint(0, 128, (2, 96), generator=torch.Generator().manual_seed(1))  # longer than llama3's 64
    expected = hf_logits(ref, ids)
    with torch.no_grad():
        assert (ours(ids) - expected).abs().max() <= 1e-4

    prompt = ids[:1, :12]
    theirs = ref.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(prompt, 8, temperature=0), theirs)

    save_hf(ours, tmp_path / "out")
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["architectures"] == [FAMILIES[family][2]] and written["model_type"] == ref.config.model_type
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(back).__name__ == FAMILIES[family][2]
    assert (hf_logits(back, ids) - expected).abs().max() <= 1e-4


def test_what_each_family_changes_matters(tmp_path):
    """The parity above could not fail if a variant changed nothing: without it the logits move."""
    ids = torch.randint(0, 128, (1, 96), generator=torch.Generator().manual_seed(2))
    for family, plain in (("llama3-rope", dict(rope_type="default")), ("linear-rope", dict(rope_type="default")),
                          ("qwen2", dict(qkv_bias=False)), ("qwen3", dict(qk_norm=False))):
        hf_model(family).save_pretrained(tmp_path / family)
        model = load_hf(tmp_path / family).eval()
        state = {k: v for k, v in model.state_dict().items() if plain.get("qkv_bias", True) or "bias" not in k}
        state = {k: v for k, v in state.items() if plain.get("qk_norm", True) or "_norm" not in k}
        changed = DecoderModel.from_state_dict(state, model.config, **plain).eval()
        with torch.no_grad():
            assert (changed(ids) - model(ids)).abs().max() > 1e-3, family


def test_default_configs_build_the_model_they_always_did():
    """New fields default to plain Llama: the same parameters, drawn from the same random stream."""
    torch.manual_seed(0)
    a = DecoderModel.tiny()
    torch.manual_seed(0)
    b = DecoderModel.tiny(rope_type="default", qkv_bias=False, qk_norm=False, head_size=None, hf_architecture="")
    assert a.state_dict().keys() == b.state_dict().keys()
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    assert a.rotary.scaling is None and not any("bias" in k or "_norm" in k for k in a.state_dict())


REFUSED = {  # family, config.json edit, the field the refusal names
    "unknown-rope-type": ("llama3-rope", dict(rope_parameters=dict(LLAMA3_ROPE, rope_type="yarn")), "rope_type"),
    "rope-extra-key": ("llama3-rope", dict(rope_parameters=dict(LLAMA3_ROPE, attention_factor=2.0)),
                       "rope_parameters.attention_factor"),
    "llama3-without-factor": ("llama3-rope", dict(rope_parameters={k: v for k, v in LLAMA3_ROPE.items()
                                                                   if k != "factor"}), "rope_parameters.factor"),
    "qwen2-sliding-window": ("qwen2", dict(use_sliding_window=True, sliding_window=16), "use_sliding_window"),
    "qwen3-attention-bias": ("qwen3", dict(attention_bias=True), "attention_bias"),
    "qwen3-gelu": ("qwen3", dict(hidden_act="gelu"), "hidden_act"),
}


@pytest.mark.parametrize("family, edit, field", REFUSED.values(), ids=REFUSED.keys())
def test_what_a_family_config_asks_for_and_we_lack_is_refused_by_name(tmp_path, family, edit, field):
    hf_model(family).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(edit)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(HFFormatError, match=field.replace(".", r"\.")) as info:
        load_hf(tmp_path)
    assert "\n" not in str(info.value)


def test_export_refuses_a_variant_its_class_cannot_express(tmp_path):
    with pytest.raises(ValueError, match="LlamaForCausalLM has qkv_bias False"):
        save_hf(DecoderModel.tiny(qkv_bias=True), tmp_path / "a")
    with pytest.raises(ValueError, match="Qwen3ForCausalLM has qk_norm True"):
        save_hf(DecoderModel.tiny(hf_architecture="Qwen3ForCausalLM"), tmp_path / "b")


TEXT = "def square(x):\n    return x * x\n\n\ndef cube(x):\n    return x * x * x\n\n" * 10


@pytest.mark.parametrize("family", ["llama3-rope", "qwen2", "qwen3"])
def test_init_from_one_tiny_step_and_export_gives_the_source_back(tmp_path, family):
    """The acceptance path: --model-init-from FOLDER, one step at lr 1e-12, llm.export, transformers' logits."""
    tok = HFTokenizer.train_bpe([TEXT], 300)
    ref = hf_model(family, vocab_size=tok.vocab_size)
    ref.save_pretrained(tmp_path / "src")
    tok.save(tmp_path / "src")
    (tmp_path / "corpus.txt").write_text(TEXT, encoding="utf-8")
    assert train_main([
        "--task", "lm", "--model-init-from", str(tmp_path / "src"), "--data-path", str(tmp_path / "corpus.txt"),
        "--data-seq-len", "16", "--data-val-fraction", "0.3", "--data-cache-dir", str(tmp_path / "cache"),
        "--training-batch-size", "2", "--training-max-steps", "1", "--training-lr", "1e-12",
        "--training-precision", "fp32", "--training-device", "cpu", "--logging-log-dir", str(tmp_path / "run"),
    ]) == 0
    assert export_main([str(tmp_path / "run"), "--to", "hf", str(tmp_path / "out")]) == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(back).__name__ == type(ref).__name__
    ids = torch.randint(0, tok.vocab_size, (1, 96), generator=torch.Generator().manual_seed(3))
    assert (hf_logits(back, ids) - hf_logits(ref, ids)).abs().max() <= 1e-4
