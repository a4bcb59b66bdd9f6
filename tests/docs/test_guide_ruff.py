"""The guide's code is clean under the project's own ruff configuration (pyproject.toml), in both languages: each
block on its own, and the framework's files once the blocks are pasted where the guide says."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO
from recipe_apply import apply_block, guide_blocks

GUIDES = [REPO / "docs" / "GUIDE_EXTENDING.md", REPO / "docs" / "GUIDE_EXTENDING.zh-CN.md"]
RUFF = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
pytestmark = pytest.mark.skipif(RUFF is None, reason="ruff is not installed")


def ruff(paths: list[Path], *ignore: str, cwd: Path) -> subprocess.CompletedProcess:
    ignored = ["--ignore", ",".join(ignore)] if ignore else []
    # Outside the repository ruff cannot see that `llm` is this project's own package (first-party imports sort
    # last), so that is said explicitly; everything else is pyproject.toml's.
    config = ["--config", str(REPO / "pyproject.toml"), "--config", 'lint.isort.known-first-party = ["llm"]']
    return subprocess.run([RUFF, "check", "--no-cache", *config, "--output-format", "concise", *ignored,
                           *map(str, paths)], cwd=cwd, capture_output=True, text=True, timeout=120)


def python_blocks(guide: Path) -> list[tuple[str, str]]:
    """(label, code) of each Python block a reader pastes (a `show` excerpt is the repository's own code, checked
    verbatim by test_guide_recipes and linted with it)."""
    blocks = []
    for i, (kind, target, code) in enumerate(guide_blocks(guide)):
        if kind in ("apply", "file") and target.endswith(".py"):
            blocks.append((f"block{i:02d}_{kind}_{Path(target).stem}", code))
    return blocks


@pytest.mark.parametrize("guide", GUIDES, ids=lambda p: p.name)
def test_each_block_is_ruff_clean(guide, tmp_path):
    blocks = python_blocks(guide)
    assert len(blocks) >= 7  # the recipes' Python blocks are all found
    paths = []
    for label, code in blocks:
        paths.append(tmp_path / f"{label}.py")
        paths[-1].write_text(code, encoding="utf-8")
    # F821 only: a fragment uses what its target file defines (`@dataclass`, `TrainingTask`, ...).
    proc = ruff(paths, "F821", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_pasted_framework_is_ruff_clean(tmp_path):
    root = tmp_path / "ws"
    shutil.copytree(REPO / "llm", root / "llm", ignore=shutil.ignore_patterns("__pycache__"))
    touched = set()
    for kind, target, code in guide_blocks(GUIDES[0]):  # the twin has the same blocks (test_guide_recipes)
        if kind == "apply":
            apply_block(root, target, code)
            touched.add(root / target)
        elif kind == "file" and target.endswith(".py"):
            (root / target).write_text(code, encoding="utf-8")
            touched.add(root / target)
    assert len(touched) >= 4
    # I001 aside: where a pasted import line goes in the file's import block is the editor's (`ruff check --fix`).
    proc = ruff(sorted(touched), "I001", cwd=root)
    assert proc.returncode == 0, proc.stdout + proc.stderr
