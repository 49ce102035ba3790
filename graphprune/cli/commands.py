"""The ``graphprune`` subcommands: ``zoo``, ``inspect``, ``prune``, ``bench``, ``demo``.

Each ``cmd_<name>(args)`` takes the parsed command line and returns an exit status.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import graphprune as gp
from graphprune import io as gpio
from graphprune import report as rp
from graphprune import views
from graphprune.cli.common import (
    PROG,
    Source,
    _data_options,
    _kwargs,
    _options,
    _out,
    _progress,
    _step,
    _terminal_width,
    prune_options,
    resolve,
    writable,
)


def _resolve(args: argparse.Namespace) -> Source:
    return resolve(args.model, args.input_shape, _kwargs(args.kwargs), args.trust, args.checkpoint)


def _prune(src: Source, args: argparse.Namespace) -> gp.PruneResult:
    options = _options(args.option)
    data, extra = _data_options(args)
    options.update(extra)
    options.update(prune_options(args))
    ratio = args.ratio
    for flag in ("macs", "params"):
        value = getattr(args, flag, None)
        if value is not None:
            options["target"], ratio = flag, value
    return gp.prune(src.model, src.inputs, method=args.method, ratio=ratio, data=data, **options)


def _settings(args: argparse.Namespace) -> dict:
    """The command line's pruning settings, for the report."""
    ratios: dict[str, float] = {}
    for d in getattr(args, "ratios", []):
        ratios.update(d)
    return {"ratio": args.ratio, "macs": getattr(args, "macs", None), "params": getattr(args, "params", None),
            "scope": args.scope, "round_to": args.round_to, "min_keep": args.min_keep,
            "max_ratio": args.max_ratio, "ratios": ratios, "steps": args.steps, "factor": args.factor,
            "uniform": bool(getattr(args, "uniform", False)),
            "ignore": list(args.ignore), "options": _options(args.option), "data": getattr(args, "data", None),
            "loss": args.loss if getattr(args, "data", None) else None,
            "checkpoint": getattr(args, "checkpoint", None), "threads": args.threads, "repeats": args.repeats}


def _report(src: Source, result: gp.PruneResult, args: argparse.Namespace, out_dir: str | Path, *,
            latency: tuple[float | None, float | None], diff: float, plot: bool = True) -> list[Path]:
    rep = rp.build_report(
        model=src.name, dg=result.graph, plan=result.plan, before=result.before, after=result.after,
        method=args.method, settings=_settings(args), latency_before=latency[0], latency_after=latency[1],
        max_diff=diff, widths_before=rp.layer_widths(src.model), widths_after=rp.layer_widths(result.model),
        inputs=gpio._inputs_spec(src.inputs))
    return rp.write_report(rep, out_dir, plot=plot, dg=result.graph)


def _latencies(src: Source, slim: torch.nn.Module, args: argparse.Namespace) -> tuple[float, float]:
    kw = {"threads": args.threads, "repeats": args.repeats}
    return gp.latency(src.model, src.inputs, **kw), gp.latency(slim, src.inputs, **kw)


def _save(slim: torch.nn.Module, src: Source, path: str | Path) -> Path:
    path = Path(path)
    gpio.save(slim, path, origin=src.origin, example_inputs=src.inputs)
    return path


def _trust_for(src: Source) -> list[str]:
    """The modules ``gp.load`` must trust to rebuild a model saved from ``src``."""
    origin = gpio.origin_of(src.model) if src.kind == "file" else src.origin
    factory = origin.get("factory") if isinstance(origin, dict) else None
    return [factory.partition(":")[0]] if isinstance(factory, str) else []


def _threads(n: int) -> str:
    return f"{n} thread" + ("" if n == 1 else "s")


def _size(path: Path) -> str:
    n = path.stat().st_size
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


