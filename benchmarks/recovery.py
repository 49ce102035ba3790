"""Recovery and training-time pruning: accuracy vs MACs on two small tasks.

Tasks (both offline):
- ``digits``: scikit-learn's handwritten digits upsampled to 16x16, a 4-conv BN classifier
  (metric: test accuracy);
- ``circle_square``: 5-label segmentation of noisy filled/hollow squares, disks and rings
  (``graphprune.train.data.circle_square``), a dilated conv net with a residual block
  (metric: test mean IoU over the 5 labels).

A dense model is trained, then every method removes about ``target`` of its MACs and gets the same
recovery budget (``F`` epochs; training-time methods spend half of it on their own training and
half fine-tuning the slim model):

- one-shot L1 pruning + fine-tuning, with the three restarts: continue, rewind (to the weights
  after epoch 1 of dense training), re-initialise;
- iterative (3 prune-retrain steps, constant schedule), and iterative with "auto" per-group
  ceilings from the gradient-singularity redundancy estimate;
- regularise-then-prune: group lasso, BN-scale sparsity (network slimming, pruned by bn_scale),
  auto-balanced regularisation (pruned by magnitude);
- SPP, C-SGD (k-means clusters, centripetal SGD, lossless merge), AOFP (to the MACs target);
- unstructured magnitude sparsity (90%, retrained with masks) converted to structure by removing
  dead channels (reaches whatever the sparsity killed; usually little).

SPP and C-SGD take a channel ratio; it is set so that the uniform local selection of that ratio
removes ``target`` of the MACs, and the table reports what each method actually reached.

    python benchmarks/recovery.py --quick     # a few minutes on one CPU core
    python benchmarks/recovery.py             # larger task, more epochs, 3 seeds per method

Writes ``benchmarks/results/recovery.json`` and ``benchmarks/results/recovery.png``.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import graphprune as gp  # noqa: E402
from graphprune import train as gt  # noqa: E402
from graphprune.train.data import circle_square, digits  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


# --- models ------------------------------------------------------------------------------------------
def cbr(i: int, o: int, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(i, o, 3, padding=dilation, dilation=dilation, bias=False),
                         nn.BatchNorm2d(o), nn.ReLU())


class DigitsNet(nn.Module):
    def __init__(self, w: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(cbr(1, w), cbr(w, 2 * w), nn.MaxPool2d(2), cbr(2 * w, 2 * w),
                                      nn.MaxPool2d(2), cbr(2 * w, 4 * w))
        self.head = nn.Linear(4 * w, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


class SegNet(nn.Module):
    def __init__(self, w: int = 16) -> None:
        super().__init__()
        self.a, self.b, self.c, self.d = cbr(1, w), cbr(w, w, 2), cbr(w, w, 4), cbr(w, w, 8)
        self.e = cbr(w, w, 1)
        self.out = nn.Conv2d(w, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.b(self.a(x))
        y = self.d(self.c(y)) + y  # residual: a group spanning b and d
        return self.out(self.e(y))


# --- metrics -----------------------------------------------------------------------------------------
def miou(model: nn.Module, data, classes: int = 5) -> float:
    conf = torch.zeros(classes, classes, dtype=torch.long)
    model.eval()
    with torch.no_grad():
        for x, y in data:
            p = model(x).argmax(1)
            conf += torch.bincount(y.flatten() * classes + p.flatten(), minlength=classes**2).view(classes, -1)
    inter = conf.diag().double()
    union = conf.sum(0).double() + conf.sum(1).double() - inter
    return float((inter / union.clamp_min(1)).mean())


# --- the experiment ------------------------------------------------------------------------------------
def _macs_to_channel_ratio(model: nn.Module, dg, ex, target: float) -> float:
    """The uniform local channel ratio whose magnitude selection removes closest to ``target`` of the MACs."""
    scores = gp.score("l1", model, dg)
    est = gp.plan.CountEstimator(dg)
    base = est.counts({})[1]
    grid = [i / 100 for i in range(0, 95)]
    return min(grid, key=lambda r: abs(1 - est.counts(gp.select(dg, scores, r))[1] / base - target))


def run_task(name: str, model: nn.Module, train, test, metric: Callable, args, target: float,
             dense_cache: dict, cfg: dict, seed: int = 0) -> list[dict]:
    ex = (train[0][0][:2],)
    kw = dict(lr=cfg["lr"], optimizer=cfg["optimizer"], weight_decay=cfg.get("weight_decay", 0.0),
              progress=False)
    if name not in dense_cache:  # dense training (shared by the targets and seeds)
        torch.manual_seed(0)
        snap = gt.Snapshot(epoch=0)
        t0 = time.perf_counter()
        gt.finetune(model, train, epochs=cfg["epochs"], plugins=[snap], **{**kw, "lr": cfg["lr_dense"]})
        dense_cache[name] = (model, snap.state, time.perf_counter() - t0)
        print(f"[{name}] dense: metric {metric(model):.4f} ({dense_cache[name][2]:.0f}s)", flush=True)
    dense, rewind_state, _ = dense_cache[name]
    dg = gp.DependencyGraph.build(dense, ex)
    base = gp.count(dense, ex)
    F_ep = cfg["finetune_epochs"]
    half = max(1, F_ep // 2)
    rc = _macs_to_channel_ratio(dense, dg, ex, target)
    rows: list[dict] = []

    def record(method: str, slim: nn.Module, pruned_metric: float | None, t0: float, **extra) -> None:
        c = gp.count(slim, ex)
        row = {"task": name, "target": target, "seed": seed, "method": method, "macs": c.macs, "params": c.params,
               "macs_frac": c.macs / base.macs, "params_frac": c.params / base.params,
               "metric_pruned": pruned_metric, "metric": metric(slim),
               "seconds": time.perf_counter() - t0, **extra}
        rows.append(row)
        print(f"[{name} {target:.0%}] {method:<22} MACs {row['macs_frac']:.3f}  "
              f"pruned {'' if pruned_metric is None else f'{pruned_metric:.4f}'}  final {row['metric']:.4f}"
              f"  ({row['seconds']:.0f}s)", flush=True)

    torch.manual_seed(seed)
    rows.append({"task": name, "target": target, "seed": seed, "method": "dense", "macs": base.macs, "params": base.params,
                 "macs_frac": 1.0, "params_frac": 1.0, "metric_pruned": None, "metric": metric(dense),
                 "seconds": dense_cache[name][2]})

    def fresh() -> nn.Module:
        return copy.deepcopy(dense)

    # one-shot, three restarts
    plan = gp.select(dg, gp.score("l1", dense, dg), target, target="macs", model=dense, example_inputs=ex)
    for mode in gt.MODES:
        t0 = time.perf_counter()
        slim = gt.restart(dense, dg, plan, mode, checkpoint=rewind_state, seed=0)
        pm = metric(slim)
        gt.finetune(slim, train, epochs=F_ep, **kw)
        record(f"one-shot/{mode}", slim, pm, t0)

    # iterative, with and without auto ceilings
    # Same budget: the F epochs are spread over the 3 retrains.
    per_step = [F_ep // 3 + (1 if i < F_ep % 3 else 0) for i in range(3)]

    def retrain(m: nn.Module, step: int) -> None:
        if per_step[step - 1]:
            gt.finetune(m, train, epochs=per_step[step - 1], **kw)

    for label, ceil in (("iterative-3", None), ("iterative-3/auto", "auto")):
        t0 = time.perf_counter()
        res = gt.iterative_prune(fresh(), ex, ratio=target, steps=3, method="l1", target="macs", data=train,
                                 retrain=retrain, ceilings=ceil, progress=False)
        record(label, res.model, None, t0, ceilings=res.ceilings)

    # regularise, then prune
    regs = {
        "group-lasso": (lambda d: gt.GroupLasso(d, args.reg), "l1"),
        "bn-slimming": (lambda d: gt.BNSparsity(d, args.reg * 0.1), "bn_scale"),
        "auto-balanced": (lambda d: gt.AutoBalanced(d, rc, args.reg), "l2"),
    }
    for label, (make, crit) in regs.items():
        t0 = time.perf_counter()
        m = fresh()
        d = gp.DependencyGraph.build(m, ex)
        gt.finetune(m, train, epochs=half, plugins=[make(d)], **kw)
        p = gp.select(d, gp.score(crit, m, d), target, target="macs", model=m, example_inputs=ex)
        slim = gp.apply(m, d, p)
        pm = metric(slim)
        gt.finetune(slim, train, epochs=F_ep - half, **kw)
        record(label, slim, pm, t0)

    # training-time methods
    t0 = time.perf_counter()
    m = fresh()
    d = gp.DependencyGraph.build(m, ex)
    steps_per_epoch = len(train)
    res_spp = gt.spp(m, d, train, rc, epochs=half, A=min(0.5, 8.0 / (half * steps_per_epoch)), **kw)
    pm = metric(res_spp.model)
    gt.finetune(res_spp.model, train, epochs=F_ep - half, **kw)
    record("spp", res_spp.model, pm, t0, reached=res_spp.reached)

    t0 = time.perf_counter()
    m = fresh()
    d = gp.DependencyGraph.build(m, ex)
    res_c = gt.csgd(m, d, train, rc, epochs=half, centripetal=args.centripetal, **kw)
    pm = metric(res_c.model)
    gt.finetune(res_c.model, train, epochs=F_ep - half, **kw)
    record("c-sgd", res_c.model, pm, t0, spread=res_c.spread)

    t0 = time.perf_counter()
    m = fresh()
    d = gp.DependencyGraph.build(m, ex)
    res_a = gt.aofp(m, d, train, target, epochs=half, rounds=2, threshold=0.05, **kw)
    pm = metric(res_a.model)
    gt.finetune(res_a.model, train, epochs=F_ep - half, **kw)
    record("aofp", res_a.model, pm, t0, reached=res_a.reached)

    t0 = time.perf_counter()
    m = fresh()
    masks = gt.magnitude_sparsify(m, args.sparsity, include_1d=True)
    gt.finetune(m, train, epochs=half, plugins=[gt.WeightMask(masks)], **kw)
    st = gt.to_structured(m, ex)
    pm = metric(st.model)
    gt.finetune(st.model, train, epochs=F_ep - half, **kw)
    record("unstructured→dead", st.model, pm, t0, max_error=st.max_error)
    return rows


def aggregate(rows: list[dict]) -> list[dict]:
    """Mean (and spread over seeds) per task, target and method, in first-seen order."""
    out: dict[tuple, dict] = {}
    for r in rows:
        key = (r["task"], r["target"], r["method"])
        a = out.setdefault(key, {**r, "metrics": [], "pruned": [], "macs_fracs": [], "params_fracs": []})
        a["metrics"].append(r["metric"])
        a["macs_fracs"].append(r["macs_frac"])
        a["params_fracs"].append(r["params_frac"])
        if r["metric_pruned"] is not None:
            a["pruned"].append(r["metric_pruned"])
    for a in out.values():
        n = len(a["metrics"])
        a["metric"] = sum(a["metrics"]) / n
        a["metric_std"] = (sum((m - a["metric"]) ** 2 for m in a["metrics"]) / max(n - 1, 1)) ** 0.5
        a["metric_pruned"] = sum(a["pruned"]) / len(a["pruned"]) if a["pruned"] else None
        a["macs_frac"] = sum(a["macs_fracs"]) / n
        a["params_frac"] = sum(a["params_fracs"]) / n
        a["seeds"] = n
    return list(out.values())


def table(rows: list[dict]) -> str:
    agg = aggregate(rows)
    multi = any(a["seeds"] > 1 for a in agg)
    lines = ["| task | target | method | MACs | params | metric pruned | metric final |",
             "|---|---|---|---|---|---|---|"]
    for r in agg:
        pm = "" if r["metric_pruned"] is None else f"{r['metric_pruned']:.3f}"
        fm = f"{r['metric']:.3f}" + (f" ± {r['metric_std']:.3f}" if multi else "")
        lines.append(f"| {r['task']} | {r['target']:.0%} | {r['method']} | {r['macs_frac']:.3f} | "
                     f"{r['params_frac']:.3f} | {pm} | {fm} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install matplotlib)")
        return False
    rows = aggregate(rows)
    tasks = sorted({r["task"] for r in rows})
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.5 * len(tasks), 4.8), squeeze=False)
    methods = sorted({r["method"] for r in rows})
    markers = "osD^v<>pP*hX"
    for ax, task in zip(axes[0], tasks):
        for i, meth in enumerate(methods):
            pts = [(r["macs_frac"], r["metric"]) for r in rows if r["task"] == task and r["method"] == meth]
            if pts:
                xs, ys = zip(*pts)
                ax.scatter(xs, ys, marker=markers[i % len(markers)], s=55 if meth != "dense" else 110,
                           label=meth, color=plt.cm.tab20(i / max(len(methods) - 1, 1)))
        ax.set_xlabel("MACs (fraction of dense)")
        ax.set_ylabel("test accuracy" if task == "digits" else "test mean IoU")
        ax.set_title(task)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller nets and data, fewer epochs, one seed")
    ap.add_argument("--tasks", default="digits,circle_square")
    ap.add_argument("--targets", default=None, help="comma list of MACs fractions to remove")
    ap.add_argument("--epochs", type=int, default=None, help="dense training epochs")
    ap.add_argument("--finetune-epochs", type=int, default=None, help="recovery budget per method")
    ap.add_argument("--seeds", type=int, default=None, help="repeats of every method (1 quick, 3 full)")
    ap.add_argument("--reg", type=float, default=1e-3, help="regulariser strength")
    ap.add_argument("--centripetal", type=float, default=0.1)
    ap.add_argument("--sparsity", type=float, default=0.95, help="unstructured sparsity before dead-channel removal")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 is fastest on a busy machine)")
    ap.add_argument("--out", type=Path, default=RESULTS / "recovery.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    seeds = args.seeds or (1 if args.quick else 3)
    targets = [float(t) for t in (args.targets or "0.5,0.7").split(",")]
    t_start = time.perf_counter()
    rows: list[dict] = []
    cache: dict = {}
    configs: dict[str, dict] = {}
    for task in args.tasks.split(","):
        torch.manual_seed(0)
        if task == "digits":
            train, test = digits(16, batch_size=64)
            model: nn.Module = DigitsNet(16)
            metric = lambda m, test=test: gt.evaluate(m, test)  # noqa: E731
            cfg = {"optimizer": "sgd", "lr_dense": 0.05, "lr": 0.02, "weight_decay": 5e-4,
                   "epochs": 15 if args.quick else 30, "finetune_epochs": 6 if args.quick else 10}
        elif task == "circle_square":
            n, size = (512, 24) if args.quick else (1024, 32)
            train = circle_square(n, size, batch_size=32, seed=0)
            test = circle_square(n // 4, size, batch_size=64, seed=1)
            model = SegNet(12 if args.quick else 16)
            metric = lambda m, test=test: miou(m, test)  # noqa: E731
            cfg = {"optimizer": "adam", "lr_dense": 1e-2, "lr": 3e-3,
                   "epochs": 25 if args.quick else 40, "finetune_epochs": 6 if args.quick else 10}
        else:
            raise SystemExit(f"unknown task {task!r}")
        cfg["epochs"] = args.epochs or cfg["epochs"]
        cfg["finetune_epochs"] = args.finetune_epochs or cfg["finetune_epochs"]
        configs[task] = cfg
        for target in targets:
            for seed in range(seeds):
                rows += run_task(task, model, train, test, metric, args, target, cache, cfg, seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"quick": args.quick, "configs": configs, "seeds": seeds, "targets": targets, "reg": args.reg,
            "centripetal": args.centripetal, "sparsity": args.sparsity, "threads": args.threads,
            "torch": torch.__version__, "python": platform.python_version(),
            "seconds": time.perf_counter() - t_start}
    args.out.write_text(json.dumps({"meta": meta, "rows": rows, "table": table(rows)}, indent=1))
    png = args.out.with_suffix(".png")
    plotted = plot(rows, png)
    print(table(rows))
    print(f"wrote {args.out}" + (f" and {png}" if plotted else "") + f" in {meta['seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
