"""Depth table: fraction of parameters left at 50%, graphprune against Torch-Pruning.

Public architectures built from their configs with random weights (nothing is
downloaded): Hugging Face transformers and diffusers at small configs, torchvision,
timm and ultralytics (optional: its rows record the import error when it is not
installed) at their real widths (small input sizes for the convolutional ones, which
change no layer width). For each model, in one process and on the same weights:

- graphprune: ``gp.prune(model, inputs, method="magnitude", ratio=0.5, p=1)``, 50% of
  every prunable group's channels (graphprune leaves the output layer whole itself).
  Hugging Face models get keyword inputs ``{"input_ids", "attention_mask", "use_cache":
  False}`` (``use_cache`` only where forward takes it). Then: does the slim model run
  and keep the output shapes, ``gp.verify`` of the plan restricted to exact groups
  (max abs difference divided by the largest output value of the original), whether the
  plan touches inexact groups (normalisation over pruned channels), and the reasons of
  the largest pinned groups (ranked by the parameter elements they hold).
- Torch-Pruning (``tp.pruner.MetaPruner``, ``MagnitudeImportance(p=1)``,
  ``pruning_ratio=0.5``, local pruning) on a deep copy, with its output layer in
  ``ignored_layers`` and, where Torch-Pruning documents a recipe for the family, that
  recipe's options and its attribute fix-up after ``step()`` (see ``RECIPES``). Then:
  does the pruned model run, keep the output shapes and stay finite (Torch-Pruning does
  not check that the pruned model computes the masked original).

Fractions are parameter elements (``sum(p.numel() for p in m.parameters())``, tied
tensors once) after / before. Each model runs in its own subprocess; each tool has a
timeout (``--timeout``, 300 s; 120 s for the small-config Hugging Face / diffusers /
user models, which both tools otherwise handle in seconds), and a tool that runs past
it is recorded as TIMEOUT; a crash of the subprocess is recorded with its last error.

torchvision's compiled operators do not load with every torch build ("operator
torchvision::nms does not exist"), and then neither torchvision nor timm nor
transformers import. ``benchmarks/_torchvision_ops.py`` declares the operator schemas
(no kernels) only in that case, so the Python models import; a model that calls one of
those operators at run time (Faster R-CNN's ``nms``) then fails, and the table says so.
Grouped convolutions: ``gp.prune`` shrinks them within every conv group by default
(``grouped="channels"``, as Torch-Pruning does); a model that has them also gets the same
plan on a graph built with ``grouped="groups"`` (whole conv groups go; recorded as
``grouped_groups``).

    PYTHONPATH=. python benchmarks/depth.py               # every model, writes results/depth.json
    PYTHONPATH=. python benchmarks/depth.py llama bert    # some (their rows are replaced in the JSON)
    python benchmarks/depth.py --list                     # the models
    python benchmarks/depth.py --markdown                 # results/depth.json as the docs' table
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
HERE = Path(__file__).resolve().parent


# ----------------------------------------------------------------------------- models


@dataclasses.dataclass
class Case:
    model: Any
    gp_inputs: Any  # tuple of tensors, or a dict of keyword inputs
    tp_inputs: Any  # what MetaPruner gets as example_inputs
    recipe: str  # which Torch-Pruning recipe (RECIPES key)
    output_layers: list[str] = dataclasses.field(default_factory=list)  # module names TP ignores


def _hf_inputs(model, vocab=128, batch=2, length=16):
    import inspect

    import torch

    torch.manual_seed(1)
    ids = torch.randint(3, vocab, (batch, length))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if "use_cache" in inspect.signature(model.forward).parameters:
        inputs["use_cache"] = False
    return inputs


def _hf(factory: str, config: str, recipe: str, output_layers=(), **fields):
    def build():
        import transformers as tf

        model = getattr(tf, factory)(getattr(tf, config)(**fields)).eval()
        inputs = _hf_inputs(model, fields.get("vocab_size", 128))
        return Case(model, inputs, dict(inputs), recipe, list(output_layers))
    return build


SMALL = dict(vocab_size=128, max_position_embeddings=64)
LLM = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, **SMALL)


def _clip_vision():
    import torch
    import transformers as tf

    config = tf.CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, image_size=32, patch_size=8, projection_dim=32)
    model = tf.CLIPVisionModelWithProjection(config).eval()
    torch.manual_seed(1)
    inputs = {"pixel_values": torch.randn(2, 3, 32, 32)}
    return Case(model, inputs, dict(inputs), "hf_heads", ["visual_projection"])


def _user_transformer():
    import torch
    from torch import nn

    class Classifier(nn.Module):  # what a user writes around nn.TransformerEncoder
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(32, 64)
            layer = nn.TransformerEncoderLayer(64, 4, dim_feedforward=128, batch_first=True, dropout=0.0)
            self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
            self.head = nn.Linear(64, 10)

        def forward(self, x):
            return self.head(self.encoder(self.embed(x)).mean(1))

    torch.manual_seed(0)
    model = Classifier().eval()
    x = torch.randn(2, 16, 32)
    return Case(model, (x,), x, "plain", ["head"])


def _unet2d():
    import diffusers
    import torch

    model = diffusers.UNet2DModel(
        sample_size=32, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8, attention_head_dim=8).eval()
    torch.manual_seed(1)
    inputs = {"sample": torch.randn(1, 3, 32, 32), "timestep": torch.ones(1, dtype=torch.long)}
    return Case(model, inputs, dict(inputs), "diffusers", ["conv_out"])


def _unet2d_condition():
    import diffusers
    import torch

    model = diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=8, cross_attention_dim=32, attention_head_dim=8).eval()
    torch.manual_seed(1)
    inputs = {"sample": torch.randn(1, 4, 16, 16), "timestep": torch.ones(1, dtype=torch.long),
              "encoder_hidden_states": torch.randn(1, 8, 32)}
    return Case(model, inputs, dict(inputs), "diffusers", ["conv_out"])


def _torchvision(name: str, size: int):
    def build():
        import _torchvision_ops
        import torch

        tv = _torchvision_ops.import_torchvision()
        model = getattr(tv.models, name)(weights=None).eval()
        torch.manual_seed(1)
        x = torch.randn(1, 3, size, size)
        head = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m.out_features == 1000]
        return Case(model, (x,), x, "torchvision", head)
    return build


def _faster_rcnn():
    import _torchvision_ops
    import torch

    tv = _torchvision_ops.import_torchvision()

    class Detector(torch.nn.Module):
        """Takes a batch tensor: graphprune's example inputs are tensors, not torchvision's list of images."""

        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, images):
            return self.model(list(images))

    # trainable_backbone_layers=5: no FrozenBatchNorm2d, as Torch-Pruning's torchvision recipe builds it
    model = Detector(tv.models.detection.fasterrcnn_mobilenet_v3_large_fpn(
        weights=None, weights_backbone=None, trainable_backbone_layers=5, min_size=320, max_size=320)).eval()
    torch.manual_seed(1)
    x = torch.rand(1, 3, 320, 320)
    ignored = ["model.rpn.head.cls_logits", "model.rpn.head.bbox_pred", "model.backbone.fpn", "model.roi_heads"]
    return Case(model, (x,), x, "torchvision", ignored)


def _timm(name: str, size: int | None = None, **kwargs):
    def build():
        import _torchvision_ops
        import torch

        _torchvision_ops.import_torchvision()
        import timm

        # num_classes=1000: some configs (eva02_tiny_patch14_224, MIM pretraining) have no classifier
        model = timm.create_model(name, pretrained=False, num_classes=1000, **kwargs).eval()
        torch.manual_seed(1)
        shape = model.pretrained_cfg.get("input_size", (3, 224, 224))
        x = torch.randn(1, shape[0], size or shape[1], size or shape[2])
        head = [n for n, m in model.named_modules()
                if isinstance(m, torch.nn.Linear) and m.out_features == model.num_classes]
        return Case(model, (x,), x, "timm", head)
    return build


def _ultralytics(config: str):
    def build():
        import _torchvision_ops
        import torch

        _torchvision_ops.import_torchvision()
        from ultralytics.nn.tasks import DetectionModel

        model = DetectionModel(config, nc=80, verbose=False).eval()
        torch.manual_seed(1)
        x = torch.randn(1, 3, 128, 128)
        return Case(model, (x,), x, "ultralytics", [n for n, m in model.named_modules() if type(m).__name__ == "Detect"])
    return build


# name -> (family, builder, small: the 120 s timeout applies)
MODELS: dict[str, tuple[str, Callable[[], Case], bool]] = {
    "llama": ("HF", _hf("LlamaForCausalLM", "LlamaConfig", "hf_llm", ["lm_head"], **LLM), True),
    "qwen2": ("HF", _hf("Qwen2ForCausalLM", "Qwen2Config", "hf_llm", ["lm_head"], **LLM), True),
    "mistral": ("HF", _hf("MistralForCausalLM", "MistralConfig", "hf_llm", ["lm_head"], **LLM), True),
    "gpt2": ("HF", _hf("GPT2LMHeadModel", "GPT2Config", "plain", ["lm_head"], vocab_size=128, n_embd=64,
                       n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0), True),
    "bert_mlm": ("HF", _hf("BertForMaskedLM", "BertConfig", "hf_bert", ["cls.predictions.decoder"],
                           hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                           **SMALL), True),
    "bert": ("HF", _hf("BertModel", "BertConfig", "hf_bert", ["pooler"], hidden_size=64, num_hidden_layers=2,
                       num_attention_heads=4, intermediate_size=128, **SMALL), True),
    "bart": ("HF", _hf("BartForConditionalGeneration", "BartConfig", "hf_heads", ["lm_head"], d_model=64,
                       encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
                       encoder_ffn_dim=128, decoder_ffn_dim=128, pad_token_id=1, bos_token_id=0,
                       eos_token_id=2, decoder_start_token_id=2, **SMALL), True),
    "clip_text": ("HF", _hf("CLIPTextModelWithProjection", "CLIPTextConfig", "hf_heads", ["text_projection"],
                            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                            projection_dim=32, **SMALL), True),
    "clip_vision": ("HF", _clip_vision, True),
    "user_transformer_encoder": ("torch", _user_transformer, True),
    "unet2d": ("diffusers", _unet2d, True),
    "unet2d_condition": ("diffusers", _unet2d_condition, True),
    "efficientnet_b0": ("torchvision", _torchvision("efficientnet_b0", 128), False),
    "efficientnet_v2_s": ("torchvision", _torchvision("efficientnet_v2_s", 128), False),
    "convnext_tiny": ("torchvision", _torchvision("convnext_tiny", 128), False),
    "regnet_x_3_2gf": ("torchvision", _torchvision("regnet_x_3_2gf", 128), False),
    "regnet_y_3_2gf": ("torchvision", _torchvision("regnet_y_3_2gf", 128), False),
    "mobilenet_v3_large": ("torchvision", _torchvision("mobilenet_v3_large", 128), False),
    "resnet50": ("torchvision", _torchvision("resnet50", 128), False),
    "fasterrcnn_mobilenet_v3_large_fpn": ("torchvision", _faster_rcnn, False),
    "resnest14d": ("timm", _timm("resnest14d", 128), False),
    "vit_tiny_patch16_224": ("timm", _timm("vit_tiny_patch16_224"), False),
    "swin_tiny_patch4_window7_224": ("timm", _timm("swin_tiny_patch4_window7_224"), False),
    "eva02_tiny_patch14_224": ("timm", _timm("eva02_tiny_patch14_224"), False),
    "convnextv2_atto": ("timm", _timm("convnextv2_atto", 128), False),
    "mobilevit_xxs": ("timm", _timm("mobilevit_xxs", 128), False),
    "levit_128s": ("timm", _timm("levit_128s"), False),
    "yolov8n": ("ultralytics", _ultralytics("yolov8n.yaml"), False),
    "yolo11n": ("ultralytics", _ultralytics("yolo11n.yaml"), False),
}


# ---------------------------------------------------------------- Torch-Pruning recipes

# Each recipe: (model copy) -> (extra MetaPruner options, fix-up after step(pruner)).
# Sources are Torch-Pruning's own examples (GitHub VainF/Torch-Pruning, examples/ and
# the author's Diff-Pruning repository for diffusers); "by analogy" marks a family without
# its own recipe that gets the closest one.
RECIPE_SOURCES = {
    "plain": "none documented: ignored output layer only",
    "hf_llm": "examples/LLMs/prune_llm.py: num_heads on q/k/v (KV heads on k/v), whole heads "
              "(prune_num_heads, head_pruning_ratio=0.5), head dims kept; attributes reset after step",
    "hf_bert": "examples/transformers/prune_hf_bert.py: num_heads on query/key/value, whole heads, head dims "
               "kept, pooler ignored (local pruning here, not the script's global); attributes reset after step",
    "hf_heads": "hf_bert / prune_llm recipe by analogy (q_proj/k_proj/v_proj heads, whole heads)",
    "timm": "examples/timm_models/prune_timm_models.py: TIMM_FUSED_ATTN=0, classifier Linear ignored, "
            "num_heads on qkv; num_heads/head_dim reset after step",
    "torchvision": "examples/torchvision_models/torchvision_pruning.py: Linear(out=1000) ignored; Faster R-CNN: "
                   "trainable_backbone_layers=5, rpn heads, FPN and roi_heads ignored",
    "ultralytics": "examples/yolov8/yolov8_pruning.py: the Detect head ignored (its C2f -> C2f_v2 module "
                   "rewrite is not applied: the model is pruned as ultralytics builds it)",
    "diffusers": "Diff-Pruning ddpm_prune.py (UNet2DModel): conv_out ignored, Up/Downsample2D channels reset "
                 "after step (UNet2DConditionModel by analogy)",
}


def _recipe_hf_llm(model):
    cfg = model.config
    heads = {}
    for name, m in model.named_modules():
        if name.endswith("self_attn") and hasattr(m, "q_proj"):
            heads[m.q_proj] = cfg.num_attention_heads
            heads[m.k_proj] = heads[m.v_proj] = cfg.num_key_value_heads

    def fix(pruner):
        for name, m in model.named_modules():
            if name.endswith("self_attn") and hasattr(m, "q_proj"):
                n_q, n_kv = m.q_proj.out_features // m.head_dim, m.k_proj.out_features // m.head_dim
                m.num_key_value_groups = max(n_q // max(n_kv, 1), 1)
                model.config.num_attention_heads, model.config.num_key_value_heads = n_q, n_kv
        model.config.hidden_size = model.lm_head.in_features
    return dict(num_heads=heads, prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=0.5), fix


def _recipe_hf_bert(model):
    from transformers.models.bert.modeling_bert import BertSelfAttention

    heads = {}
    for m in model.modules():
        if isinstance(m, BertSelfAttention):
            heads[m.query] = heads[m.key] = heads[m.value] = m.num_attention_heads

    def fix(pruner):
        for m in model.modules():
            if isinstance(m, BertSelfAttention):
                m.num_attention_heads = pruner.num_heads[m.query]
                m.attention_head_size = m.query.out_features // m.num_attention_heads
                m.all_head_size = m.query.out_features
    return dict(num_heads=heads, prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=0.5), fix


def _recipe_hf_heads(model):
    heads = {}
    for m in model.modules():
        if all(hasattr(m, a) for a in ("q_proj", "k_proj", "v_proj", "num_heads")):
            heads[m.q_proj] = heads[m.k_proj] = heads[m.v_proj] = m.num_heads

    def fix(pruner):
        for m in model.modules():
            if all(hasattr(m, a) for a in ("q_proj", "k_proj", "v_proj", "num_heads")):
                m.num_heads = pruner.num_heads[m.q_proj]
                m.head_dim = m.q_proj.out_features // m.num_heads
                if hasattr(m, "embed_dim"):
                    m.embed_dim = m.q_proj.out_features
    return dict(num_heads=heads, prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=0.5), fix


def _recipe_timm(model):
    heads = {}
    for m in model.modules():
        if hasattr(m, "num_heads") and isinstance(getattr(m, "qkv", None), __import__("torch").nn.Linear):
            heads[m.qkv] = m.num_heads

    def fix(pruner):
        for m in model.modules():
            if hasattr(m, "num_heads") and getattr(m, "qkv", None) in pruner.num_heads:
                m.num_heads = pruner.num_heads[m.qkv]
                m.head_dim = m.qkv.out_features // (3 * m.num_heads)
                if hasattr(m, "attn_dim"):  # timm >= 1.0.20 reshapes to attn_dim, where the recipe's
                    m.attn_dim = m.num_heads * m.head_dim  # ViT script patches forward to reshape(B, N, -1)
    return dict(num_heads=heads), fix


def _recipe_diffusers(model):
    def fix(pruner):
        from diffusers.models.resnet import Downsample2D, Upsample2D

        for m in model.modules():
            if isinstance(m, (Upsample2D, Downsample2D)) and getattr(m, "conv", None) is not None:
                m.channels = m.conv.in_channels
                m.out_channels = m.conv.out_channels
    return {}, fix


RECIPES = {
    "plain": lambda model: ({}, lambda pruner: None),
    "torchvision": lambda model: ({}, lambda pruner: None),
    "ultralytics": lambda model: ({}, lambda pruner: None),
    "hf_llm": _recipe_hf_llm,
    "hf_bert": _recipe_hf_bert,
    "hf_heads": _recipe_hf_heads,
    "timm": _recipe_timm,
    "diffusers": _recipe_diffusers,
}


# ------------------------------------------------------------------------ measuring


class ToolTimeout(Exception):
    pass


def _alarm(seconds: float):
    def handler(signum, frame):
        raise ToolTimeout(f"still running after {seconds:.0f} s")
    signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)


def _disarm():
    signal.setitimer(signal.ITIMER_REAL, 0)


def _n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _tensors(out) -> list:
    import torch

    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping):
        return [t for v in out.values() for t in _tensors(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _tensors(v)]
    if dataclasses.is_dataclass(out):
        return [t for f in dataclasses.fields(out) for t in _tensors(getattr(out, f.name))]
    return []


def _run(model, case: Case, *, graph_module: bool = False):
    import torch

    inputs = case.gp_inputs
    with torch.no_grad():
        if graph_module and isinstance(inputs, dict):  # the slim GraphModule takes the tensors by name
            return model(**{k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)})
        return model(**inputs) if isinstance(inputs, dict) else model(*inputs)


def _shapes(out) -> list:
    return sorted(tuple(t.shape) for t in _tensors(out))


def _error(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return text[:300]


def _elements(tensors: dict, group) -> int:
    """Parameter elements a group's slices hold (each member: its tensor's share along its axis)."""
    total = 0
    for m in group.members:
        t = tensors.get(m.param)
        if t is not None and t.dim() > m.dim:
            total += t.numel() // max(t.shape[m.dim], 1) * len(m.positions)
    return int(total)


def _named_tensors(model) -> dict:
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(model.named_buffers(remove_duplicate=False))
    return tensors


def _pinned(model, dg, top: int = 5) -> list[dict]:
    """Pinned (not prunable) groups, largest first by the parameter elements they hold."""
    tensors = _named_tensors(model)
    rows = [{"group": g.id, "size": g.size, "elements": _elements(tensors, g), "reason": g.reason,
             "producers": list(g.producers)[:3]} for g in dg.groups if not g.prunable]
    rows.sort(key=lambda r: -r["elements"])
    return rows[:top]


def _uncut(model, dg, plan, n0: int) -> dict:
    """Prunable groups the 50% plan leaves whole (a group of one unit cannot lose half of it)."""
    tensors = _named_tensors(model)
    rows = [{"group": g.id, "size": g.size, "elements": _elements(tensors, g), "producers": list(g.producers)[:2]}
            for g in dg.groups if g.prunable and not len(plan.get(g.id, ()))]
    rows.sort(key=lambda r: -r["elements"])
    return {"groups": len(rows), "share": sum(r["elements"] for r in rows) / n0 if n0 else 0.0, "largest": rows[:5]}


def _uncovered(model, dg, n0: int) -> dict:
    """Parameters in no group (kept whole), by reason: their share of the model's elements."""
    sizes = dict((n, p.numel()) for n, p in model.named_parameters())
    by_reason: dict[str, int] = {}
    for name, why in getattr(dg, "uncovered", {}).items():
        by_reason[why] = by_reason.get(why, 0) + sizes.get(name, 0)
    total = sum(by_reason.values())
    top = sorted(by_reason.items(), key=lambda kv: -kv[1])[:5]
    return {"share": total / n0 if n0 else 0.0, "reasons": [{"reason": r, "share": e / n0} for r, e in top]}


