"""How fast LEAN plans on a ResNet-50 at real widths (millions of kernel edges).

Times each stage on ``gp.zoo.create("resnet50", width=64)`` (torchvision widths, 23.5M
parameters; random init with BatchNorm statistics calibrated on random data):
tracing + dependency graph, channel graph (operator norms of every kernel), longest-chain
extraction, and kept kernels -> plan. Also runs a *stress* case where every kernel weight is
multiplied by e^shift, so that most nodes lie on chains >= 1 and extraction is all chains
(the worst case for the exact, sequential algorithm): it reports chains per second.

    PYTHONPATH=. python benchmarks/lean_speed.py            # writes benchmarks/results/lean_speed.json
    PYTHONPATH=. python benchmarks/lean_speed.py --quick    # resnet50 at width 16
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import graphprune as gp  # noqa: E402
from graphprune import lean  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=int, default=64, help="ResNet-50 base width (64 = torchvision)")
    p.add_argument("--quick", action="store_true", help="width 16")
    p.add_argument("--n", type=int, nargs="+", default=[16, 32], help="mock image sizes of the operator norms")
    p.add_argument("--keep", type=float, nargs="+", default=[0.5, 0.1, 0.05])
    p.add_argument("--stress-shift", type=float, nargs="+", default=[1.0, 2.0],
                   help="log-weight shifts of the stress cases")
    p.add_argument("--stress-paths", type=int, default=100, help="chains timed in each stress case")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "lean_speed.json")
    args = p.parse_args(argv)
    if args.quick:
        args.width = 16
    torch.set_num_threads(args.threads)
    res: dict = {"config": {k: str(v) for k, v in vars(args).items()},
                 "machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads,
                             "torch": torch.__version__}}
    t = time.perf_counter()
    model, x = gp.zoo.create("resnet50", width=args.width)
    res["create_s"] = time.perf_counter() - t
    t = time.perf_counter()
    dg = gp.DependencyGraph.build(model, x)
    res["dependency_graph_s"] = time.perf_counter() - t
    res["params"] = sum(p.numel() for p in model.parameters())
    rows = []
    cg = None
    for n in args.n:
        t = time.perf_counter()
        cg = lean.ChannelGraph.build(model, dg, n=n)
        build = time.perf_counter() - t
        for keep in args.keep:
            ext = lean.extract(cg, keep)
            t = time.perf_counter()
            lp = lean.plan_from_kernels(dg, cg, ext)
            plan_s = time.perf_counter() - t
            rows.append({"n": n, "keep": keep, "nodes": cg.n_nodes, "kernel_edges": cg.n_kernels,
                         "fixed_edges": cg.n_edges - cg.n_kernels, "graph_s": build,
                         "extract_s": ext.seconds, "chains": ext.n_paths, "chain_kernels": ext.path_kernels,
                         "plan_s": plan_s, "total_s": build + ext.seconds + plan_s,
                         "kept_kernels": lp.kept_kernels, "kept_channels": lp.kept_channels,
                         "channels": lp.total_channels})
            r = rows[-1]
            print(f"n={n:<3} keep={keep:<5} {r['kernel_edges']:>9} kernel edges  graph {build:6.2f}s  "
                  f"extract {ext.seconds:6.2f}s ({ext.n_paths} chains)  plan {plan_s:5.2f}s  "
                  f"-> {lp.kept_kernels} kernels, {lp.kept_channels}/{lp.total_channels} channels", flush=True)
    res["rows"] = rows
    # stress: every kernel weight x e^shift, chains everywhere
    res["stress"] = []
    for shift in args.stress_shift:
        strong = copy.deepcopy(cg)
        for b in strong.kernel_blocks:
            strong.blocks[b].logw += shift
        ext = lean.extract(strong, 0.5, max_paths=args.stress_paths)
        fill_s = lean.extract(strong, 0.5, method="individual").seconds  # the threshold part alone
        per_chain = max(ext.seconds - fill_s, 0.0) / max(ext.n_paths, 1)
        row = {"shift": shift, "n": args.n[-1], "chains": ext.n_paths, "chain_kernels": ext.path_kernels,
               "mean_chain_length": ext.path_kernels / max(ext.n_paths, 1), "extract_s": ext.seconds,
               "fill_s": fill_s, "seconds_per_chain": per_chain}
        res["stress"].append(row)
        print(f"stress (weights x e^{shift}): {ext.n_paths} chains of mean length "
              f"{row['mean_chain_length']:.1f}, {ext.seconds:.2f}s with the fill ({fill_s:.2f}s alone): "
              f"{1000 * per_chain:.1f} ms per chain", flush=True)
    print(f"\nResNet-50 width {args.width}: {res['params'] / 1e6:.1f}M params; trace + dependency graph "
          f"{res['dependency_graph_s']:.1f}s (once per model)")
    print(f"{'n':>3} {'keep':>5} {'kernel edges':>13} {'graph s':>8} {'extract s':>9} {'chains':>7} "
          f"{'plan s':>7} {'total s':>8}")
    for r in rows:
        print(f"{r['n']:>3} {r['keep']:>5} {r['kernel_edges']:>13} {r['graph_s']:>8.2f} {r['extract_s']:>9.2f} "
              f"{r['chains']:>7} {r['plan_s']:>7.2f} {r['total_s']:>8.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1))
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
