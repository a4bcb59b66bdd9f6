"""Config resolution: precedence, generated flags, YAML, validation errors."""

from __future__ import annotations

import pytest
import yaml

from llm.training.core.cli import build_parser
from llm.training.core.config import Config, TrainingConfig, field_help, validate_config
from llm.training.core.errors import ConfigError
from llm.training.train import parse_config


def test_precedence_defaults_task_yaml_cli(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(yaml.safe_dump({"training": {"lr": 0.05, "epochs": 3}, "model": {"hidden_size": 48}}))
    config, _, _ = parse_config(["--task", "regression", "--config", str(cfg_file), "--training-lr", "0.01"])
    assert config.training.lr == 0.01  # CLI beats YAML
    assert config.training.epochs == 3  # YAML beats task default (10)
    assert config.model.hidden_size == 48  # YAML beats task default (64)
    assert config.data.seq_len == 16  # task default beats dataclass default (256)
    assert config.training.momentum == TrainingConfig().momentum  # plain default


def test_generated_flags_bare_aliases_booleans_lists():
    config, _, _ = parse_config([
        "--task", "regression", "--model-use-moe", "--model-num-experts", "8", "--model-top-k", "2",
        "--scheduler-type", "exponential", "--training-callbacks", "MetricsLogger", "WelcomeMessage",
        "--no-model-tie-embeddings", "--model-num-kv-heads", "none",
    ])
    assert config.model.use_moe is True and config.model.num_experts == 8 and config.model.top_k == 2
    assert config.training.scheduler_type == "exponential"
    assert config.training.callbacks == ["MetricsLogger", "WelcomeMessage"]
    assert config.model.tie_embeddings is False and config.model.num_kv_heads is None
    config, _, _ = parse_config(["--task", "regression", "--model-use-moe", "--no-model-use-moe"])
    assert config.model.use_moe is False


def test_help_lists_every_field_with_default_and_doc():
    text = build_parser(["regression"]).format_help()
    for section in ("model", "data", "training", "logging", "checkpoint", "distributed"):
        for name in getattr(Config(), section).__dataclass_fields__:
            assert f"--{section}-{name.replace('_', '-')}" in text
    assert "cosine, step, plateau, exponential" in text  # the field's comment is its help
    assert "(default: 0.001)" in text


def test_field_help_reads_trailing_comments():
    helps = field_help(TrainingConfig)
    assert "peak learning rate" in helps["lr"]
    assert "callbacks" in helps["callbacks"]


@pytest.mark.parametrize(
    "argv, field",
    [
        (["--training-lr", "0"], "training.lr"),
        (["--training-lr", "abc"], "--training-lr"),
        (["--model-top-k", "9", "--model-num-experts", "8"], "model.top_k"),
        (["--model-hidden-size", "30", "--model-num-heads", "4"], "model.hidden_size"),
        (["--training-precision", "fp8"], "training.precision"),
        (["--training-optimizer", "adamww"], "training.optimizer"),
        (["--training-scheduler-type", "cosin"], "training.scheduler_type"),
        (["--training-callbacks", "MetricLogger"], "training.callbacks"),
        (["--training-lrr", "0.1"], "--training-lrr"),
        (["--data-path", "/no/such/file.csv"], "data.path"),
        (["--task", "regresion"], "task"),
    ],
)
def test_bad_values_name_the_field(argv, field):
    with pytest.raises(ConfigError) as info:
        parse_config(["--task", "regression", *argv] if argv[0] != "--task" else argv)
    assert field in str(info.value)


def test_did_you_mean_suggestions():
    with pytest.raises(ConfigError, match="did you mean 'MetricsLogger'"):
        parse_config(["--task", "regression", "--training-callbacks", "MetricLogger"])
    with pytest.raises(ConfigError, match="did you mean '--training-lr'"):
        parse_config(["--task", "regression", "--training-lrr", "0.1"])
    with pytest.raises(ConfigError, match="did you mean 'regression'"):
        parse_config(["--task", "regresion"])


def test_yaml_unknown_key_and_wrong_type(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("training:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="unknown key 'training.learning_rate'"):
        parse_config(["--config", str(bad)])
    bad.write_text("model:\n  use_moe: 'yes'\n")
    with pytest.raises(ConfigError, match="model.use_moe: expected bool"):
        parse_config(["--config", str(bad)])
    bad.write_text("trainin:\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match="did you mean 'training'"):
        parse_config(["--config", str(bad)])


def test_yaml_round_trip():
    config = Config()
    config.model.use_moe = True
    from llm.training.core.config import config_from_dict

    again = config_from_dict(yaml.safe_load(config.to_yaml()))
    assert again == config
    validate_config(again)
