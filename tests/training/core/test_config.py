"""Config resolution: precedence, generated flags, help, list appends, YAML, validation errors."""

from __future__ import annotations

import dataclasses
import re
import typing

import pytest
import yaml

from llm.errors import ConfigError
from llm.training.core.cli import BARE_ALIASES, build_parser
from llm.training.core.config import SECTIONS, Config, TrainingConfig, field_help, validate_config
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
        "--scheduler-type", "exponential", "--training-callbacks", "MetricsLogger", "EarlyStopping",
        "--no-model-tie-embeddings", "--model-num-kv-heads", "none",
    ])
    assert config.model.use_moe is True and config.model.num_experts == 8 and config.model.top_k == 2
    assert config.training.scheduler_type == "exponential"
    assert config.training.callbacks == ["MetricsLogger", "EarlyStopping"]  # without + a list replaces
    assert config.model.tie_embeddings is False and config.model.num_kv_heads is None
    config, _, _ = parse_config(["--task", "regression", "--model-use-moe", "--no-model-use-moe"])
    assert config.model.use_moe is False


def _help(capsys, monkeypatch, argv: list[str]) -> str:
    monkeypatch.setenv("COLUMNS", "120")  # argparse wraps to the terminal; pin it for a stable layout
    with pytest.raises(SystemExit) as info:
        parse_config([*argv, "--help"])
    assert info.value.code == 0
    return capsys.readouterr().out


def _default_of(text: str, flag: str) -> str:
    """The `(default: ...)` of one flag's help entry (entries may wrap onto a second line)."""
    match = re.search(rf"^  {re.escape(flag)}[ ,\n].*?\(default:\s+([^)]*)\)", text, flags=re.M | re.S)
    assert match, flag
    return " ".join(match.group(1).split())


def test_help_is_grouped_by_section_with_each_flag_and_default_once(capsys, monkeypatch):
    text = _help(capsys, monkeypatch, [])
    lines = text.splitlines()
    assert lines[0].startswith("usage: python -m llm.training.train --task NAME [--config YAML]") and lines[1] == ""
    # was 315, 78 of them usage; 126 with ~75 fields, ~1.5 lines per field added since (issue 20 families: 188;
    # issues 21, 23, 24: 206 with 150 flags, other tasks' own flags left out)
    assert len(lines) < 220
    fields = 0
    for section, cls in SECTIONS.items():
        heading = f"{section} - {cls.__doc__.strip().splitlines()[0].rstrip('.')}:"
        assert heading in lines
        body = text.split(heading, 1)[1].split("\n\n", 1)[0]  # the section's own entries
        for f in dataclasses.fields(cls):
            flag = f"--{section}-{f.name.replace('_', '-')}"
            if f.type in ("bool", bool):
                flag = f"--[no-]{section}-{f.name.replace('_', '-')}"
            entry = rf"^  {re.escape(flag)}[ ,\n]"
            if "regression" not in f.metadata.get("tasks", ("regression",)):  # another task's own flag: not listed
                assert not re.search(entry, text, flags=re.M), flag
                continue
            fields += 1
            assert len(re.findall(entry, text, flags=re.M)) == 1, flag  # one entry, and not in the usage line
            assert re.search(entry, body, flags=re.M), f"{flag} not under {section}"
    assert "cosine, step, plateau, exponential" in text  # the field's comment is its help
    resolved, _, _ = parse_config([])  # exactly what a run without flags uses
    for section, cls in SECTIONS.items():
        derived = {name for name, doc in field_help(cls).items() if "(default:" in doc}  # checked below
        for name, value in ((f.name, getattr(getattr(resolved, section), f.name)) for f in dataclasses.fields(cls)
                            if "regression" in f.metadata.get("tasks", ("regression",))):
            shown = {True: "true", False: "false", None: None, "": "''"}.get(value, value) \
                if isinstance(value, (bool, str, type(None))) else value
            if name not in derived:
                expected = " ".join(map(str, shown)) if isinstance(shown, list) else str(shown)
                flag = f"--{section}-{name.replace('_', '-')}"
                assert _default_of(text, f"--[no-]{flag[2:]}" if isinstance(value, bool) else flag) == expected
    assert "Other tasks' own flags (dpo 5, lm 3, sft 2) are listed by --task NAME --help." in text
    dpo = _help(capsys, monkeypatch, ["--task", "dpo"])
    assert "--training-dpo-beta FLOAT" in dpo and "(default: 0.1)" in dpo and "(dpo " not in dpo
    # One default per flag: every field, plus --task, --seed and --plugins; no argparse-added duplicates.
    assert text.count("(default:") == fields + 3
    # A comment explaining a derived default stands in for the value (None), not beside it.
    assert _default_of(text, "--model-num-kv-heads") == "num_heads"
    assert _default_of(text, "--logging-log-dir") == "runs/<task>-<timestamp>"
    assert "one of classification, dpo, lm, regression" in text


