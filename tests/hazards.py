"""Hazards: ops and model traits that test what graphprune promises beyond plain layers.

``strategies.architectures(hazardous=True)`` mixes these op kinds into the same random
DAGs (``WEIGHTS`` gives how often each is offered, against about 30 for the plain ops on
a feature map) and draws the model traits of ``fuzznet.Arch`` (``draw_traits``):

- ``width``: a channel count used as a number: ``y / y.size(1)``, ``y * y.shape[1] ** -0.5``,
  ``y - y.sum(1, keepdim=True) / y.shape[1]``, ``y.sum(1, keepdim=True) / y.shape[1]``,
  ``y / y.numel()`` (the slim graph keeps such numbers at their original value);
- ``heads``: a width in a reshape, ``y.view(b, h, c // h, -1)`` (run-time, ``-1`` or literal
  sizes), something per head (a scale by ``t.shape[2] ** -0.5``, a softmax over tokens, a
  mean over a head's channels or over the heads), and back;
- ``chanreduce``: mean / amax / logsumexp / softmax / log_softmax / cumsum over the
  channel axis, alone or combined with the input, and mean / amax / sum over every axis
  (``dim=()`` or no dim);
- ``chlast``: ``F.avg_pool1d`` / ``F.max_pool1d`` / ``F.interpolate`` over the channels of a
  channels-last ``[B, N, C]`` view (and, for contrast, pooling the tokens of ``[B, C, N]``);
- ``wstd``: weight standardisation (``F.batch_norm`` of the weight as ``[1, out, in*k*k]``
  in training mode, or by hand) then ``F.conv2d``;
- ``index``: ``x[:, k]``, ``x[:, -1]``, ``x[:, a:b]``, ``x[..., a:b, :, :]``, ``x[:, ::2]``,
  ``x.narrow(1, a, n)``, ``x.select(1, k)`` on channel axes;
- ``tied``: a second conv or linear whose weight is an earlier one's (``b.weight = a.weight``);
  ``tiedtok``: two linears sharing one weight, on the tokens ``[B, H*W, C]`` of a map;
- ``gtwice``: a grouped conv module called twice (chained, added, or concatenated), or on a
  value and on the model input (cut or zero-padded to the width: no channel axis);
- ``dropout``: ``nn.Dropout`` or ``F.dropout(y, p, self.training)`` (it matters in training mode).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from fuzznet import EXTRA, MAX_C, Arch, Extra, Op
from hypothesis import strategies as st
from torch import nn

WEIGHTS = {"width": 3, "heads": 2, "chanreduce": 3, "chlast": 2, "wstd": 2, "index": 3, "tied": 2,
           "tiedtok": 1, "gtwice": 2, "dropout": 1}
WIDTH_FORMS = ("div_size", "scale_shape", "center", "mean_shape", "div_numel")
HEAD_INNER = ("none", "scale", "softmax", "center", "headmix")
HEAD_SIZES = ("runtime", "minus1", "literal")
CHANNEL_REDUCTIONS = ("mean", "amax", "logsumexp", "softmax", "log_softmax", "cumsum",
                      "mean_all", "amax_all", "amax_noarg", "sum_all")  # *_all: every axis (dim=())
CHLAST = ("avg_pool1d", "max_pool1d", "interpolate", "interpolate_linear", "tokens")
INDEX_FORMS = ("pick", "pick_neg", "range", "ellipsis", "step", "narrow", "select")
FORMS = ("plain", "plain", "plain", "dict", "list", "nested")


TRAITS = ("form", "inplace_input", "training", "export", "stash", "sink")


def one_in(draw, n: int) -> bool:
    """True about once in ``n`` draws; shrinks to False. (``st.integers(0, n - 1)`` favours its
    ends, so ``== 0`` comes up far more often than once in ``n``.)"""
    return draw(st.sampled_from([False] * (n - 1) + [True]))


def draw_traits(draw, arch: Arch, without: frozenset = frozenset()) -> None:
    """Model-level traits, each off in most networks (they shrink to off); those named in
    ``without`` stay off."""
    arch.form = draw(st.sampled_from(FORMS)) if "form" not in without else "plain"
    arch.inplace_input = draw(st.sampled_from(["", "", "", "", "", "mul_", "iadd"])) \
        if "inplace_input" not in without else ""
    arch.training = one_in(draw, 5) and "training" not in without
    arch.export = one_in(draw, 8) and "export" not in without
    arch.stash = one_in(draw, 12) and "stash" not in without
    arch.batch = 2 if arch.training else draw(st.sampled_from([1, 1, 2]))
    arch.sink = not one_in(draw, 6) and "sink" not in without  # dead ends reach the first output


def _tie_candidates(arch: Arch) -> list[tuple[int, int]]:
    """``(op index, value index)``: an earlier conv or linear and a value it could also read."""
    out = []
    for j, op in enumerate(arch.ops):
        if op.kind in ("conv", "linear"):
            want = arch.shapes[op.inputs[0]]
            out += [(j, v) for v, s in enumerate(arch.shapes) if len(s) == len(want) and s[0] == want[0]]
    return out


def kinds(arch: Arch, maps: list[int], flats: list[int], without: frozenset = frozenset()) -> list[str]:
    """The hazard kinds that fit the values so far, each ``WEIGHTS`` times (none named in ``without``)."""
    fits = {"width", "chanreduce", "index", "dropout"} if maps or flats else set()
    if maps:
        fits |= {"heads", "chlast", "wstd", "gtwice", "tiedtok"}
    if _tie_candidates(arch):
        fits.add("tied")
    return [k for k in WEIGHTS if k in fits and k not in without for _ in range(WEIGHTS[k])]


def draw_op(draw, arch: Arch, kind: str, emit, pick) -> None:
    """Draw one hazard op of ``kind``; ``emit(op, *shapes)`` appends it, ``pick`` picks an input."""
    shapes = arch.shapes
    computed = range(arch.n_inputs, len(shapes))  # values with channels to prune, unlike the inputs
    maps = [i for i in computed if len(shapes[i]) == 3] or [i for i, s in enumerate(shapes) if len(s) == 3]
    flats = [i for i in computed if len(shapes[i]) == 1]
    if kind == "tied":
        candidates = _tie_candidates(arch)
        kinds_there = sorted({arch.ops[j].kind for j, _ in candidates})  # a conv or a linear, evenly
        source = draw(st.sampled_from(kinds_there))
        j, v = draw(st.sampled_from([(j, v) for j, v in candidates if arch.ops[j].kind == source]))
        src = arch.ops[j]
        if src.kind == "linear":
            emit(Op("tied", (v,), (j, draw(st.booleans()))), (src.args[0],))
        else:
            c_out, k, stride, _, _ = src.args
            h, w = shapes[v][1:]
            emit(Op("tied", (v,), (j, draw(st.booleans()))),
                 (c_out, (h + 2 * (k // 2) - k) // stride + 1, (w + 2 * (k // 2) - k) // stride + 1))
        return
    x = pick(draw, maps if kind in ("heads", "chlast", "wstd", "gtwice", "tiedtok") or not flats else
             flats if not maps else maps + flats)
    s = shapes[x]
    c, rest = s[0], s[1:]
    if kind == "width":
        form = draw(st.sampled_from(WIDTH_FORMS))
        emit(Op("width", (x,), (form,)), (1, *rest) if form == "mean_shape" else s)
    elif kind == "chanreduce":
        how, mix = draw(st.sampled_from(CHANNEL_REDUCTIONS)), draw(st.booleans())
        keeps = mix or how in ("softmax", "log_softmax", "cumsum") or "_" in how
        emit(Op("chanreduce", (x,), (how, mix)), s if keeps else (1, *rest))
    elif kind == "index":
        form = draw(st.sampled_from([f for f in INDEX_FORMS if f != "ellipsis" or len(s) == 3]))
        if form in ("pick", "select"):
            k = draw(st.integers(0, c - 1))
            emit(Op("index", (x,), (form, k)), (1, *rest))
        elif form == "pick_neg":
            emit(Op("index", (x,), (form,)), (1, *rest))
        elif form == "step":
            emit(Op("index", (x,), (form,)), ((c + 1) // 2, *rest))
        else:
            a = draw(st.integers(0, c - 1))
            b = draw(st.integers(a + 1, c))
            emit(Op("index", (x,), (form, a, b)), (b - a, *rest))
    elif kind == "tiedtok":
        c_out = draw(st.integers(1, MAX_C))
        emit(Op("tiedtok", (x,), (c_out, draw(st.booleans()))), (c_out, *rest))
    elif kind == "dropout":
        emit(Op("dropout", (x,), (draw(st.sampled_from(["module", "functional"])),)), s)
    elif kind == "heads":
        h = draw(st.sampled_from([d for d in range(1, c + 1) if c % d == 0]))
        emit(Op("heads", (x,), (h, draw(st.sampled_from(HEAD_INNER)), draw(st.sampled_from(HEAD_SIZES)))), s)
    elif kind == "chlast":
        h, w = rest
        how = draw(st.sampled_from([m for m in CHLAST if (m != "tokens" or h % 2 == 0)
                                    and (not m.endswith("pool1d") or c >= 2)]))
        out_c = {"avg_pool1d": c // 2, "max_pool1d": c // 2, "tokens": c}.get(how, 2 * c)
        emit(Op("chlast", (x,), (how,)), (out_c, h // 2, w) if how == "tokens" else (out_c, h, w))
    elif kind == "wstd":
        k = draw(st.sampled_from([1, 3])) if c > 1 else 3
        c_out = draw(st.integers(1, MAX_C))
        emit(Op("wstd", (x,), (c_out, k, draw(st.sampled_from(["bn", "manual"])), draw(st.booleans()))),
             (c_out, *rest))
    elif kind == "gtwice" and c >= 2:
        g = draw(st.sampled_from([d for d in range(2, c + 1) if c % d == 0]))
        combine = draw(st.sampled_from(["chain", "add", "cat", "input"]))
        c_out = c if combine == "chain" else g * draw(st.integers(1, max(1, MAX_C // g)))
        other = {"chain": x, "input": 0}.get(combine) if combine in ("chain", "input") else \
            draw(st.sampled_from([i for i in maps if shapes[i] == s]))
        args = (g, c_out, draw(st.sampled_from([1, 3])), combine, draw(st.booleans()))
        emit(Op("gtwice", (x, other), args), (2 * c_out if combine == "cat" else c_out, *rest))
    else:  # the drawn kind does not fit this input: a channel-count scale instead
        emit(Op("width", (x,), ("div_size",)), s)


# --- what the ops compute -------------------------------------------------------------------


def _width(net, i, op, ins):
    y, form = ins[0], op.args[0]
    if form == "div_size":
        return y / y.size(1)
    if form == "scale_shape":
        return y * y.shape[1] ** -0.5
    if form == "center":
        return y - y.sum(1, keepdim=True) / y.shape[1]
    if form == "mean_shape":
        return y.sum(1, keepdim=True) / y.shape[1]
    return y / y.numel()


def _heads(net, i, op, ins):
    """``[B, C, H, W]`` as ``[B, h, C // h, H * W]``, something per head, and back."""
    y = ins[0]
    h, inner, sizes = op.args
    c, hh, ww = net.arch.shapes[op.inputs[0]]
    if sizes == "runtime":
        b, cc, hy, wy = y.shape
        t = y.view(b, h, cc // h, hy * wy)
    elif sizes == "minus1":
        t = y.view(y.shape[0], h, y.shape[1] // h, -1)
    else:
        t = y.reshape(net.arch.batch, h, c // h, hh * ww)
    if inner == "scale":
        t = t * t.shape[2] ** -0.5
    elif inner == "softmax":
        t = t.softmax(-1)
    elif inner == "center":
        t = t - t.mean(2, keepdim=True)
    elif inner == "headmix":
        t = t * t.mean(1, keepdim=True)
    if sizes == "runtime":
        return t.reshape(y.shape)
    if sizes == "minus1":
        return t.reshape(y.shape[0], -1, y.shape[2], y.shape[3])
    return t.reshape(net.arch.batch, c, hh, ww)


def _chanreduce(net, i, op, ins):
    y, (how, mix) = ins[0], op.args
    if how == "mean":
        r = y.mean(1, keepdim=True)
    elif how == "amax":
        r = torch.amax(y, dim=1, keepdim=True)
    elif how == "logsumexp":
        r = torch.logsumexp(y, 1, keepdim=True)
    elif how == "softmax":
        r = F.softmax(y, dim=1)
    elif how == "log_softmax":
        r = torch.log_softmax(y, 1)
    elif how == "cumsum":
        r = torch.cumsum(y, dim=1)
    elif how == "mean_all":
        return y - y.mean(dim=())
    elif how == "amax_all":
        return y - torch.amax(y, dim=())
    elif how == "amax_noarg":
        return y - y.amax()
    else:
        return y - y.sum() / 100.0
    if not mix:
        return r
    return y - r if how in ("mean", "amax", "logsumexp", "log_softmax") else y * r


def _chlast(net, i, op, ins):
    y, (how,) = ins[0], op.args
    _, h, w = net.arch.shapes[op.inputs[0]]
    if how == "tokens":  # pools tokens, not channels: [B, C, N] -> [B, C, N / 2]
        return F.avg_pool1d(y.flatten(2), 2).reshape(y.shape[0], y.shape[1], h // 2, w)
    t = y.flatten(2).transpose(1, 2)  # [B, N, C]
    if how == "avg_pool1d":
        u = F.avg_pool1d(t, 2)
    elif how == "max_pool1d":
        u = F.max_pool1d(t, 2)
    elif how == "interpolate":
        u = F.interpolate(t, scale_factor=2.0)
    else:
        u = F.interpolate(t, scale_factor=2.0, mode="linear", align_corners=False)
    return u.transpose(1, 2).reshape(y.shape[0], -1, h, w)


def _make_wstd(net, i, op, c, gen):
    c_out, k, _, bias = op.args
    net.layers[f"wstd{i}"] = nn.Conv2d(c, c_out, k, padding=k // 2, bias=bias)


def _wstd(net, i, op, ins):
    conv, k, form = net.layers[f"wstd{i}"], op.args[1], op.args[2]
    w = conv.weight
    if form == "bn":
        w = F.batch_norm(w.reshape(1, w.shape[0], -1), None, None, training=True, eps=1e-5).reshape_as(w)
    else:
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
    return F.conv2d(ins[0], w, conv.bias, padding=k // 2)


def _index(net, i, op, ins):
    y, form, a = ins[0], op.args[0], op.args[1:]
    if form == "pick":
        return y[:, a[0]].unsqueeze(1)
    if form == "select":
        return y.select(1, a[0]).unsqueeze(1)
    if form == "pick_neg":
        return y[:, -1].unsqueeze(1)
    if form == "step":
        return y[:, ::2]
    if form == "range":
        return y[:, a[0]:a[1]]
    if form == "ellipsis":
        return y[..., a[0]:a[1], :, :]
    return y.narrow(1, a[0], a[1] - a[0])


def _make_tied(net, i, op, c, gen):
    j, bias = op.args
    src = net.layers[f"{net.arch.ops[j].kind}{j}"]
    if isinstance(src, nn.Linear):
        m = nn.Linear(src.in_features, src.out_features, bias=bias)
    else:
        m = nn.Conv2d(src.in_channels, src.out_channels, src.kernel_size, src.stride, src.padding,
                      groups=src.groups, bias=bias)
    m.weight = src.weight  # one Parameter, two modules
    net.layers[f"tied{i}"] = m


def _make_tiedtok(net, i, op, c, gen):
    c_out, bias = op.args
    a, b = nn.Linear(c, c_out, bias=bias), nn.Linear(c, c_out, bias=bias)
    b.weight = a.weight
    net.layers[f"tokA{i}"], net.layers[f"tokB{i}"] = a, b


def _tiedtok(net, i, op, ins):
    """``a(t) + b(t.flip(1))`` on the tokens ``t`` of map ``y``, ``a`` and ``b`` sharing a weight."""
    y = ins[0]
    _, h, w = net.arch.shapes[op.inputs[0]]
    t = y.flatten(2).transpose(1, 2)  # [B, N, C]
    u = net.layers[f"tokA{i}"](t) + net.layers[f"tokB{i}"](t.flip(1))
    return u.transpose(1, 2).reshape(y.shape[0], -1, h, w)


def _make_gtwice(net, i, op, c, gen):
    g, c_out, k, _, bias = op.args
    net.layers[f"gtwice{i}"] = nn.Conv2d(c, c_out, k, padding=k // 2, groups=g, bias=bias)


def _gtwice(net, i, op, ins):
    conv, combine = net.layers[f"gtwice{i}"], op.args[3]
    if combine == "chain":
        return conv(conv(ins[0]))
    if combine == "input":  # the model input, cut or padded to this width and resized: no channel axis
        c, h, w = net.arch.shapes[op.inputs[0]]
        c_in = net.arch.c_in
        u = ins[1][:, :c] if c <= c_in else F.pad(ins[1], (0, 0, 0, 0, 0, c - c_in))
        if (h, w) != (net.arch.hw, net.arch.hw):
            u = F.interpolate(u, size=(h, w))
        return conv(ins[0]) + conv(u)
    if combine == "add":
        return conv(ins[0]) + conv(ins[1])
    return torch.cat([conv(ins[0]), conv(ins[1])], 1)


def _make_dropout(net, i, op, c, gen):
    if op.args[0] == "module":
        net.layers[f"dropout{i}"] = nn.Dropout(0.5)


def _dropout(net, i, op, ins):
    if op.args[0] == "module":
        return net.layers[f"dropout{i}"](ins[0])
    return F.dropout(ins[0], 0.5, net.training)


EXTRA.update({
    "width": Extra(None, _width),
    "heads": Extra(None, _heads),
    "chanreduce": Extra(None, _chanreduce),
    "chlast": Extra(None, _chlast),
    "wstd": Extra(_make_wstd, _wstd),
    "index": Extra(None, _index),
    "tied": Extra(_make_tied, lambda net, i, op, ins: net.layers[f"tied{i}"](ins[0])),
    "tiedtok": Extra(_make_tiedtok, _tiedtok),
    "gtwice": Extra(_make_gtwice, _gtwice),
    "dropout": Extra(_make_dropout, _dropout),
})
