"""The package's layering: base layer at the bottom, models and data below training, no import cycle anywhere.

The graph is read from the source with `ast`, not by importing: every `import` / `from ... import` of an `llm`
module counts, at module level and inside functions (a deferred import that hides a cycle is still a cycle),
with relative imports resolved and `from pkg import name` pointing at the submodule when `name` is one. A
package `__init__` that re-exports a submodule has an edge to it. Imports under `if TYPE_CHECKING:` are left
out: they never run, so they cannot form a cycle or pull a layer in at run time.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CLIS = ("llm.generate", "llm.export", "llm.plot", "llm.evaluate")


# --------------------------------------------------------------------------------------------------- the graph
def find_modules(package_dir: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under ``package_dir`` (a package's name is its folder's)."""
    modules = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = path.relative_to(package_dir.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


class _Imports(ast.NodeVisitor):
    """Collects (target, line) of every import statement, at any depth; those under `if TYPE_CHECKING:` only when
    `type_checking` is set."""

    def __init__(self, module: str, is_package: bool, modules: dict[str, Path], type_checking: bool = False) -> None:
        self.package = module if is_package else module.rpartition(".")[0]
        self.modules = modules
        self.type_checking = type_checking
        self.found: list[tuple[str, int]] = []

    def _known(self, name: str) -> str | None:
        """``name`` or its longest prefix that is a module of the package; None outside it."""
        while name and name not in self.modules:
            name = name.rpartition(".")[0]
        return name or None

    def _add(self, name: str | None, line: int) -> None:
        if name is not None:
            self.found.append((name, line))

    def visit_If(self, node: ast.If) -> None:
        if self.type_checking or not _is_type_checking(node.test):
            for child in node.body:
                self.visit(child)
        for child in node.orelse:
            self.visit(child)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(self._known(alias.name), node.lineno)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            base = self.package.split(".")
            base = base[: len(base) - (node.level - 1)]
            source = ".".join(base + ([node.module] if node.module else []))
        else:
            source = node.module or ""
        for alias in node.names:
            submodule = f"{source}.{alias.name}"
            self._add(submodule if submodule in self.modules else self._known(source), node.lineno)


def import_graph(package_dir: Path, type_checking: bool = False) -> dict[str, dict[str, int]]:
    """module -> {imported module of the same package: first line importing it}, self-imports left out; with
    `type_checking`, imports made only for the type checker count too."""
    modules = find_modules(package_dir)
    graph: dict[str, dict[str, int]] = {}
    for name, path in modules.items():
        visitor = _Imports(name, path.name == "__init__.py", modules, type_checking)
        visitor.visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
        edges: dict[str, int] = {}
        for target, line in visitor.found:
            if target != name:
                edges.setdefault(target, line)
        graph[name] = edges
    return graph


def cyclic_components(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan): each is a set of mutual importers."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(v: str) -> None:  # recursion depth is bounded by the module count (~100)
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return components


def find_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle (a closed path of modules) per cyclic component."""
    return [_cycle_in(graph, set(c), c[0]) for c in cyclic_components(graph)]


def _cycle_in(graph: dict[str, dict[str, int]], component: set[str], start: str) -> list[str]:
    """A shortest path start -> ... -> start inside one strongly connected component (breadth-first)."""
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v]):
                if w not in component:
                    continue
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return [*reversed(path), start]
                if w not in parent:
                    parent[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"{sorted(component)} is not strongly connected")


def describe(graph: dict[str, dict[str, int]], cycle: list[str]) -> str:
    return " -> ".join(f"{a} (line {graph[a][b]})" for a, b in zip(cycle, cycle[1:])) + f" -> {cycle[-1]}"


def _in(module: str, *packages: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def upward_imports(graph: dict[str, dict[str, int]]) -> list[str]:
    """Every import that points up the layers, as 'importer (line N) -> imported: rule'."""
    rules = [
        (("llm.errors",), lambda t: True, "the base layer imports nothing from llm"),
        (("llm.registry",), lambda t: t != "llm.errors", "the registry imports only llm.errors"),
        (("llm.fs",), lambda t: t != "llm.errors", "the file rule imports only llm.errors"),
        (("llm.pidlock",), lambda t: t not in ("llm.errors", "llm.fs", "llm.untrusted"),
         "the pid-file lock imports only llm.errors, llm.fs and llm.untrusted"),
        (("llm.config",), lambda t: not _in(t, "llm.errors", "llm.config"), "the config layer imports only llm.errors"),
        (("llm.models", "llm.data"), lambda t: _in(t, "llm.training", "llm.artifacts", *CLIS),
         "models and data sit below artifacts and training"),
        # Reading a run needs the schema of its config.yaml (the seed fixes it in llm/training/core/config.py),
        # and nothing else of training: no engine, checkpointer, observers or parallelism.
        (("llm.artifacts",), lambda t: _in(t, "llm.training", *CLIS) and t != "llm.training.core.config",
         "artifacts sit below training (only the config schema is read)"),
        (("llm.training",), lambda t: _in(t, *CLIS), "training never imports the user CLIs"),
        (("llm.training",), lambda t: _in(t, "llm.models.moe"), "training never names MoE internals (model hooks)"),
    ]
    found = []
    for module, edges in sorted(graph.items()):
        for packages, forbidden, rule in rules:
            if _in(module, *packages):
                found += [f"{module} (line {line}) -> {t}: {rule}" for t, line in sorted(edges.items()) if forbidden(t)]
    return found


# ---------------------------------------------------------------------------------------------------- llm/
@pytest.fixture(scope="module")
def graph() -> dict[str, dict[str, int]]:
    return import_graph(ROOT / "llm")


def test_the_graph_sees_the_package(graph):
    # Guards the checks below against vacuously passing on a graph that lost its edges.
    assert {"llm", "llm.errors", "llm.registry", "llm.models.decoder", "llm.training.core.engine"} <= set(graph)
    assert "llm.models.layers" in graph["llm.models.moe.layer"]
    assert "llm.models.decoder" in graph["llm.models"]  # package re-exports are edges
    assert "llm.models.moe.layer" in graph["llm.models.moe"]


def test_no_upward_imports(graph):
    assert upward_imports(graph) == []


def test_no_import_cycles(graph):
    report = [
        f"{', '.join(component)}\n  e.g. {describe(graph, _cycle_in(graph, set(component), component[0]))}"
        for component in cyclic_components(graph)
    ]
    assert not report, "modules that import each other (directly or through others):\n" + "\n".join(report)


def test_no_cycles_even_through_type_checking_imports():
    # A collaborator that names the engine's type only for the type checker still knows the engine: the contracts
    # (run context, stateful components) exist so that nothing the engine calls needs to.
    graph = import_graph(ROOT / "llm", type_checking=True)
    report = [describe(graph, cycle) for cycle in find_cycles(graph)]
    assert not report, "import cycles, counting TYPE_CHECKING imports:\n" + "\n".join(report)


def folder_shares(package_dir: Path) -> dict[str, float]:
    """Each folder's share of the package's lines (its own files, not its subfolders')."""
    lines: dict[str, int] = {}
    for path in package_dir.rglob("*.py"):
        folder = str(path.parent.relative_to(package_dir.parent))
        lines[folder] = lines.get(folder, 0) + len(path.read_text(encoding="utf-8").splitlines())
    total = sum(lines.values())
    return {folder: n / total for folder, n in lines.items()}


def test_no_folder_holds_more_than_forty_percent_of_the_package():
    shares = folder_shares(ROOT / "llm")
    assert len(shares) >= 8  # the wings: artifacts, config, data, models, moe, training and its parts
    crowded = {folder: f"{share:.0%}" for folder, share in shares.items() if share > 0.40}
    assert not crowded, f"folders holding more than 40% of llm/'s lines: {crowded}"


# ----------------------------------------------------------------------------------- the checker itself
def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root / "llm"


def test_checker_finds_a_cycle_hidden_in_a_deferred_relative_import(tmp_path):
    pkg = _write(tmp_path, {
        "llm/__init__.py": "",
        "llm/models/__init__.py": "from llm.models.a import A\n",
        "llm/models/a.py": "from .b import B\nA = 1\n",
        "llm/models/b.py": "def f():\n    from . import a\n    return a\nB = 2\n",
        "llm/models/c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from llm.models import a\n",
    })
    graph = import_graph(pkg)
    assert graph["llm.models"] == {"llm.models.a": 1}
    assert graph["llm.models.b"] == {"llm.models.a": 2}
    assert graph["llm.models.c"] == {}  # TYPE_CHECKING-only
    assert import_graph(pkg, type_checking=True)["llm.models.c"] == {"llm.models.a": 3}
    cycles = find_cycles(graph)
    assert cycles == [["llm.models.a", "llm.models.b", "llm.models.a"]]
    assert describe(graph, cycles[0]) == "llm.models.a (line 1) -> llm.models.b (line 2) -> llm.models.a"


def test_checker_finds_upward_imports(tmp_path):
    pkg = _write(tmp_path, {
        "llm/__init__.py": "",
        "llm/errors.py": "",
        "llm/registry.py": "from .errors import E\nimport llm.data.x\n",
        "llm/data/__init__.py": "",
        "llm/data/x.py": "def f():\n    import llm.training.core.thing as t\n",
        "llm/training/__init__.py": "",
        "llm/training/core/__init__.py": "",
        "llm/training/core/thing.py": "from ... import generate\n",
        "llm/generate.py": "",
    })
    assert upward_imports(import_graph(pkg)) == [
        "llm.data.x (line 2) -> llm.training.core.thing: models and data sit below artifacts and training",
        "llm.registry (line 2) -> llm.data.x: the registry imports only llm.errors",
        "llm.training.core.thing (line 1) -> llm.generate: training never imports the user CLIs",
    ]