def test_help_shows_the_selected_task_and_yaml_defaults(capsys, monkeypatch, tmp_path):
    from llm.training.tasks.lm_task import LMTask

    lm = LMTask.config_defaults["training"]
    assert (lm["max_steps"], lm["batch_size"]) != (0, 32)  # else the test proves nothing
    text = _help(capsys, monkeypatch, ["--task", "lm"])
    assert _default_of(text, "--training-max-steps") == str(lm["max_steps"]) == "1100"
    assert _default_of(text, "--training-precision") == "auto"
    assert _default_of(text, "--training-batch-size") == str(lm["batch_size"])
    lm_callbacks = parse_config(["--task", "lm"])[0].training.callbacks  # config_defaults may itself use +NAME
    assert _default_of(text, "--training-callbacks") == " ".join(lm_callbacks)
    assert _default_of(text, "--model-intermediate-multiple-of") == "8"  # the task's rounding of the derived width
    assert _default_of(text, "--model-intermediate-size") == "8/3 hidden_size, rounded up to intermediate_multiple_of"
    cfg = tmp_path / "c.yaml"
    cfg.write_text("task: lm\ntraining:\n  lr: 0.25\n  callbacks: [+EarlyStopping]\nmodel:\n  intermediate_size: 512\n")
    text = _help(capsys, monkeypatch, ["--config", str(cfg)])
    # A set value replaces the comment's derived default rather than adding a second one.
    assert _default_of(text, "--model-intermediate-size") == "512"
    assert _default_of(text, "--training-lr") == "0.25"
    assert _default_of(text, "--training-max-steps") == "1100"  # the YAML's task
    assert _default_of(text, "--training-callbacks") == " ".join([*lm_callbacks, "EarlyStopping"])


def test_bare_aliases_only_from_the_allowlist():
    for name, section in BARE_ALIASES.items():
        holders = [s for s, cls in SECTIONS.items() if name in {f.name for f in dataclasses.fields(cls)}]
        assert holders == [section], f"bare --{name} must name exactly one field"
    options = {s for action in build_parser(["regression"])._actions for s in action.option_strings}
    prefixed = tuple(f"--{no}{section}-" for section in SECTIONS for no in ("", "no-"))
    bare = {s for s in options if not s.startswith(prefixed)}
    run_flags = {"-h", "--help", "--config", "--print-config", "--task", "--seed", "--plugins"}
    assert bare == run_flags | {f"--{name.replace('_', '-')}" for name in BARE_ALIASES}
    config, _, _ = parse_config(["--task", "regression", "--lr", "0.02", "--max-steps", "7", "--log-dir", "x"])
    assert (config.training.lr, config.training.max_steps, config.logging.log_dir) == (0.02, 7, "x")


@pytest.mark.parametrize(
    "flag, full",
    [
        ("--mode", "--checkpoint-mode"), ("--interval", "--checkpoint-interval"), ("--top-k", "--model-top-k"),
        ("--resume", "--checkpoint-resume"), ("--monitor", "--checkpoint-monitor"), ("--path", "--data-path"),
        ("--module", "--data-module"), ("--level", "--logging-level"), ("--backend", "--distributed-backend"),
        ("--strategy", "--distributed-strategy"), ("--no-use-moe", "--no-model-use-moe"),
    ],
)
def test_ambiguous_bare_names_are_rejected_naming_the_full_flag(flag, full):
    with pytest.raises(ConfigError, match=f"unknown flag '{flag}' \\(did you mean '{full}'\\?\\)"):
        parse_config(["--task", "regression", flag, "1"])


