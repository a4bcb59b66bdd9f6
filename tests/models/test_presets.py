"""Named model shapes: exact parameter counts on the meta device, overrides, and `--model-preset` through the CLI."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from llm.errors import ConfigError
from llm.models import DecoderModel
from llm.models.config import FIELD_NAMES, ModelConfig
from llm.models.presets import PRESETS, Preset, get_preset

# The original models' total parameter counts (from their Hugging Face config.json shapes), written out here so a
# catalogue edit cannot move a count and its test together.
ORIGINAL_COUNTS = {
    "smollm2-135m": 134_515_008,
    "tinyllama-1.1b": 1_100_048_384,
    "llama-3.2-1b": 1_235_814_400,
    "llama-3.1-8b": 8_030_261_248,
    "qwen2.5-0.5b": 494_032_768,
    "qwen3-0.6b": 751_632_384 - 151936 * 1024,  # the Hub's count has the tied embedding twice (its file holds both)
    "mixtral-8x7b": 46_702_792_704,
    "mistral-7b-v0.3": 7_248_023_552,
    "qwen3-30b-a3b": 30_532_122_624,
}


def meta_model(**kwargs) -> DecoderModel:
    with torch.device("meta"):  # shapes only: the 46.7B-parameter Mixtral costs nothing here
        return DecoderModel(**kwargs)


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_builds_its_stated_parameter_count(name):
    preset = PRESETS[name]
    assert set(preset.fields) <= set(FIELD_NAMES) and "preset" not in preset.fields
    with torch.device("meta"):
        model = DecoderModel.from_preset(name)
    assert model.num_parameters() == preset.parameters
    assert model.config.preset == name and preset.note and preset.tokenizer


def test_real_models_have_the_original_counts():
    assert set(ORIGINAL_COUNTS) <= set(PRESETS)
    for name, count in ORIGINAL_COUNTS.items():
        assert meta_model(preset=name).num_parameters() == count, name
    mixtral = meta_model(preset="mixtral-8x7b")
    assert mixtral.layers[0].mlp.gate.bias is None  # the router has no bias, as in Mixtral
    assert mixtral.layers[0].mlp.w_gate_up.shape == (8, 4096, 2 * 14336)
    assert meta_model(preset="smollm2-135m").lm_head.weight is not None
    tied = meta_model(preset="llama-3.2-1b")
    assert tied.lm_head.weight is tied.embed_tokens.weight
    assert (tied.config.rope_type, tied.config.rope_factor, tied.config.rope_original_max_seq_len) == \
        ("llama3", 32.0, 8192)


@pytest.mark.parametrize("name", ["llama-3.2-1b", "llama-3.1-8b", "qwen2.5-0.5b", "qwen3-0.6b", "mistral-7b-v0.3",
                                  "qwen3-30b-a3b"])
def test_real_model_presets_are_transformers_own_models(name):
    """The preset's exported config.json builds, in transformers on the meta device, the published class with our
    parameter count, and its rope scaling / head width / biases are the original's."""
    transformers = pytest.importorskip("transformers")
    from llm.models.hf import _config_to_hf

    ours = meta_model(preset=name)
    hf = _config_to_hf(ours)
    config = transformers.AutoConfig.for_model(**{k: v for k, v in hf.items() if k != "architectures"})
    with torch.device("meta"):
        theirs = getattr(transformers, hf["architectures"][0])(config)
    assert theirs.num_parameters() == ours.num_parameters() == ORIGINAL_COUNTS[name]
    expected_class = {"qwen2.5-0.5b": "Qwen2ForCausalLM", "qwen3-0.6b": "Qwen3ForCausalLM",
                      "mistral-7b-v0.3": "MistralForCausalLM", "qwen3-30b-a3b": "Qwen3MoeForCausalLM"}
    assert type(theirs).__name__ == expected_class.get(name, "LlamaForCausalLM")
    if name.startswith("llama"):
        rope = config.rope_parameters
        assert (rope["rope_type"], rope["factor"], rope["original_max_position_embeddings"]) == \
            ("llama3", 32.0 if "3.2" in name else 8.0, 8192)


