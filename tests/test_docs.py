"""Run every ```python block of README.md and docs/*.md, so the docs cannot rot.

Each file's blocks run in order in one namespace, in a fresh temporary directory
(examples may write files), with the repository importable.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = sorted([REPO / "README.md", *(REPO / "docs").glob("*.md")])
FENCE = re.compile(r"^```python[^\n]*\n(.*?)^```\s*$", re.DOTALL | re.MULTILINE)


def python_blocks(path: Path) -> list[tuple[int, str]]:
    """(line number, code) of every ```python block in a Markdown file."""
    text = path.read_text()
    return [(text.count("\n", 0, m.start()) + 2, m.group(1)) for m in FENCE.finditer(text)]


def test_docs_exist():
    names = {p.name for p in DOCS}
    for name in ("README.md", "getting-started.md", "concepts.md", "api.md", "cli.md", "extending.md",
                 "criteria.md", "lean.md", "recovery.md", "benchmarks.md"):
        assert name in names


def test_fence_extraction():
    doc = "text\n```python\nx = 1\n```\n```console\n$ ls\n```\n```python\ny = x + 1\n```\n"
    blocks = [m.group(1) for m in FENCE.finditer(doc)]
    assert blocks == ["x = 1\n", "y = x + 1\n"]


@pytest.mark.parametrize("path", [p for p in DOCS if python_blocks(p)],
                         ids=lambda p: p.relative_to(REPO).as_posix())
def test_examples_run(path, tmp_path, monkeypatch):
    blocks = python_blocks(path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(REPO))
    namespace: dict = {"__name__": f"docs_{path.stem.replace('-', '_')}"}
    for line, code in blocks:
        try:
            exec(compile(code, f"{path.relative_to(REPO)}:{line}", "exec"), namespace)
        except Exception as exc:
            raise AssertionError(f"example at {path.relative_to(REPO)} line {line} failed: "
                                 f"{type(exc).__name__}: {exc}") from exc