def test_bare_name_of_two_sections_names_both():
    with pytest.raises(ConfigError, match="did you mean '--model-vocab-size' or '--data-vocab-size'"):
        parse_config(["--task", "regression", "--vocab-size", "512"])


def test_plus_appends_to_the_resolved_list(tmp_path, monkeypatch):
    from llm.training.tasks.lm_task import LMTask

    task_defaults = list(LMTask.config_defaults["training"]["callbacks"])
    base = parse_config(["--task", "lm"])[0].training.callbacks
    assert "TextSampler" in base and "EarlyStopping" not in base  # the lm task's own list, not the dataclass's
    config, _, _ = parse_config(["--task", "lm", "--training-callbacks", "+EarlyStopping"])
    assert config.training.callbacks == [*base, "EarlyStopping"]
    assert LMTask.config_defaults["training"]["callbacks"] == task_defaults  # appending copies, never mutates
    assert "EarlyStopping" not in TrainingConfig().callbacks

    (tmp_path / "extra_cb.py").write_text("from llm.training.core.callbacks import Callback\n"
                                          "class Extra(Callback):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = tmp_path / "c.yaml"
    cfg.write_text("training:\n  callbacks: ['+EarlyStopping']\nplugins: [+json]\n")
    config, _, _ = parse_config(["--task", "lm", "--config", str(cfg)])
    assert config.training.callbacks == [*base, "EarlyStopping"] and config.plugins == ["json"]
    # Flags append to what the YAML resolved, and plain values still replace it.
    config, _, _ = parse_config(["--task", "lm", "--config", str(cfg), "--plugins", "+extra_cb",
                                 "--training-callbacks", "+extra_cb:Extra"])
    assert config.training.callbacks == [*base, "EarlyStopping", "extra_cb:Extra"]
    assert config.plugins == ["json", "extra_cb"]
    config, _, _ = parse_config(["--task", "lm", "--config", str(cfg), "--training-callbacks", "MetricsLogger"])
    assert config.training.callbacks == ["MetricsLogger"]
    # In a list of numbers + is a sign, not an append.
    config, _, _ = parse_config(["--task", "lm", "--training-betas", "+0.8", "0.9"])
    assert config.training.betas == [0.8, 0.9]


@pytest.mark.parametrize(
    "values, message",
    [
        (["+EarlyStopping", "MetricsLogger"], "mixes '\\+NAME'"),
        (["+"], "a lone '\\+' names nothing"),
        (["+MetricsLogger"], "duplicate callbacks \\['MetricsLogger'\\]"),
    ],
)
def test_bad_appends_are_one_line_errors(values, message):
    assert "MetricsLogger" in parse_config(["--task", "regression"])[0].training.callbacks
    with pytest.raises(ConfigError, match=message) as info:
        parse_config(["--task", "regression", "--training-callbacks", *values])
    assert "\n" not in str(info.value) and "training.callbacks" in str(info.value)


def test_field_help_reads_trailing_comments():
    helps = field_help(TrainingConfig)
    assert "peak learning rate" in helps["lr"]
    assert "package.module:Class" in helps["callbacks"]  # a comment closing a multi-line default


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


# ---------------------------------------------------------------------------------------------
# Issue 12, item 7: every value checked before anything is written.
# ---------------------------------------------------------------------------------------------


def _numeric_fields() -> list[tuple[str, str, type]]:
    """(section or '', field, float|int) of every numeric field, lists of numbers included."""
    from llm.training.core.config import field_types

    found = []
    for section, cls in [("", Config), *SECTIONS.items()]:
        for name, tp in field_types(cls).items():
            base = typing.get_args(tp)[0] if typing.get_origin(tp) in (list, typing.List) else tp
            base = next((a for a in typing.get_args(base) if a is not type(None)), base)  # Optional[int] -> int
            if base in (int, float):
                found.append((section, name, base))
    return found


def _set(config: Config, section: str, name: str, value) -> None:
    owner = getattr(config, section) if section else config
    setattr(owner, name, [value, value] if isinstance(getattr(owner, name), list) else value)


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_every_float_field_refuses_non_finite_values(bad):
    floats = [(s, n) for s, n, base in _numeric_fields() if base is float]
    assert len(floats) >= 15 and ("training", "betas") in floats  # the walk sees lists and every section
    for section, name in floats:
        config = Config()
        _set(config, section, name, bad)
        with pytest.raises(ConfigError, match=rf"^{section}\.{name}: .*must be a finite number"):
            validate_config(config, check_names=False)


def test_every_int_field_refuses_values_beyond_64_bits():
    ints = [(s, n) for s, n, base in _numeric_fields() if base is int]
    assert ("", "seed") in ints and ("model", "num_kv_heads") in ints
    for section, name in ints:
        config = Config()
        _set(config, section, name, 2**64)
        field = f"{section}.{name}" if section else name
        with pytest.raises(ConfigError, match=rf"^{re.escape(field)}: .*must fit in 64 bits"):
            validate_config(config, check_names=False)


@pytest.mark.parametrize(
    "section, name, value, message",
    [
        ("", "seed", -1, r"seed: invalid value -1; an integer in \[0, 2\*\*63\)"),
        ("", "seed", 2**63, "seed: invalid value"),
        ("training", "momentum", -0.1, r"training.momentum: .*\[0, 1\)"),
        ("training", "momentum", 1.0, r"training.momentum: .*\[0, 1\)"),
        ("training", "plateau_factor", 1.5, r"training.plateau_factor: .*\(0, 1\)"),
        ("training", "plateau_factor", 0.0, r"training.plateau_factor: .*\(0, 1\)"),
        ("training", "plateau_patience", -1, "training.plateau_patience: .*>= 0"),
        ("training", "early_stopping_patience", 0, "training.early_stopping_patience: .*>= 1"),
        ("training", "early_stopping_min_delta", -0.5, "training.early_stopping_min_delta: .*>= 0"),
        ("training", "gamma", 0.0, "training.gamma: .*> 0"),
        ("distributed", "timeout_minutes", 1e9, "distributed.timeout_minutes: .*a year"),
    ],
)
def test_out_of_range_values_are_refused(section, name, value, message):
    config = Config()
    _set(config, section, name, value)
    with pytest.raises(ConfigError, match=message):
        validate_config(config, check_names=False)


def test_edges_of_the_ranges_are_accepted_and_a_growing_gamma_is_noted():
    config = Config()
    config.seed, config.training.momentum, config.training.plateau_patience = 2**63 - 1, 0.0, 0
    config.training.scheduler_type, config.training.gamma = "exponential", 1.5
    validate_config(config)
    assert any("training.gamma 1.5 > 1" in note for note in config.notes)


def test_yaml_non_finite_and_float_seed_are_refused_with_the_field(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("training:\n  lr: .inf\n")
    with pytest.raises(ConfigError, match="training.lr: invalid value inf; must be a finite number"):
        parse_config(["--task", "regression", "--config", str(cfg)])
    cfg.write_text("seed: 1e23\n")  # YAML 1.1 reads this as text
    with pytest.raises(ConfigError, match=r"seed: expected int, got '1e23' \(str\)"):
        parse_config(["--task", "regression", "--config", str(cfg)])
    cfg.write_text("seed: 1.0e+23\n")  # and this as a float
    with pytest.raises(ConfigError, match=r"seed: expected int, got 1e\+23 \(float\)"):
        parse_config(["--task", "regression", "--config", str(cfg)])


def test_yaml_exponent_floats_are_numbers(tmp_path):
    # PyYAML (YAML 1.1) reads `1e-3` as a string; a float field takes it as YAML 1.2 and the user mean it.
    cfg = tmp_path / "c.yaml"
    cfg.write_text("training:\n  lr: 1e-3\n  weight_decay: 5E-2\n")
    config, _, _ = parse_config(["--task", "regression", "--config", str(cfg)])
    assert config.training.lr == 1e-3 and config.training.weight_decay == 0.05
    cfg.write_text("training:\n  lr: 1e-3x\n")
    with pytest.raises(ConfigError, match="training.lr: expected float"):
        parse_config(["--task", "regression", "--config", str(cfg)])


def _billion_laughs() -> str:
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi"):
        lines.append(f"{name}: &{name} [{','.join([f'*{prev}'] * 9)}]")
    return "\n".join(lines) + "\n"


# Refused before anything is expanded: expanding it would not finish (a billion strings), which the timeout catches.
@pytest.mark.timeout(60)
def test_yaml_alias_bomb_fails_fast_with_one_line(tmp_path):
    cfg = tmp_path / "bomb.yaml"
    cfg.write_text(_billion_laughs())
    assert cfg.stat().st_size < 500  # a billion "lol"s once expanded
    with pytest.raises(ConfigError) as info:
        parse_config(["--task", "regression", "--config", str(cfg)])
    assert re.fullmatch(r"config: '.*bomb.yaml' line 2: YAML aliases are not accepted \(\*a\); write the value out",
                        str(info.value))


@pytest.mark.parametrize(
    "text, message",
    [
        ("base: &b {lr: 0.1}\ntraining:\n  <<: *b\n", "line 3: YAML aliases are not accepted"),  # merge keys too
        ("training:\n  lr: 0.1\n  epochs: 2\n  lr: 0.2\n", "line 4: duplicate key 'lr'"),
        ("training: {lr: 0.1}\ntraining: {lr: 0.2}\n", "line 2: duplicate key 'training'"),
        ("[" * 20000 + "]" * 20000, "nested too deeply"),
        ("seed: " + "9" * 5000 + "\n", "holds a value that cannot be read"),
        ("seed: 2\n\udcff", "not valid YAML"),
    ],
)
def test_yaml_constructs_a_config_never_needs_are_refused(tmp_path, text, message):
    cfg = tmp_path / "c.yaml"
    cfg.write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(ConfigError, match=message):
        parse_config(["--task", "regression", "--config", str(cfg)])


def test_config_that_is_not_a_regular_file_is_refused_without_reading_it(tmp_path):
    import os

    fifo = tmp_path / "c.yaml"
    os.mkfifo(fifo)  # opening it would block forever
    with pytest.raises(ConfigError, match="is not a regular file"):
        parse_config(["--task", "regression", "--config", str(fifo)])
    with pytest.raises(ConfigError, match="is not a regular file"):
        parse_config(["--task", "regression", "--config", "/dev/zero"])


def test_huge_values_are_shortened_in_messages(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("training:\n  optimizer: " + "x" * 2**20 + "\n")
    with pytest.raises(ConfigError) as info:
        parse_config(["--task", "regression", "--config", str(cfg)])
    message = str(info.value)
    assert message.startswith("training.optimizer: unknown optimizer 'xxx") and len(message) < 500
    assert "chars]..." in message  # says that it was cut
    cfg.write_text("training:\n  ? " + "x" * 2**20 + "\n  : 1\n")  # a huge unknown key (YAML's explicit key form)
    with pytest.raises(ConfigError) as info:
        parse_config(["--task", "regression", "--config", str(cfg)])
    from llm.errors import MAX_MESSAGE_CHARS  # the cap: the valid keys of 'training' (~100) are listed

    assert "unknown key" in str(info.value) and len(str(info.value)) <= MAX_MESSAGE_CHARS


def test_user_error_messages_are_capped_as_text():
    from llm.errors import MAX_MESSAGE_CHARS, UserError, invalid, shorten

    assert len(str(UserError("y" * 10**6))) <= MAX_MESSAGE_CHARS
    assert str(UserError("short")) == "short"
    cut = shorten("a" * 1000 + "TAIL", 100)
    assert len(cut) <= 100 and cut.startswith("aaa") and cut.endswith("TAIL") and "[" in cut
    assert len(str(invalid("data.path", "p" * 10**6, "no such file"))) < 300


def test_log_dir_must_be_creatable(tmp_path):
    from llm.training.core.config import check_log_dir

    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ConfigError, match=r"logging.log_dir: .*cannot be created: '.*a_file' is not a directory"):
        check_log_dir(str(tmp_path / "a_file" / "run" / "deeper"))
    with pytest.raises(ConfigError, match="logging.log_dir: .*exists and is not a directory"):
        check_log_dir(str(tmp_path / "a_file"))
    with pytest.raises(ConfigError, match="logging.log_dir: .*not a usable path"):
        check_log_dir(str(tmp_path / "nul\0byte"))
    with pytest.raises(ConfigError, match="logging.log_dir: .*longer than 255 bytes"):
        check_log_dir(str(tmp_path / ("n" * 300) / "run"))
    check_log_dir(str(tmp_path / "new" / "run"))  # creatable: nothing is created by the check
    assert not (tmp_path / "new").exists()


def test_yaml_over_the_size_cap_is_refused_unread(tmp_path, monkeypatch):
    from llm.config import yaml_file

    monkeypatch.setattr(yaml_file, "MAX_YAML_BYTES", 64)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("training:\n  lr: 0.1\n" + "# padding\n" * 10)
    with pytest.raises(ConfigError, match="is larger than 64 bytes; not a config file"):
        parse_config(["--task", "regression", "--config", str(cfg)])


def test_long_flag_values_are_shortened_in_parse_errors():
    with pytest.raises(ConfigError) as info:
        parse_config(["--task", "regression", "--training-lr", "9" * 100_000 + "x"])
    assert "--training-lr" in str(info.value) and len(str(info.value)) < 600


# ------------------------------------------------------------------------------------------- resolved once, frozen
def test_the_resolved_config_refuses_assignment_and_copies_are_explicit(tmp_path):
    import pickle

    from llm.config import FrozenConfigError, is_frozen, replace_values, thawed

    config, _, _ = parse_config(["--task", "regression", "--logging-log-dir", str(tmp_path / "run")])
    for owner, name, value in [(config.training, "lr", 0.5), (config.model, "hidden_size", 8), (config, "task", "lm"),
                               (config.logging, "log_dir", "elsewhere")]:
        with pytest.raises(FrozenConfigError, match=r"^config\.(\w+\.)?\w+: the run's config is resolved once"):
            setattr(owner, name, value)
    with pytest.raises(FrozenConfigError, match=r"^config\.training\.lr"):
        config.training.lr = 0.5
    assert config.training.lr != 0.5
    # A spawned worker receives the config pickled: it arrives frozen.
    assert is_frozen(pickle.loads(pickle.dumps(config)).training)
    changed = replace_values(config, {"training.lr": 0.5})
    assert changed.training.lr == 0.5 and config.training.lr != 0.5 and is_frozen(changed.model)
    loose = thawed(config)
    loose.training.lr = 0.25  # a thawed copy is a plain config again
    assert not is_frozen(loose) and is_frozen(config)
    with pytest.raises(AttributeError, match="no field 'lrr'"):
        replace_values(config, {"training.lrr": 1.0})


def test_resolution_order_preset_yaml_flags_init_from_and_auto(tmp_path, monkeypatch):
    """defaults < task defaults < preset < YAML < flags, then init-from adopts the source's shape, the lm task's
    vocabulary follows the tokenizer, and `auto` precision becomes what this machine runs."""
    import torch

    from llm.models.decoder import DecoderModel
    from llm.models.hf import save_hf
    from llm.models.presets import PRESETS
    from llm.training.optim.precision import resolve_precision

    monkeypatch.setenv("LLM_CACHE_DIR", str(tmp_path / "cache"))
    tiny = PRESETS["tiny"].fields
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  num_layers: 3\n  hidden_size: 64\ntraining:\n  lr: 0.002\n")
    run = ["--task", "lm", "--logging-log-dir", str(tmp_path / "run"), "--training-device", "cpu"]
    config, _, _ = parse_config([*run, "--model-preset", "tiny", "--config", str(cfg), "--model-hidden-size", "48",
                                 "--model-num-heads", "4", "--training-precision", "auto"])
    m = config.model
    assert m.num_kv_heads == tiny["num_kv_heads"]  # the preset's, over the task's default (None)
    assert m.num_layers == 3 != tiny["num_layers"]  # the YAML's, over the preset's
    assert m.hidden_size == 48  # the flag's, over the YAML's and the preset's
    assert config.training.lr == 0.002  # the YAML's, over the lm task's default
    assert m.max_seq_len == config.data.seq_len == 256  # derived: raised to data.seq_len (preset: 128)
    assert config.training.precision == resolve_precision("auto", torch.device("cpu"))[0]  # auto, resolved
    assert any(note.startswith("precision ") for note in config.notes)

    source = tmp_path / "source"
    torch.manual_seed(0)
    save_hf(DecoderModel.tiny(hidden_size=64, num_layers=3, max_seq_len=64), source)
    config, _, _ = parse_config([*run, "--model-init-from", str(source), "--data-tokenizer", "byte",
                                 "--training-precision", "fp32"])
    m = config.model
    assert (m.hidden_size, m.num_layers, m.num_kv_heads, m.max_seq_len) == (64, 3, 2, 64)  # adopted from the source
    assert config.data.seq_len == 64  # lowered to the source's context
    assert m.vocab_size == 256  # the byte tokenizer's
    assert config.training.precision == "fp32"  # set: not touched


def test_resume_policies_are_declared_beside_the_fields():
    from llm.training import checkpointer
    from llm.training.core.config import resume_policy, resume_tables

    assert resume_policy("training.lr").kind == "applied" and "peak lr" in resume_policy("training.lr").note
    assert resume_policy("training.scheduler_type").note == "--training-scheduler-type"
    assert resume_policy("checkpoint.keep_last").kind == "expected"  # the whole section's policy
    assert resume_policy("training.warmup").kind == resume_policy("no.such.field").kind == "warn"
    # The checkpointer's tables, read from the fields.
    expected, applied, refused = resume_tables()
    assert set(expected) == {"training.max_steps", "training.epochs", "training.callbacks", "training.log_interval",
                             "training.val_interval", "logging.", "checkpoint.", "distributed.", "plugins",
                             "training.lr", "training.profile_steps"}
    assert applied == {"training.lr": "the schedule's peak lr (its position is kept)",
                       "training.max_steps": "the schedule's horizon", "training.epochs": "the schedule's horizon"}
    assert refused == {"task": "--task", "training.optimizer": "--training-optimizer",
                       "training.scheduler_type": "--training-scheduler-type",
                       "training.scheduler_interval": "--training-scheduler-interval"}
    assert checkpointer.config_changes({"training": {"lr": 1.0}}, {"training": {"lr": 2.0}}, expected=expected) == []


@pytest.mark.parametrize("hf, ours", [
    ("--save-steps", "--checkpoint-interval"), ("--eval-steps", "--training-val-interval"),
    ("--learning_rate", "--training-lr"), ("--num-train-epochs", "--training-epochs"),
    ("--resume-from-checkpoint", "--checkpoint-resume"),
])
def test_hugging_face_trainer_flag_names_point_at_ours(hf, ours):
    hint = f"unknown flag '{hf}' \\(the Hugging Face Trainer's name; here it is '{ours}'\\)"
    with pytest.raises(ConfigError, match=hint):
        parse_config(["--task", "regression", hf, "1"])


def test_every_hugging_face_name_maps_to_a_flag_that_exists():
    from llm.training.core.cli import HF_TRAINER_FLAGS, build_parser

    options = {s for action in build_parser()._actions for s in action.option_strings}
    assert {ours.split()[0] for ours in HF_TRAINER_FLAGS.values()} <= options  # the flag, then what to pass
    assert not set(HF_TRAINER_FLAGS) & options  # a name we accept needs no pointer


# The Trainer names a newcomer types first: each is either our flag too (a bare field name) or points at ours.
HF_FIRST = ["--save-steps", "--eval-steps", "--resume-from-checkpoint", "--learning-rate", "--num-train-epochs",
            "--per-device-train-batch-size", "--gradient-accumulation-steps", "--warmup-steps", "--weight-decay",
            "--max-steps", "--logging-steps", "--output-dir", "--seed", "--bf16", "--fp16"]


@pytest.mark.parametrize("hf", HF_FIRST)
def test_common_hugging_face_names_are_ours_or_point_at_ours(hf):
    from llm.training.core.cli import HF_TRAINER_FLAGS, build_parser

    options = {s for action in build_parser()._actions for s in action.option_strings}
    assert hf in options or hf in HF_TRAINER_FLAGS


@pytest.mark.parametrize("hf, ours", [("--bf16", "--training-precision bf16"), ("--fp16", "--training-precision fp16")])
def test_hugging_face_switches_point_at_our_value(hf, ours):
    hint = f"unknown flag '{hf}' \\(the Hugging Face Trainer's name; here it is '{ours}'\\)"
    with pytest.raises(ConfigError, match=hint):
        parse_config(["--task", "regression", hf])
