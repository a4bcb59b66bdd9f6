"""LoRA through peft: only adapters train, the merge equals the adapted model, state dicts round-trip."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn

from llm.errors import ConfigError
from llm.models import lora
from llm.models.decoder import DecoderModel
from llm.training.optim.optimizers import param_groups


def adapted(adapters_only: bool = False, seed: int = 0, **overrides) -> DecoderModel:
    torch.manual_seed(seed)
    return lora.apply_lora(DecoderModel.tiny(**overrides), rank=4, alpha=8, adapters_only=adapters_only)


def train(model: nn.Module, steps: int = 3) -> None:
    """A few AdamW steps with weight decay (which must not reach frozen weights either)."""
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        ids = torch.randint(0, 256, (2, 16), generator=gen)
        loss = nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.roll(-1, 1).flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()


def test_only_adapters_train_and_the_base_stays_bitwise():
    model = adapted()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    # Every projection of both blocks is adapted: 7 targets x 2 layers x (A, B).
    assert len(trainable) == 28
    with lora.full_state(model):
        before = {k: v.clone() for k, v in model.state_dict().items()}
    train(model)
    with lora.full_state(model):
        after = model.state_dict()
    for key, value in before.items():
        if lora.is_adapter_key(key):
            continue
        assert torch.equal(after[key], value), key
    assert not torch.equal(after["layers.0.self_attn.q_proj.lora_B.default.weight"],
                           before["layers.0.self_attn.q_proj.lora_B.default.weight"])


def test_merged_model_is_plain_and_computes_what_the_adapted_one_does():
    model = adapted()
    train(model)
    merged = lora.merged_model(model)
    assert type(merged) is DecoderModel and not lora.is_adapted(merged)
    assert set(merged.state_dict()) == set(DecoderModel.tiny().state_dict())  # plain names, no peft
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(2))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(merged.eval()(ids), model(ids), atol=1e-5, rtol=0)
    assert lora.is_adapted(model)  # merging made a copy; the adapted model still trains
    assert lora.exportable(merged) is merged


def test_adapters_only_state_dict_round_trips_and_still_requires_the_adapters():
    model = adapted(adapters_only=True)
    train(model)
    state = model.state_dict()
    assert state and all(lora.is_adapter_key(k) for k in state)
    fresh = adapted(adapters_only=True)  # same seed: the base a run rebuilds from its source
    fresh.load_state_dict(state, strict=True)
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        assert torch.equal(fresh.eval()(ids), model.eval()(ids))
    incomplete = dict(state)
    incomplete.pop(next(iter(state)))
    with pytest.raises(RuntimeError, match="Missing key"):
        adapted(adapters_only=True).load_state_dict(incomplete, strict=True)


def test_full_state_dict_holds_base_and_adapters():
    model = adapted(adapters_only=False)
    keys = set(model.state_dict())
    assert "layers.0.self_attn.q_proj.base_layer.weight" in keys and "embed_tokens.weight" in keys
    assert "layers.0.self_attn.q_proj.lora_A.default.weight" in keys


def test_a_plain_state_dict_sets_the_base_and_keeps_the_adapters():
    torch.manual_seed(5)
    plain = DecoderModel.tiny()
    model = adapted()
    train(model)
    adapters = {k: v.clone() for k, v in lora.adapter_parameters(model).items()}
    model.load_state_dict(plain.state_dict(), strict=True)
    assert torch.equal(model.layers[1].mlp.down_proj.base_layer.weight, plain.layers[1].mlp.down_proj.weight)
    assert all(torch.equal(p, adapters[n]) for n, p in lora.adapter_parameters(model).items())


def test_moe_experts_are_not_adapted_but_the_model_trains():
    model = adapted(use_moe=True)
    names = set(lora.adapter_parameters(model))
    assert not any("w_gate_up" in n or "w_down" in n or ".gate." in n for n in names)
    assert any("self_attn.q_proj" in n for n in names)
    train(model, steps=1)


def test_bad_targets_and_models_are_config_errors():
    with pytest.raises(ConfigError, match=r"training.lora_targets: \['qkv'\] name no nn.Linear.*q_proj"):
        lora.apply_lora(DecoderModel.tiny(), rank=2, alpha=4, targets=["q_proj", "qkv"])
    with pytest.raises(ConfigError, match="training.lora_rank: LoRA adapts a DecoderModel"):
        lora.apply_lora(nn.Sequential(nn.Linear(4, 4)), rank=2, alpha=4, targets=["0"])


def test_missing_peft_says_how_to_install_it(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a))
    with pytest.raises(ConfigError, match=r"training.lora_rank: .*pip install 'llm\[lora\]'"):
        lora.apply_lora(DecoderModel.tiny(), rank=2, alpha=4)


def test_targets_are_checked_on_a_meta_model_before_anything_is_allocated():
    with torch.device("meta"):
        tied, untied = DecoderModel.tiny(tie_embeddings=True), DecoderModel.tiny()
    assert lora.check_targets(tied, ["q_proj", "down_proj"]) == ["q_proj", "down_proj"]
    assert lora.check_targets(untied, ["lm_head"]) == ["lm_head"]
    with pytest.raises(ConfigError, match=r"^training.lora_targets: \['lm_head'\] adapts the LM head, which is tied"):
        lora.check_targets(tied, ["q_proj", "lm_head"])


def test_only_an_adapters_only_model_pins_its_base():
    torch.manual_seed(0)
    state = DecoderModel.tiny().state_dict()
    plain, full, only = DecoderModel.tiny(), adapted(adapters_only=False), adapted(adapters_only=True)
    for model in (plain, full, only):
        lora.pin_base(model, "runs/base", state)
    assert lora.base_pin(plain) is None and lora.base_pin(full) is None
    assert lora.base_pin(only) == {"path": "runs/base", "sha256": lora.base_sha256(state)}
