"""The ``graphprune`` command (also ``python -m graphprune``).

Subcommands: ``demo``, ``inspect``, ``prune``, ``bench``, ``zoo``. A MODEL argument is a
zoo name (``resnet20``), an import spec ``package.module:factory`` (a function that
returns the model, or ``(model, example_inputs)``), a file path ``models.py:factory``,
or a file written by ``gp.save`` (``--trust MODULE`` lets it call factories in MODULE);
see ``graphprune.sources``.
Bad input ends with exit status 2 (usage) or 1 (anything else) and one message line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

import graphprune as gp
from graphprune import io as gpio
from graphprune import report as rp
from graphprune import sources
from graphprune.errors import GraphPruneError, InputError
from graphprune.sources import Source

PROG = "graphprune"


class CLIError(Exception):
    """A problem with the command line or its files: reported in one line, exit 1."""


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (no usage dump), exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise _UsageError(f"{message} (see '{self.prog} --help')")


# --- models ----------------------------------------------------------------------------------
_SHAPE = re.compile(r"^\s*\d+(\s*,\s*\d+)*\s*(:\s*[a-z0-9]+)?\s*$")


def parse_shape(text: str) -> tuple[tuple[int, ...], torch.dtype]:
    """'1,3,32,32' or '4,16:int64' -> (shape, dtype)."""
    if not _SHAPE.match(text):
        raise CLIError(f"--input-shape {text!r} is not a comma-separated list of sizes like 1,3,32,32 "
                       "(optionally with a dtype: 4,16:int64)")
    dims, _, dtype_name = text.partition(":")
    dtype = getattr(torch, dtype_name.strip() or "float32", None)
    if not isinstance(dtype, torch.dtype):
        raise CLIError(f"--input-shape {text!r}: unknown dtype {dtype_name.strip()!r}")
    return tuple(int(d) for d in dims.split(",")), dtype


def _make_inputs(shapes: Sequence[str]) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for s in shapes:
        shape, dtype = parse_shape(s)
        if dtype.is_floating_point:
            out.append(torch.randn(shape, generator=gen).to(dtype))
        else:
            out.append(torch.zeros(shape, dtype=dtype))
    return tuple(out)


def _kwargs(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CLIError(f"--kwargs must be a JSON object like '{{\"num_classes\": 100}}': {exc}") from exc
    if not isinstance(value, dict):
        raise CLIError("--kwargs must be a JSON object like '{\"num_classes\": 100}'")
    return value


def resolve(spec: str, input_shapes: Sequence[str] = (), kwargs: dict[str, Any] | None = None,
            trust: Sequence[str] = ()) -> Source:
    """Turn a MODEL argument into a model and example inputs (``graphprune.sources.resolve``).

    The current directory is importable, as under ``python -m``; import specs on the
    command line are the user's own choice, names read from saved files need ``--trust``.
    """
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())
    given = _make_inputs(input_shapes) if input_shapes else None
    return sources.resolve(spec, example_inputs=given, kwargs=kwargs, trust=tuple(trust))


# --- output helpers --------------------------------------------------------------------------------
def _out(text: str = "") -> None:
    print(text, flush=True)


@contextlib.contextmanager
def _progress(total: int, desc: str) -> Iterator[Any]:
    """A tqdm bar on stderr (only on a terminal) that steps through named stages."""
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, file=sys.stderr, leave=False, disable=None,
               bar_format="{desc}: {n_fmt}/{total_fmt} |{bar}| {elapsed}")
    try:
        yield bar
    finally:
        bar.close()


def _step(bar: Any, text: str) -> None:
    bar.set_description_str(text)
    bar.refresh()


def _terminal_width() -> int:
    return max(80, shutil.get_terminal_size((120, 24)).columns)


def _options(pairs: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.isidentifier():
            raise CLIError(f"--option {pair!r} must look like name=value (e.g. p=1)")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _target_supported() -> bool:
    """Whether ``gp.prune`` takes ``target=`` itself (else it would reach the criterion unused)."""
    import inspect

    return "target" in inspect.signature(gp.prune).parameters


_LOSSES = ("cross_entropy", "nll_loss", "mse_loss", "l1_loss", "smooth_l1_loss",
           "binary_cross_entropy_with_logits")


def load_data(path: str, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Batches ``(inputs, targets)`` from a torch file holding {'inputs': T, 'targets': T} or (T, T)."""
    if not Path(path).is_file():
        raise CLIError(f"--data {path!r}: no such file")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CLIError(f"--data {path!r} cannot be read with torch.load(weights_only=True) "
                       f"({type(exc).__name__})") from exc
    if isinstance(blob, dict) and {"inputs", "targets"} <= set(blob):
        inputs, targets = blob["inputs"], blob["targets"]
    elif isinstance(blob, (tuple, list)) and len(blob) == 2:
        inputs, targets = blob
    else:
        raise CLIError(f"--data {path!r} must hold {{'inputs': tensor, 'targets': tensor}} or a pair "
                       "(inputs, targets), saved with torch.save")
    if not (isinstance(inputs, torch.Tensor) and isinstance(targets, torch.Tensor)) or len(inputs) != len(targets):
        raise CLIError(f"--data {path!r}: inputs and targets must be tensors with the same first dimension")
    return [(inputs[i:i + batch_size], targets[i:i + batch_size]) for i in range(0, len(inputs), batch_size)]


