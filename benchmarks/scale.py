"""Scale: structure without weights. Llama-shaped models on the meta device, 8 -> 128 layers.

Each configuration runs in a fresh subprocess (so peak RSS is its own), with one intra-op
thread. Times are CPU seconds of that process (``time.process_time``), which other load on
a shared machine inflates far less than wall-clock time; ``wall_s`` is the wall-clock build
+ plan for reference. A ``transformers.LlamaForCausalLM`` is built from its config under
``torch.device("meta")`` (nothing is allocated) and taken through every structural step:

- ``build``: ``gp.DependencyGraph.build(model, {"input_ids": ...}, factor="heads")`` with
  meta example inputs (batch 1, 8 tokens); split into ``trace`` (``gp.trace``, the
  torch.export graph with shapes) and ``group`` (labelling and grouping on that graph);
- ``plan``: ``gp.select(dg, gp.score("random", model, dg), 0.5)`` (a structure-only criterion);
- ``slim``: ``gp.apply(model, dg, plan)``, the slim architecture on the meta device
  (its check run compares output shapes);
- ``plan_rss_gb``: peak RSS (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) of the child once
  the graph is grouped and planned; ``peak_rss_gb``: the same at the end (after ``slim``).

Shapes: ``8b`` = Llama-3-8B (hidden 4096, intermediate 14336, 32 heads, 8 KV heads,
vocab 128256), ``70b`` = Llama-3-70B (hidden 8192, intermediate 28672, 64 heads, 8 KV heads,
vocab 128256). Depths: 8, 32, 128, and the real ones (32 for 8B, 80 for 70B).
``per_layer_s`` is the build + plan time per decoder layer: flat when the cost grows
linearly with depth.

    python benchmarks/scale.py                 # every row
    python benchmarks/scale.py 8b:8 70b:80     # chosen rows (shape:layers)
    python benchmarks/scale.py --profile 8b:32 # cProfile of one row, printed

Writes ``benchmarks/results/scale.json`` (rows merged by name with earlier ones).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
SHAPES = {  # hidden, intermediate, heads, kv heads
    "8b": (4096, 14336, 32, 8),
    "70b": (8192, 28672, 64, 8),
}
ROWS = ["8b:8", "8b:32", "8b:128", "70b:8", "70b:32", "70b:80", "70b:128"]
RATIO = 0.5


def run_one(spec: str, profile: bool = False) -> dict:
    """Build, plan and slim one configuration in this process; the measurements."""
    import resource
    import warnings

    import torch
    import transformers as tf

    import graphprune as gp
    import graphprune.graph as graph_module

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    shape, layers = spec.split(":")
    hidden, inter, heads, kv = SHAPES[shape]
    config = tf.LlamaConfig(vocab_size=128256, hidden_size=hidden, intermediate_size=inter,
                            num_hidden_layers=int(layers), num_attention_heads=heads, num_key_value_heads=kv)
    with torch.device("meta"):
        model = tf.LlamaForCausalLM(config)
    inputs = {"input_ids": torch.zeros(1, 8, dtype=torch.long)}
    prof = None
    if profile:
        import cProfile
        prof = cProfile.Profile()
        prof.enable()
    traced: list[float] = []

    def timed_trace(*args, **kwargs):  # the trace inside build, timed on its own
        start = time.process_time()
        try:
            return trace(*args, **kwargs)
        finally:
            traced.append(time.process_time() - start)

    trace, graph_module.trace = graph_module.trace, timed_trace
    wall = time.perf_counter()
    t2 = time.process_time()
    dg = gp.DependencyGraph.build(model, inputs, factor="heads")
    t3 = time.process_time()
    graph_module.trace = trace
    t1 = t2 + traced[0]
    plan = gp.select(dg, gp.score("random", model, dg, seed=0), RATIO)
    t4 = time.process_time()
    wall = time.perf_counter() - wall
    planned_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    slim = gp.apply(model, dg, plan)
    t5 = time.process_time()
    if prof is not None:
        import pstats
        prof.disable()
        pstats.Stats(prof).sort_stats("cumulative").print_stats(40)
    params = sum(p.numel() for p in model.parameters())
    slim_params = sum(p.numel() for p in slim.parameters())
    return {"name": spec, "shape": shape, "layers": int(layers), "hidden": hidden, "intermediate": inter,
            "heads": heads, "kv_heads": kv, "params": params, "slim_params": slim_params,
            "nodes": len(dg.gm.graph.nodes), "groups": len(dg.groups),
            "prunable": sum(g.prunable for g in dg.groups), "removed_groups": len(plan),
            "trace_s": t1 - t2, "group_s": t3 - t1, "build_s": t3 - t2, "plan_s": t4 - t3, "slim_s": t5 - t4,
            "build_plan_s": t4 - t2, "per_layer_s": (t4 - t2) / int(layers), "wall_s": wall,
            "plan_rss_gb": planned_rss, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9}


def print_row(row: dict, header: bool) -> None:
    if header:
        cols = (f"{'model':8s} {'layers':>6s} {'params':>7s} {'nodes':>6s} {'groups':>6s} | {'trace':>6s} "
                f"{'group':>6s} {'build':>6s} {'plan':>6s} {'slim':>6s} | {'b+p/layer':>9s} {'RSS GB':>6s} {'+slim':>6s}")
        print(cols)
        print("-" * len(cols))
    print(f"{row['shape']:8s} {row['layers']:6d} {row['params'] / 1e9:6.1f}B {row['nodes']:6d} {row['groups']:6d} | "
          f"{row['trace_s']:6.1f} {row['group_s']:6.1f} {row['build_s']:6.1f} {row['plan_s']:6.1f} "
          f"{row['slim_s']:6.1f} | {row['per_layer_s']:9.2f} {row['plan_rss_gb']:6.2f} {row['peak_rss_gb']:6.2f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("rows", nargs="*", help=f"shape:layers (default: {' '.join(ROWS)})")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--profile", action="store_true", help="cProfile one row in this process")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_one(args.child)))
        return
    if args.profile:
        for spec in args.rows:
            print(run_one(spec, profile=True))
        return
    rows = []
    out = RESULTS / "scale.json"
    old = json.loads(out.read_text())["rows"] if out.exists() else []
    for spec in args.rows or ROWS:
        shape, layers = spec.split(":")
        if shape not in SHAPES or not layers.isdigit():
            parser.error(f"bad row {spec!r}: write shape:layers with shape in {list(SHAPES)}")
        done = subprocess.run([sys.executable, __file__, "--child", spec], capture_output=True, text=True)
        if done.returncode:
            print(done.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"{spec} failed")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print_row(rows[-1], header=len(rows) == 1)
    import torch
    import transformers
    merged = {r["name"]: r for r in old}
    merged.update({r["name"]: r for r in rows})
    order = {name: i for i, name in enumerate(ROWS)}
    meta = {"torch": torch.__version__, "transformers": transformers.__version__, "threads": 1,
            "python": platform.python_version(), "machine": platform.processor() or platform.machine(),
            "inputs": "input_ids (1, 8) on meta", "ratio": RATIO}
    RESULTS.mkdir(exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": sorted(merged.values(), key=lambda r: order.get(r["name"], 99))},
                              indent=1))
    print(f"CPU seconds; b+p/layer = (build + plan) / layers. Results in {out}")


if __name__ == "__main__":
    main()
