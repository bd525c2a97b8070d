"""The shape of `benchmarks/`: no script imports another (what two share lives in `toolkit/` or the package), the
toolkit parts the peer's environment uses import only the standard library at module level, and every script
answers `--help`. Read from the source with `ast`, like tests/test_architecture.py, except the `--help` run.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
import toolkit

FOLDER = Path(toolkit.__file__).resolve().parents[1]  # the scripts' folder, where the toolkit package lives
SCRIPTS = sorted(FOLDER.glob("*.py"))
# The toolkit modules `peer_llmcompressor.py` uses from an environment without the package's dependencies.
STDLIB_ONLY = ("__init__.py", "cells.py", "provenance.py")


def imported(path: Path, module_level: bool = False) -> set[str]:
    """The first component of every absolute import of `path`: anywhere in the file, or in its body only."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = set()
    for node in tree.body if module_level else ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level:
            found.add((node.module or "").split(".")[0])
    return found


def test_no_benchmark_script_imports_another():
    names = {path.stem for path in SCRIPTS}
    offenders = {}
    for path in [*SCRIPTS, *sorted((FOLDER / "toolkit").glob("*.py"))]:
        found = imported(path) & (names - {path.stem})
        if found:
            offenders[str(path.relative_to(FOLDER))] = sorted(found)
    assert not offenders, f"move what these import into benchmarks/toolkit/: {offenders}"


def test_the_toolkit_parts_the_peer_uses_import_only_the_standard_library_at_module_level():
    allowed = set(sys.stdlib_module_names) | {"__future__"}
    for name in STDLIB_ONLY:
        assert imported(FOLDER / "toolkit" / name, module_level=True) <= allowed, name


def test_the_checker_sees_an_import_of_another_script(tmp_path):
    script = tmp_path / "a.py"
    script.write_text("import torch\ndef main():\n    from quality import entry_key\nfrom toolkit.cells import x\n")
    assert imported(script) == {"torch", "quality", "toolkit"}
    assert imported(script, module_level=True) == {"torch", "toolkit"}


@pytest.mark.slow
def test_every_script_answers_help():
    """`python benchmarks/NAME.py --help` for each script, in one process (each as `__main__`, argv as a user's)."""
    code = (
        "import runpy, sys\n"
        "failed = []\n"
        "for path in sys.argv[1:]:\n"
        "    sys.argv = [path, '--help']\n"
        "    sys.path[0] = path.rsplit('/', 1)[0]\n"
        "    try:\n"
        "        runpy.run_path(path, run_name='__main__')\n"
        "        failed.append((path, 'no exit'))\n"
        "    except SystemExit as stop:\n"
        "        if stop.code not in (0, None):\n"
        "            failed.append((path, stop.code))\n"
        "    except Exception as error:\n"
        "        failed.append((path, repr(error)))\n"
        "print('FAILED', failed)\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", code, *map(str, SCRIPTS)], capture_output=True, text=True, timeout=600, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.rstrip().endswith("FAILED []"), done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("usage:") == len(SCRIPTS)


@pytest.mark.slow
def test_the_peer_script_stores_cells_without_the_package_init(tmp_path):
    """peer_llmcompressor.py runs where peft / optimum are missing: its toolkit imports and its atomic cell writes
    must not run `optimum_oats/__init__.py` (the script imports the package's modules through a bare stub)."""
    code = (
        "import importlib.abc, runpy, sys\n"
        "class Missing(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('peft', 'optimum'):\n"
        "            raise ImportError(f'{name} is not installed in the peer environment')\n"
        "sys.meta_path.insert(0, Missing())\n"
        f"sys.path.insert(0, {str(FOLDER)!r})\n"
        f"peer = runpy.run_path({str(FOLDER / 'peer_llmcompressor.py')!r}, run_name='peer')\n"
        "peer['project_module']('data.text')\n"
        "from toolkit.cells import read_cell, write_cell\n"
        "from toolkit.provenance import Provenance\n"
        f"write_cell({str(tmp_path / 'cell.json')!r}, {{'perplexity': 33.67}})\n"
        f"assert read_cell({str(tmp_path / 'cell.json')!r}) == {{'perplexity': 33.67}}\n"
        "assert Provenance.start('llmcompressor').record()['versions']['llmcompressor']\n"
        "import optimum_oats\n"
        "assert not hasattr(optimum_oats, 'OATSConfig'), 'the package __init__ ran'\n"
        "print('OK')\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(FOLDER.parent)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert done.stdout.strip() == "OK", done.stdout[-2000:] + done.stderr[-3000:]
