"""Pruning reports: tables for the terminal, report.json / report.md, a width plot.

``build_report`` collects what a prune did (per group kept and removed channels,
parameters, MACs, latency before and after, method and settings) into a plain dict;
``write_report`` writes it as JSON and Markdown, plus ``widths.png`` (the fraction of its
output channels each layer keeps) when matplotlib is installed (``pip install
graphprune[plot]``) and ``groups.html`` (``graphprune.views``) given the dependency graph.

>>> human(251_495_680), human(855_770), human(12)
('251.50 M', '855.77 K', '12')
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from graphprune.rules.base import layer_width

__all__ = ["human", "table", "truncate", "layer_widths", "group_rows", "counts_table",
           "build_report", "to_markdown", "write_report", "plot_widths", "widths_figure", "NO_PLOT"]


def human(n: float) -> str:
    """A count with a K / M / G suffix, two decimals."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:g}"


def table(rows: Sequence[Sequence[Any]], *, align: str | None = None, indent: str = "") -> str:
    """Rows of cells as an aligned text table; the first row is the header.

    ``align`` has one letter per column, ``l`` or ``r`` (default: first left, rest right).
    """
    cells = [[str(c) for c in r] for r in rows]
    n = max(len(r) for r in cells)
    cells = [r + [""] * (n - len(r)) for r in cells]
    align = align or "l" + "r" * (n - 1)
    widths = [max(len(r[i]) for r in cells) for i in range(n)]

    def fmt(r: list[str]) -> str:
        return indent + "  ".join(c.ljust(w) if a == "l" else c.rjust(w)
                                  for c, w, a in zip(r, widths, align)).rstrip()

    lines = [fmt(cells[0]), indent + "  ".join("-" * w for w in widths)]
    lines += [fmt(r) for r in cells[1:]]
    return "\n".join(lines)


def truncate(text: str, width: int) -> str:
    """Cut every line of ``text`` to ``width`` characters, marking cuts with '...'."""
    if width <= 0:
        return text
    return "\n".join(line if len(line) <= width else line[: width - 3] + "..."
                     for line in text.splitlines())


def layer_widths(model: nn.Module) -> dict[str, int]:
    """Output width of every conv and linear layer, by qualified name, in model order."""
    return {name: w for name, m in model.named_modules() if (w := layer_width(m)) is not None}


def group_rows(dg: Any, plan: Mapping[int, Sequence[int]]) -> list[dict[str, Any]]:
    """One dict per group: id, channels, kept, removed, prunable, reason, producers."""
    rows = []
    for g in dg.groups:
        removed = len(plan.get(g.id, ()))
        rows.append({"group": g.id, "channels": g.size, "kept": g.size - removed,
                     "removed": removed, "prunable": bool(g.prunable), "reason": g.reason,
                     "producers": list(g.producers)})
    return rows


def _ratio(a: float, b: float) -> str:
    return f"{b / a:.3f}" if a else "-"


def counts_table(before: Any, after: Any, latency_before: float | None = None,
                 latency_after: float | None = None, *, indent: str = "  ") -> str:
    """Parameters, MACs and (if given) latency, dense vs slim, with slim/dense ratios."""
    rows: list[list[str]] = [["", "dense", "slim", "slim/dense"]]
    rows.append(["parameters", f"{before.params:,}", f"{after.params:,}", _ratio(before.params, after.params)])
    rows.append(["MACs", human(before.macs), human(after.macs), _ratio(before.macs, after.macs)])
    if latency_before is not None and latency_after is not None:
        rows.append(["latency", f"{latency_before * 1e3:.2f} ms", f"{latency_after * 1e3:.2f} ms",
                     _ratio(latency_before, latency_after)])
    text = table(rows, align="lrrr", indent=indent)
    if latency_before and latency_after:
        text += f"\n{indent}the slim model runs {latency_before / latency_after:.2f}x as fast"
    return text


