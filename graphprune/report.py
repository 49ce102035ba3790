"""Pruning reports: tables for the terminal, report.json / report.md, a width plot.

``build_report`` collects what a prune did (per group kept and removed channels,
parameters, MACs, latency before and after, method and settings) into a plain dict;
``write_report`` writes it as JSON and Markdown, plus ``widths.png`` (per-layer
widths before and after) when matplotlib is installed (``pip install graphprune[plot]``).

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
           "build_report", "to_markdown", "write_report", "plot_widths"]


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
            lines += ["", f"![layer widths]({report['plot']})"]
    return "\n".join(lines) + "\n"


def plot_widths(layers: Sequence[Mapping[str, Any]], path: str | Path, title: str = "") -> Path | None:
    """Bar chart of per-layer widths before and after; None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    names = [r["layer"] for r in layers]
    xs = range(len(names))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.18 * len(names) + 2), 4))
    ax.bar(xs, [r["before"] for r in layers], color="lightgray", label="before")
    ax.bar(xs, [r["after"] for r in layers], color="tab:blue", label="after")
    ax.set_ylabel("output channels")
    ax.set_title(title or "layer widths")
    ax.set_xticks(list(xs))
    ax.set_xticklabels(names, rotation=90, fontsize=6)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(report: dict[str, Any], out_dir: str | Path, *, plot: bool = True) -> list[Path]:
    """Write report.json, report.md and (with matplotlib) widths.png into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if plot and report.get("layers"):
        png = plot_widths(report["layers"], out / "widths.png", f"{report['model']}: layer widths")
        if png is not None:
            report["plot"] = png.name
            written.append(png)
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "report.md").write_text(to_markdown(report))
    return [out / "report.json", out / "report.md", *written]
