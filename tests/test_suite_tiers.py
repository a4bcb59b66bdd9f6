"""The test tiers: `make test-fast` is `pytest -m "not slow"`. tiers.SLOW_TESTS (applied in conftest.py) marks
slow tests by name in modules that do not mark them themselves, and a name there that no longer exists would
silently move a slow test into the fast tier."""

from __future__ import annotations

import ast

from tiers import SLOW_TESTS, TESTS_DIR


def test_every_name_in_slow_tests_is_a_test_function_of_its_module():
    for module, names in SLOW_TESTS.items():
        path = TESTS_DIR / module
        assert path.is_file(), module
        tree = ast.parse(path.read_text(encoding="utf-8"))
        defined = {node.name for node in tree.body
                   if isinstance(node, ast.FunctionDef) and node.name.startswith("test")}
        missing = [name for name in names if name != "*" and name not in defined]
        assert not missing, f"{module}: {missing} are not test functions there"