def build_report(
    *,
    model: str,
    dg: Any,
    plan: Mapping[int, Sequence[int]],
    before: Any,
    after: Any,
    method: str,
    settings: Mapping[str, Any],
    latency_before: float | None = None,
    latency_after: float | None = None,
    max_diff: float | None = None,
    widths_before: Mapping[str, int] | None = None,
    widths_after: Mapping[str, int] | None = None,
    inputs: Sequence[Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """Everything a prune did, as a JSON-ready dict."""
    from graphprune import __version__

    groups = group_rows(dg, plan)
    prunable = [g for g in groups if g["prunable"]]
    wb = dict(widths_before or {})
    wa = dict(widths_after or {})
    return {
        "model": model,
        "graphprune": __version__,
        "torch": torch.__version__,
        "inputs": list(inputs or []),
        "method": method,
        "settings": dict(settings),
        "summary": {
            "groups": len(groups),
            "prunable_groups": len(prunable),
            "prunable_channels": sum(g["channels"] for g in prunable),
            "removed_channels": sum(g["removed"] for g in groups),
        },
        "params": {"before": before.params, "after": after.params},
        "macs": {"before": before.macs, "after": after.macs},
        "latency_s": {"before": latency_before, "after": latency_after,
                      "threads": settings.get("threads")},
        "max_abs_diff": max_diff,
        "groups": groups,
        "layers": [{"layer": k, "before": v, "after": wa.get(k, 0)} for k, v in wb.items()],
        "plan": {str(k): list(v) for k, v in plan.items()},
    }


def to_markdown(report: Mapping[str, Any]) -> str:
    """The report as Markdown: summary, size and speed, groups, layer widths."""
    s = report["summary"]
    lines = [f"# graphprune report: {report['model']}", ""]
    lines.append(f"- method: `{report['method']}`")
    for k, v in report["settings"].items():
        if v is not None and v != [] and v != {}:
            lines.append(f"- {k}: `{v}`")
    if report.get("inputs"):
        shapes = ", ".join("x".join(map(str, i["shape"])) + f" {i['dtype']}" for i in report["inputs"])
        lines.append(f"- example inputs: {shapes}")
    lines.append(f"- removed {s['removed_channels']:,} of {s['prunable_channels']:,} prunable channels "
                 f"({s['prunable_groups']} of {s['groups']} groups prunable)")
    if report.get("max_abs_diff") is not None:
        lines.append(f"- exactness (gp.verify, max |masked original - slim|): {report['max_abs_diff']:.3g}")
    lines += ["", "## Size and speed", "", "| | before | after | after/before |", "|---|---:|---:|---:|"]
    p, m, lat = report["params"], report["macs"], report["latency_s"]
    lines.append(f"| parameters | {p['before']:,} | {p['after']:,} | {_ratio(p['before'], p['after'])} |")
    lines.append(f"| MACs | {m['before']:,} | {m['after']:,} | {_ratio(m['before'], m['after'])} |")
    if lat.get("before") is not None and lat.get("after") is not None:
        threads = lat.get("threads")
        threads = f"{threads} thread{'s' if threads != 1 else ''}" if threads else "default threads"
        lines.append(f"| CPU latency (ms, {threads}, median) | "
                     f"{lat['before'] * 1e3:.3f} | {lat['after'] * 1e3:.3f} | "
                     f"{_ratio(lat['before'], lat['after'])} |")
    lines += ["", "## Groups", "", "| group | channels | kept | removed | prunable | producers |",
              "|---:|---:|---:|---:|---|---|"]
    for g in report["groups"]:
        status = "yes" if g["prunable"] else f"no: {g['reason']}"
        prods = ", ".join(g["producers"][:3]) + (" ..." if len(g["producers"]) > 3 else "")
        lines.append(f"| {g['group']} | {g['channels']} | {g['kept']} | {g['removed']} | "
                     f"{status.replace('|', '/')} | {prods} |")
    if report.get("layers"):
        lines += ["", "## Layer widths", "", "| layer | before | after |", "|---|---:|---:|"]
        lines += [f"| {r['layer']} | {r['before']} | {r['after']} |" for r in report["layers"]]
        if report.get("plot"):
            lines += ["", f"![output channels kept per layer]({report['plot']})"]
    if report.get("view"):
        lines += ["", f"Groups and layers, interactive: [{report['view']}]({report['view']})"]
    return "\n".join(lines) + "\n"


#: why a report has no widths.png
NO_PLOT = "matplotlib is not installed; pip install 'graphprune[plot]' (make demo installs it)"


def widths_figure(layers: Sequence[Mapping[str, Any]], title: str = "") -> Any:
    """A matplotlib figure of the fraction of its output channels each layer keeps.

    One horizontal bar per layer, in model order from the top, on a 0-100 % axis, so a
    1000-class head does not squash the early layers; ``before -> after`` widths are
    written beside each bar. The figure grows with the number of layers (labels stay at
    8 pt). Raises ImportError without matplotlib.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import PercentFormatter

    n = len(layers)
    kept = [r["after"] / r["before"] if r["before"] else 1.0 for r in layers]
    fig, ax = plt.subplots(figsize=(8.0, max(2.5, 0.24 * n + 1.3)))
    ys = list(range(n))
    ax.barh(ys, [1.0] * n, color="#e3e3e3", height=0.7, label="removed")
    ax.barh(ys, kept, color="tab:blue", height=0.7, label="kept")
    ax.set_yticks(ys)
    ax.set_yticklabels([r["layer"] for r in layers], fontsize=8)
    ax.set_ylim(n - 0.5, -0.5)  # the first layer on top
    ax.set_xlim(0.0, 1.0)
    ax.xaxis.set_major_formatter(PercentFormatter(1.0))
    ax.tick_params(axis="x", labelsize=8)
    ax.set_xlabel("output channels kept", fontsize=9)
    for y, r in zip(ys, layers):
        ax.text(1.01, y, f"{r['before']} → {r['after']}", va="center", fontsize=8,
                transform=ax.get_yaxis_transform())
    ax.set_title(title or "output channels kept per layer", fontsize=10, loc="left")
    ax.legend(loc="lower right", fontsize=8, bbox_to_anchor=(1.0, 1.0), ncol=2, frameon=False)
    fig.tight_layout()
    return fig


def plot_widths(layers: Sequence[Mapping[str, Any]], path: str | Path, title: str = "") -> Path | None:
    """Save ``widths_figure(layers, title)`` as a PNG; None when matplotlib is missing."""
    try:
        fig = widths_figure(layers, title)
    except ImportError:
        return None
    import matplotlib.pyplot as plt

    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(report: dict[str, Any], out_dir: str | Path, *, plot: bool = True, dg: Any = None) -> list[Path]:
    """Write report.json, report.md, widths.png (with matplotlib) and, given the dependency graph
    ``dg`` the plan was made on, groups.html (``graphprune.views``) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if plot and report.get("layers"):
        png = plot_widths(report["layers"], out / "widths.png", f"{report['model']}: output channels kept")
        if png is not None:
            report["plot"] = png.name
            written.append(png)
    if dg is not None:
        from types import SimpleNamespace

        from graphprune.views import write_html

        plan = {int(k): v for k, v in report["plan"].items()}
        counts = [SimpleNamespace(params=report["params"][k], macs=report["macs"][k]) for k in ("before", "after")]
        written.append(write_html(out / "groups.html", dg, plan, title=report["model"], before=counts[0],
                                  after=counts[1]))
        report["view"] = "groups.html"
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "report.md").write_text(to_markdown(report))
    return [out / "report.json", out / "report.md", *written]
