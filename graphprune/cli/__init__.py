"""The ``graphprune`` command (also ``python -m graphprune``).

Subcommands: ``demo``, ``inspect``, ``prune``, ``bench``, ``zoo``. A MODEL argument is a
zoo name (``resnet20``), an import spec ``package.module:factory`` (a function that
returns the model, or ``(model, example_inputs)``), a file path ``models.py:factory``,
``timm:NAME``, ``hf:CONFIG_OR_DIR``, or a file written by ``gp.save`` (``--trust MODULE``
lets it call factories in MODULE); see ``graphprune.sources``.
Bad input ends with exit status 2 (usage) or 1 (anything else) and one message line; a
closed output pipe (``| head``) ends quietly with status 141, as if killed by SIGPIPE.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from collections.abc import Sequence

import graphprune as gp
from graphprune.cli.commands import cmd_bench, cmd_demo, cmd_inspect, cmd_prune, cmd_zoo
from graphprune.cli.common import (
    _LOSSES,
    PROG,
    CLIError,
    _UsageError,
    parse_ignore,
    parse_min_keep,
    parse_ratios,
    parse_shape,
    resolve,
)
from graphprune.errors import GraphPruneError, InputError

__all__ = ["main", "build_parser", "CLIError", "parse_shape", "parse_ratios", "parse_ignore", "parse_min_keep",
           "resolve", "PROG"]


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (no usage dump), exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise _UsageError(f"{message} (see '{self.prog} --help')")


# --- parser ------------------------------------------------------------------------------------
def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL",
                   help="zoo name, import spec package.module:factory, file path models.py:factory, "
                        "timm:NAME, hf:CONFIG_OR_DIR, or a file saved by graphprune")
    p.add_argument("--input-shape", action="append", default=[], metavar="SHAPE",
                   help="example input shape like 1,3,32,32 (optionally :dtype, e.g. 4,16:int64); "
                        "repeat for several inputs; required for import specs whose factory "
                        "returns no example inputs")
    p.add_argument("--kwargs", metavar="JSON", help="keyword arguments for the model factory, as JSON")
    p.add_argument("--trust", action="append", default=[], metavar="MODULE",
                   help="for a saved MODEL file: a module whose factories (and submodules') the file may "
                        "call to rebuild the model (repeatable); zoo models need none")
    p.add_argument("--checkpoint", metavar="FILE",
                   help="load trained weights into the model: a state dict saved with torch.save "
                        "(read with weights_only=True) or a .safetensors file")


def _factor_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--factor", choices=("largest", "heads"), default=None,
                   help="where a reshape splits channels over several axes (attention heads), prune "
                        "the largest factor (per-head dims; default) or whole heads")


def _prune_args(p: argparse.ArgumentParser, ratio_default: float | None = 0.5) -> None:
    p.add_argument("--method", "-m", default="magnitude", help="importance criterion (default: magnitude)")
    p.add_argument("--ratio", "-r", type=float, default=ratio_default,
                   help="fraction of the channels of every prunable group to remove (default: 0.5)")
    p.add_argument("--scope", choices=("local", "global"), default="local",
                   help="local: the same fraction of every group (default); global: one ranking of all "
                        "channels")
    p.add_argument("--round-to", type=int, metavar="N",
                   help="every group keeps a multiple of N channels (or all of them)")
    p.add_argument("--min-keep", type=parse_min_keep, default=1, metavar="N",
                   help="every group keeps at least N channels, or this fraction of them if N < 1 (default: 1)")
    p.add_argument("--max-ratio", type=float, metavar="R",
                   help="no layer loses more than this fraction of its channels")
    p.add_argument("--ratios", type=parse_ratios, action="append", default=[], metavar="LAYER=R,...",
                   help="per-module ratios overriding --ratio, e.g. layer1=0.3,fc1=0.1 (module names as in "
                        "model.named_modules(); repeatable)")
    p.add_argument("--uniform", action="store_true",
                   help="repeated blocks keep one width: each layer of a stack (model.layers.*.mlp.up_proj) "
                        "loses the same number of channels, as configs and kernels expect")
    p.add_argument("--steps", type=int, default=1, metavar="N",
                   help="prune iteratively in N steps, re-tracing and re-scoring after each (default: 1)")
    _factor_arg(p)
    p.add_argument("--option", "-O", action="append", default=[], metavar="NAME=VALUE",
                   help="option for the criterion, e.g. -O p=1 or -O seed=3 (repeatable)")
    p.add_argument("--ignore", type=parse_ignore, nargs="*", default=[], metavar="GROUP_OR_LAYER",
                   help="group ids or module names (as in model.named_modules()) to leave untouched")
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
    p.add_argument("--model", default="resnet56", choices=[*gp.zoo.list_models(), *gp.zoo.ALIASES], metavar="NAME",
                   help="zoo model (default: resnet56)")
    _prune_args(p)
    _latency_args(p)
    p.add_argument("--out-dir", default="out", help="where the slim model and report go (default: out)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("inspect", help="print a model's dependency groups")
    _model_args(p)
    _factor_arg(p)
    p.add_argument("--html", metavar="FILE",
                   help="write one self-contained HTML page: the layer graph, groups coloured and selectable")
    p.add_argument("--svg", metavar="FILE", help="draw the layer graph (data flow, groups coloured) as SVG")
    p.add_argument("--dot", metavar="FILE", help="write the layer graph as Graphviz DOT")
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
    p.add_argument("--report", metavar="DIR",
                   help="write report.json, report.md, groups.html and widths.png here")
    p.add_argument("--html", metavar="FILE", help="write the groups view with widths before and after (HTML)")
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
    if getattr(args, "max_ratio", None) is not None and not 0 < args.max_ratio <= 1:
        raise _UsageError(f"argument --max-ratio: must be in (0, 1], got {args.max_ratio}")
    for flag in ("round_to", "steps"):
        v = getattr(args, flag, None)
        if v is not None and v < 1:
            raise _UsageError(f"argument --{flag.replace('_', '-')}: must be at least 1, got {v}")
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
    except BrokenPipeError:  # the reader went away (| head): stop quietly, as a SIGPIPE would
        _silence_stdout()
        return 141
    except OSError as exc:  # a file or folder the command was told to write or read
        if debug:
            raise
        if exc.errno == errno.EPIPE:
            _silence_stdout()
            return 141
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"{PROG}: error: {where}{exc.strerror or ' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    except Exception as exc:  # one line, not a traceback; GRAPHPRUNE_DEBUG=1 shows it
        if debug:
            raise
        print(f"{PROG}: internal error: {type(exc).__name__}: {' '.join(str(exc).split())} "
              "(set GRAPHPRUNE_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's final flush cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is not a real file (captured in tests)
        pass


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