def _summary(pinned: list[dict], uncovered: dict, uncut: dict, n0: int) -> str:
    """One line: what keeps graphprune from removing more (largest first)."""
    parts = []
    if uncovered["share"] >= 0.05:
        parts.append(f"{uncovered['share']:.0%} of params in no group: {uncovered['reasons'][0]['reason']}")
    if uncut["share"] >= 0.05:
        sizes = sorted({r["size"] for r in uncut["largest"]})
        parts.append(f"{uncut['groups']} prunable group(s) of {'/'.join(map(str, sizes))} unit(s) left whole, "
                     f"{uncut['share']:.0%} of params (e.g. {uncut['largest'][0]['producers'][0]})")
    others = [r for r in pinned if r["reason"] != "reaches a model output"]
    for row in (others[:1] + pinned[:1])[: 2 if not parts else 1]:
        text = f"{row['size']} ch [{row['producers'][0] if row['producers'] else '-'}]: {row['reason']}"
        if text not in parts:
            parts.append(text if len(text) < 200 else text[:197] + "...")
    return " | ".join(parts)


def _graphprune(case: Case, want: list, scale: float, n0: int, timeout: float) -> dict:
    import torch

    import graphprune as gp

    row: dict = {}
    _alarm(timeout)
    try:
        start = time.perf_counter()
        result = gp.prune(case.model, case.gp_inputs, method="magnitude", ratio=0.5, p=1)
        row["s"] = time.perf_counter() - start
    except ToolTimeout as exc:
        return {"status": "TIMEOUT", "error": str(exc)}
    except gp.TraceError as exc:  # not one graph: the parts that trace (gp.prune_parts)
        _disarm()
        return _graphprune_parts(case, want, n0, timeout, _error(exc))
    except Exception as exc:
        return {"status": "FAILED", "typed": isinstance(exc, gp.GraphPruneError), "error": _error(exc),
                "traceback": traceback.format_exc()[-1500:]}
    finally:
        _disarm()
    slim, dg, plan = result.model, result.graph, result.plan
    row.update(status="ok", params=n0, params_after=_n_params(slim), left=_n_params(slim) / n0,
               count_before=result.before.params, count_after=result.after.params,
               groups=len(dg.groups), prunable=sum(g.prunable for g in dg.groups),
               inexact_groups=sum(g.prunable and not g.exact for g in dg.groups),
               plan_touches_inexact=any(len(ch) and not dg.groups[gid].exact for gid, ch in plan.items()))
    try:
        got = _run(slim, case, graph_module=True)
        row.update(runs=True, same_shape=_shapes(got) == want,
                   finite=all(bool(torch.isfinite(t).all()) for t in _tensors(got) if t.is_floating_point()))
    except Exception as exc:
        row.update(runs=False, run_error=_error(exc))
    _alarm(timeout)
    try:
        exact = gp.Plan({gid: ch for gid, ch in plan.items() if dg.groups[gid].exact})
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            diff = gp.verify(case.model, case.gp_inputs, exact, dg=dg)
        row.update(verify_s=time.perf_counter() - start, verify_abs=diff, verify=diff / scale if scale else diff,
                   exact_groups_cut=sum(1 for ch in exact.values() if len(ch)))
    except Exception as exc:
        row["verify_error"] = _error(exc)
    finally:
        _disarm()
    row["pinned"] = _pinned(case.model, dg)
    row["pinned_share"] = sum(r["elements"] for r in _pinned(case.model, dg, top=10**6)) / n0
    row["uncovered"] = _uncovered(case.model, dg, n0)
    row["uncut"] = _uncut(case.model, dg, plan, n0)
    row["pinned_summary"] = _summary(row["pinned"], row["uncovered"], row["uncut"], n0)
    if _has_grouped_conv(case.model):
        row["grouped_groups"] = _grouped_groups(case, n0, scale, timeout)
    return row


