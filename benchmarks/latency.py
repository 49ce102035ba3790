"""CPU latency of dense vs slim ResNet-50, next to the MACs reduction.

For each channel-pruning ratio (25/50/70% of every prunable group, L1 magnitude), the
script builds the slim ``GraphModule`` with ``gp.apply`` and an *eager* ResNet-50 of
the same widths: the zoo's ``ResNet``/``Bottleneck`` classes (their Python forward),
every conv/BN/linear re-created at the width read off the slim model, then
``load_state_dict`` of the slim model's weights (outputs are checked to match).

Timing: ``torch.inference_mode()``, a fixed number of intra-op threads, warm-up runs,
then rounds in which dense, slim and eager each run once in rotating order (so load
from other processes hits all three alike); medians over the rounds. Reported:

- MACs reduction = dense MACs / slim MACs (``gp.count``), latency speedup = dense
  time / slim time, and their quotient (target: speedup >= 0.85 x MACs reduction);
- the same with BatchNorm folded into the convolutions of *both* models
  (``torch.fx.experimental.optimization.fuse``, the usual step before CPU deployment;
  the slim model is a GraphModule, so the pass applies to it directly). Folding removes
  a per-channel pass over every activation, a cost that falls only linearly with width
  while MACs fall quadratically, so it matters most for the slim model;
- slim / eager time (target: <= 1, the GraphModule costs nothing over eager code).

    python benchmarks/latency.py                   # 224x224, batch 1, 1 thread
    python benchmarks/latency.py --threads 2 --rounds 30 --round-to 8

Writes ``benchmarks/results/latency.json`` (``latency_round_to{N}.json`` with ``--round-to``).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn
from torch.fx.experimental.optimization import fuse

import graphprune as gp
from graphprune.zoo.resnet import Bottleneck, ResNet

RESULTS = Path(__file__).parent / "results"


def dense_resnet50() -> nn.Module:
    torch.manual_seed(0)
    model = ResNet(Bottleneck, (3, 4, 6, 3), num_classes=1000, width=64).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-trivial BatchNorm, so magnitude ranks differ between layers
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
    return model


def eager_like(dense: nn.Module, slim: torch.fx.GraphModule) -> nn.Module:
    """The zoo's eager ResNet with every layer at the slim model's width, slim weights loaded."""
    eager = copy.deepcopy(dense)
    slim_modules = dict(slim.named_modules())
    for name, module in list(eager.named_modules()):
        s = slim_modules.get(name)
        if s is None:
            continue
        if isinstance(module, nn.Conv2d):
            new = nn.Conv2d(s.in_channels, s.out_channels, module.kernel_size, module.stride, module.padding,
                            module.dilation, s.groups, bias=module.bias is not None)
        elif isinstance(module, nn.BatchNorm2d):
            new = nn.BatchNorm2d(s.num_features, module.eps, module.momentum)
        elif isinstance(module, nn.Linear):
            new = nn.Linear(s.in_features, s.out_features, bias=module.bias is not None)
        else:
            continue
        parent, _, attr = name.rpartition(".")
        setattr(eager.get_submodule(parent) if parent else eager, attr, new)
    eager.load_state_dict(slim.state_dict())
    return eager.eval()


def timed(model: nn.Module, x: torch.Tensor) -> float:
    start = time.perf_counter()
    model(x)
    return time.perf_counter() - start


def measure(models: dict[str, nn.Module], x: torch.Tensor, rounds: int, warmup: int) -> dict[str, float]:
    names = list(models)
    times: dict[str, list[float]] = {n: [] for n in names}
    with torch.inference_mode():
        for _ in range(warmup):
            for n in names:
                timed(models[n], x)
        for r in range(rounds):
            for n in names[r % len(names):] + names[:r % len(names)]:
                times[n].append(timed(models[n], x))
    return {n: statistics.median(t) for n, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratios", type=float, nargs="*", default=[0.25, 0.5, 0.7])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--round-to", type=int, default=None, help="keep widths multiples of this")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dense = dense_resnet50()
    x = torch.randn(args.batch, 3, args.size, args.size)
    dg = gp.DependencyGraph.build(dense, x)
    scores = gp.score("magnitude", dense, dg, p=1)
    base = gp.count(dense, x)
    dense_folded = fuse(dense)
    rows = []
    header = (f"{'pruned':>6s} {'GMACs':>13s} {'MACs red.':>9s} | {'dense ms':>8s} {'slim ms':>8s} "
              f"{'eager ms':>8s} | {'speedup':>7s} {'/MACs red.':>10s} {'slim/eager':>10s} | "
              f"{'BN folded: dense':>16s} {'slim':>6s} {'speedup':>7s} {'/MACs red.':>10s}")
    print(f"ResNet-50, {args.batch}x3x{args.size}x{args.size}, {args.threads} thread(s), "
          f"median of {args.rounds} rounds" + (f", round_to={args.round_to}" if args.round_to else ""))
    print(header)
    print("-" * len(header))
    for ratio in args.ratios:
        plan = gp.select(dg, scores, ratio, round_to=args.round_to)
        slim = gp.apply(dense, dg, plan).eval()
        eager = eager_like(dense, slim)
        with torch.inference_mode():
            diff = (slim(x) - eager(x)).abs().max().item()
        assert diff < 1e-4, f"eager copy differs from the slim model by {diff}"
        slim_folded = fuse(slim)
        with torch.inference_mode():
            diff = (slim(x) - slim_folded(x)).abs().max().item()
        assert diff < 1e-3, f"BN folding changed the slim model's output by {diff}"
        counts = gp.count(slim, x)
        t = measure({"dense": dense, "slim": slim, "eager": eager, "dense_folded": dense_folded,
                     "slim_folded": slim_folded}, x, args.rounds, args.warmup)
        row = {"ratio": ratio, "macs_dense": base.macs, "macs_slim": counts.macs,
               "params_dense": base.params, "params_slim": counts.params,
               "macs_reduction": base.macs / counts.macs,
               "dense_s": t["dense"], "slim_s": t["slim"], "eager_s": t["eager"],
               "speedup": t["dense"] / t["slim"], "slim_over_eager": t["slim"] / t["eager"],
               "dense_folded_s": t["dense_folded"], "slim_folded_s": t["slim_folded"],
               "speedup_folded": t["dense_folded"] / t["slim_folded"]}
        row["speedup_over_macs_reduction"] = row["speedup"] / row["macs_reduction"]
        row["speedup_folded_over_macs_reduction"] = row["speedup_folded"] / row["macs_reduction"]
        rows.append(row)
        print(f"{ratio:6.0%} {base.macs / 1e9:5.2f}->{counts.macs / 1e9:<6.2f} {row['macs_reduction']:8.2f}x | "
              f"{1e3 * t['dense']:8.1f} {1e3 * t['slim']:8.1f} {1e3 * t['eager']:8.1f} | "
              f"{row['speedup']:6.2f}x {row['speedup_over_macs_reduction']:10.2f} {row['slim_over_eager']:10.3f} | "
              f"{1e3 * t['dense_folded']:16.1f} {1e3 * t['slim_folded']:6.1f} {row['speedup_folded']:6.2f}x "
              f"{row['speedup_folded_over_macs_reduction']:10.2f}", flush=True)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / (f"latency_round_to{args.round_to}.json" if args.round_to else "latency.json")
    meta = {"torch": torch.__version__, "threads": args.threads, "rounds": args.rounds, "warmup": args.warmup,
            "input": [args.batch, 3, args.size, args.size], "round_to": args.round_to,
            "machine": platform.processor() or platform.machine()}
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"results in {out}")


if __name__ == "__main__":
    main()
