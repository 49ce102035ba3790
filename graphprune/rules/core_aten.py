"""Coverage of the Core ATen IR opset: which rule answers each overload, and why some need none.

``torch.export`` graphs that are decomposed (``ExportedProgram.run_decompositions()``) hold
only the *core* ATen overloads (``torch.Tag.core``). Every one of them that can carry a
channel axis has a rule (its own, registered in its family's file, or a tag rule such as
``torch.Tag.pointwise``). The rest are listed in ``NO_RULE`` with the reason none is needed;
at run time they get the unknown-op fallback (the numerical probe, else pinning with a
reason that names the op), which is also the answer for every op outside the opset.
``tests/rules/test_core_aten.py`` fails when torch adds a core overload that is in
neither place, so that someone decides.

Print the counts with ``python -m graphprune.rules.core_aten``.

>>> cov = coverage()
>>> sorted(cov) == ["none", "own", "tag", "undecided"]
True
>>> "aten.convolution.default" in cov["own"], "aten.full.default" in cov["none"]
(True, True)
"""

from __future__ import annotations

import torch

import graphprune.rules  # noqa: F401  (registers the built-in rules)
from graphprune.rules import base

__all__ = ["NO_RULE", "core_overloads", "coverage", "report"]

_BACKWARD = "a backward (gradient) op: inference graphs, which are what graphprune prunes, hold none"
_CREATES = "creates a tensor from sizes and numbers, reading no tensor: nothing to follow"
_NUMBER = "returns a number about memory layout, not a tensor or a width"

#: Core ATen overloads that need no rule, each with the reason (reviewed by hand). They get
#: the unknown-op fallback: probed, else pinned with a reason naming the op.
NO_RULE: dict[str, str] = {
    "aten._adaptive_avg_pool2d_backward.default": _BACKWARD,
    "aten.avg_pool2d_backward.default": _BACKWARD,
    "aten.convolution_backward.default": _BACKWARD,
    "aten.embedding_dense_backward.default": _BACKWARD,
    "aten.max_pool2d_with_indices_backward.default": _BACKWARD,
    "aten.native_group_norm_backward.default": _BACKWARD,
    "aten.native_layer_norm_backward.default": _BACKWARD,
    "aten.arange.start_step": _CREATES,
    "aten.empty.memory_format": _CREATES,
    "aten.empty_strided.default": _CREATES,
    "aten.full.default": _CREATES,
    "aten.rand.default": _CREATES,
    "aten.randn.default": _CREATES,
    "aten.randperm.default": _CREATES,
    "aten.scalar_tensor.default": _CREATES,
    "aten.sym_stride.int": _NUMBER,
    "aten.sym_storage_offset.default": _NUMBER,
    "aten._local_scalar_dense.default": "reads a one-element tensor as a Python number (.item()): a value, "
                                        "not a channel; a channel it reads is pinned",
    "aten.nonzero.default": "its output length depends on the values: positions of every axis are "
                            "data, so the axes that reach it are pinned",
    "aten.as_strided.default": "addresses memory by strides and offset, not by axes: a channel axis "
                               "cannot be followed, so it is pinned",
    "aten.masked_scatter.default": "fills masked positions in order from the flattened source: removing "
                                   "any position moves every later value, so it is pinned",
    "aten.index.Tensor": "advanced indexing: its rule is being written apart (until then it is pinned "
                         "with a reason naming it); remove this entry when the rule lands",
}


def core_overloads() -> list[torch._ops.OpOverload]:
    """Every ATen overload of this torch build tagged ``torch.Tag.core``, sorted by name."""
    found = []
    for name in dir(torch.ops.aten):
        packet = getattr(torch.ops.aten, name, None)
        if not isinstance(packet, torch._ops.OpOverloadPacket):
            continue
        for overload in packet.overloads():
            op = getattr(packet, overload)
            if torch.Tag.core in op.tags:
                found.append(op)
    return sorted(found, key=str)


def coverage() -> dict[str, list[str]]:
    """Core ATen overloads by how they are answered: ``own`` rule, ``tag`` rule, declared in
    ``NO_RULE`` (``none``), or ``undecided`` (neither: a new op torch added)."""
    out: dict[str, list[str]] = {"own": [], "tag": [], "none": [], "undecided": []}
    for op in core_overloads():
        if op in base._FUNCTION_RULES:
            out["own"].append(str(op))
        elif any(t in base._TAG_RULES for t in op.tags):
            out["tag"].append(str(op))
        elif str(op) in NO_RULE:
            out["none"].append(str(op))
        else:
            out["undecided"].append(str(op))
    return out


def report() -> str:
    """The counts of ``coverage()`` as text, naming any undecided overload."""
    cov = coverage()
    lines = [f"core ATen overloads: {sum(len(v) for v in cov.values())} (torch {torch.__version__})"]
    for key, what in (("own", "own rule"), ("tag", "tag rule"), ("none", "declared none (NO_RULE)"),
                      ("undecided", "undecided")):
        lines.append(f"  {what:24s} {len(cov[key])}")
    if cov["undecided"]:
        lines.append("undecided: " + ", ".join(cov["undecided"]))
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