def _data_options(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    from graphprune import importance

    needs_data = args.method in getattr(importance, "DATA_DRIVEN", ())
    if not getattr(args, "data", None):
        if needs_data:
            raise CLIError(f"method {args.method!r} scores channels on data: pass --data FILE (a torch file "
                           "with {'inputs': tensor, 'targets': tensor}) and --loss (default cross_entropy)")
        return None, {}
    import torch.nn.functional as F

    return load_data(args.data, args.batch_size), {"loss_fn": getattr(F, args.loss)}


def _prune(src: Source, args: argparse.Namespace) -> gp.PruneResult:
    options = _options(args.option)
    data, extra = _data_options(args)
    options.update(extra)
    ratio = args.ratio
    for flag in ("macs", "params"):
        value = getattr(args, flag, None)
        if value is not None:
            if not _target_supported():
                raise CLIError(f"--{flag} needs target-based selection (gp.prune(..., target={flag!r})), "
                               "which this graphprune version does not support yet; use --ratio")
            options["target"], ratio = flag, value
    return gp.prune(src.model, src.inputs, method=args.method, ratio=ratio, data=data, ignore=args.ignore,
                    **options)


def _latencies(src: Source, slim: torch.nn.Module, args: argparse.Namespace) -> tuple[float, float]:
    kw = {"threads": args.threads, "repeats": args.repeats}
    return gp.latency(src.model, src.inputs, **kw), gp.latency(slim, src.inputs, **kw)


def _save(slim: torch.nn.Module, src: Source, path: str | Path) -> Path:
    path = Path(path)
    gpio.save(slim, path, origin=src.origin, example_inputs=src.inputs)
    return path


def _threads(n: int) -> str:
    return f"{n} thread" + ("" if n == 1 else "s")


def _size(path: Path) -> str:
    n = path.stat().st_size
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


# --- commands --------------------------------------------------------------------------------------
def cmd_zoo(args: argparse.Namespace) -> int:
    from graphprune.zoo import _REGISTRY

    rows = [["model", "input (per sample)", "description"]]
    for name in gp.zoo.list_models():
        entry = _REGISTRY[name]
        doc = (entry.factory.__doc__ or "").strip().splitlines()
        rows.append([name, "x".join(map(str, entry.input_shape)), doc[0] if doc else ""])
    _out(rp.table(rows, align="lll"))
    _out(f"\n{len(rows) - 1} models; use one as MODEL, e.g. '{PROG} inspect resnet20'")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    if args.svg and shutil.which("dot") is None:
        raise CLIError("--svg needs Graphviz's 'dot' program, which is not installed "
                       "(apt install graphviz); --dot FILE writes the DOT text without it")
    src = resolve(args.model, args.input_shape, _kwargs(args.kwargs), args.trust)
    dg = gp.DependencyGraph.build(src.model, src.inputs)
    counts = gp.count(src.model, src.inputs)
    _out(f"{src.name} ({src.kind}), example inputs {src.describe_inputs()}: "
         f"{counts.params:,} parameters, {rp.human(counts.macs)} MACs")
    _out()
    text = dg.describe()
    _out(text if args.full else rp.truncate(text, _terminal_width()))
    if args.dot:
        Path(args.dot).parent.mkdir(parents=True, exist_ok=True)
        Path(args.dot).write_text(dg.to_dot() + "\n")
        _out(f"wrote {args.dot}")
    if args.svg:
        Path(args.svg).parent.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["dot", "-Tsvg", "-o", args.svg], input=dg.to_dot(), text=True,
                              capture_output=True)
        if done.returncode:
            raise CLIError(f"dot failed: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}")
        _out(f"wrote {args.svg}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(dg.to_json() + "\n")
        _out(f"wrote {args.json}")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    src = resolve(args.model, args.input_shape, _kwargs(args.kwargs), args.trust)
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
            settings = {"ratio": args.ratio, "macs": args.macs, "params": args.params,
                        "ignore": list(args.ignore), "options": _options(args.option),
                        "data": args.data, "loss": args.loss if args.data else None,
                        "threads": args.threads, "repeats": args.repeats}
            rep = rp.build_report(
                model=src.name, dg=result.graph, plan=result.plan, before=result.before,
                after=result.after, method=args.method, settings=settings, latency_before=lat_b,
                latency_after=lat_a, max_diff=diff, widths_before=rp.layer_widths(src.model),
                widths_after=rp.layer_widths(result.model), inputs=gpio._inputs_spec(src.inputs))
            written = rp.write_report(rep, args.report, plot=not args.no_plot)
        bar.update()
    s = result.plan
    n_prunable = sum(g.size for g in result.graph.groups if g.prunable)
    _out(f"{src.name}: method {args.method}, removed {s.n_removed:,} of {n_prunable:,} prunable channels "
         f"in {len(s)} groups")
    _out(rp.counts_table(result.before, result.after, lat_b, lat_a))
    _out(f"  exactness: max |masked original - slim| = {diff:.3g}")
    if saved:
        _out(f"saved {saved} ({_size(saved)}); load it with graphprune.load({str(saved)!r})")
    if written:
        _out("report: " + ", ".join(str(p) for p in written))
        if args.report and not any(p.suffix == ".png" for p in written) and not args.no_plot:
            _out("  (no widths.png: matplotlib is not installed; pip install 'graphprune[plot]')")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    src = resolve(args.model, args.input_shape, _kwargs(args.kwargs), args.trust)
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
        settings = {"ratio": args.ratio, "threads": args.threads, "repeats": args.repeats}
        rep = rp.build_report(
            model=src.name, dg=dg, plan=result.plan, before=result.before, after=result.after,
            method=args.method, settings=settings, latency_before=lat_b, latency_after=lat_a,
            max_diff=diff, widths_before=rp.layer_widths(src.model),
            widths_after=rp.layer_widths(result.model), inputs=gpio._inputs_spec(src.inputs))
        written = rp.write_report(rep, out_dir / f"{src.name}_report")
        bar.update()
    _out(f"[5/5] Saved {path} ({_size(path)}) with gp.save; gp.load rebuilt it: outputs "
         + ("identical to the slim model's" if same else "DIFFER from the slim model's"))
    _out(f"      report: {', '.join(str(p) for p in written)}")
    return 0 if (same and diff <= tol) else 1


# --- parser ------------------------------------------------------------------------------------
def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL",
                   help="zoo name, import spec package.module:factory, or a file saved by graphprune")
    p.add_argument("--input-shape", action="append", default=[], metavar="SHAPE",
                   help="example input shape like 1,3,32,32 (optionally :dtype, e.g. 4,16:int64); "
                        "repeat for several inputs; required for import specs whose factory "
                        "returns no example inputs")
    p.add_argument("--kwargs", metavar="JSON", help="keyword arguments for the model factory, as JSON")
    p.add_argument("--trust", action="append", default=[], metavar="MODULE",
                   help="for a saved MODEL file: a module whose factories (and submodules') the file may "
                        "call to rebuild the model (repeatable); zoo models need none")


