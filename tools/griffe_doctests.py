"""A griffe extension for the API reference: doctest blocks in docstrings become code.

Docstrings here hold doctest examples (``>>>`` lines and their output) outside any
"Examples:" section; Markdown would read an output such as ``[(8, True)]`` as a link.
This wraps every run of lines from a ``>>>`` line to the next blank line in a
``pycon`` code fence. Used by mkdocs.yml (mkdocstrings' ``extensions`` option).
"""

from __future__ import annotations

from typing import Any

import griffe


def fence_doctests(text: str) -> str:
    """``text`` with each doctest block (``>>>`` up to a blank line) inside a ```` ```pycon ```` fence."""
    out: list[str] = []
    inside = False
    for line in text.splitlines():
        if not inside and line.lstrip().startswith(">>>"):
            indent = line[: len(line) - len(line.lstrip())]
            out += ["", f"{indent}```pycon"]
            inside = True
        elif inside and not line.strip():
            out += [f"{indent}```", ""]
            inside = False
            continue
        out.append(line)
    if inside:
        out.append(f"{indent}```")
    return "\n".join(out)


class DoctestFences(griffe.Extension):
    """Fence the doctest blocks of every docstring griffe loads."""

    def on_object(self, *, obj: Any, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = fence_doctests(obj.docstring.value)
