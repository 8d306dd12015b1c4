"""The layering (docs/architecture.md): leaves < core < fast < pipeline < toy < lab < commands, imports only point
down, no cycles, and no module-level state that decides what runs (registries that another module fills, `global`
rebinding, one module assigning into another's attributes)."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).parents[1] / "lcot"
# anything else: a command (6)
RANK = {"errors": 0, "io": 0, "config": 0, "console": 0, "core": 1, "fast": 2, "pipeline": 3, "toy": 4, "lab": 5}
CONTAINERS = (ast.Dict, ast.List, ast.Set, ast.DictComp, ast.ListComp, ast.SetComp)
CONTAINER_CALLS = {"dict", "list", "set", "defaultdict", "OrderedDict", "deque", "Counter"}
WEAK_CALLS = {"WeakKeyDictionary", "WeakValueDictionary", "WeakSet"}  # caches keyed by objects: always state
MUTATORS = {"add", "append", "extend", "insert", "update", "setdefault", "pop", "popitem", "clear", "remove",
            "discard", "__setitem__"}


def module_name(path: Path, pkg: Path) -> str:
    parts = path.relative_to(pkg.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, pkg: Path) -> set[str]:
    """Every lcot module `path` imports, at module level or inside functions (not under `if TYPE_CHECKING:`, which
    never runs)."""
    found, tree = set(), ast.parse(path.read_text())
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                   and ast.unparse(block.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")
                   for stmt in block.body for n in ast.walk(stmt)}
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "lcot":
            for alias in node.names:  # `from lcot.fast import graph` names a module
                sub = f"{node.module}.{alias.name}"
                is_module = (pkg.parent / sub.replace(".", "/")).with_suffix(".py").is_file()
                found.add(sub if is_module else node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "lcot"}
    return found


def rank(module: str) -> int:
    parts = module.split(".")
    return RANK.get(parts[1], 6) if len(parts) > 1 else 6


def graph(pkg: Path = PKG) -> dict[str, set[str]]:
    return {module_name(p, pkg): imports(p, pkg) for p in pkg.rglob("*.py")}


def upward_imports(pkg: Path = PKG) -> list[tuple[str, str]]:
    return [(src, dst) for src, deps in graph(pkg).items() for dst in deps if dst != "lcot" and rank(dst) > rank(src)]


def cycles(pkg: Path = PKG) -> list[list[str]]:
    g, state, found = graph(pkg), {}, []

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for dep in sorted(g.get(node, ())):
            if state.get(dep) == "open":
                found.append(path[path.index(dep):] + [dep] if dep in path else [node, dep])
            elif dep not in state:
                visit(dep, [*path, dep])
        state[node] = "done"

    for node in sorted(g):
        if node not in state:
            visit(node, [node])
    return found


def _call_name(node: ast.AST) -> str | None:
    if isinstance(node, ast.Call):
        f = node.func
        return f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
    return None


def _root(node: ast.AST) -> str | None:
    """The name an attribute/subscript chain starts from: `a` for a.b[c].d."""
    while isinstance(node, (ast.Attribute, ast.Subscript)):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def module_state(pkg: Path = PKG) -> list[str]:
    """Module-level mutable state: a container bound at module level that is mutated anywhere in the package or is
    not a named constant (UPPER_CASE), any weak-reference registry, any `global` statement, and any assignment into
    an attribute of an imported lcot module (one module filling another's registry or patching its functions)."""
    found = []
    trees = {p: ast.parse(p.read_text()) for p in sorted(pkg.rglob("*.py"))}
    containers: dict[str, str] = {}  # module-level container name -> where
    for p, tree in trees.items():
        where = p.relative_to(pkg.parent)
        for node in tree.body:
            if not isinstance(node, (ast.Assign, ast.AnnAssign)) or node.value is None:
                continue
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            call = _call_name(node.value)
            for t in (t for t in targets if isinstance(t, ast.Name) and t.id != "__all__"):
                if call in WEAK_CALLS:
                    found.append(f"{where}:{node.lineno}: {t.id} is a module-level {call}")
                elif isinstance(node.value, CONTAINERS) or call in CONTAINER_CALLS:
                    if not t.id.lstrip("_").isupper():
                        found.append(f"{where}:{node.lineno}: {t.id} is a module-level container, not a constant")
                    containers[t.id] = f"{where}:{node.lineno}"
    for p, tree in trees.items():
        where = p.relative_to(pkg.parent)
        lcot_modules = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "lcot":
                for alias in node.names:
                    if (pkg.parent / f"{node.module}.{alias.name}".replace(".", "/")).with_suffix(".py").is_file():
                        lcot_modules.add(alias.asname or alias.name)
            elif isinstance(node, ast.Import):
                lcot_modules |= {a.asname for a in node.names if a.name.startswith("lcot") and a.asname}
        for node in ast.walk(tree):
            if isinstance(node, ast.Global):
                found.append(f"{where}:{node.lineno}: global {', '.join(node.names)}")
            targets = (node.targets if isinstance(node, ast.Assign) else [node.target]
                       if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else node.targets
                       if isinstance(node, ast.Delete) else [])
            for t in targets:
                if isinstance(t, (ast.Attribute, ast.Subscript)) and _root(t) in lcot_modules:
                    found.append(f"{where}:{node.lineno}: assigns into module {_root(t)}: {ast.unparse(t)}")
                elif isinstance(t, ast.Subscript) and _root(t) in containers:
                    found.append(f"{where}:{node.lineno}: mutates {_root(t)} ({containers[_root(t)]})")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in MUTATORS:
                owner = node.func.value
                if isinstance(owner, ast.Name) and owner.id in containers:
                    found.append(f"{where}:{node.lineno}: mutates {owner.id} ({containers[owner.id]})")
                elif isinstance(owner, ast.Attribute) and _root(owner) in lcot_modules:
                    found.append(f"{where}:{node.lineno}: fills module {_root(owner)}'s {ast.unparse(owner)}")
            if _call_name(node) == "setattr" and node.args and _root(node.args[0]) in lcot_modules:
                found.append(f"{where}:{node.lineno}: setattr on module {_root(node.args[0])}")
    return found


def test_imports_only_point_down():
    assert not upward_imports(), f"imports that point up a layer: {upward_imports()}"


def test_no_import_cycles():
    assert not cycles(), f"import cycles: {cycles()}"


def test_no_module_level_state_decides_what_runs():
    assert not module_state(), "module-level mutable state:\n" + "\n".join(module_state())


def test_the_core_never_names_the_fast_layer():
    """Not even in a function: the fast layer is optional (tests/test_no_fast.py runs the kit without it)."""
    for path in (PKG / "core").rglob("*.py"):
        assert not {m for m in imports(path, PKG) if m.startswith("lcot.fast")}, path
        assert "import lcot.fast" not in path.read_text() and "from lcot.fast" not in path.read_text(), path


def test_the_checks_find_planted_violations(tmp_path):
    """The checks above, run on a planted package: an upward import, a cycle, a registry one module fills in another,
    a `global`, a mutated constant and a weak registry are each found (and a clean package passes)."""
    fake = tmp_path / "lcot"
    for sub in ("core", "fast", "lab"):
        (fake / sub).mkdir(parents=True)
    (fake / "core" / "a.py").write_text("from lcot.lab.b import x\nTABLE = {'k': 1}\n")
    (fake / "lab" / "b.py").write_text("from lcot.core.a import y\n")
    (fake / "core" / "typed.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                            "    from lcot.lab.b import z\n")
    (fake / "core" / "reg.py").write_text("RUNNERS = []\n_cache = {}\n")
    (fake / "fast" / "fill.py").write_text(
        "from lcot.core import reg\nimport weakref\nSEEN = weakref.WeakKeyDictionary()\n"
        "def install(f):\n    global STATE\n    reg.RUNNERS.append(f)\n    reg.run = f\n")
    (fake / "fast" / "own.py").write_text("from lcot.core.a import TABLE\ndef f():\n    TABLE['k'] = 2\n")
    assert upward_imports(fake) == [("lcot.core.a", "lcot.lab.b")]
    assert cycles(fake) and "lcot.core.a" in cycles(fake)[0]
    state = "\n".join(module_state(fake))
    for expected in ("_cache is a module-level container", "SEEN is a module-level WeakKeyDictionary",
                     "global STATE", "assigns into module reg: reg.run", "mutates TABLE",
                     "fills module reg's reg.RUNNERS"):
        assert expected in state, (expected, state)
    clean = tmp_path / "clean" / "lcot"
    (clean / "core").mkdir(parents=True)
    (clean / "core" / "a.py").write_text("NAMES = {'a': 1}\ndef f(x):\n    d = {}\n    d['a'] = x\n    return d\n")
    assert not upward_imports(clean) and not cycles(clean) and not module_state(clean)
