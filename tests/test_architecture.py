"""The package's shape: imports run one way, top to bottom, with no circle (lazy imports included), and modules and
signatures stay small. Read from the source with `ast`, so nothing is imported to check it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "optimum_oats"

# Each part of the package and its level: a module may import only from its own part or from a lower level.
# Parts on the same level (algorithms and nn; evaluation and training) do not import each other.
LEVELS = {
    "utils": 0,
    "kernels": 1,
    "algorithms": 2,
    "nn": 2,
    "data": 3,
    "config": 4,
    "engine": 5,
    "integrations": 6,
    "evaluation": 7,
    "training": 7,
    "hub": 8,
    "compress": 9,
    "commands": 10,
    "__init__": 11,
}
MAX_MODULE_LINES = 400
# Modules allowed over the cap: one algorithm each, which reads best in one piece.
LONG_MODULES = {"algorithms/oats.py"}
MAX_KEYWORD_FLAGS = 6


def _module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules(root: Path = PACKAGE) -> dict[str, Path]:
    return {_module_name(p, root): p for p in sorted(root.rglob("*.py"))}


def _imports(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """Every package module `path` imports, anywhere in the file (function-level imports count)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for guard in ast.walk(tree):  # `if TYPE_CHECKING:` imports are for annotations and never run
        if isinstance(guard, ast.If) and "TYPE_CHECKING" in ast.unparse(guard.test):
            guard.body = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # `from pkg import sub` imports the module `pkg.sub` when it exists, else a name of `pkg`.
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in modules else module for a in node.names]
        else:
            continue
        found.update(t for t in targets if t in modules and t != name)
    return found


def _graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    modules = _modules(root)
    return {name: _imports(path, name, modules) for name, path in modules.items()}


def _part(module: str) -> str:
    parts = module.split(".")
    return "__init__" if len(parts) == 1 else parts[1]


def test_every_part_has_a_level():
    assert {_part(m) for m in _modules()} <= set(LEVELS)


def test_no_import_circle():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt) :] + [nxt]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_imports_run_downwards():
    upward = []
    for module, targets in _graph().items():
        for target in targets:
            src, dst = _part(module), _part(target)
            if src != dst and LEVELS[dst] >= LEVELS[src]:
                upward.append(f"{module} -> {target}")
    assert not upward, "imports that do not run downwards:\n" + "\n".join(sorted(upward))


def test_math_and_layers_never_reach_up():
    """`algorithms/` and `nn/` are pure: nothing of the engine, the integrations or transformers glue."""
    graph = _graph()
    for module, targets in graph.items():
        if _part(module) in ("algorithms", "nn"):
            assert {_part(t) for t in targets} <= {_part(module), "utils", "kernels"}, module


def test_the_checker_sees_a_circle(tmp_path):
    """The graph walk must catch a circle hidden in a function-level import, and skip `TYPE_CHECKING` ones."""
    package = tmp_path / "optimum_oats"
    (package / "engine").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "engine" / "__init__.py").write_text("")
    (package / "engine" / "a.py").write_text("from .b import x\nif TYPE_CHECKING:\n    from .c import z\n")
    (package / "engine" / "b.py").write_text("def f():\n    from .a import y\n")
    (package / "engine" / "c.py").write_text("")
    graph = _graph(package)
    assert graph["optimum_oats.engine.a"] == {"optimum_oats.engine.b"}
    assert graph["optimum_oats.engine.b"] == {"optimum_oats.engine.a"}


def test_modules_stay_small():
    long = {
        str(p.relative_to(PACKAGE)): n
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES
    }
    assert set(long) <= LONG_MODULES, long


def test_functions_take_few_keyword_flags():
    """A function with many optional keyword arguments wants a settings object instead."""
    crowded = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                flags = sum(d is not None for d in node.args.kw_defaults) + len(node.args.defaults)
                if flags > MAX_KEYWORD_FLAGS:
                    crowded.append(f"{path.relative_to(PACKAGE)}:{node.name} ({flags})")
    assert not crowded, crowded