# --- commands --------------------------------------------------------------------------------------
def cmd_zoo(args: argparse.Namespace) -> int:
    from graphprune.zoo import _REGISTRY

    rows = [["model", "parameters", "input (per sample)", "description"]]
    for name in gp.zoo.list_models():
        entry = _REGISTRY[name]
        doc = (entry.factory.__doc__ or "").strip().splitlines()
        rows.append([name, f"{gp.zoo.param_count(name):,}", "x".join(map(str, entry.input_shape)),
                     doc[0] if doc else ""])
    _out(rp.table(rows, align="lrll"))
    _out(f"\n{len(rows) - 1} models; use one as MODEL, e.g. '{PROG} inspect resnet20'. Models named mini_* "
         "are reduced-width versions of the ImageNet architectures they are named after (torchvision's "
         "resnet18 has 11,689,512 parameters, mini_resnet18 703,386).")
    _out("Former names, still accepted: " + ", ".join(f"{a} -> {b}" for a, b in sorted(gp.zoo.ALIASES.items())))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    for flag in ("dot", "svg", "json", "html"):
        writable(getattr(args, flag), f"--{flag}")
    src = _resolve(args)
    dg = gp.DependencyGraph.build(src.model, src.inputs, **({"factor": args.factor} if args.factor else {}))
    counts = gp.count(src.model, src.inputs)
    _out(f"{src.name} ({src.kind}), example inputs {src.describe_inputs()}: "
         f"{counts.params:,} parameters, {rp.human(counts.macs)} MACs")
    _out()
    text = dg.describe()
    _out(text if args.full else rp.truncate(text, _terminal_width()))
    written = {"dot": lambda: dg.to_dot(view="layers") + "\n", "svg": lambda: views.to_svg(dg, title=src.name),
               "json": lambda: dg.to_json() + "\n",
               "html": lambda: views.to_html(dg, title=src.name, before=counts)}
    for flag, text_of in written.items():
        path = getattr(args, flag)
        if path:
            Path(path).write_text(text_of(), encoding="utf-8")
            _out(f"wrote {path}")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    writable(args.out, "--out")
    writable(args.report, "--report", folder=True)
    writable(args.html, "--html")
    src = _resolve(args)
    with _progress(4, "pruning") as bar:
        _step(bar, f"tracing and pruning {src.name}")
        result = _prune(src, args)
        bar.update()
        _step(bar, "verifying")
        diff = gp.verify(src.model, src.inputs, result.plan, dg=result.graph, slim=result.model)
        bar.update()
        _step(bar, "measuring latency")
        lat_b, lat_a = _latencies(src, result.model, args) if args.repeats > 0 else (None, None)
        bar.update()
        _step(bar, "saving")
        saved = _save(result.model, src, args.out) if args.out else None
        written = []
        if args.report:
            written = _report(src, result, args, args.report, latency=(lat_b, lat_a), diff=diff,
                              plot=not args.no_plot)
        if args.html:
            written.append(views.write_html(args.html, result.graph, result.plan, title=src.name,
                                            before=result.before, after=result.after))
        bar.update()
    s = result.plan
    n_prunable = sum(g.size for g in result.graph.groups if g.prunable)
    _out(f"{src.name}: method {args.method}, removed {s.n_removed:,} of {n_prunable:,} prunable channels "
         f"in {len(s)} groups")
    _out(rp.counts_table(result.before, result.after, lat_b, lat_a))
    _out(f"  exactness: max |masked original - slim| = {diff:.3g}")
    if saved:
        trust = _trust_for(src)
        how = f"graphprune.load({str(saved)!r}" + (f", trust={trust!r})" if trust else ")")
        _out(f"saved {saved} ({_size(saved)}); load it with {how}")
    if written:
        _out("report: " + ", ".join(str(p) for p in written))
        if args.report and not any(p.suffix == ".png" for p in written) and not args.no_plot:
            _out(f"  (no widths.png: {rp.NO_PLOT})")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    src = _resolve(args)
    args.macs = args.params = None
    with _progress(2, "bench") as bar:
        _step(bar, f"pruning {src.name} at ratio {args.ratio}")
        result = _prune(src, args)
        bar.update()
        _step(bar, "measuring latency")
        lat_b, lat_a = _latencies(src, result.model, args)
        bar.update()
    _out(f"{src.name}, inputs {src.describe_inputs()}, {args.method} at ratio {args.ratio}; "
         f"CPU latency: {_threads(args.threads)}, median of {args.repeats} runs")
    _out(rp.counts_table(result.before, result.after, lat_b, lat_a))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    out_dir = Path(args.out_dir)
    writable(out_dir, "--out-dir", folder=True)
    src = resolve(args.model, (), {})
    args.macs = args.params = None
    width = _terminal_width()
    _out(f"graphprune demo: {src.name} from the zoo, example inputs {src.describe_inputs()}")
    _out()
    with _progress(5, "demo") as bar:
        _step(bar, "tracing, grouping, scoring and pruning")
        result = _prune(src, args)
        dg = result.graph
        bar.update()
        _out("[1/5] Dependency groups (gp.DependencyGraph.build(model, inputs).describe())")
        _out(rp.truncate(dg.describe(), width))
        _out()
        n_prunable = sum(g.size for g in dg.groups if g.prunable)
        _out(f"[2/5] gp.prune(model, inputs, method={args.method!r}, ratio={args.ratio}): "
             f"removed {result.plan.n_removed:,} of {n_prunable:,} prunable channels in {len(result.plan)} groups")
        _out()
        _step(bar, "measuring CPU latency")
        lat_b, lat_a = _latencies(src, result.model, args)
        bar.update()
        _out(f"[3/5] Size and speed (latency: CPU, {_threads(args.threads)}, median of {args.repeats} runs)")
        _out(rp.counts_table(result.before, result.after, lat_b, lat_a))
        _out()
        _step(bar, "verifying exactness")
        diff = gp.verify(src.model, src.inputs, result.plan, dg=dg, slim=result.model)
        tol = 1e-4  # the project's exactness bar: max abs difference in float32
        bar.update()
        _out(f"[4/5] Exactness: gp.verify -> max |masked original - slim| = {diff:.3g} "
             f"({'OK, within' if diff <= tol else 'FAILED, above'} tolerance {tol:.1g})")
        _out()
        _step(bar, "saving and reloading")
        path = _save(result.model, src, out_dir / f"{src.name}_slim.gp")
        again = gp.load(path)
        with torch.no_grad():
            want = result.model.eval()(*src.inputs)
            got = again.eval()(*src.inputs)
        same = torch.equal(want, got) if isinstance(want, torch.Tensor) else None
        written = _report(src, result, args, out_dir / f"{src.name}_report", latency=(lat_b, lat_a), diff=diff)
        bar.update()
    _out(f"[5/5] Saved {path} ({_size(path)}) with gp.save; gp.load rebuilt it: outputs "
         + ("identical to the slim model's" if same else "DIFFER from the slim model's"))
    _out(f"      report: {', '.join(str(p) for p in written)}")
    if not any(p.suffix == ".png" for p in written):
        _out(f"      (no widths.png: {rp.NO_PLOT})")
    return 0 if (same and diff <= tol) else 1