def _graphprune_parts(case: Case, want: list, n0: int, timeout: float, trace_error: str) -> dict:
    """``gp.prune_parts`` with the same options, for a model that does not trace whole."""
    import graphprune as gp

    _alarm(timeout)
    try:
        start = time.perf_counter()
        result = gp.prune_parts(case.model, case.gp_inputs, method="magnitude", ratio=0.5, p=1)
        seconds = time.perf_counter() - start
    except ToolTimeout as exc:
        return {"status": "TIMEOUT", "error": str(exc), "trace_error": trace_error}
    except Exception as exc:
        return {"status": "FAILED", "typed": isinstance(exc, gp.GraphPruneError), "error": _error(exc),
                "trace_error": trace_error}
    finally:
        _disarm()
    row = {"status": "ok", "via": "prune_parts", "trace_error": trace_error, "s": seconds, "params": n0,
           "params_after": _n_params(result.model), "left": _n_params(result.model) / n0,
           "parts": {name: [r.before.params, r.after.params] for name, r in result.parts.items()},
           "unpruned": result.unpruned, "verify": result.max_diff, "verify_abs": result.max_diff,
           "part_diffs": result.part_diffs, "output_diff": result.output_diff}
    try:
        got = _run(result.model, case)
        row.update(runs=True, same_shape=_shapes(got) == want)
    except Exception as exc:
        row.update(runs=False, run_error=_error(exc))
    row["pinned_summary"] = "parts: " + ", ".join(result.parts) + " (their outputs keep their widths)"
    return row


