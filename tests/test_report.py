"""graphprune.report: tables, report.json / report.md, widths.png (matplotlib) and groups.html."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

import graphprune as gp
from graphprune import report as rp


def _layers(n: int, head: int = 1000) -> list[dict]:
    """``n`` layers of a ResNet-like width profile with a ``head``-wide classifier last."""
    rows = [{"layer": f"layer{i // 16 + 1}.{i % 16 // 3}.conv{i % 3 + 1}", "before": 64 * 2 ** (i // 16),
             "after": 32 * 2 ** (i // 16) if i % 3 else 64 * 2 ** (i // 16)} for i in range(n - 1)]
    return rows + [{"layer": "fc", "before": head, "after": head}]


def test_widths_plot_shows_kept_fraction_readable_at_resnet50_size():
    pytest.importorskip("matplotlib", reason="matplotlib is part of the dev install (make test)")
    layers = _layers(58)
    fig = rp.widths_figure(layers, "resnet50")
    ax = fig.axes[0]
    assert ax.get_xlim() == (0.0, 1.0)  # a fraction: the 1000-class head does not set the scale
    background, kept = ax.containers
    assert [p.get_width() for p in background] == [1.0] * len(layers)
    assert [p.get_width() for p in kept] == [r["after"] / r["before"] for r in layers]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels == [r["layer"] for r in layers]  # every layer named, in model order from the top
    assert min(t.get_fontsize() for t in ax.get_yticklabels()) >= 8
    height = fig.get_size_inches()[1] * 72  # points
    assert height / len(layers) >= 14  # room for an 8 pt label per layer
    notes = [t.get_text() for t in ax.texts]
    assert "1000 → 1000" in notes and "64 → 32" in notes
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_write_report_writes_png_and_html(tmp_path):
    model, x = gp.zoo.create("resnet20")
    result = gp.prune(model, x, ratio=0.5)
    rep = rp.build_report(model="resnet20", dg=result.graph, plan=result.plan, before=result.before,
                          after=result.after, method="magnitude", settings={"ratio": 0.5},
                          widths_before=rp.layer_widths(model), widths_after=rp.layer_widths(result.model))
    written = rp.write_report(rep, tmp_path, dg=result.graph)
    names = sorted(p.name for p in written)
    has_mpl = importlib.util.find_spec("matplotlib") is not None
    assert names == sorted(["report.json", "report.md", "groups.html"] + (["widths.png"] if has_mpl else []))
    page = (tmp_path / "groups.html").read_text()
    assert page.count('<li class="group') == len(result.graph.groups)
    assert f"{result.before.params:,} → {result.after.params:,}" in page
    md = (tmp_path / "report.md").read_text()
    assert "[groups.html](groups.html)" in md and "![output channels kept per layer](widths.png)" in md
    assert json.loads((tmp_path / "report.json").read_text())["view"] == "groups.html"


def test_no_matplotlib_says_why(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert rp.plot_widths(_layers(3), tmp_path / "w.png") is None
    assert "pip install 'graphprune[plot]'" in rp.NO_PLOT


def test_human_and_table():
    assert rp.human(1_500_000) == "1.50 M"
    text = rp.table([["a", "b"], ["x", 1]])
    assert text.splitlines()[0].startswith("a") and "-" in text.splitlines()[1]
