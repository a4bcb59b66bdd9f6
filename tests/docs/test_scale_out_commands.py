"""docs/scale-out.md's training commands, typed as written, are accepted by the config parser (parse only: no
process group, no run)."""

from __future__ import annotations

import re
import shlex

import pytest
from helpers import REPO

from llm.training.train import parse_config

DOC = REPO / "docs" / "scale-out.md"
ENTRY = "llm.training.train"


def doc_commands() -> list[list[str]]:
    """The arguments of each command in the doc's bash blocks that runs `llm.training.train` (continuation lines
    joined, comments dropped), launcher included: the test reads torchrun's process count from them."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", DOC.read_text("utf-8"), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if ENTRY not in line:  # other commands (a multi-line `python -c "..."`) are not split
                continue
            argv = shlex.split(line, comments=True)
            if ENTRY in argv:
                commands.append(argv)
    return commands


def _torchrun_processes(launcher: list[str]) -> int | None:
    """The number of processes torchrun starts (`--nproc-per-node N` times `--nnodes N`), None for no torchrun."""
    if "torchrun" not in launcher:  # (environment assignments may come first)
        return None
    counts = {"--nproc-per-node": 1, "--nproc_per_node": 1, "--nnodes": 1}
    for i, word in enumerate(launcher[:-1]):
        if word in counts:
            counts[word] = int(launcher[i + 1])
    return counts["--nproc-per-node"] * counts["--nproc_per_node"] * counts["--nnodes"]


def test_the_doc_has_the_fsdp_command():
    assert any("fsdp" in argv for argv in doc_commands())


@pytest.mark.parametrize("command", doc_commands(),
                         ids=lambda command: " ".join(command[command.index(ENTRY) + 1:])[:60])
def test_doc_command_parses(command, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = command[command.index(ENTRY) + 1:]
    processes = _torchrun_processes(command[:command.index(ENTRY)])
    if processes is not None:  # what torchrun gives each process: the config checks the job's size
        monkeypatch.setenv("RANK", "0")
        monkeypatch.setenv("LOCAL_RANK", "0")
        monkeypatch.setenv("WORLD_SIZE", str(processes))
    config, _, _ = parse_config(argv)
    assert config.task == argv[argv.index("--task") + 1]
    assert not any(tmp_path.iterdir())  # parsing writes nothing
