"""Recurrent layers: nn.LSTM, nn.GRU, nn.RNN (any depth, one or two directions).

Channel flow: the input features are ``weight_ih_l0``'s columns; the hidden units are the
prunable channels. Unit ``j`` owns row ``g * H + j`` of every gate block of
``weight_ih``/``weight_hh``/biases and column ``j`` of ``weight_hh`` (its recurrent
input), in every layer and direction: ``nn.LSTM`` has one ``hidden_size``, so a unit is
removed from all of them at once (one group per module). The layer output (and
``h_n``/``c_n``) carries the units. Values are mixed across units only through
``weight_hh``, and a removed unit's rows are zero in the masked original, so its gates
are constant and its state stays zero: exact. ``proj_size`` (LSTM projections) pins.
"""

from __future__ import annotations

import math

import numpy as np
import torch.nn as nn

from graphprune.rules.base import Multi, register, unlabelled

_GATES = {nn.LSTM: 4, nn.GRU: 3, nn.RNN: 1}


def _gates(module: nn.Module) -> int:
    return next(n for cls, n in _GATES.items() if isinstance(module, cls))


def _resize_recurrent(module: nn.RNNBase) -> None:
    module.hidden_size = module.weight_hh_l0.shape[1]
    module.input_size = module.weight_ih_l0.shape[1]
    module._init_flat_weights()  # forward reads the cached list of its (now sliced) parameters


def _recurrent_macs(shapes, node, module, rule) -> int:
    """Per time step and sample, every layer's ``weight_ih`` and ``weight_hh`` products."""
    x = shapes.of(node.args[0])
    if x is None or len(x) < 2:
        return 0
    steps_and_batch = math.prod(x[:-1]) if len(x) == 3 else x[0]
    total = 0
    for name, _ in module.named_parameters():
        if name.startswith(("weight_ih", "weight_hh")):
            w = shapes.param(f"{node.target}.{name}")
            total += math.prod(w) if w is not None else 0
    return steps_and_batch * total


@register(nn.LSTM, nn.GRU, nn.RNN, resize=_resize_recurrent, macs=_recurrent_macs)
def recurrent(ctx, node, module):
    """Hidden units of every layer and direction, coupled position by position."""
    x = node.args[0]
    x_lab = ctx.labels(x)
    shapes = ctx.shape(node)
    if getattr(module, "proj_size", 0) or len(node.args) > 1 or node.kwargs:
        ctx.pin_all(x_lab, f"{ctx.describe_node()} has projections or an initial state")
        return unlabelled(shapes)
    name, n_gates, hidden = node.target, _gates(module), module.hidden_size
    directions = 2 if module.bidirectional else 1
    reason = f"input of {ctx.describe_node()} is not a channel axis"
    units = ctx.module_param(name, "weight_hh_l0", 1, "in")  # layer 0's recurrent columns: the units
    layer_in = x_lab[-1] if x_lab else None
    for layer in range(module.num_layers):
        outputs = []
        for d in range(directions):
            sfx = f"_l{layer}" + ("_reverse" if d else "")
            w_ih_cols = ctx.module_param(name, f"weight_ih{sfx}", 1, "in")
            ctx.couple([w_ih_cols, layer_in], len(w_ih_cols), reason)
            rows = [ctx.module_param(name, f"weight_{k}{sfx}", 0, "out") for k in ("ih", "hh")]
            rows += [p for p in (ctx.module_param(name, f"bias_{k}{sfx}", 0, "pass") for k in ("ih", "hh"))
                     if p is not None]
            for r in rows:
                for g in range(n_gates):
                    ctx.union(r[g * hidden:(g + 1) * hidden], units)
            ctx.union(ctx.module_param(name, f"weight_hh{sfx}", 1, "in"), units)
            outputs.append(units)
        layer_in = np.concatenate(outputs)
    first = 1 if module.batch_first else 0
    out = [None, None, layer_in]
    if x_lab:
        out[first] = x_lab[first]  # the batch axis passes; time steps are mixed: not a channel axis
        ctx.pin(x_lab[1 - first], f"{ctx.describe_node()} runs along a channel axis")
    state = (None, None, units)
    states = Multi([state, state]) if isinstance(module, nn.LSTM) else state
    return Multi([tuple(out), states])
