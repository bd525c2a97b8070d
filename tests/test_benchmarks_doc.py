"""BENCHMARKS.md's current tables are reproducible: every command they print names a script and flags that exist.

Only the reader's part of the page is checked (everything before the pointer to the dated log); the log keeps
old commands as they were run.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # reads benchmarks/ scripts (tests/test_markers.py)
ROOT = Path(__file__).resolve().parents[1]
HISTORY_MARKER = "<!-- history -->"
SCRIPT = re.compile(r"benchmarks/(\w+)\.py((?:(?:[ \t]+|[ \t]*\\\n[ \t]*)+[^\s`|\\]+)*)")


def _current_part() -> str:
    text = (ROOT / "BENCHMARKS.md").read_text(encoding="utf-8")
    assert HISTORY_MARKER in text, f"BENCHMARKS.md must mark where the dated history starts with {HISTORY_MARKER}"
    return text.split(HISTORY_MARKER, 1)[0]


def _commands(text: str) -> list[tuple[str, list[str]]]:
    found = []
    for match in SCRIPT.finditer(text):
        flags = re.findall(r"(?<![\w-])(--[a-z][\w-]*)", match.group(2))
        found.append((match.group(1), flags))
    return found


def test_the_current_tables_name_only_existing_scripts_and_flags():
    commands = _commands(_current_part())
    assert commands, "the current tables must give the commands that printed them"
    sources = {path.stem: path.read_text(encoding="utf-8") for path in (ROOT / "benchmarks").glob("*.py")}
    shared = "".join(source for name, source in sources.items() if name.startswith("_"))
    problems = []
    for script, flags in commands:
        if script not in sources:
            problems.append(f"benchmarks/{script}.py does not exist")
            continue
        problems += [
            f"benchmarks/{script}.py has no {flag}"
            for flag in flags
            if f'"{flag}"' not in sources[script] and f'"{flag}"' not in shared
        ]
    assert not problems, problems


def test_the_command_parser_sees_flags_across_continued_lines():
    text = "run `python benchmarks/quality.py --methods a b \\\n    --rates 0.3` and python benchmarks/speed.py"
    assert _commands(text) == [("quality", ["--methods", "--rates"]), ("speed", [])]