def _prune_args(p: argparse.ArgumentParser, ratio_default: float | None = 0.5) -> None:
    p.add_argument("--method", "-m", default="magnitude", help="importance criterion (default: magnitude)")
    p.add_argument("--ratio", "-r", type=float, default=ratio_default,
                   help="fraction of the channels of every prunable group to remove (default: 0.5)")
    p.add_argument("--option", "-O", action="append", default=[], metavar="NAME=VALUE",
                   help="option for the criterion, e.g. -O p=1 or -O seed=3 (repeatable)")
    p.add_argument("--ignore", type=int, nargs="*", default=[], metavar="GROUP",
                   help="group ids to leave untouched")
    p.add_argument("--data", metavar="FILE",
                   help="data for data-driven methods (taylor, hessian, ...): a torch file holding "
                        "{'inputs': tensor, 'targets': tensor}")
    p.add_argument("--loss", default="cross_entropy", choices=_LOSSES,
                   help="loss for data-driven methods, from torch.nn.functional (default: cross_entropy)")
    p.add_argument("--batch-size", type=int, default=32, help="batch size for --data (default: 32)")


def _latency_args(p: argparse.ArgumentParser, repeats: int = 30) -> None:
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads for latency (default: 1)")
    p.add_argument("--repeats", type=int, default=repeats,
                   help=f"timed forward passes; the median is reported (default: {repeats})")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Structural channel pruning for PyTorch models via torch.fx.")
    parser.add_argument("--version", action="version", version=f"{PROG} {gp.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("demo", help="trace a zoo ResNet, show its groups, prune 50%%, measure, save, reload")
    p.add_argument("--model", default="resnet56", choices=gp.zoo.list_models(), metavar="NAME",
                   help="zoo model (default: resnet56)")
    _prune_args(p)
    _latency_args(p)
    p.add_argument("--out-dir", default="out", help="where the slim model and report go (default: out)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("inspect", help="print a model's dependency groups")
    _model_args(p)
    p.add_argument("--dot", metavar="FILE", help="write the groups graph as Graphviz DOT")
    p.add_argument("--svg", metavar="FILE", help="render the groups graph to SVG (needs Graphviz 'dot')")
    p.add_argument("--json", metavar="FILE", help="write the groups as JSON")
    p.add_argument("--full", action="store_true", help="do not cut long lines to the terminal width")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("prune", help="prune a model, save it and write a report")
    _model_args(p)
    _prune_args(p)
    target = p.add_mutually_exclusive_group()
    target.add_argument("--macs", type=float, metavar="R", help="remove this fraction of the MACs instead")
    target.add_argument("--params", type=float, metavar="R", help="remove this fraction of the parameters instead")
    p.add_argument("--out", "-o", metavar="FILE", help="save the slim model here (load with graphprune.load)")
    p.add_argument("--report", metavar="DIR", help="write report.json, report.md and widths.png here")
    p.add_argument("--no-plot", action="store_true", help="skip widths.png in the report")
    _latency_args(p, repeats=20)
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("bench", help="params, MACs and CPU latency, dense vs slim")
    _model_args(p)
    _prune_args(p)
    _latency_args(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("zoo", help="list the reference models")
    p.set_defaults(func=cmd_zoo)
    return parser


def _check_ranges(args: argparse.Namespace) -> None:
    for flag in ("ratio", "macs", "params"):
        v = getattr(args, flag, None)
        if v is not None and not 0 <= v < 1:
            raise _UsageError(f"argument --{flag}: must be in [0, 1), got {v}")
    if getattr(args, "threads", 1) < 1:
        raise _UsageError(f"argument --threads: must be at least 1, got {args.threads}")
    if getattr(args, "batch_size", 1) < 1:
        raise _UsageError(f"argument --batch-size: must be at least 1, got {args.batch_size}")
    if getattr(args, "repeats", 1) < 0:
        raise _UsageError(f"argument --repeats: must be at least 0, got {args.repeats}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; return its exit status (0 ok, 1 error, 2 usage error)."""
    parser = build_parser()
    debug = bool(os.environ.get("GRAPHPRUNE_DEBUG"))
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        _check_ranges(args)
        return int(args.func(args) or 0)
    except _UsageError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except (CLIError, GraphPruneError, InputError) as exc:
        if debug:
            raise
        print(f"{PROG}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # one line, not a traceback; GRAPHPRUNE_DEBUG=1 shows it
        if debug:
            raise
        print(f"{PROG}: internal error: {type(exc).__name__}: {' '.join(str(exc).split())} "
              "(set GRAPHPRUNE_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
