"""Engine speed: graphprune against Torch-Pruning 1.6.1 on realistic model sizes.

Per model, in the same process and interleaved repeat by repeat (so machine load hits
both tools alike), with one intra-op thread:

- graphprune: ``DependencyGraph.build`` (trace, shape propagation, grouping), plan
  (``score("magnitude", p=1)`` + ``select(ratio)``), ``apply`` (copy, slice, rewrite,
  one check run of the slim model). The user's model is not touched, so every repeat
  runs on the same model.
- graphprune fast mode (opt-in, column ``fast``): the same with
  ``DependencyGraph.build(..., check=False)`` (no eager run comparing the traced graph
  with the model) and ``apply(..., check=False)`` (no check run of the slim model). Same
  groups and plans (tests/test_fast_build.py); what it does not check is said in
  ``DependencyGraph.build``'s docstring.
- Torch-Pruning: ``MetaPruner(model, x, MagnitudeImportance(p=1), pruning_ratio,
  ignored_layers=[classifier])`` (which builds its ``DependencyGraph``) + ``step()``,
  on a fresh deep copy each repeat (it prunes in place; the copy is not timed).
  ``tp_build`` times ``DependencyGraph().build_dependency`` alone, for reference.

Both prune the same fraction of every prunable layer's channels (local scope, L1
magnitude). Each tool runs ``--warmup`` times untimed first (one by default: the first
call pays lazy imports and allocator growth). The ratio column is the median of
Torch-Pruning's total over graphprune's per repeat; times are medians of ``--repeats``
runs.

Models (ImageNet sizes, 1000 classes, batch 1):

- ``resnet50`` / ``resnet101``: zoo ``ResNet`` with Bottleneck [3,4,6,3] / [3,4,23,3],
  base width 64, 3x224x224.
- ``densenet201``: zoo ``DenseNet`` with growth 32, blocks (6,12,48,32) (DenseNet-201's
  widths and 200 convolutions). Its stem is CIFAR-style (3x3, stride 1), so the input is
  3x56x56: the feature maps then have DenseNet-201's sizes at 224x224 (56, 28, 14, 7).
- ``mobilenet_v2``: width multiplier 1.0, 3x224x224.
- ``vit_b16``: zoo ``VisionTransformer`` (timm-style) with embed 768, depth 12, 12 heads,
  MLP ratio 4, patch 16, 3x224x224. Torch-Pruning gets ``num_heads`` for every qkv and
  ``prune_head_dims=True`` (its documented ViT recipe).

    python benchmarks/engine_speed.py                       # all models, 3 repeats
    python benchmarks/engine_speed.py densenet201 --repeats 5
    python benchmarks/engine_speed.py --profile densenet201  # cProfile of graphprune only
    python benchmarks/engine_speed.py --profile --fast resnet50  # ... of its fast mode
    python benchmarks/engine_speed.py --shapes   # the shape run on real vs meta vs fake tensors

Writes ``benchmarks/results/engine_speed.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import cProfile
import gc
import importlib.metadata
import json
import platform
import pstats
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import graphprune as gp
from graphprune.zoo.densenet import DenseNet
from graphprune.zoo.mobilenet import MobileNetV2
from graphprune.zoo.resnet import Bottleneck, ResNet
from graphprune.zoo.vit import Attention, VisionTransformer

RESULTS = Path(__file__).parent / "results"
RATIO = 0.5


def _resnet50() -> nn.Module:
    return ResNet(Bottleneck, (3, 4, 6, 3), num_classes=1000, width=64)


def _resnet101() -> nn.Module:
    return ResNet(Bottleneck, (3, 4, 23, 3), num_classes=1000, width=64)


def _densenet201() -> nn.Module:
    return DenseNet(growth_rate=32, block_config=(6, 12, 48, 32), num_classes=1000)


def _mobilenet_v2() -> nn.Module:
    return MobileNetV2(num_classes=1000, width_mult=1.0)


def _vit_b16() -> nn.Module:
    return VisionTransformer(img_size=224, patch_size=16, num_classes=1000, embed_dim=768,
                             depth=12, num_heads=12, mlp_ratio=4.0)


# name -> (factory, input spatial size, name of the classifier module)
MODELS: dict[str, tuple[Callable[[], nn.Module], int, str]] = {
    "resnet50": (_resnet50, 224, "fc"),
    "resnet101": (_resnet101, 224, "fc"),
    "densenet201": (_densenet201, 56, "classifier"),
    "mobilenet_v2": (_mobilenet_v2, 224, "classifier.2"),
    "vit_b16": (_vit_b16, 224, "head"),
}


def make(name: str) -> tuple[nn.Module, torch.Tensor]:
    factory, size, _ = MODELS[name]
    torch.manual_seed(0)
    model = factory().eval()
    return model, torch.randn(1, 3, size, size)


def run_graphprune(model: nn.Module, x: torch.Tensor, check: bool = True) -> dict[str, float]:
    t0 = time.perf_counter()
    dg = gp.DependencyGraph.build(model, x, check=check)
    t1 = time.perf_counter()
    scores = gp.score("magnitude", model, dg, p=1)
    plan = gp.select(dg, scores, RATIO)
    t2 = time.perf_counter()
    slim = gp.apply(model, dg, plan, check=check)
    t3 = time.perf_counter()
    del slim
    return {"build": t1 - t0, "plan": t2 - t1, "apply": t3 - t2, "total": t3 - t0}


def _tp_kwargs(name: str, model: nn.Module) -> dict:
    modules = dict(model.named_modules())
    kwargs = {"ignored_layers": [modules[MODELS[name][2]]]}
    if name.startswith("vit"):
        kwargs.update(num_heads={m.qkv: m.num_heads for m in model.modules() if isinstance(m, Attention)},
                      prune_head_dims=True, prune_num_heads=False)
    return kwargs


def run_torch_pruning(name: str, model: nn.Module, x: torch.Tensor) -> dict[str, float]:
    import torch_pruning as tp

    m = copy.deepcopy(model)
    t0 = time.perf_counter()
    tp.DependencyGraph().build_dependency(m, example_inputs=x)
    t1 = time.perf_counter()
    del m
    m = copy.deepcopy(model)
    t2 = time.perf_counter()
    pruner = tp.pruner.MetaPruner(m, x, importance=tp.importance.MagnitudeImportance(p=1),
                                  pruning_ratio=RATIO, **_tp_kwargs(name, m))
    pruner.step()
    t3 = time.perf_counter()
    return {"build": t1 - t0, "total": t3 - t2}


def bench(name: str, repeats: int, with_tp: bool, warmup: int = 1) -> dict:
    model, x = make(name)
    row: dict = {"model": name, "input": list(x.shape),
                 "params": sum(p.numel() for p in model.parameters())}
    for _ in range(warmup):  # untimed: first-call costs (lazy imports, allocator) of both tools
        run_graphprune(model, x)
        run_graphprune(model, x, check=False)
        if with_tp:
            run_torch_pruning(name, model, x)
    gp_runs, fast_runs, tp_runs = [], [], []
    for _ in range(repeats):
        gc.collect()
        gp_runs.append(run_graphprune(model, x))
        gc.collect()
        fast_runs.append(run_graphprune(model, x, check=False))
        if with_tp:
            gc.collect()
            tp_runs.append(run_torch_pruning(name, model, x))
    for key in ("build", "plan", "apply", "total"):
        row[f"gp_{key}_s"] = statistics.median(r[key] for r in gp_runs)
        row[f"gp_fast_{key}_s"] = statistics.median(r[key] for r in fast_runs)
    if tp_runs:
        row["tp_build_s"] = statistics.median(r["build"] for r in tp_runs)
        row["tp_total_s"] = statistics.median(r["total"] for r in tp_runs)
        # ratio of medians, and median of the per-repeat ratios (paired, robust to load drift)
        row["ratio"] = row["tp_total_s"] / row["gp_total_s"]
        row["ratio_paired"] = statistics.median(t["total"] / g["total"] for g, t in zip(gp_runs, tp_runs))
        row["ratio_fast"] = row["tp_total_s"] / row["gp_fast_total_s"]
        row["ratio_fast_paired"] = statistics.median(t["total"] / g["total"] for g, t in zip(fast_runs, tp_runs))
    row["gp_runs"], row["gp_fast_runs"], row["tp_runs"] = gp_runs, fast_runs, tp_runs
    return row


def print_row(row: dict, header: bool) -> None:
    if header:
        cols = (f"{'model':13s} {'params':>7s} | {'gp build':>8s} {'plan':>6s} {'apply':>6s} "
                f"{'total':>6s} | {'fast':>6s} | {'TP DG':>6s} {'TP total':>8s} | {'TP/gp':>6s} {'TP/fast':>7s}")
        print(cols)
        print("-" * len(cols))
    line = (f"{row['model']:13s} {row['params'] / 1e6:6.1f}M | {row['gp_build_s']:8.2f} "
            f"{row['gp_plan_s']:6.2f} {row['gp_apply_s']:6.2f} {row['gp_total_s']:6.2f} | "
            f"{row['gp_fast_total_s']:6.2f} |")
    if "tp_total_s" in row:
        line += (f" {row['tp_build_s']:6.2f} {row['tp_total_s']:8.2f} | {row['ratio_paired']:5.1f}x "
                 f"{row['ratio_fast_paired']:6.1f}x")
    print(line, flush=True)


def profile(name: str, check: bool = True) -> None:
    model, x = make(name)
    run_graphprune(model, x, check)  # warm caches
    prof = cProfile.Profile()
    prof.runcall(run_graphprune, model, x, check)
    pstats.Stats(prof).sort_stats("cumulative").print_stats(40)


def shape_backends(name: str, repeats: int) -> dict:
    """Seconds (min of ``repeats``) of the traced graph's shape-recording run on real tensors,
    against the same run on meta tensors (a structural copy holding meta parameters) and
    under ``FakeTensorMode``: what weight-free shape propagation would cost instead."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from graphprune.preserve import structural_copy
    from graphprune.shapes import _run_recording

    model, x = make(name)
    gm = gp.trace(model, x)
    meta = structural_copy(gm)
    for m in meta.modules():
        for table in (m._parameters, m._buffers):
            for key, t in table.items():
                if t is not None:
                    table[key] = t.to("meta")
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    runs = {"real": lambda: _run_recording(gm, (x.clone(),)),
            "meta": lambda: _run_recording(meta, (x.to("meta"),)),
            "fake": lambda: _run_recording(gm, (fake_mode.from_tensor(x),))}
    row = {"model": name}
    for key, fn in runs.items():
        times = []
        for _ in range(repeats + 1):  # the first run is a warm-up
            t0 = time.perf_counter()
            with torch.no_grad(), (fake_mode if key == "fake" else contextlib.nullcontext()):
                fn()
            times.append(time.perf_counter() - t0)
        row[f"{key}_s"] = min(times[1:])
    print(f"{name:13s} real {row['real_s']:.3f} s | meta {row['meta_s']:.3f} s | fake {row['fake_s']:.3f} s", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", help=f"default: all of {', '.join(MODELS)}")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs of each tool first")
    parser.add_argument("--no-tp", action="store_true", help="skip Torch-Pruning")
    parser.add_argument("--profile", action="store_true", help="cProfile graphprune on the models")
    parser.add_argument("--fast", action="store_true", help="profile the fast mode (check=False)")
    parser.add_argument("--shapes", action="store_true",
                        help="time the shape-recording run on real, meta and fake tensors (engine_shapes.json)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")  # Torch-Pruning warns about unwrapped parameters
    names = args.models or list(MODELS)
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {list(MODELS)}")
    if args.profile:
        for name in names:
            profile(name, check=not args.fast)
        return
    if args.shapes:
        rows = [shape_backends(name, args.repeats) for name in names]
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "engine_shapes.json").write_text(json.dumps({"torch": torch.__version__, "threads": 1,
                                                                "rows": rows}, indent=1))
        return
    with_tp = not args.no_tp
    if with_tp:
        try:
            import torch_pruning as tp  # noqa: F401
        except ImportError:
            print("torch-pruning is not installed (pip install --no-deps torch-pruning==1.6.1); "
                  "timing graphprune only")
            with_tp = False
    rows = []
    for name in names:
        rows.append(bench(name, args.repeats, with_tp, args.warmup))
        print_row(rows[-1], header=len(rows) == 1)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "engine_speed.json"
    meta = {"torch": torch.__version__, "threads": 1, "repeats": args.repeats, "warmup": args.warmup, "ratio": RATIO,
            "python": platform.python_version(), "machine": platform.processor() or platform.machine()}
    if with_tp:
        meta["torch_pruning"] = importlib.metadata.version("torch-pruning")
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"seconds, medians of {args.repeats}; fast = build(check=False) + apply(check=False); "
          f"TP/gp, TP/fast = medians of per-repeat ratios. Results in {out}")


if __name__ == "__main__":
    main()
