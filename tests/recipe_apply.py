"""Put a guide's code block where the guide says, the way a user would edit the file.

Rules, applied with `ast` on the target file: imports go after the file's last top-level import (one the file
has already is left out, as a user would leave it); a class that exists already receives the block's methods and
fields (replacing same-named ones, the `# ...` lines standing for the rest of the class); an assignment to an
existing top-level name replaces it; anything else is appended. A target that does not exist is created from the block.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

BLOCK_RE = re.compile(r"<!-- (apply|run|file|show)(?:: ([^ ]+))? -->\n```(\w+)\n(.*?)```", re.S)


def guide_blocks(path: Path) -> list[tuple[str, str, str]]:
    """(kind, target, code) of every directive-tagged block of a guide, in order."""
    return [(kind, target or "", code) for kind, target, _, code in BLOCK_RE.findall(path.read_text("utf-8"))]


def _names(node: ast.stmt) -> list[str]:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [node.name]
    if isinstance(node, ast.Assign):
        return [t.id for t in node.targets if isinstance(t, ast.Name)]
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
        return [node.target.id]
    return []


def _span(node: ast.stmt) -> tuple[int, int]:
    """0-based [start, end) line span including decorators."""
    decorators = getattr(node, "decorator_list", [])
    start = min([node.lineno] + [d.lineno for d in decorators])
    return start - 1, node.end_lineno


def _lines(lines: list[str], node: ast.stmt) -> list[str]:
    start, end = _span(node)
    return [line if line.endswith("\n") else line + "\n" for line in lines[start:end]]


def _imported(*nodes: ast.stmt) -> set[tuple[str | None, str, str | None]]:
    """(module, name, alias) of each name the import statements bind."""
    return {(getattr(n, "module", None), a.name, a.asname) for n in nodes for a in getattr(n, "names", [])}


def merge(source: str, snippet: str) -> str:
    src_tree, snip_tree = ast.parse(source), ast.parse(snippet)
    src_lines, snip_lines = source.splitlines(keepends=True), snippet.splitlines(keepends=True)
    existing = {name: node for node in src_tree.body for name in _names(node)}
    imports = [n for n in src_tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    import_at = _span(imports[-1])[1] if imports else 0
    edits: list[tuple[int, int, list[str]]] = []  # (start, end, replacement) over the source lines
    appended: list[str] = []
    for node in snip_tree.body:
        names = _names(node)
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            if not _imported(node) <= _imported(*imports):  # an import the file has already is not pasted twice
                edits.append((import_at, import_at, _lines(snip_lines, node)))
        elif isinstance(node, ast.ClassDef) and node.name in existing:
            edits.extend(_merge_class(existing[node.name], node, src_lines, snip_lines))
        elif names and names[0] in existing and not isinstance(node, ast.ClassDef):
            start, end = _span(existing[names[0]])
            edits.append((start, end, _lines(snip_lines, node)))
        else:
            appended += ["\n", "\n"] + _lines(snip_lines, node)
    for start, end, new in sorted(edits, key=lambda e: (e[0], e[1]), reverse=True):
        src_lines[start:end] = new
    return "".join(src_lines + appended)


def _merge_class(target: ast.ClassDef, block: ast.ClassDef, src_lines: list[str], snip_lines: list[str]):
    members = {name: node for node in target.body for name in _names(node)}
    class_end = _span(target)[1]
    for node in block.body:
        names = _names(node)
        if names and names[0] in members:
            start, end = _span(members[names[0]])
            yield start, end, _lines(snip_lines, node)
        elif not isinstance(node, ast.Expr):  # `...` placeholders are not code to add
            yield class_end, class_end, ["\n"] + _lines(snip_lines, node)


def apply_block(root: Path, target: str, code: str) -> None:
    path = root / target
    if path.exists():
        path.write_text(merge(path.read_text("utf-8"), code), encoding="utf-8")
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(code, encoding="utf-8")
