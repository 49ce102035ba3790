"""Memory: what building the graph and applying a plan allocate, and peak RSS.

Per model (the engine-speed sizes) and a 50% L1-magnitude plan:

- ``weights``: bytes of the model's parameters and buffers;
- ``build shares``: every parameter/buffer of the traced graph is the model's own tensor
  (same storage), i.e. building the graph copies no weights;
- ``build alloc``: bytes of all tensors that ATen ops created during
  ``DependencyGraph.build`` (counted with a ``TorchDispatchMode``): the activations of
  the one shape-propagation run, not weights;
- ``apply alloc``: bytes created by ``apply(check=False)`` next to the slim model's own
  size: each kept tensor is copied once, at its new size (no full copy first);
- ``peak``/``kept``: growth of the resident set size during ``build`` and during ``apply``
  (peak, and what stays), each phase in a fresh subprocess whose glibc returns freed
  large blocks to the OS at once (``MALLOC_MMAP_THRESHOLD_``), so RSS follows live memory.

    python benchmarks/memory.py                 # resnet50 densenet201 vit_b16
    python benchmarks/memory.py resnet101

Writes ``benchmarks/results/memory.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import graphprune as gp

sys.path.insert(0, str(Path(__file__).parent))
from engine_speed import MODELS, make  # noqa: E402

RESULTS = Path(__file__).parent / "results"
MB = 2**20


class AllocCounter(TorchDispatchMode):
    """Sums the bytes of every new storage an ATen op returns (views, aliases and in-place
    results excluded). Transient tensors count too: this is total allocation, not peak."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.bytes += t.untyped_storage().nbytes()
        return out


def _rss() -> dict[str, float]:
    """Current and peak resident set size (MB) of this process, from /proc."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines()
                  if line.startswith(("VmRSS", "VmHWM")))
    return {k: int(v.split()[0]) / 1024 for k, v in fields.items()}


def _reset_peak() -> bool:
    """Reset the peak RSS counter (Linux: write 5 to clear_refs); False where impossible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    state = dict(module.named_parameters())
    state.update(dict(module.named_buffers()))
    return state


def _nbytes(module: torch.nn.Module) -> int:
    return sum(t.untyped_storage().nbytes() for t in _state(module).values())


def measure(name: str) -> dict:
    torch.set_num_threads(1)
    model, x = make(name)
    row = {"model": name, "weights_mb": _nbytes(model) / MB}
    with AllocCounter() as count:
        dg = gp.DependencyGraph.build(model, x)
    row["build_alloc_mb"] = count.bytes / MB
    plan = gp.select(dg, gp.score("magnitude", model, dg, p=1), 0.5)
    mine = {t.untyped_storage().data_ptr() for t in _state(model).values()}
    row["build_shares_weights"] = all(t.untyped_storage().data_ptr() in mine for t in _state(dg.gm).values())
    with AllocCounter() as count:
        slim = gp.apply(model, dg, plan, check=False)
    row["apply_alloc_mb"] = count.bytes / MB
    row["slim_mb"] = _nbytes(slim) / MB
    row["slim_shares_nothing"] = not any(t.untyped_storage().data_ptr() in mine for t in _state(slim).values())
    return row


def phase_rss(name: str, phase: str) -> dict[str, float]:
    """In a fresh process: RSS peak and growth (MB) during ``build`` or ``apply`` alone."""
    torch.set_num_threads(1)
    model, x = make(name)
    if phase == "apply":
        dg = gp.DependencyGraph.build(model, x)
        plan = gp.select(dg, gp.score("magnitude", model, dg, p=1), 0.5)
    start = _rss()["VmRSS"]
    if not _reset_peak():
        return {"peak": float("nan"), "kept": float("nan")}
    result = gp.DependencyGraph.build(model, x) if phase == "build" else gp.apply(model, dg, plan)
    now = _rss()
    del result
    return {"peak": now["VmHWM"] - start, "kept": now["VmRSS"] - start}


def _phase_in_subprocess(name: str, phase: str) -> dict[str, float]:
    code = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import memory; "
            f"print(json.dumps(memory.phase_rss({name!r}, {phase!r})))")
    # a fixed mmap threshold: every large tensor is mapped on its own and returned to the OS
    # when freed, so RSS follows live memory instead of what glibc keeps for reuse
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", help=f"default: resnet50 densenet201 vit_b16; any of {list(MODELS)}")
    args = parser.parse_args()
    names = args.models or ["resnet50", "densenet201", "vit_b16"]
    header = (f"{'model':12s} {'weights':>7s} | {'build':>6s} {'shares':>6s} {'peak':>6s} | "
              f"{'apply':>6s} {'slim':>6s} {'peak':>6s} {'kept':>6s}   (MB)")
    print(header)
    print("-" * len(header))
    rows = []
    for name in names:
        row = measure(name)
        for phase in ("build", "apply"):
            rss = _phase_in_subprocess(name, phase)
            row[f"rss_{phase}_peak_mb"], row[f"rss_{phase}_kept_mb"] = rss["peak"], rss["kept"]
        rows.append(row)
        print(f"{name:12s} {row['weights_mb']:7.1f} | {row['build_alloc_mb']:6.1f} "
              f"{'yes' if row['build_shares_weights'] else 'NO':>6s} {row['rss_build_peak_mb']:6.1f} | "
              f"{row['apply_alloc_mb']:6.1f} {row['slim_mb']:6.1f} {row['rss_apply_peak_mb']:6.1f} "
              f"{row['rss_apply_kept_mb']:6.1f}", flush=True)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "memory.json"
    out.write_text(json.dumps({"torch": torch.__version__, "rows": rows}, indent=1))
    print(f"results in {out}")


if __name__ == "__main__":
    main()