def _has_grouped_conv(model) -> bool:
    import torch

    return any(isinstance(m, torch.nn.Conv2d) and 1 < m.groups < m.in_channels for m in model.modules())


def _grouped_groups(case: Case, n0: int, scale: float, timeout: float) -> dict:
    """The same 50% magnitude plan on a graph built with ``grouped="groups"`` (grouped convolutions
    lose whole conv groups instead of the same positions in every group, the default)."""
    import graphprune as gp

    _alarm(timeout)
    try:
        dg = gp.DependencyGraph.build(case.model, case.gp_inputs, grouped="groups")
        plan = gp.select(dg, gp.score("magnitude", case.model, dg, p=1), 0.5)
        slim = gp.apply(case.model, dg, plan)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            diff = gp.verify(case.model, case.gp_inputs, plan, dg=dg, slim=slim)
        return {"left": _n_params(slim) / n0, "verify": diff / scale if scale else diff,
                "plan_touches_inexact": any(len(ch) and not dg.groups[g].exact for g, ch in plan.items())}
    except ToolTimeout as exc:
        return {"status": "TIMEOUT", "error": str(exc)}
    except Exception as exc:
        return {"status": "FAILED", "error": _error(exc)}
    finally:
        _disarm()


def _torch_pruning(case: Case, want: list, n0: int, timeout: float) -> dict:
    import torch
    import torch_pruning as tp

    model = copy.deepcopy(case.model)
    modules = dict(model.named_modules())
    ignored = [modules[n] for n in case.output_layers if n in modules]
    options, fix = RECIPES[case.recipe](model)
    example = case.tp_inputs
    row: dict = {"recipe": case.recipe, "ignored": [n for n in case.output_layers if n in modules]}
    _alarm(timeout)
    stage = "MetaPruner"
    try:
        start = time.perf_counter()
        pruner = tp.pruner.MetaPruner(model, example, importance=tp.importance.MagnitudeImportance(p=1),
                                      pruning_ratio=0.5, ignored_layers=ignored, **options)
        stage = "step"
        pruner.step()
        fix(pruner)
        row["s"] = time.perf_counter() - start
    except ToolTimeout as exc:
        return {**row, "status": "TIMEOUT", "error": f"{stage}: {exc}"}
    except Exception as exc:
        return {**row, "status": "FAILED", "error": f"{stage}: {_error(exc)}",
                "traceback": traceback.format_exc()[-1500:]}
    finally:
        _disarm()
    row.update(status="ok", params=n0, params_after=_n_params(model), left=_n_params(model) / n0)
    model.eval()
    try:
        got = _run(model, case)
        row.update(runs=True, same_shape=_shapes(got) == want,
                   finite=all(bool(torch.isfinite(t).all()) for t in _tensors(got) if t.is_floating_point()))
        if not row["same_shape"]:
            row["shapes"] = [list(s) for s in _shapes(got)]
    except Exception as exc:
        row.update(runs=False, run_error=_error(exc))
    return row