def test_tiny_preset_is_what_decoder_tiny_builds():
    assert DecoderModel.tiny().config == dataclasses.replace(DecoderModel.from_preset("tiny").config, preset="")
    assert DecoderModel.tiny().num_parameters() == PRESETS["tiny"].parameters
    moe = DecoderModel.from_preset("debug-moe")
    assert moe.config.use_moe and moe.aux_loss is None  # an MoE model, before any forward


def test_benchmark_presets_agree_with_each_other():
    dense, moe = PRESETS["bench-256"].fields, PRESETS["bench-256-moe"].fields
    moe_only = {"use_moe", "num_experts", "top_k", "moe_intermediate_size"}
    assert {k: v for k, v in moe.items() if k not in moe_only} == dense
    big_dense, big_moe = PRESETS["byte-125m"].fields, PRESETS["byte-moe-480m"].fields
    assert big_dense["hidden_size"] == big_moe["hidden_size"] == 768 and big_moe["moe_intermediate_size"] == 2048


def test_from_preset_takes_overrides_and_every_form_agrees():
    model = meta_model(preset="tinyllama-1.1b", hidden_size=1024, num_layers=2)
    c = model.config
    assert (c.hidden_size, c.num_layers, c.num_heads, c.intermediate_size) == (1024, 2, 32, 5632)  # the rest: preset
    config = ModelConfig.from_preset("smollm2-135m", num_layers=3)
    assert config.preset == "smollm2-135m" and config.num_layers == 3 and config.num_kv_heads == 3
    by_fields = meta_model(**dataclasses.asdict(config))
    by_preset_keyword = meta_model(preset="smollm2-135m", num_layers=3)
    with torch.device("meta"):
        assert DecoderModel(config).config == by_fields.config == by_preset_keyword.config
    assert DecoderModel.from_preset("tiny").config == DecoderModel(preset="tiny").config
    # A finished config's preset is a record: its own values are built, not the preset's.
    recorded = dataclasses.replace(ModelConfig(hidden_size=64, num_layers=1), preset="tinyllama-1.1b")
    assert DecoderModel(recorded).config.hidden_size == 64


def test_unknown_names_fail_clearly():
    with pytest.raises(ConfigError, match=r"unknown preset 'tinylama'.*did you mean 'tinyllama-1.1b'\?"):
        DecoderModel.from_preset("tinylama")
    with pytest.raises(ConfigError, match="valid: tiny, debug-moe"):
        get_preset("nope")
    with pytest.raises(TypeError, match="did you mean 'hidden_size'"):
        DecoderModel.from_preset("tiny", hiden_size=64)
    assert isinstance(get_preset("tiny"), Preset)


# ------------------------------------------------------------------------------------------------- through the CLI
def parse(*args: str):
    from llm.training.train import parse_config

    # fp32: `auto` precision adds a note of its own (resolved with the config) that these tests do not look at
    return parse_config(["--task", "lm", "--training-device", "cpu", "--training-precision", "fp32", *args])[0]


def test_cli_preset_with_a_flag_override_notes_what_changed():
    config = parse("--model-preset", "tinyllama-1.1b", "--model-hidden-size", "1024")
    m = config.model
    assert (m.preset, m.hidden_size, m.num_layers, m.num_kv_heads, m.intermediate_size) == (
        "tinyllama-1.1b", 1024, 22, 4, 5632)
    assert m.intermediate_multiple_of == ModelConfig.intermediate_multiple_of  # the preset replaced the task's
    assert m.max_seq_len == 2048 and m.rope_theta == 10000.0
    [note] = config.notes
    assert note.startswith("model.preset tinyllama-1.1b: ")
    assert "hidden_size 2048 -> 1024 (flag)" in note
    # The default byte tokenizer has 256 ids: the preset's 32000-token vocabulary is not trained.
    assert m.vocab_size == 256 and "vocab_size 32000 -> 256 (follows data.tokenizer 'byte'" in note


