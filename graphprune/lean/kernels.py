"""From kept kernels to kept channels: LEAN's plan and its kernel masks.

``plan_from_kernels(dg, cg, extraction)`` keeps a channel class iff a kept kernel from a
surviving class enters it and one leaves it (to a fixpoint), as a ``gp.Plan``, plus
masks of the kernels kept inside surviving channels; ``slim_kernel_masks`` re-indexes
them for the slim model, ``apply_kernel_masks`` zeroes the dropped kernels and
``KernelMasker`` keeps them at zero while training.

>>> import torch, graphprune as gp
>>> from graphprune.lean import ChannelGraph, extract
>>> model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(),
...                             torch.nn.Conv2d(4, 4, 3, padding=1), torch.nn.ReLU(),
...                             torch.nn.Conv2d(4, 2, 1))
>>> dg = gp.DependencyGraph.build(model, torch.randn(1, 1, 8, 8))
>>> cg = ChannelGraph.build(model, dg)
>>> lp = plan_from_kernels(dg, cg, extract(cg, keep=6))
>>> lp.kept_kernels <= 6, lp.kept_channels < lp.total_channels
(True, True)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from graphprune.graph import DependencyGraph
from graphprune.lean.channel_graph import ChannelGraph
from graphprune.lean.paths import Extraction
from graphprune.plan import Plan
from graphprune.removal import Removal, repair
from graphprune.select import resolve_ignore

__all__ = ["LeanPlan", "plan_from_kernels", "slim_kernel_masks", "apply_kernel_masks", "KernelMasker"]


@dataclass
class LeanPlan:
    """Surviving channels as a ``Plan``, plus kernel masks and counts.

    ``kernel_masks[param]`` is a bool tensor over ``weight.shape[:2]`` (original model's
    indexing) of the kernels kept inside surviving channels. ``extra_sparsity`` is the
    fraction of kernels between surviving channels that the masks drop on top of the
    channel removal.
    """

    plan: Plan
    kernel_masks: dict[str, torch.Tensor]
    total_kernels: int
    kept_kernels: int
    kernels_between_kept_channels: int
    total_channels: int
    kept_channels: int
    restored: list[tuple[int, int]] = field(default_factory=list)

    @property
    def extra_sparsity(self) -> float:
        k = self.kernels_between_kept_channels
        return 1.0 - self.kept_kernels / k if k else 0.0

    def summary(self) -> dict[str, Any]:
        return {"total_kernels": self.total_kernels, "kept_kernels": self.kept_kernels,
                "kernels_between_kept_channels": self.kernels_between_kept_channels,
                "extra_sparsity": self.extra_sparsity, "total_channels": self.total_channels,
                "kept_channels": self.kept_channels, "restored": len(self.restored)}


def _ragged(ptr: np.ndarray, items: np.ndarray, which: np.ndarray) -> np.ndarray:
    lo, hi = ptr[which], ptr[which + 1]
    lens = hi - lo
    total = int(lens.sum())
    if not total:
        return np.zeros(0, np.int64)
    starts = np.repeat(lo - np.concatenate([[0], np.cumsum(lens)[:-1]]), lens)
    return items[starts + np.arange(total)]


def plan_from_kernels(
    dg: DependencyGraph,
    cg: ChannelGraph,
    extraction: Extraction | Mapping[int, np.ndarray],
    *,
    ignore: Iterable[int | str] = (),
) -> LeanPlan:
    """The channels that survive the kept kernels, as a plan on ``dg``, to a fixpoint.

    A channel class survives iff a kept kernel from a surviving class enters it (or no
    kernel enters it at all: a source) and one leaves it to a surviving class (or it is
    read by the model output or an op outside the graph); a class whose only edges are
    its own (a depthwise conv) also needs one of those kept. Unprunable classes and
    ``ignore``d groups always survive. A group that may not vanish but lost every
    channel keeps its strongest one (with its strongest in- and out-kernels).
    """
    kept = extraction.kept if isinstance(extraction, Extraction) else dict(extraction)
    skip = resolve_ignore(dg, ignore)
    uniq, node_c = np.unique(cg.node_key, return_inverse=True)
    nc = len(uniq)
    pinned = np.ones(nc, bool)
    lab = uniq >= 0
    gids = np.where(lab, dg.group_of_cls[np.where(lab, uniq, 0)], -1)
    prunable = np.array([g >= 0 and dg.groups[g].prunable and g not in skip for g in gids.tolist()], bool)
    pinned[prunable] = False
    sink = np.zeros(nc, bool)
    sink[node_c[cg.node_sink]] = True

    has_in = np.zeros(nc, bool)
    has_self = np.zeros(nc, bool)
    strength = np.full(nc, -np.inf)
    ks, kd, kself = [], [], []
    for b in cg.kernel_blocks:
        blk = cg.blocks[b]
        exist = np.isfinite(blk.logw)
        sc = node_c[blk.src_matrix()]
        dc = node_c[blk.dst]
        same = sc == dc[:, None]
        has_in[dc[(exist & ~same).any(1)]] = True
        has_self[dc[(exist & same).any(1)]] = True
        np.maximum.at(strength, dc, blk.logw.max(1, initial=-np.inf).astype(np.float64))
        r, c = np.nonzero(kept[b] & exist)
        s_, d_ = sc[r, c], dc[r]
        ks.append(s_)
        kd.append(d_)
        kself.append(s_ == d_)
    ks_ = np.concatenate(ks) if ks else np.zeros(0, np.int64)
    kd_ = np.concatenate(kd) if kd else np.zeros(0, np.int64)
    kself_ = np.concatenate(kself) if kself else np.zeros(0, bool)
    es, ed = ks_[~kself_], kd_[~kself_]
    in_cnt = np.bincount(ed, minlength=nc)
    out_cnt = np.bincount(es, minlength=nc)
    self_cnt = np.bincount(kd_[kself_], minlength=nc)
    by_src = np.argsort(es, kind="stable")
    src_ptr = np.searchsorted(es[by_src], np.arange(nc + 1))
    by_dst = np.argsort(ed, kind="stable")
    dst_ptr = np.searchsorted(ed[by_dst], np.arange(nc + 1))
    alive = np.ones(nc, bool)
    while True:
        dead = alive & ~pinned & ((has_in & (in_cnt == 0)) | (~sink & (out_cnt == 0)) | (has_self & (self_cnt == 0)))
        if not dead.any():
            break
        alive[dead] = False
        which = np.flatnonzero(dead)
        in_cnt -= np.bincount(ed[_ragged(src_ptr, by_src, which)], minlength=nc)
        out_cnt -= np.bincount(es[_ragged(dst_ptr, by_dst, which)], minlength=nc)

    # Group plan; groups that may not vanish keep their strongest channel.
    removed: dict[int, list[int]] = {}
    cls_of = {}
    for i in np.flatnonzero(~alive & lab):
        g, ch = int(dg.group_of_cls[uniq[i]]), int(dg.chan_of_cls[uniq[i]])
        removed.setdefault(g, []).append(ch)
        cls_of[(g, ch)] = i
    restored: list[tuple[int, int]] = []
    for g, chans in removed.items():
        if len(chans) == dg.groups[g].size and not dg.groups[g].removable:
            best = max(chans, key=lambda ch: (strength[cls_of[(g, ch)]], -ch))
            chans.remove(best)
            alive[cls_of[(g, best)]] = True
            restored.append((g, best))
    plan = Plan({g: c for g, c in removed.items() if c})
    if Removal(dg, plan).problems:
        scores = {g: np.full(dg.groups[g].size, -np.inf) for g in plan}
        for i in np.flatnonzero(lab & prunable):
            g = int(dg.group_of_cls[uniq[i]])
            if g in scores:
                scores[g][int(dg.chan_of_cls[uniq[i]])] = strength[i]
        scores = {g: np.where(np.isfinite(s), s, -1e30) for g, s in scores.items()}
        plan = repair(dg, plan, scores)
        removed_mask = dg.removed_classes(plan)
        alive[lab] = ~removed_mask[uniq[lab]]

    # Kernel masks among surviving channels.
    restored_c = np.zeros(nc, bool)
    for g, ch in restored:
        restored_c[cls_of[(g, ch)]] = True
    masks: dict[str, torch.Tensor] = {}
    n_kept = n_between = n_total = 0
    for b in cg.kernel_blocks:
        blk = cg.blocks[b]
        exist = np.isfinite(blk.logw)
        sc = node_c[blk.src_matrix()]
        dc = node_c[blk.dst]
        between = exist & alive[sc] & alive[dc][:, None]
        eff = kept[b] & between
        if restored_c.any():
            rows = np.flatnonzero(restored_c[dc] & ~eff.any(1) & between.any(1))
            if len(rows):
                cols = np.where(between[rows], blk.logw[rows], -np.inf).argmax(1)
                eff[rows, cols] = True
            colmask = restored_c[sc] & between
            if colmask.any():
                for cl in np.unique(sc[colmask]).tolist():
                    sel = (sc == cl) & between
                    if (eff & sel).any():
                        continue
                    flat = np.where(sel, blk.logw, -np.inf)
                    r, c = np.unravel_index(int(flat.argmax()), flat.shape)
                    eff[r, c] = True
        n_total += int(exist.sum())
        n_between += int(between.sum())
        n_kept += int(eff.sum())
        if blk.param is not None:
            m = torch.from_numpy(eff.T.copy() if blk.transposed else eff.copy())
            masks[blk.param] = masks[blk.param] | m if blk.param in masks else m
    total_ch = sum(g.size for g in dg.groups if g.prunable)
    return LeanPlan(plan, masks, n_total, n_kept, n_between, total_ch, total_ch - plan.n_removed, restored)


def slim_kernel_masks(dg: DependencyGraph, plan: Plan, masks: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The kernel masks re-indexed for the slim model ``gp.apply(model, dg, plan)``."""
    removal = Removal(dg, plan)
    out = {}
    for param, m in masks.items():
        for d in (0, 1):
            labels = dg.member_labels.get((param, d))
            if labels is not None and len(labels) == m.shape[d]:
                keep = torch.from_numpy(removal.keep(labels))
                m = m[keep] if d == 0 else m[:, keep]
        if m.numel():
            out[param] = m
    return out


