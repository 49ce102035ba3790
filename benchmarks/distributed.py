"""Distributed scoring: two ranks against one on the same data (same result, time, work per rank).

A zoo ResNet-20 (CIFAR sizes, random weights) is scored on ``--batches`` batches of
``--batch`` random 3x32x32 images with ``graphprune.distributed`` under a gloo process group
on the CPU (``torch.multiprocessing.spawn``, one intra-op thread per rank), first with one
rank, then with two:

- ``taylor``, ``hessian`` (Fisher) and ``oracle`` (on the first ``--groups`` prunable
  groups): each rank scores its shard of the batches (``split="data"``), the sums are
  all-reduced;
- ``shapley`` (first ``--groups`` groups, ``--permutations`` permutations, 2 batches,
  ablations vectorised in blocks of 8): every rank holds the data, the ablations are shared
  out (``split="ablations"``).

Reported per criterion: seconds with 1 and 2 ranks (slowest rank, between barriers), their
ratio, each rank's CPU seconds, the batches or ablations each rank computed, and the
largest relative difference between the 2-rank and the 1-rank scores. The ratio is what this machine gives: with 2
cores shared with other jobs, two ranks compete for them, so it says more about the machine
than about the method; the work per rank is the machine-independent part.

    python benchmarks/distributed.py [--batches 8 --batch 16 --permutations 2 --groups 2]   # ~2 min

Writes ``benchmarks/results/distributed.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import graphprune as gp  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
CRITERIA = ("taylor", "hessian", "oracle", "shapley")
SPLIT = {"taylor": "data", "hessian": "data", "oracle": "data", "shapley": "ablations"}


def _data(batches: int, batch: int) -> list:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 10, (batch,), generator=g))
            for _ in range(batches)]


def _rank(rank: int, world: int, init: str, out: str, args: dict) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        model, x = gp.zoo.create("resnet20")
        model.eval()
        dg = gp.DependencyGraph.build(model, x)
        data = _data(args["batches"], args["batch"])
        rows = {}
        first = [g.id for g in dg.groups if g.prunable][:args["groups"]]
        for name in CRITERIA:
            split = SPLIT[name]
            options = {"oracle": dict(groups=first, batch_ablations=8),
                       "shapley": dict(groups=first, permutations=args["permutations"], batch_ablations=8,
                                       max_batches=2, progress=False)}.get(name, {})
            mine = gp.distributed.shard(data) if split == "data" else data
            dist.barrier()
            t0, c0 = time.perf_counter(), time.process_time()
            with gp.distributed.scoring(split=split) as share:
                scores = gp.score(name, model, dg, data=mine, loss_fn=F.cross_entropy, **options)
            cpu = time.process_time() - c0
            dist.barrier()
            seconds = time.perf_counter() - t0
            rows[name] = {"seconds": seconds, "cpu_seconds": cpu, "batches": len(mine),
                          "ablations": share.ablations,
                          "scores": {int(k): v.tolist() for k, v in scores.items()}}
        with open(Path(out) / f"rank{rank}.json", "w") as f:
            json.dump(rows, f)
    finally:
        dist.destroy_process_group()


def run(world: int, args: dict) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        init = f"file://{Path(tmp) / 'init'}"
        mp.spawn(_rank, args=(world, init, tmp, args), nprocs=world, join=True)
        return [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(world)]


def _max_rel(a: dict, b: dict) -> float:
    worst = 0.0
    for gid, s in b.items():
        s, t = np.asarray(s), np.asarray(a[gid])
        worst = max(worst, float(np.max(np.abs(t - s)) / max(np.max(np.abs(s)), 1e-30)))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--permutations", type=int, default=2)
    parser.add_argument("--groups", type=int, default=2, help="groups oracle and shapley ablate")
    args = vars(parser.parse_args())
    one, two = run(1, args), run(2, args)
    rows = []
    for name in CRITERIA:
        t1 = one[0][name]["seconds"]
        t2 = max(r[name]["seconds"] for r in two)
        work = "ablations" if SPLIT[name] == "ablations" else "batches"
        rows.append({
            "criterion": name, "split": SPLIT[name],
            "seconds_1_rank": t1, "seconds_2_ranks": t2, "ratio": t1 / t2,
            "cpu_seconds_1_rank": one[0][name]["cpu_seconds"],
            "cpu_seconds_per_rank_2_ranks": [r[name]["cpu_seconds"] for r in two],
            f"{work}_1_rank": one[0][name][work], f"{work}_per_rank_2_ranks": [r[name][work] for r in two],
            "max_rel_diff": max(_max_rel(r[name]["scores"], one[0][name]["scores"]) for r in two),
        })
    print(f"{'criterion':10} {'split':10} {'1 rank s':>9} {'2 ranks s':>10} {'speed-up':>9} "
          f"{'CPU s, 1 rank':>14} {'CPU s per rank':>15} {'work':>10} {'1 rank':>7} {'per rank':>9} "
          f"{'max rel diff':>13}")
    for r in rows:
        work = "ablations" if r["split"] == "ablations" else "batches"
        per = " ".join(f"{c:.1f}" for c in r["cpu_seconds_per_rank_2_ranks"])
        print(f"{r['criterion']:10} {r['split']:10} {r['seconds_1_rank']:9.2f} {r['seconds_2_ranks']:10.2f} "
              f"{r['ratio']:8.2f}x {r['cpu_seconds_1_rank']:14.1f} {per:>15} {work:>10} {r[f'{work}_1_rank']:>7} "
              f"{str(r[f'{work}_per_rank_2_ranks']):>9} {r['max_rel_diff']:13.1e}")
    RESULTS.mkdir(exist_ok=True)
    meta = {"torch": torch.__version__, "python": platform.python_version(), "cpus": os.cpu_count(),
            "load_average_1min": os.getloadavg()[0], "model": "resnet20 (zoo, random weights)",
            "threads_per_rank": 1, "backend": "gloo", **args}
    (RESULTS / "distributed.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
