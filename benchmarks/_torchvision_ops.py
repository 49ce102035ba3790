"""Let torchvision's Python models import when its compiled operators do not load.

A torchvision wheel built for another torch release cannot register its C++ operators
(``torchvision::nms`` and friends); ``import torchvision`` then dies inside
``torchvision/_meta_registrations.py``, which attaches fake (shape) functions to those
operators and finds nothing to attach them to. timm imports torchvision, so it dies too.

``import_torchvision()`` imports torchvision as usual. Only if that fails for this
reason does it declare the operators' schemas with ``torch.library`` (declarations
only, no kernels) and import again. Classification and segmentation models need none
of these operators and run normally; a model that calls one at run time (detection:
``nms``, ``roi_align``) fails there (torchvision's own check raises ``RuntimeError:
Couldn't load custom C++ ops``), which the benchmark records as that model's result.
Nothing is declared when the real operators load. Import this before transformers,
timm or diffusers, which import torchvision themselves.
"""

from __future__ import annotations

import sys

import torch

_SCALE_AND_POOL = "float spatial_scale, SymInt pooled_height, SymInt pooled_width"
_SIZES = "SymInt batch_size, SymInt channels, SymInt height, SymInt width"
_CONV = ("SymInt stride_h, SymInt stride_w, SymInt pad_h, SymInt pad_w, SymInt dilation_h, "
         "SymInt dilation_w, SymInt groups, SymInt offset_groups, bool use_mask")

# operator name -> (arguments, returns), as torchvision's C++ library declares them
_OPERATORS = {
    "nms": ("Tensor dets, Tensor scores, float iou_threshold", "Tensor"),
    "qnms": ("Tensor dets, Tensor scores, float iou_threshold", "Tensor"),
    "roi_align": (f"Tensor input, Tensor rois, {_SCALE_AND_POOL}, int sampling_ratio, bool aligned", "Tensor"),
    "qroi_align": (f"Tensor input, Tensor rois, {_SCALE_AND_POOL}, int sampling_ratio, bool aligned", "Tensor"),
    "_roi_align_backward": (f"Tensor grad, Tensor rois, {_SCALE_AND_POOL}, {_SIZES}, int sampling_ratio, "
                            "bool aligned", "Tensor"),
    "ps_roi_align": (f"Tensor input, Tensor rois, {_SCALE_AND_POOL}, int sampling_ratio", "(Tensor, Tensor)"),
    "_ps_roi_align_backward": (f"Tensor grad, Tensor rois, Tensor channel_mapping, {_SCALE_AND_POOL}, "
                               f"int sampling_ratio, {_SIZES}", "Tensor"),
    "roi_pool": (f"Tensor input, Tensor rois, {_SCALE_AND_POOL}", "(Tensor, Tensor)"),
    "_roi_pool_backward": (f"Tensor grad, Tensor rois, Tensor argmax, {_SCALE_AND_POOL}, {_SIZES}", "Tensor"),
    "ps_roi_pool": (f"Tensor input, Tensor rois, {_SCALE_AND_POOL}", "(Tensor, Tensor)"),
    "_ps_roi_pool_backward": (f"Tensor grad, Tensor rois, Tensor channel_mapping, {_SCALE_AND_POOL}, {_SIZES}",
                              "Tensor"),
    "deform_conv2d": (f"Tensor input, Tensor weight, Tensor offset, Tensor mask, Tensor bias, {_CONV}", "Tensor"),
    "_deform_conv2d_backward": (f"Tensor grad, Tensor input, Tensor weight, Tensor offset, Tensor mask, "
                                f"Tensor bias, {_CONV}", "(Tensor, Tensor, Tensor, Tensor, Tensor)"),
}

_library = None  # the declarations live as long as this module
declared = False  # whether this process runs on the declarations (no detection kernels)


def _declare() -> None:
    global _library, declared
    _library = torch.library.Library("torchvision", "DEF")
    for name, (arguments, returns) in _OPERATORS.items():
        try:
            _library.define(f"{name}({arguments}) -> {returns}")
        except RuntimeError:  # already declared by a partial load
            pass
    declared = True


def import_torchvision():
    """``import torchvision``, declaring its operators first if its compiled library did not load."""
    try:
        import torchvision
        return torchvision
    except RuntimeError as exc:
        if "torchvision::" not in str(exc) or "does not exist" not in str(exc):
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]  # the failed import left half-initialised modules behind
    _declare()
    import torchvision
    _detection_kernels(torchvision)
    return torchvision


def _nms(dets: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy non-maximum suppression: indices of the kept boxes, by decreasing score."""
    order = scores.argsort(descending=True)
    boxes = dets[order]
    x1, y1, x2, y2 = boxes.unbind(1)
    area = (x2 - x1).clamp(min=0) * (y2 - y1).clamp(min=0)
    suppressed = torch.zeros(len(order), dtype=torch.bool)
    keep = []
    for i in range(len(order)):
        if suppressed[i]:
            continue
        keep.append(i)
        w = (torch.minimum(x2[i], x2[i + 1:]) - torch.maximum(x1[i], x1[i + 1:])).clamp(min=0)
        h = (torch.minimum(y2[i], y2[i + 1:]) - torch.maximum(y1[i], y1[i + 1:])).clamp(min=0)
        inter = w * h
        iou = inter / (area[i] + area[i + 1:] - inter)
        suppressed[i + 1:] |= iou > iou_threshold
    return order[torch.tensor(keep, dtype=torch.long)]


def _detection_kernels(torchvision) -> None:
    """CPU kernels in plain torch for the two operators detection models call (``nms``, and
    ``roi_align`` through torchvision's own pure-Python version), so that Faster R-CNN runs
    for both tools; the others stay declarations."""
    from torchvision.ops import roi_align as roi_align_module

    _library.impl("nms", _nms, "CPU")
    _library.impl("roi_align", lambda x, rois, scale, ph, pw, ratio, aligned: roi_align_module._roi_align(
        x, rois, scale, ph, pw, ratio, aligned), "CPU")
    torchvision.extension._has_ops = lambda: True  # the checks in torchvision.ops ask this
