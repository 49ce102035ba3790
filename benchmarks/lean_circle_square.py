"""LEAN on the "circle-square" segmentation task (Schoonhoven et al.), reproduced in graphprune.

The data follow the LEAN authors' public generator: images with 24 non-overlapping objects of
size n/8 (filled squares, hollow squares, disks, rings; intensity uniform in [0.2, 1]) plus
N(0, noise^2) noise; the label is the shape class (5 labels with background; a hollow shape is
labelled over its full extent). An MS-D network (width 1, dilations 1..10) and a small U-Net are
trained, then pruned with LEAN, individual L1 and individual operator norm on a geometric schedule
of kept-kernel fractions from --start-keep down to --final-keep, with a short retraining after every
step (kernel masks held at zero). A control run gives the unpruned model the same retraining epochs. Reported per keep ratio: global pixel accuracy on the test set,
kept kernels and kept channels. As in the LEAN experiments, the final 1x1 layer is left out of the
pruning graph (graphprune's default ``exclude=None``).

    PYTHONPATH=. python benchmarks/lean_circle_square.py                 # quick CPU default (64x64)
    PYTHONPATH=. python benchmarks/lean_circle_square.py --paper         # 256x256, 500/100/50, depth 50, 50 epochs

The quick default shrinks the task for a CPU budget (see ``--help``); its numbers are not the
paper's. Results: benchmarks/results/lean_circle_square.json and .png.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import graphprune as gp  # noqa: E402
from graphprune import lean  # noqa: E402
from graphprune.train import evaluate, finetune  # noqa: E402

PAPER = {"lean": 0.90, "l1": 0.81, "opnorm": 0.77}  # MS-D, 5% of kernels kept (LEAN paper, CS data)
METHODS = {"lean": "LEAN", "l1": "individual L1", "opnorm": "individual op-norm"}


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------
def _templates(sz: int) -> np.ndarray:
    t = np.zeros((4, sz, sz), np.float32)
    t[0] = 1
    t[1] = 1
    q = max(sz // 4, 1)
    t[1][q:-q, q:-q] = 0
    xx, yy = np.mgrid[-1:1:1j * sz, -1:1:1j * sz]
    t[2] = xx ** 2 + yy ** 2 < 1
    t[3] = xx ** 2 + yy ** 2 < 1
    t[3][xx ** 2 + yy ** 2 < 0.25] = 0
    return t


def generate(count: int, size: int, rng: np.random.Generator, objects: int = 24,
             noise: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` noisy images ``[N, 1, size, size]`` and shape labels ``[N, size, size]`` (0..4)."""
    sz = size // 8
    tmpl = _templates(sz)
    xs = np.zeros((count, 1, size, size), np.float32)
    ys = np.zeros((count, size, size), np.int64)
    for i in range(count):
        im, lab = xs[i, 0], ys[i]
        for k in range(objects):
            tp = k % 4
            for _ in range(10_000):
                x, y = (rng.random(2) * (size - sz)).astype(int)
                if lab[x:x + sz, y:y + sz].max() == 0 and im[x:x + sz, y:y + sz].max() == 0:
                    break
            im[x:x + sz, y:y + sz] = tmpl[tp] * (rng.random() * 0.8 + 0.2)
            lab[x:x + sz, y:y + sz] = tmpl[2 * (tp // 2)] * (tp + 1)
        im += rng.normal(size=im.shape).astype(np.float32) * noise
    return torch.from_numpy(xs), torch.from_numpy(ys)


class Batches:
    """Re-iterable mini-batches, reshuffled every pass (seeded)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch: int, shuffle: bool, seed: int = 0) -> None:
        self.x, self.y, self.batch, self.shuffle = x, y, batch, shuffle
        self.gen = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return math.ceil(len(self.x) / self.batch)

    def __iter__(self):
        order = torch.randperm(len(self.x), generator=self.gen) if self.shuffle else torch.arange(len(self.x))
        for i in range(0, len(order), self.batch):
            idx = order[i:i + self.batch]
            yield self.x[idx], self.y[idx]


# ----------------------------------------------------------------------------------------------
# Experiment
# ----------------------------------------------------------------------------------------------
def build(name: str, args: argparse.Namespace) -> torch.nn.Module:
    if name == "msd":
        model, _ = gp.zoo.create("msd", depth=args.depth, width=1, num_classes=5)
    elif name == "unet":
        model, _ = gp.zoo.create("unet", num_classes=5, base=args.unet_base)
    else:
        raise SystemExit(f"unknown model {name!r}")
    return model


def kernel_counts(model: torch.nn.Module, example: torch.Tensor) -> tuple[int, int]:
    """Nonzero kernels (in the pruning graph) and prunable channels of a model."""
    dg = gp.DependencyGraph.build(model, example)
    cg = lean.ChannelGraph.build(model, dg)
    return cg.n_kernels, sum(g.size for g in dg.groups if g.prunable)


def run(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    rng = np.random.default_rng(args.seed)
    t0 = time.time()
    xtr, ytr = generate(args.train, args.size, rng, noise=args.noise)
    xva, yva = generate(args.val, args.size, rng, noise=args.noise)
    xte, yte = generate(args.test, args.size, rng, noise=args.noise)
    mean, std = float(xtr.mean()), float(xtr.std())
    xtr, xva, xte = ((x - mean) / std for x in (xtr, xva, xte))
    train = Batches(xtr, ytr, args.batch, True, args.seed)
    val = Batches(xva, yva, args.batch, False)
    test = Batches(xte, yte, args.batch, False)
    example = (xtr[:2],)
    keeps = [float(k) for k in np.geomspace(args.start_keep, args.final_keep, args.steps)]
    print(f"data: {args.train}/{args.val}/{args.test} images of {args.size}x{args.size} "
          f"({time.time() - t0:.1f}s); keep schedule {[round(k, 3) for k in keeps]}", flush=True)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    out = {"config": config, "keeps": keeps, "paper_at_5pct": PAPER, "models": {}}
    for name in args.models:
        t1 = time.time()
        base = build(name, args)
        lr = args.lr or {"msd": 1e-2, "unet": 3e-3}[name]
        retrain_lr = args.retrain_lr or lr / 5
        fit = finetune(base, train, epochs=args.epochs, lr=lr, optimizer="adam", schedule="cosine",
                       eval_data=val, restore_best=True, progress=False, device=dev)
        base_acc = evaluate(base, test, device=dev)
        base.cpu()
        kernels0, channels0 = kernel_counts(base, example[0])
        counts0 = gp.count(base, example)
        print(f"[{name}] trained {args.epochs} epochs in {time.time() - t1:.0f}s: test acc {base_acc:.4f}, "
              f"val {fit.best_eval:.4f}, {kernels0} kernels, {channels0} prunable channels, "
              f"{counts0.params} params", flush=True)
        entry = {"test_acc": base_acc, "kernels": kernels0, "channels": channels0, "params": counts0.params,
                 "macs": counts0.macs, "train_seconds": time.time() - t1, "methods": {}}
        if args.control:  # the same retraining without pruning: what the extra epochs alone give
            t2 = time.time()
            dense = copy.deepcopy(base)
            rows = []
            for keep in keeps:
                finetune(dense, train, epochs=args.retrain_epochs, lr=retrain_lr, optimizer="adam",
                         schedule=None, progress=False, device=dev)
                rows.append({"keep": keep, "test_acc": evaluate(dense, test, device=dev)})
            entry["control"] = {"steps": rows, "seconds": time.time() - t2}
            print(f"[{name}] control (retraining, no pruning): acc {rows[-1]['test_acc']:.4f}", flush=True)
        for method in args.methods:
            t2 = time.time()
            rows: list[dict] = []

            def retrain(slim, step, rows=rows, retrain_lr=retrain_lr):
                pruned_acc = evaluate(slim.to(dev), test, device=dev)
                finetune(slim, train, epochs=args.retrain_epochs, lr=retrain_lr, optimizer="adam",
                         schedule=None, progress=False, device=dev)
                rows.append({"pruned_acc": pruned_acc, "test_acc": evaluate(slim, test, device=dev)})
                return slim.cpu()  # graphs are traced on the CPU

            result = gp.prune(copy.deepcopy(base), example, method="lean", criterion=method, schedule=keeps,
                              callback=retrain, n=args.n)
            for row, info in zip(rows, result.lean):
                row.update(keep=info["keep"], kept_kernels=info["kept_kernels"],
                           kept_kernel_frac=info["kept_kernels"] / kernels0,
                           kept_channels=info["kept_channels"], channels=channels0,
                           kept_channel_frac=info["kept_channels"] / max(channels0, 1),
                           extra_sparsity=info["extra_sparsity"], chains=info["paths"],
                           chain_kernels=info["path_kernels"])
            final = gp.count(result.model, example)
            entry["methods"][method] = {"steps": rows, "params": final.params, "macs": final.macs,
                                        "seconds": time.time() - t2}
            last = rows[-1]
            print(f"[{name}] {METHODS[method]:>18}: keep {last['keep']:.3f} -> acc {last['test_acc']:.4f} "
                  f"(before retrain {last['pruned_acc']:.4f}), kernels {last['kept_kernels']}/{kernels0}, "
                  f"channels {last['kept_channels']}/{channels0}, {time.time() - t2:.0f}s", flush=True)
        out["models"][name] = entry
    out["seconds"] = time.time() - t0
    return out


def table(res: dict) -> str:
    lines = []
    for name, entry in res["models"].items():
        lines.append(f"\n{name}: unpruned test accuracy {entry['test_acc']:.4f}, {entry['kernels']} kernels, "
                     f"{entry['channels']} prunable channels")
        ctl = entry.get("control")
        head = f"{'keep':>6} | " + " | ".join(f"{METHODS[m]:>28}" for m in entry["methods"])
        head += " | no pruning" if ctl else ""
        lines.append(head)
        lines.append(f"{'':>6} | " + " | ".join(f"{'acc   kernels  channels':>28}" for _ in entry["methods"]))
        lines.append("-" * len(head))
        for i, keep in enumerate(res["keeps"]):
            cells = []
            for v in entry["methods"].values():
                r = v["steps"][i]
                cells.append(f"{r['test_acc']:.4f} {r['kept_kernels']:>7} {r['kept_channels']:>5}/{r['channels']:<5}"
                             .rjust(28))
            if ctl:
                cells.append(f"{ctl['steps'][i]['test_acc']:.4f}")
            lines.append(f"{keep:>6.3f} | " + " | ".join(cells))
    paper = res["paper_at_5pct"]
    lines.append("\npublished (MS-D, 256x256, depth 50, 5% kept): " +
                 ", ".join(f"{METHODS[m]} {v:.2f}" for m, v in paper.items()))
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing (pip install matplotlib): no plot")
        return
    models = list(res["models"])
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4), squeeze=False)
    from matplotlib.ticker import FixedLocator, NullFormatter, ScalarFormatter

    for ax, name in zip(axes[0], models):
        entry = res["models"][name]
        colors = {}
        for m, v in entry["methods"].items():
            fr = [r["kept_kernel_frac"] for r in v["steps"]]
            acc = [r["test_acc"] for r in v["steps"]]
            (line,) = ax.plot(fr, acc, "o-", label=METHODS[m])
            colors[m] = line.get_color()
        ax.axhline(entry["test_acc"], color="gray", ls="--", label="unpruned")
        if entry.get("control"):
            ax.axhline(entry["control"]["steps"][-1]["test_acc"], color="gray", ls=":",
                       label="unpruned, same retraining")
        if name == "msd":
            for m, a in res["paper_at_5pct"].items():
                ax.plot([0.05], [a], "x", ms=10, mew=2, color=colors.get(m, "k"))
            ax.plot([], [], "x", color="k", label="published, 5% kept (256x256, depth 50)")
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(FixedLocator([0.02, 0.05, 0.1, 0.2, 0.5, 1.0]))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("fraction of kernels kept (after channel removal)")
        ax.set_ylabel("test pixel accuracy")
        ax.set_title(f"{name}, circle-square {res['config']['size']}x{res['config']['size']}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=64, help="image side (paper: 256); objects are size/8")
    p.add_argument("--train", type=int, default=120, help="training images (paper: 500)")
    p.add_argument("--val", type=int, default=24, help="validation images (paper: 100)")
    p.add_argument("--test", type=int, default=30, help="test images (paper: 50)")
    p.add_argument("--noise", type=float, default=None,
                   help="Gaussian noise std; default size/256, so that an object's mean has the SNR of the "
                        "authors' generator (std 1 at 256x256)")
    p.add_argument("--models", nargs="+", default=["msd", "unet"], choices=["msd", "unet"])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--depth", type=int, default=30, help="MS-D depth (paper: 50)")
    p.add_argument("--unet-base", type=int, default=8)
    p.add_argument("--epochs", type=int, default=20, help="training epochs (paper: 50)")
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate (default: MS-D 1e-2, U-Net 3e-3)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=6, help="pruning steps from --start-keep to --final-keep")
    p.add_argument("--start-keep", type=float, default=0.8)
    p.add_argument("--final-keep", type=float, default=0.05)
    p.add_argument("--retrain-epochs", type=int, default=2, help="retraining epochs per step (paper: 3)")
    p.add_argument("--retrain-lr", type=float, default=None, help="default: the training lr / 5")
    p.add_argument("--n", type=int, default=64, help="mock image size of the operator norms (paper, MS-D: 64)")
    p.add_argument("--no-control", dest="control", action="store_false",
                   help="skip the control run (the same retraining epochs without pruning)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="where to train (cuda for --paper); graphs are traced on cpu")
    p.add_argument("--paper", action="store_true",
                   help="the published setting: 256x256, 500/100/50 images, depth 50, 50 epochs, 15 steps "
                        "to 5%%, 3 retraining epochs (GPU-sized)")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "lean_circle_square.json")
    p.add_argument("--replot", action="store_true", help="only redraw the table and plot from --out")
    args = p.parse_args(argv)
    if args.replot:
        res = json.loads(args.out.read_text())
        print(table(res))
        plot(res, args.out.with_suffix(".png"))
        return
    if args.paper:
        args.size, args.train, args.val, args.test = 256, 500, 100, 50
        args.depth, args.epochs, args.steps, args.retrain_epochs = 50, 50, 15, 3
        args.lr, args.start_keep = 1e-3, 0.05 ** (1 / 15)
    if args.noise is None:
        args.noise = args.size / 256
    res = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1))
    print(table(res))
    print(f"\nresults: {args.out} ({res['seconds'] / 60:.1f} min)")
    plot(res, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
