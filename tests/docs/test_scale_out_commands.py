"""docs/scale-out.md's training commands, typed as written, are accepted by the config parser (parse only: no
process group, no run)."""

from __future__ import annotations

import re
import shlex

import pytest
from helpers import REPO

from llm.errors import ConfigError
from llm.training.train import parse_config

DOC = REPO / "docs" / "scale-out.md"
ENTRY = "llm.training.train"


def doc_commands() -> list[list[str]]:
    """The arguments after `-m llm.training.train` / `python -m llm.training.train` of each command in the doc's
    bash blocks (continuation lines joined, comments dropped)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", DOC.read_text("utf-8"), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            argv = shlex.split(line, comments=True)
            if ENTRY in argv:
                commands.append(argv[argv.index(ENTRY) + 1:])
    return commands


def test_the_doc_has_the_fsdp_command():
    assert any("fsdp" in argv for argv in doc_commands())


@pytest.mark.parametrize("argv", doc_commands(), ids=lambda argv: " ".join(argv)[:60])
def test_doc_command_parses(argv, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config, _, _ = parse_config(argv)
    assert config.task == argv[argv.index("--task") + 1]
    assert not any(tmp_path.iterdir())  # parsing writes nothing


def test_fsdp_with_muon_is_one_line_naming_the_fix(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as err:
        parse_config(["--task", "lm", "--distributed-strategy", "fsdp", "--training-precision", "bf16"])
    message = str(err.value)
    assert "\n" not in message and "--training-optimizer adamw" in message and message.startswith("training.optimizer")
    assert not any(tmp_path.iterdir())