def child(name: str, out: Path, timeout: float) -> None:
    """Measure one model; write the row to ``out`` after each tool (a later crash keeps it)."""
    os.environ.setdefault("TIMM_FUSED_ATTN", "0")  # the timm recipe's setting, for both tools
    sys.path.insert(0, str(HERE))
    import _torchvision_ops
    import torch

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    _torchvision_ops.import_torchvision()
    import torch_pruning

    family, build, _ = MODELS[name]
    row: dict = {"model": name, "family": family}

    def save():
        out.write_text(json.dumps(row, default=_json_default))

    torch.manual_seed(0)
    try:
        case = build()
    except Exception as exc:
        row["build_error"] = _error(exc)
        save()
        return
    row["torchvision_ops_declared"] = _torchvision_ops.declared
    row["torch_pruning"] = getattr(torch_pruning, "__version__", "?")
    n0 = _n_params(case.model)
    row["params"] = n0
    try:
        ref = _run(case.model, case)
        want = _shapes(ref)
        scale = max((float(t.abs().max()) for t in _tensors(ref) if t.is_floating_point() and t.numel()),
                    default=1.0)
        row.update(output_shapes=[list(s) for s in want], output_scale=scale)
    except Exception as exc:
        row["original_run_error"] = _error(exc)
        want, scale = None, 1.0
    save()
    row["gp"] = _graphprune(case, want, scale, n0, timeout)
    save()
    row["tp"] = _torch_pruning(case, want, n0, timeout)
    save()


