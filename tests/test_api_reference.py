"""The API reference is generated from the docstrings (mkdocs + mkdocstrings, mkdocs.yml) and
must build without a single warning, so it cannot drift from the code: a renamed or removed
name, a broken cross-reference or link fails here. The docstrings' examples run as doctests
(``--doctest-modules``), the guides' examples in tests/test_docs.py.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import types
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

from griffe_doctests import fence_doctests  # noqa: E402


def test_mkdocs_build_strict(tmp_path):
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("mkdocstrings_handlers") is None:
        pytest.fail("the API reference needs mkdocs and mkdocstrings[python] (the dev install has them: "
                    "pip install -c constraints.txt -e '.[dev]')")
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    page = (tmp_path / "site" / "reference" / "graph" / "index.html").read_text()
    for name in ("DependencyGraph", "describe", "layer_graph", "to_dot", "Member"):
        assert name in page
    views = (tmp_path / "site" / "reference" / "views" / "index.html").read_text()
    assert "write_html" in views and "widths_figure" in views


def test_reference_pages_cover_every_public_name():
    import graphprune as gp

    text = "\n".join(p.read_text() for p in (REPO / "docs" / "reference").glob("*.md"))
    modules = set()
    for name in gp.__all__:
        obj = getattr(gp, name)
        if isinstance(obj, types.ModuleType):
            modules.add(obj.__name__)
        elif isinstance(obj, (type, types.FunctionType)):
            modules.add(obj.__module__)
    documented = {line.split(":::")[1].strip() for line in text.splitlines() if line.startswith(":::")}
    undocumented = {m for m in modules if not any(m == d or m.startswith(d + ".") for d in documented)}
    assert not undocumented, undocumented


def test_doctest_blocks_become_code():
    text = "Intro.\n\n>>> 1 + 1\n2\n>>> [(8, True)]\n[(8, True)]\n\nAfter."
    assert fence_doctests(text) == ("Intro.\n\n\n```pycon\n>>> 1 + 1\n2\n>>> [(8, True)]\n[(8, True)]\n```\n\n"
                                    "After.")
