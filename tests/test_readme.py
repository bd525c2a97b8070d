"""The README's usage snippet runs as written (on a tiny model instead of the embedded SmolLM2, for time)."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
MODEL_LINE = "model_id = optimum_oats.default_model_path()"


def _usage_snippet() -> str:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Usage") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_usage_snippet_runs(dense_dir, data_dir, tmp_path, monkeypatch):
    snippet = _usage_snippet()
    assert MODEL_LINE in snippet  # the one substitution below must keep meaning something
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OATS_DATA_DIR", str(data_dir))
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        exec(compile(snippet.replace(MODEL_LINE, f"model_id = {str(dense_dir)!r}"), str(README), "exec"), {})
    printed = stdout.getvalue().splitlines()
    assert printed[0].startswith("CompressionReport: 14 compressed layers (method=hassle")
    assert len(printed) < 100
    assert (tmp_path / "out" / "config.json").is_file() and (tmp_path / "out" / "oats_report.json").is_file()