@torch.no_grad()
def apply_kernel_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> int:
    """Zero the kernels ``masks`` drops in ``model``'s weights, in place; returns how many."""
    params = dict(model.named_parameters())
    zeroed = 0
    for name, m in masks.items():
        w = params.get(name)
        if w is None or tuple(w.shape[:2]) != tuple(m.shape):
            continue
        drop = ~m.to(w.device)
        w[drop] = 0
        zeroed += int(drop.sum())
    return zeroed


class KernelMasker:
    """Keeps dropped kernels at zero while training (a ``graphprune.train.finetune`` plugin).

    ``after_step`` re-zeroes them; ``hook()`` instead masks their gradients (for any
    training loop; with zero start values SGD, Adam and AdamW keep them at zero) and
    returns handles to ``remove()``.
    """

    def __init__(self, masks: Mapping[str, torch.Tensor]) -> None:
        self.masks = dict(masks)

    def after_step(self, model: nn.Module) -> None:
        apply_kernel_masks(model, self.masks)

    def hook(self, model: nn.Module) -> list[Any]:
        handles = []
        params = dict(model.named_parameters())
        for name, m in self.masks.items():
            w = params.get(name)
            if w is None or tuple(w.shape[:2]) != tuple(m.shape):
                continue
            full = m.to(w.device, w.dtype).reshape(tuple(m.shape) + (1,) * (w.dim() - 2))
            handles.append(w.register_hook(lambda g, full=full: g * full.to(g.device)))
        return handles
