"""Importance criteria in the low-data regime, on real data that ships with scikit-learn.

A zoo CIFAR ResNet-20 is trained on scikit-learn's handwritten digits (8x8 greyscale,
upsampled to 16x16 and repeated to 3 channels; 1297 train / 500 test images). Then,
with only 100 training images (10 per class) for scoring and fine-tuning, every
criterion prunes 30/50/70% of the MACs (``gp.select(target="macs")``, hit within 1%)
in local and global scope, and the table reports

- test accuracy right after pruning (no fine-tuning) and after a short fine-tuning on
  the same 100 images,
- each criterion's Spearman rank correlation with ``oracle`` (the exact loss change of
  removing each channel alone): over all channels pooled, and the mean within groups
  (``taylor_fo`` is the signed first-order estimate of that loss change, ``taylor``
  its square as in Molchanov et al.),
- the scoring time.

With ``torch-pruning`` installed, its ``GroupMagnitudeImportance`` and
``GroupTaylorImportance`` (with its own pruner, ratio searched to the same MACs)
run side by side.

    python benchmarks/criteria.py            # ~1 h on 2 busy cores (15 min of it training, cached)
    python benchmarks/criteria.py --quick    # ~10 min on 2 busy cores: width 8, local scope only

Writes ``benchmarks/results/criteria.json`` (``criteria_quick.json`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import graphprune as gp  # noqa: E402

TARGETS = (0.3, 0.5, 0.7)
RESULTS = Path(__file__).resolve().parent / "results"


# --- data and model ----------------------------------------------------------------------------------
def load_digits(size: int = 16, test: int = 500, seed: int = 0):
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    x = (x - x.mean()) / x.std()
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    te, tr = perm[:test], perm[test:]
    return x[tr], y[tr], x[te], y[te]


def few_shot(x: torch.Tensor, y: torch.Tensor, per_class: int = 10, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.cat([torch.nonzero(y == c).flatten()[torch.randperm(int((y == c).sum()), generator=g)[:per_class]]
                     for c in range(10)])
    return x[idx], y[idx]


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random shifts of up to 2 pixels."""
    pad = F.pad(x, (2, 2, 2, 2))
    i, j = torch.randint(0, 5, (2,), generator=gen).tolist()
    return pad[:, :, i:i + x.shape[2], j:j + x.shape[3]]


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    was = model.training
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(x[i:i + 250]).argmax(1) for i in range(0, len(x), 250)])
    model.train(was)
    return float((pred == y).float().mean())