def _json_default(obj):
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    return str(obj)


# ------------------------------------------------------------------------- the table


def _cell_left(tool: dict | None) -> str:
    if not tool:
        return "-"
    if tool.get("status") != "ok":
        return tool.get("status", "?")
    return f"{tool['left']:.2f}"


def _cell_ok(tool: dict | None) -> str:
    if not tool or tool.get("status") != "ok":
        return "-"
    if not tool.get("runs"):
        return "no (run fails)"
    if not tool.get("same_shape"):
        return "no (shape)"
    return "yes" if tool.get("finite", True) else "no (not finite)"


def _cell_verify(gp: dict | None) -> str:
    if not gp or gp.get("status") != "ok":
        return "-"
    if "verify" not in gp:
        return "error"
    v = gp["verify"]
    text = "inf" if math.isinf(v) else f"{v:.0e}"
    return text + (" (+inexact)" if gp.get("plan_touches_inexact") else "")


def print_table(rows: list[dict], header: bool = True) -> None:
    head = (f"{'model':34s} {'params':>9s} {'gp left':>7s} {'TP left':>7s} {'gp ok':>6s} {'TP ok':>14s} "
            f"{'verify':>15s} {'gp s':>6s} {'TP s':>6s}  gp: largest pinned")
    if header:
        print(head)
        print("-" * len(head))
    for r in rows:
        gp, tp = r.get("gp"), r.get("tp")
        if "build_error" in r or "crash" in r:
            print(f"{r['model']:34s} {r.get('build_error') or r.get('crash')}")
            if not gp and not tp:
                continue
        gs = f"{gp['s']:.1f}" if gp and "s" in gp else "-"
        ts = f"{tp['s']:.1f}" if tp and "s" in tp else "-"
        note = (gp or {}).get("pinned_summary", "") if (gp or {}).get("status") == "ok" else (gp or {}).get("error", "")
        print(f"{r['model']:34s} {r.get('params', 0):9d} {_cell_left(gp):>7s} {_cell_left(tp):>7s} "
              f"{_cell_ok(gp):>6s} {_cell_ok(tp):>14s} {_cell_verify(gp):>15s} {gs:>6s} {ts:>6s}  {note[:140]}")
        if tp and tp.get("status") != "ok":
            print(f"{'':34s} TP: {tp.get('error', '')[:150]}")
        elif tp and not tp.get("runs", True):
            print(f"{'':34s} TP run: {tp.get('run_error', '')[:150]}")


