"""Record every node's output shape with one run of a traced graph on example inputs.

``propagate_shapes(gm, inputs)`` runs ``gm`` once (``torch.fx.Interpreter`` semantics at a
fraction of its per-node cost) and leaves on each node:

- ``node.meta["shape"]``: a ``torch.Size`` for a tensor, a nested tuple of them for tuple
  outputs, the value itself for Python scalars (``x.size(1)``);
- ``node.meta["tensor_meta"]``: the usual fx ``TensorMetadata`` (placeholders only: building
  it costs about half a millisecond per tensor).

It returns the graph's output and restores the buffers the run may update (BatchNorm
running statistics in training mode).

>>> import torch
>>> gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU()))
>>> _ = propagate_shapes(gm, (torch.randn(2, 4),))
>>> [(n.name, tuple(n.meta["shape"])) for n in gm.graph.nodes if n.op != "output"]
[('input_1', (2, 4)), ('_0', (2, 3)), ('_1', (2, 3))]
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.fx
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from graphprune.errors import TraceError

__all__ = ["propagate_shapes", "shape_of", "kept_buffers"]


def shape_of(value: Any) -> Any:
    """The shape structure recorded in ``node.meta['shape']`` for a runtime value."""
    if isinstance(value, torch.Tensor):
        return value.shape
    if isinstance(value, (tuple, list)):
        return tuple(shape_of(v) for v in value)
    if isinstance(value, dict):
        return tuple(shape_of(v) for v in value.values())
    if isinstance(value, (int, float, bool, str)) or value is None:
        return value
    if isinstance(value, torch.Size):
        return tuple(value)
    return None


def _run_recording(gm: torch.fx.GraphModule, inputs: tuple[Any, ...]) -> Any:
    """Run the graph once on real inputs, storing each node's output shape in ``node.meta``.

    ``torch.fx.Interpreter`` semantics (placeholders with defaults and ``*args``, values
    freed after their last use) with a fraction of its per-node overhead: each node's
    callable is looked up once and arguments are filled in with ``map_arg``.
    """
    modules = dict(gm.named_modules())
    last_user: dict[torch.fx.Node, torch.fx.Node] = {}
    for node in gm.graph.nodes:
        for used in node.all_input_nodes:
            last_user[used] = node
    dead_after: dict[torch.fx.Node, list[torch.fx.Node]] = {}
    for used, user in last_user.items():
        dead_after.setdefault(user, []).append(used)
    env: dict[torch.fx.Node, Any] = {}
    pending = iter(inputs)
    for node in gm.graph.nodes:
        try:
            if node.op == "placeholder":
                if node.target.startswith("*"):
                    value = list(pending)
                else:
                    value = next(pending, _MISSING)
                    if value is _MISSING:
                        if not node.args:
                            raise TypeError(f"no value for input {node.target!r}")
                        value = node.args[0]
            elif node.op == "get_attr":
                value = gm
                for part in node.target.split("."):
                    value = getattr(value, part)
            elif node.op == "output":
                return torch.fx.node.map_arg(node.args[0], env.__getitem__)
            else:
                args = torch.fx.node.map_arg(node.args, env.__getitem__)
                kwargs = torch.fx.node.map_arg(node.kwargs, env.__getitem__)
                if node.op == "call_function":
                    value = node.target(*args, **kwargs)
                elif node.op == "call_method":
                    value = getattr(args[0], node.target)(*args[1:], **kwargs)
                else:
                    value = modules[node.target](*args, **kwargs)
        except Exception as exc:
            culprit = f"module {node.target!r}" if node.op == "call_module" else f"{node.op} {node.target}"
            raise TraceError(
                f"running the example inputs through node {node.name!r} ({culprit}) failed: "
                f"{type(exc).__name__}: {exc}. Check that example_inputs have the shape, "
                "dtype and device the model expects."
            ) from exc
        node.meta["shape"] = shape_of(value)
        if node.op == "placeholder" and isinstance(value, torch.Tensor):
            node.meta["tensor_meta"] = _extract_tensor_metadata(value)
        env[node] = value
        for used in dead_after.get(node, ()):
            del env[used]
    return None


_MISSING = object()


def propagate_shapes(gm: torch.fx.GraphModule, inputs: tuple[torch.Tensor, ...]) -> Any:
    """Annotate ``gm`` in place with output shapes; state buffers are restored afterwards."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(inputs) > len(placeholders) or len(inputs) < sum(
        1 for n in placeholders if not n.args
    ):
        names = ", ".join(n.target for n in placeholders)
        raise TraceError(
            f"the model's forward takes {len(placeholders)} input(s) ({names}) "
            f"but {len(inputs)} example input(s) were given"
        )
    with kept_buffers(gm), torch.no_grad():
        return _run_recording(gm, inputs)


@contextlib.contextmanager
def kept_buffers(module: torch.nn.Module) -> Iterator[None]:
    """Put every buffer of ``module`` back to its value on entry (a forward may update some)."""
    saved = {name: b.detach().clone() for name, b in module.named_buffers()}
    try:
        yield
    finally:
        with torch.no_grad():
            for name, b in module.named_buffers():
                if name in saved:
                    b.copy_(saved[name])