def train(model, x, y, epochs: int, lr: float = 0.05, batch: int = 64, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    steps = epochs * ((len(x) + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), batch):
            b = perm[i:i + batch]
            loss = F.cross_entropy(model(augment(x[b], gen)), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    return model


def finetune(model, x, y, steps: int, lr: float = 0.01, seed: int = 0):
    """A short fine-tuning on the few-shot set: SGD, batches of 50, BatchNorm statistics adapt."""
    model = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()
    for _ in range(steps):
        b = torch.randperm(len(x), generator=gen)[:50]
        loss = F.cross_entropy(model(augment(x[b], gen)), y[b])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model


def trained_model(width: int, epochs: int, data, cache: Path):
    xtr, ytr, xte, yte = data
    model, _ = gp.zoo.create("resnet20", num_classes=10, width=width)
    path = cache / f"digits16_resnet20_w{width}_e{epochs}.pt"
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval(), 0.0
    t = time.time()
    train(model, xtr, ytr, epochs)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model.eval(), time.time() - t


# --- criteria ------------------------------------------------------------------------------------------
def criteria(quick: bool) -> dict[str, dict]:
    """name -> (method, options, global-scope normalisation).

    In global scope the loss-based criteria and ``bn_scale`` rank raw scores (loss
    units and gammas compare across groups); magnitudes grow with the size of a
    channel's slices, so ``l1``/``l2`` divide each group by its mean score, and
    ``l2_raw`` shows the unnormalised ranking (raw L1 favours pruning the narrow
    early layers so much that it collapses: 0.11 accuracy at -30% MACs).
    """
    return {
        "random": {"method": "random", "options": {"seed": 0}, "normalize": None},
        "l1": {"method": "magnitude", "options": {"p": 1}, "normalize": "mean"},
        "l2": {"method": "magnitude", "options": {"p": 2}, "normalize": "mean"},
        "l2_raw": {"method": "magnitude", "options": {"p": 2}, "normalize": None},
        "bn_scale": {"method": "bn_scale", "options": {}, "normalize": None},
        "taylor": {"method": "taylor", "options": {}, "normalize": None},
        "taylor_fo": {"method": "taylor", "options": {"square": False}, "normalize": None},
        "hessian": {"method": "hessian", "options": {}, "normalize": None},
        "oracle": {"method": "oracle", "options": {"progress": False}, "normalize": None},
        "shapley": {"method": "shapley", "options": {"permutations": 2 if quick else 5, "progress": False},
                    "normalize": None},
    }


def spearman(a: dict, b: dict) -> tuple[float, float]:
    from scipy.stats import spearmanr

    keys = sorted(set(a) & set(b))
    if not keys:
        return float("nan"), float("nan")
    pooled = spearmanr(np.concatenate([a[k] for k in keys]), np.concatenate([b[k] for k in keys]))[0]
    within = [spearmanr(a[k], b[k])[0] for k in keys if len(a[k]) > 2 and np.std(a[k]) > 0 and np.std(b[k]) > 0]
    return float(pooled), float(np.mean(within)) if within else float("nan")


# --- torch-pruning ----------------------------------------------------------------------------------
def tp_prune(tp, model, kind: str, macs_ratio: float, scope: str, few, example, base_macs: int):
    """torch-pruning's own pruner with its importance; ratio bisected to the MACs target."""
    fx, fy = few

    def run(ratio: float):
        m = copy.deepcopy(model).eval()
        imp = tp.importance.GroupMagnitudeImportance(p=2) if kind == "magnitude" else \
            tp.importance.GroupTaylorImportance()
        pruner = tp.pruner.MetaPruner(m, example, imp, pruning_ratio=ratio, global_pruning=scope == "global",
                                      ignored_layers=[m.fc], max_pruning_ratio=0.95)
        if kind == "taylor":
            m.zero_grad()
            for i in range(0, len(fx), 50):
                (F.cross_entropy(m(fx[i:i + 50]), fy[i:i + 50]) * len(fx[i:i + 50]) / len(fx)).backward()
        pruner.step()
        m.zero_grad()
        return m, 1 - gp.count(m, example).macs / base_macs

    lo, hi, best = 0.0, 0.95, None
    for _ in range(10):
        mid = (lo + hi) / 2
        m, got = run(mid)
        if best is None or abs(got - macs_ratio) < abs(best[1] - macs_ratio):
            best = (m, got)
        if abs(got - macs_ratio) <= 0.004:
            break
        lo, hi = (mid, hi) if got < macs_ratio else (lo, mid)
    return best


# --- main -------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="width 8, 2 Shapley permutations, local scope only")
    ap.add_argument("--width", type=int, default=None, help="ResNet-20 base width (default 16; 8 with --quick)")
    ap.add_argument("--epochs", type=int, default=None, help="training epochs (default 30; 15 with --quick)")
    ap.add_argument("--finetune-steps", type=int, default=40)
    ap.add_argument("--scopes", default=None, help="comma list of local,global")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "graphprune-bench")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--no-torch-pruning", action="store_true")
    ap.add_argument("--criteria", default=None, help="comma list: run only these (oracle is scored anyway)")
    ap.add_argument("--merge", action="store_true",
                    help="replace the rows run now in the existing JSON, keep the others")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    width = args.width or (8 if args.quick else 16)
    epochs = args.epochs or (15 if args.quick else 30)
    scopes = (args.scopes or ("local" if args.quick else "local,global")).split(",")
    out = args.out or RESULTS / ("criteria_quick.json" if args.quick else "criteria.json")
    torch.manual_seed(0)

    data = load_digits()
    xtr, ytr, xte, yte = data
    model, train_s = trained_model(width, epochs, data, args.cache)
    base_acc = accuracy(model, xte, yte)
    fx, fy = few_shot(xtr, ytr)
    batches = [(fx[i:i + 50], fy[i:i + 50]) for i in range(0, len(fx), 50)]
    example = (xte[:2],)
    dg = gp.DependencyGraph.build(model, example)
    base = gp.count(model, example)
    print(f"resnet20 width {width}: test accuracy {base_acc:.4f} (trained in {train_s:.0f}s; 0 = cached), "
          f"{base.macs / 1e6:.2f} MMACs/image, {base.params} params; "
          f"{sum(g.size for g in dg.groups if g.prunable)} prunable channels in "
          f"{sum(g.prunable for g in dg.groups)} groups; scoring/fine-tuning on {len(fx)} images", flush=True)

    specs = criteria(args.quick)
    wanted = list(specs) if args.criteria is None else args.criteria.split(",")
    unknown = set(wanted) - set(specs)
    if unknown:
        ap.error(f"unknown criteria {sorted(unknown)}; choose from {list(specs)}")
    scores, timing = {}, {}
    for name, spec in specs.items():
        if name not in wanted and name != "oracle":
            continue
        t = time.time()
        scores[name] = gp.score(spec["method"], model, dg, data=batches, loss_fn=F.cross_entropy, **spec["options"])
        timing[name] = time.time() - t
        print(f"  scored {name:9s} in {timing[name]:6.1f}s", flush=True)

    rows = []
    for name, spec in specs.items():
        if name not in wanted:
            continue
        pooled, within = spearman(scores[name], scores["oracle"])
        row = {"criterion": name, "spearman_pooled": pooled, "spearman_within": within,
               "score_s": timing[name], "results": {}}
        for scope in scopes:
            for ratio in TARGETS:
                plan = gp.select(dg, scores[name], ratio, target="macs", scope=scope,
                                 normalize=spec["normalize"] if scope == "global" else None,
                                 model=model, example_inputs=example)
                slim = gp.apply(model, dg, plan)
                got = 1 - gp.count(slim, example).macs / base.macs
                acc0 = accuracy(slim, xte, yte)
                acc1 = accuracy(finetune(slim, fx, fy, args.finetune_steps), xte, yte)
                row["results"][f"{scope}@{ratio}"] = {"macs_removed": got, "acc": acc0, "acc_ft": acc1}
                print(f"  {name:9s} {scope:6s} {ratio:.0%}: MACs -{got:.3f} acc {acc0:.4f} -> ft {acc1:.4f}",
                      flush=True)
        rows.append(row)

    if not args.no_torch_pruning:
        try:
            import torch_pruning as tp
        except ImportError:
            tp = None
            print("  torch-pruning not installed: skipped (pip install torch-pruning==1.6.1)")
        if tp is not None:
            for kind in ("magnitude", "taylor"):
                row = {"criterion": f"tp_{kind}", "spearman_pooled": None, "spearman_within": None,
                       "score_s": None, "results": {}}
                for scope in scopes:
                    for ratio in TARGETS:
                        m, got = tp_prune(tp, model, kind, ratio, scope, (fx, fy), example, base.macs)
                        acc0 = accuracy(m, xte, yte)
                        acc1 = accuracy(finetune(m, fx, fy, args.finetune_steps), xte, yte)
                        row["results"][f"{scope}@{ratio}"] = {"macs_removed": got, "acc": acc0, "acc_ft": acc1}
                        print(f"  tp_{kind:9s} {scope:6s} {ratio:.0%}: MACs -{got:.3f} acc {acc0:.4f} -> "
                              f"ft {acc1:.4f}", flush=True)
                rows.append(row)

    if args.merge and out.exists():
        done = {r["criterion"] for r in rows}
        old = [r for r in json.loads(out.read_text())["rows"] if r["criterion"] not in done]
        order = list(specs) + ["tp_magnitude", "tp_taylor"]
        rows = sorted(rows + old, key=lambda r: order.index(r["criterion"]) if r["criterion"] in order else 99)
    table = render(rows, scopes, base_acc, width, len(fx))
    print()
    print(table)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "setup": {"model": "resnet20", "width": width, "epochs": epochs, "input": "digits 16x16x3",
                  "train": len(xtr), "test": len(xte), "few_shot": len(fx), "finetune_steps": args.finetune_steps,
                  "base_accuracy": base_acc, "base_macs": base.macs, "base_params": base.params,
                  "quick": args.quick, "torch": torch.__version__, "python": platform.python_version(),
                  "threads": torch.get_num_threads(), "cpu_count": os.cpu_count()},
        "rows": rows, "table": table}, indent=1))
    print(f"\nwrote {out}")
    return 0


def render(rows, scopes, base_acc: float, width: int, few: int) -> str:
    head = ["criterion", "rho pooled", "rho within", "score s"]
    for scope in scopes:
        head += [f"{scope} -{int(r * 100)}% MACs" for r in TARGETS]
    lines = [f"ResNet-20 (width {width}) on digits, test accuracy {base_acc:.3f} unpruned; "
             f"cells: accuracy without fine-tuning / after fine-tuning on {few} images; "
             "rho: Spearman with oracle",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def f(v, fmt):
        return "—" if v is None or (isinstance(v, float) and np.isnan(v)) else format(v, fmt)

    for row in rows:
        cells = [row["criterion"], f(row["spearman_pooled"], ".2f"), f(row["spearman_within"], ".2f"),
                 f(row["score_s"], ".1f")]
        for scope in scopes:
            for r in TARGETS:
                res = row["results"].get(f"{scope}@{r}")
                cell = "—" if res is None else f"{res['acc']:.3f} / {res['acc_ft']:.3f}"
                if res is not None and abs(res["macs_removed"] - r) > 0.01:
                    cell += f" (-{res['macs_removed']:.0%})"
                cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