def test_cli_preset_from_yaml_flags_win_and_matching_values_are_not_noted(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("task: lm\nmodel:\n  preset: smollm2-135m\n  num_layers: 2\n  num_heads: 9\n")
    config = parse("--config", str(cfg))
    assert (config.model.preset, config.model.num_layers, config.model.hidden_size) == ("smollm2-135m", 2, 576)
    assert "num_layers 30 -> 2 (YAML)" in config.notes[0] and "num_heads" not in config.notes[0]
    with pytest.raises(ConfigError, match="must be divisible by model.num_heads=9"):  # impossible shapes stay errors
        parse("--config", str(cfg), "--model-preset", "tiny")  # the flag's preset, under the YAML's fields
    cfg.write_text("task: lm\nmodel:\n  preset: smollm2-135m\n  num_layers: 1\n")
    config = parse("--config", str(cfg), "--model-preset", "tiny")
    assert (config.model.preset, config.model.num_layers, config.model.hidden_size) == ("tiny", 1, 32)
    # A preset for the byte tokenizer keeps everything: no note.
    assert parse("--model-preset", "byte-125m", "--data-seq-len", "2048").notes == []


def test_cli_preset_vocab_is_kept_with_its_own_tokenizer(tmp_path, monkeypatch):
    from llm.data.tokenizers import HFTokenizer

    tokenizer = HFTokenizer.train_bpe(["def f(x):\n    return x * 2\n" * 50, "class A:\n    pass\n" * 50], 300)
    tokenizer.save(tmp_path)
    path = str(tmp_path / "tokenizer.json")
    own = dict(PRESETS["tiny"].fields, vocab_size=tokenizer.vocab_size)
    monkeypatch.setitem(PRESETS, "tiny-bpe", Preset(own, parameters=0, tokenizer=path))
    config = parse("--model-preset", "tiny-bpe", "--data-tokenizer", path)
    assert config.model.vocab_size == tokenizer.vocab_size and not any("vocab" in n for n in config.notes)
    config = parse("--model-preset", "tiny-bpe")  # the byte tokenizer instead: follow it
    assert config.model.vocab_size == 256 and "vocab_size" in config.notes[0]
    config = parse("--model-preset", "tinyllama-1.1b", "--model-vocab-size", "512")  # set by the user: kept (padded)
    assert config.model.vocab_size == 512 and "vocab_size 32000 -> 512 (flag)" in config.notes[0]


def test_cli_preset_shorter_context_than_the_window_is_raised_unless_set():
    config = parse("--model-preset", "tiny")  # tiny's max_seq_len is 128, the lm window 256
    assert config.model.max_seq_len == 256 and "max_seq_len 128 -> 256 (raised to data.seq_len)" in config.notes[0]
    with pytest.raises(ConfigError, match=r"data.seq_len.*must be <= model.max_seq_len=128"):
        parse("--model-preset", "tiny", "--model-max-seq-len", "128")  # a contradiction the user wrote stays one


def test_cli_unknown_preset_is_one_line_exit_2(tmp_path):
    from helpers import call_main

    from llm.training.train import main

    with pytest.raises(ConfigError, match="did you mean 'smollm2-135m'"):
        parse("--model-preset", "smollm-135m")
    proc = call_main(main, ["--task", "lm", "--model-preset", "mixtral-8x7", "--logging-log-dir",
                            str(tmp_path / "run")], cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: model.preset: unknown preset 'mixtral-8x7'; valid: " + ", ".join(PRESETS)
        + " (did you mean 'mixtral-8x7b'?)"
    ]
    assert not (tmp_path / "run").exists()


def test_help_shows_the_preset_values(capsys):
    from llm.training.train import parse_config

    with pytest.raises(SystemExit):
        parse_config(["--task", "lm", "--model-preset", "llama-3.2-1b", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--model-hidden-size INT width of the residual stream (default: 2048)" in text
    assert "--model-rope-theta FLOAT rotary embedding base (default: 500000.0)" in text
