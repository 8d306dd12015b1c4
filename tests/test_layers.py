"""Imports only point down (docs/architecture.md): leaves < core < pipeline < toy < lab < commands, no cycles."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PKG = Path(__file__).parents[1] / "lcot"
# anything else: a command (5)
RANK = {"errors": 0, "io": 0, "config": 0, "console": 0, "core": 1, "pipeline": 2, "toy": 3, "lab": 4}


def module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every lcot module `path` imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "lcot":
            for alias in node.names:  # `from lcot.core import graph` names a module
                sub = f"{node.module}.{alias.name}"
                found.add(sub if (PKG.parent / sub.replace(".", "/")).with_suffix(".py").is_file() else node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "lcot"}
    return found


def rank(module: str) -> int:
    parts = module.split(".")
    return RANK.get(parts[1], 5) if len(parts) > 1 else 5


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports(p) for p in PKG.rglob("*.py")}


def test_imports_only_point_down():
    wrong = [(src, dst) for src, deps in graph().items() for dst in deps
             if dst != "lcot" and rank(dst) > rank(src)]
    assert not wrong, f"imports that point up a layer: {wrong}"


def test_no_import_cycles():
    g, state, cycles = graph(), {}, []

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for dep in sorted(g.get(node, ())):
            if state.get(dep) == "open":
                cycles.append(path[path.index(dep):] + [dep] if dep in path else [node, dep])
            elif dep not in state:
                visit(dep, [*path, dep])
        state[node] = "done"

    for node in sorted(g):
        if node not in state:
            visit(node, [node])
    assert not cycles, f"import cycles: {cycles}"


def test_the_checks_can_fail(tmp_path, monkeypatch):
    """A planted upward import and a planted cycle are both found."""
    fake = tmp_path / "lcot"
    (fake / "core").mkdir(parents=True)
    (fake / "lab").mkdir()
    (fake / "core" / "a.py").write_text("from lcot.lab.b import x\n")
    (fake / "lab" / "b.py").write_text("from lcot.core.a import y\n")
    monkeypatch.setattr(sys.modules[__name__], "PKG", fake)
    g = graph()
    assert g == {"lcot.core.a": {"lcot.lab.b"}, "lcot.lab.b": {"lcot.core.a"}}
    assert rank("lcot.lab.b") > rank("lcot.core.a")
    try:
        test_no_import_cycles()
    except AssertionError as err:
        assert "lcot.core.a" in str(err)
    else:
        raise AssertionError("the planted cycle was not found")
