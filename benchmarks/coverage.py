"""Architecture coverage: every zoo model traced, grouped, pruned 50%, verified.

For each model: traced?, groups, prunable groups (inexact ones counted apart), params
and MACs after a 50% magnitude plan over all prunable groups, the verify difference on
a 50% plan over the exact groups, build and apply times. With ``torch-pruning``
installed (``pip install --no-deps torch-pruning==1.6.1``), the same models go through
Torch-Pruning's MetaPruner at the same ratio in the same run: whether it runs, keeps
the output shape, its params/MACs (counted by graphprune's counter) and its time.

    python benchmarks/coverage.py            # all zoo models
    python benchmarks/coverage.py vit_tiny   # some
Writes benchmarks/results/coverage.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
import warnings
from pathlib import Path

import numpy as np
import torch

import graphprune as gp

RESULTS = Path(__file__).parent / "results"


def _graphprune_row(name: str) -> dict:
    model, x = gp.zoo.create(name)
    row: dict = {"model": name}
    start = time.perf_counter()
    try:
        dg = gp.DependencyGraph.build(model, x)
    except gp.GraphPruneError as exc:
        return {**row, "traced": False, "error": str(exc)[:200]}
    row["build_s"] = time.perf_counter() - start
    row.update(traced=True, groups=len(dg.groups),
               prunable=sum(g.prunable for g in dg.groups),
               inexact=sum(g.prunable and not g.exact for g in dg.groups))
    before = gp.count(model, x)
    scores = gp.score("magnitude", model, dg)
    plan = gp.select(dg, scores, 0.5)
    start = time.perf_counter()
    slim = gp.apply(model, dg, plan)
    row["apply_s"] = time.perf_counter() - start
    after = gp.count(slim, x)
    row.update(params=before.params, params_after=after.params, macs=before.macs, macs_after=after.macs)
    exact_plan = gp.Plan({gid: ch for gid, ch in plan.items() if dg.groups[gid].exact})
    row["verify"] = gp.verify(model, x, exact_plan, dg=dg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        row["verify_all"] = gp.verify(model, x, plan, dg=dg, slim=slim)
    row["output_layers"] = sorted({p.rsplit(".", 1)[0] for g in dg.groups if not g.prunable
                                   and "output" in g.reason for p in g.producers})
    return row


def _torch_pruning_row(name: str, output_layers: list[str]) -> dict:
    import torch_pruning as tp

    model, x = gp.zoo.create(name)
    with torch.no_grad():
        want = model(*x)
    model = copy.deepcopy(model)
    modules = dict(model.named_modules())
    ignored = [modules[n] for n in output_layers if n in modules]
    start = time.perf_counter()
    try:
        pruner = tp.pruner.MetaPruner(model, x[0] if len(x) == 1 else x,
                                      importance=tp.importance.MagnitudeImportance(p=2),
                                      pruning_ratio=0.5, ignored_layers=ignored)
        pruner.step()
        seconds = time.perf_counter() - start
        with torch.no_grad():
            got = model(*x)
    except Exception as exc:  # Torch-Pruning fails in many ways on models it does not handle
        return {"tp_ok": False, "tp_error": f"{type(exc).__name__}: {str(exc)[:120]}"}
    row = {"tp_ok": True, "tp_s": seconds, "tp_same_shape": tuple(got.shape) == tuple(want.shape),
           "tp_finite": bool(torch.isfinite(got).all())}
    try:
        counts = gp.count(model, x)
        row.update(tp_params=counts.params, tp_macs=counts.macs)
    except gp.GraphPruneError as exc:
        row["tp_count_error"] = str(exc)[:120]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", help="zoo names (default: all)")
    parser.add_argument("--no-tp", action="store_true", help="skip Torch-Pruning")
    args = parser.parse_args()
    torch.set_num_threads(1)
    try:
        import torch_pruning  # noqa: F401
        have_tp = not args.no_tp
    except ImportError:
        have_tp = False
    rows = []
    for name in args.models or gp.zoo.list_models():
        row = _graphprune_row(name)
        if have_tp and row.get("traced"):
            row.update(_torch_pruning_row(name, row["output_layers"]))
        rows.append(row)
        _print_row(row, have_tp, header=len(rows) == 1)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "coverage.json"
    out.write_text(json.dumps({"torch": torch.__version__, "rows": rows}, indent=1, default=float))
    ok = sum(r.get("traced", False) and r["verify"] <= 1e-4 for r in rows)
    print(f"\n{ok}/{len(rows)} models traced and exact (verify <= 1e-4); results in {out}")
    if have_tp:
        tp_ok = sum(r.get("tp_ok", False) and r.get("tp_same_shape", False) for r in rows)
        print(f"Torch-Pruning ran and kept the output shape on {tp_ok}/{len(rows)}")


def _print_row(row: dict, have_tp: bool, header: bool) -> None:
    if header:
        cols = (f"{'model':14s} {'groups':>6s} {'prun.':>5s} {'inex.':>5s} {'params':>16s} "
                f"{'MACs (M)':>16s} {'verify':>8s} {'build':>6s} {'apply':>6s}")
        if have_tp:
            cols += f" | {'TP':18s} {'TP params':>9s} {'TP MACs':>8s} {'TP s':>6s}"
        print(cols)
        print("-" * len(cols))
    if not row.get("traced"):
        print(f"{row['model']:14s} NOT TRACED: {row['error']}")
        return
    line = (f"{row['model']:14s} {row['groups']:6d} {row['prunable']:5d} {row['inexact']:5d} "
            f"{row['params']:>7d}->{row['params_after']:<7d} "
            f"{row['macs'] / 1e6:7.2f}->{row['macs_after'] / 1e6:<7.2f} {row['verify']:8.1e} "
            f"{row['build_s']:6.2f} {row['apply_s']:6.2f}")
    if have_tp:
        if row.get("tp_ok"):
            status = "ok" if row["tp_same_shape"] and row["tp_finite"] else "BAD OUTPUT"
            line += (f" | {status:18s} {row.get('tp_params', 0):9d} "
                     f"{row.get('tp_macs', 0) / 1e6:8.2f} {row['tp_s']:6.2f}")
        else:
            line += f" | FAILED {row['tp_error'][:60]}"
    print(line)


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
