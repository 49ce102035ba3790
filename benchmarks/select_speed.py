"""Selection under a MACs target: how long it takes, against a plain channel ratio.

Per model, with one intra-op thread: build the graph once, score it once (magnitude),
then time ``gp.select`` with ``target="channels"`` and with ``target="macs"`` (given
the model, so the result is checked against ``gp.count`` of the slim model), and count
the ``gp.apply`` calls the MACs target needs. Reported: seconds (median of
``--repeats``), the MACs removed against the 50% asked, and the applies.

Models (batch 1, 1000 classes):

- ``vit_tiny``: the zoo's timm-style ``VisionTransformer`` at timm ``vit_tiny_patch16_224``'s
  sizes (embed 192, depth 12, 3 heads, MLP ratio 4, patch 16, 3x224x224), attention written
  out (``q @ k^T``, softmax, ``@ v``).
- ``vit_tiny_sdpa``: the same with timm's fused attention path
  (``F.scaled_dot_product_attention``), as ``timm.create_model("vit_tiny_patch16_224")`` runs.
- ``vit_tiny_mha``: the zoo's torchvision-style ViT (``nn.MultiheadAttention``) at the same sizes.
- ``resnet50``: zoo ``ResNet`` with Bottleneck [3,4,6,3], base width 64, 3x224x224.

    python benchmarks/select_speed.py [--repeats 3]

Writes ``benchmarks/results/select_speed.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import graphprune as gp
from graphprune.zoo.resnet import Bottleneck, ResNet
from graphprune.zoo.vit import Attention, MHAVisionTransformer, VisionTransformer

RESULTS = Path(__file__).parent / "results"


class FusedAttention(Attention):
    """timm's ``Attention`` with ``fused_attn``: qkv Linear, reshape, SDPA, proj."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


def _vit_tiny(fused: bool) -> VisionTransformer:
    model = VisionTransformer(img_size=224, patch_size=16, num_classes=1000, embed_dim=192, depth=12,
                              num_heads=3, mlp_ratio=4.0)
    if fused:
        for block in model.blocks:
            old = block.attn
            block.attn = FusedAttention(192, num_heads=3)
            block.attn.load_state_dict(old.state_dict())
    return model.eval()


def _models():
    torch.manual_seed(0)
    x = torch.randn(1, 3, 224, 224)
    yield "vit_tiny", _vit_tiny(False), x
    yield "vit_tiny_sdpa", _vit_tiny(True), x
    yield "vit_tiny_mha", MHAVisionTransformer(image_size=224, patch_size=16, num_layers=12, num_heads=3,
                                               hidden_dim=192, mlp_dim=768, num_classes=1000).eval(), x
    yield "resnet50", ResNet(Bottleneck, [3, 4, 6, 3], num_classes=1000).eval(), torch.randn(1, 3, 224, 224)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for name, model, x in _models():
        dg = gp.DependencyGraph.build(model, x)
        scores = gp.score("magnitude", model, dg)
        base = gp.count(model, x).macs
        applies = []
        real_apply = gp.apply.__globals__["apply"] if "apply" in gp.apply.__globals__ else gp.apply
        times = {"channels": [], "macs": []}
        plan = None
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            gp.select(dg, scores, 0.5)
            times["channels"].append(time.perf_counter() - t0)
            applies.clear()
            counted = _counting_apply(applies)
            t0 = time.perf_counter()
            with counted:
                plan = gp.select(dg, scores, 0.5, target="macs", model=model, example_inputs=x)
            times["macs"].append(time.perf_counter() - t0)
        after = gp.count(real_apply(model, dg, plan), x).macs
        row = {"model": name, "macs": base, "select_channels_s": statistics.median(times["channels"]),
               "select_macs_s": statistics.median(times["macs"]), "applies": len(applies),
               "macs_removed": 1 - after / base}
        rows.append(row)
        print(f"{name:14s} channels {row['select_channels_s']:6.2f} s   macs target {row['select_macs_s']:6.2f} s"
              f"   applies {row['applies']:3d}   MACs removed {row['macs_removed']:.3f} (asked 0.500)", flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "select_speed.json").write_text(json.dumps(rows, indent=1))


class _counting_apply:
    """Counts ``apply`` calls made by ``gp.select`` (wherever the installed version looks it up)."""

    def __init__(self, calls: list) -> None:
        import graphprune.rewrite as rewrite

        self.calls, self.rewrite = calls, rewrite
        self.real = rewrite.apply

    def __enter__(self):
        def counting(*a, **k):
            self.calls.append(1)
            return self.real(*a, **k)
        self.rewrite.apply = counting
        self.module = __import__(gp.select.__module__, fromlist=["x"])
        self.had = getattr(self.module, "apply", None)
        if self.had is not None:
            self.module.apply = counting
        return self

    def __exit__(self, *exc):
        self.rewrite.apply = self.real
        if self.had is not None:
            self.module.apply = self.had


if __name__ == "__main__":
    main()