# The issue's figures (graphprune then / Torch-Pruning then), where it lists the model
ISSUE = {"llama": "0.60* / hangs", "qwen2": "0.60* / hangs", "mistral": "0.60* / hangs", "gpt2": "1.00 / 1.00",
         "bert_mlm": "0.57 / 0.28", "bert": "0.57 / 0.28", "bart": "0.54 / 0.36", "clip_text": "0.68 / 0.34",
         "clip_vision": "0.68 / 0.34", "user_transformer_encoder": "1.00 / 0.78", "unet2d": "0.92 / 0.25",
         "unet2d_condition": "0.77 / 0.24", "efficientnet_b0": "0.43-0.47 / 0.27-0.32",
         "efficientnet_v2_s": "0.43-0.47 / 0.27-0.32", "convnext_tiny": "0.52-0.55 / 0.25-0.26",
         "regnet_x_3_2gf": "0.34-0.38 / 0.26-0.27", "regnet_y_3_2gf": "0.34-0.38 / 0.26-0.27",
         "fasterrcnn_mobilenet_v3_large_fpn": "cannot trace / 0.88", "resnest14d": "0.58 / 0.42"}


# What graphprune keeps whole, and why that is right (the docs' last column; see docs/benchmarks.md)
_OUTPUT = "output layer"
NOTES = {"llama": "vocab (output)", "qwen2": "vocab (output)", "mistral": "vocab (output)",
         "gpt2": "vocab (output, tied `wte`)", "bert_mlm": "vocab (output)",
         "bert": "hidden size: `last_hidden_state` is an output",
         "bart": "`d_model`: `encoder_last_hidden_state` is an output",
         "clip_text": "hidden size: `last_hidden_state` is an output",
         "clip_vision": "hidden size: `last_hidden_state` is an output",
         "user_transformer_encoder": _OUTPUT, "unet2d": "GroupNorm groups go whole (exact); skip concats join "
         "streams into wider units", "unet2d_condition": "as UNet2DModel", "efficientnet_b0": _OUTPUT,
         "efficientnet_v2_s": _OUTPUT, "convnext_tiny": _OUTPUT, "regnet_x_3_2gf": _OUTPUT,
         "regnet_y_3_2gf": _OUTPUT, "mobilenet_v3_large": _OUTPUT, "resnet50": _OUTPUT,
         "fasterrcnn_mobilenet_v3_large_fpn": "part outputs (`gp.prune_parts`: see below)", "resnest14d": _OUTPUT,
         "vit_tiny_patch16_224": _OUTPUT, "swin_tiny_patch4_window7_224": _OUTPUT,
         "eva02_tiny_patch14_224": _OUTPUT, "convnextv2_atto": _OUTPUT, "mobilevit_xxs": _OUTPUT,
         "levit_128s": _OUTPUT, "yolov8n": "neck feature maps (eval-mode outputs)",
         "yolo11n": "neck feature maps (eval-mode outputs)"}


