"""What an op without a rule does to channels, found by running it on random inputs.

Before the labelling pass pins the channels that reach an op it has no rule for (a
function wrapped with ``torch.fx.wrap``, a user's leaf module), ``channelwise(ctx, node,
module)`` asks whether the op is *channel-wise* along each labelled axis of its one tensor
input: for every such axis and a few channels, running the op on the input without
those channels must give the full output without them. That is exactly what pruning
needs (a removed channel neither moves nor changes the others, whatever the op reads
from the channel count), so the labels pass through. Anything else leaves the decision
to pinning: ops with parameters or buffers (their slices are not known), several tensor
inputs, outputs of another shape, non-deterministic or failing runs, and any mismatch.

>>> import torch, graphprune as gp
>>> class SoftClip(torch.nn.Module):          # kept whole as a leaf: no rule knows it
...     def forward(self, x):
...         return 3.0 * torch.tanh(x / 3.0)
>>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), SoftClip(), torch.nn.Conv2d(8, 2, 1))
>>> dg = gp.DependencyGraph.build(model, torch.randn(1, 3, 4, 4), leaf_modules=[SoftClip])
>>> dg.groups[0].prunable, dg.node_info["_1"]
(True, {'probed': True})
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.fx

__all__ = ["channelwise"]

_CHANNELS_TRIED = 2


def _value(x: Any) -> Any:
    """A random stand-in for a node argument (recorded numbers stay as recorded)."""
    if isinstance(x, torch.fx.Node):
        shape = x.meta.get("shape")
        return torch.randn(shape, generator=_GEN) if isinstance(shape, torch.Size) else shape
    return x


_GEN = torch.Generator()


def channelwise(ctx: Any, node: torch.fx.Node, module: torch.nn.Module | None) -> Any:
    """The input's labels if the op is channel-wise along every labelled axis, else None."""
    if node.op not in ("call_function", "call_method", "call_module"):
        return None
    if module is not None and (any(True for _ in module.parameters()) or any(True for _ in module.buffers())):
        return None
    tensors = [a for a in node.all_input_nodes if isinstance(a.meta.get("shape"), torch.Size)]
    out_shape = node.meta.get("shape")
    if len(tensors) != 1 or not isinstance(out_shape, torch.Size) or out_shape != tensors[0].meta["shape"]:
        return None
    x = tensors[0]
    labels = ctx.labels(x)
    if not isinstance(labels, tuple) or all(lab is None for lab in labels):
        return None

    def run(value: torch.Tensor) -> torch.Tensor:
        args = torch.fx.node.map_arg(node.args, lambda a: value if a is x else _value(a))
        kwargs = torch.fx.node.map_arg(node.kwargs, lambda a: value if a is x else _value(a))
        if node.op == "call_module":
            return module(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        return node.target(*args, **kwargs)

    _GEN.manual_seed(0)
    try:
        with torch.no_grad():
            full = torch.randn(tuple(out_shape), generator=_GEN, dtype=torch.float64)
            y = run(full)
            if not isinstance(y, torch.Tensor) or y.shape != full.shape or not torch.isfinite(y).all() \
                    or not torch.equal(y, run(full.clone())):
                return None
            for d, lab in enumerate(labels):
                n = full.shape[d]
                if lab is None or n < 2:
                    continue
                for c in sorted({0, n // 2})[:_CHANNELS_TRIED]:
                    keep = torch.as_tensor(np.delete(np.arange(n), c))
                    part = run(full.index_select(d, keep))
                    if part.shape != y.index_select(d, keep).shape or \
                            not torch.allclose(part, y.index_select(d, keep), rtol=1e-9, atol=1e-12):
                        return None
    except Exception:  # an op that does not take a random float input (an index, a mask): pin
        return None
    return labels
