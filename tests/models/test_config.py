"""ModelConfig is the one field list: the constructors' two forms agree, the layers take it, the run config uses it."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch

from llm.models import DecoderModel, MoELayer, TransformerBlock
from llm.models.config import ModelConfig, default_intermediate_size
from llm.models.layers import Attention

SMALL = dict(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=32)


@pytest.mark.parametrize("use_moe", [False, True])
def test_config_and_keyword_forms_build_the_same_model(use_moe):
    config = ModelConfig(**SMALL, use_moe=use_moe, num_experts=4, moe_intermediate_size=16, tie_embeddings=True)
    torch.manual_seed(0)
    from_config = DecoderModel(config)
    torch.manual_seed(0)
    from_keywords = DecoderModel(**dataclasses.asdict(config))
    shapes = {name: p.shape for name, p in from_config.named_parameters()}
    assert shapes == {name: p.shape for name, p in from_keywords.named_parameters()}
    assert any(".mlp.w_gate_up" in name for name in shapes) == use_moe
    for (name, a), b in zip(from_config.state_dict().items(), from_keywords.state_dict().values()):
        assert torch.equal(a, b), name
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(from_config(ids), from_keywords(ids), rtol=0, atol=0)
    assert from_config.config == from_keywords.config


def test_model_config_is_the_resolved_dataclass():
    config = ModelConfig(**SMALL)
    model = DecoderModel(config)
    assert isinstance(model.config, ModelConfig)
    assert model.config is not config and config.intermediate_size is None  # the caller's config is untouched
    assert model.config == dataclasses.replace(
        config, intermediate_size=default_intermediate_size(32), moe_intermediate_size=default_intermediate_size(32)
    )
    assert DecoderModel(num_heads=8).config.num_kv_heads == 8  # derived from the heads when left None
    assert DecoderModel(config, dropout=0.25, use_moe=True).config.dropout == 0.25  # keywords override the config
    assert config.resolved().resolved() == config.resolved()
    assert model.causal and not DecoderModel(config, causal=False).causal


def test_training_config_model_section_is_the_model_config():
    from llm.training.core import config as training_config

    assert training_config.ModelConfig is ModelConfig
    assert training_config.SECTIONS["model"] is ModelConfig
    assert isinstance(training_config.Config().model, ModelConfig)
    # --help text comes from the trailing comments of this class's source
    assert training_config.field_help(ModelConfig)["top_k"] == "experts activated per token"


def test_signature_lists_the_config_fields():
    # Tools filter a saved `model:` mapping by the keywords the model accepts (llm.export does).
    params = inspect.signature(DecoderModel).parameters
    assert [f.name for f in dataclasses.fields(ModelConfig)] + ["causal"] == list(params)[1:]
    assert params["num_heads"].default == ModelConfig.num_heads


def test_layers_take_the_config():
    config = ModelConfig(**SMALL, use_moe=True, num_experts=4, top_k=1, intermediate_size=48, num_shared_experts=1,
                         moe_aux_loss_coef=0.5)
    block = TransformerBlock(config, causal=False)
    assert not block.self_attn.causal and block.self_attn.num_kv_heads == 2 and block.self_attn.head_dim == 8
    moe = block.mlp
    assert isinstance(moe, MoELayer)
    assert (moe.num_experts, moe.top_k, moe.intermediate_size, moe.aux_loss_coef) == (4, 1, 48, 0.5)
    assert moe.w_gate_up.shape == (4, 32, 96)  # moe_intermediate_size defaults to intermediate_size
    assert moe.shared_experts is not None
    attention = Attention(ModelConfig(hidden_size=24, num_heads=6))
    assert (attention.num_heads, attention.num_kv_heads, attention.head_dim) == (6, 6, 4)
    with pytest.raises(ValueError, match="not divisible"):
        Attention(ModelConfig(hidden_size=30, num_heads=4))
    with pytest.raises(TypeError, match="ModelConfig or keyword arguments"):
        TransformerBlock(dataclasses.asdict(config))


def test_fsdp_units_are_the_blocks():
    model = DecoderModel.tiny()
    assert model.fsdp_units() == list(model.layers)
    assert all(isinstance(unit, TransformerBlock) for unit in model.fsdp_units())


def test_from_state_dict_takes_a_config():
    source = DecoderModel.tiny(tie_embeddings=True)
    state = {k: v for k, v in source.state_dict().items() if k != "lm_head.weight"}  # a tied file keeps one
    rebuilt = DecoderModel.from_state_dict(state, source.config)
    assert rebuilt.lm_head.weight is rebuilt.embed_tokens.weight
    ids = torch.randint(0, 256, (1, 5))
    torch.testing.assert_close(rebuilt(ids), source(ids))


def test_intermediate_size_is_derived_from_hidden_size_by_a_rounding_rule():
    assert default_intermediate_size(128) == 512 and default_intermediate_size(128, 8) == 344  # Llama's vs lm's
    assert default_intermediate_size(768, 8) == default_intermediate_size(768) == 2048
    assert ModelConfig(hidden_size=128, intermediate_multiple_of=8).resolved().intermediate_size == 344
    widened = ModelConfig(hidden_size=768, intermediate_multiple_of=8).resolved()
    assert widened.intermediate_size == widened.moe_intermediate_size == 2048  # follows the width, not a number
    assert ModelConfig(hidden_size=768, intermediate_size=1000).resolved().intermediate_size == 1000  # set: kept
    with pytest.raises(ValueError, match="intermediate_multiple_of must be >= 1"):
        ModelConfig(intermediate_multiple_of=0).resolved()