def _cell_tp_ok(tp: dict | None) -> str:
    if not tp:
        return "-"
    if tp.get("status") != "ok":
        return tp.get("status", "?") + (f" ({tp['error'].split(':')[0]})" if tp.get("status") == "FAILED" else "")
    return _cell_ok(tp)


def markdown(rows: list[dict]) -> str:
    """The table of docs/benchmarks.md."""
    out = ["| model | params | graphprune left | TP left | graphprune runs, same shape | TP runs, same shape "
           "| verify, exact groups (rel.) | graphprune s | TP s | issue then: gp / TP | what graphprune keeps whole |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        gp, tp = r.get("gp") or {}, r.get("tp") or {}
        gs = f"{gp['s']:.1f}" if "s" in gp else "-"
        ts = f"{tp['s']:.1f}" if "s" in tp else "-"
        left = _cell_left(gp)
        if gp.get("status") != "ok" and gp.get("error"):
            left = f"{gp['status']} ({gp['error'].split(':')[0]})"
        out.append(f"| {r['model']} | {r.get('params', 0) / 1e6:.2f}M | {left} | {_cell_left(tp)} | "
                   f"{_cell_ok(gp)} | {_cell_tp_ok(tp)} | {_cell_verify(gp)} | {gs} | {ts} | "
                   f"{ISSUE.get(r['model'], '')} | {NOTES.get(r['model'], '')} |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", help="model names (default: all; --list shows them)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per tool (default 300)")
    parser.add_argument("--small-timeout", type=float, default=120.0,
                        help="seconds per tool for the small-config models (default 120)")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--markdown", action="store_true", help="print results/depth.json as a markdown table")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, Path(args.out), args.timeout)
        return
    if args.markdown:
        print(markdown(json.loads((RESULTS / "depth.json").read_text())["rows"]))
        return
    if args.list:
        for name, (family, _, small) in MODELS.items():
            print(f"{name:36s} {family}{' (small config)' if small else ''}")
        return
    names = args.models or list(MODELS)
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        parser.error(f"unknown models {unknown}; --list shows them")
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "depth.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    by_name = {r["model"]: r for r in old.get("rows", [])}
    rows = []
    for name in names:
        timeout = args.small_timeout if MODELS[name][2] else args.timeout
        row = _run_child(name, timeout)
        by_name[name] = row
        rows.append(row)
        print_table([row], header=len(rows) == 1)
        sys.stdout.flush()
        _write(path, by_name, args)
    print()
    print_table([by_name[n] for n in MODELS if n in by_name])
    print(f"\nresults in {path}")


def _run_child(name: str, timeout: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--out", str(out),
               "--timeout", str(timeout)]
        start = time.perf_counter()
        limit = 2 * (timeout + 60) + 180  # both tools, verify, building the model, imports
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=limit)
            crash = None if done.returncode == 0 else f"exit {done.returncode}: {done.stderr.strip()[-300:]}"
        except subprocess.TimeoutExpired:
            crash = f"subprocess killed after {limit:.0f} s"
        row = json.loads(out.read_text()) if out.exists() else {"model": name, "family": MODELS[name][0]}
        row["wall_s"] = time.perf_counter() - start
        row["timeout_s"] = timeout
        row["date"] = time.strftime("%Y-%m-%d %H:%M")
        if crash:
            row["crash"] = crash
            status = "CRASH" if crash.startswith("exit") else "TIMEOUT"
            for tool in ("gp", "tp"):
                if tool not in row:  # the first missing one was running; a later one never started
                    row[tool] = {"status": status, "error": crash}
                    status = "NOT RUN"
        return row


def _write(path: Path, by_name: dict, args) -> None:
    import importlib.metadata as md

    def version(pkg):
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    ordered = [by_name[n] for n in MODELS if n in by_name]
    meta = {pkg: version(pkg) for pkg in ("torch", "torchvision", "timm", "transformers", "diffusers",
                                          "torch-pruning")}
    path.write_text(json.dumps({"versions": meta, "timeout_s": args.timeout, "small_timeout_s": args.small_timeout,
                                "threads": 1, "ratio": 0.5, "rows": ordered}, indent=1, default=_json_default))


if __name__ == "__main__":
    main()
