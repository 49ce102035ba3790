"""The Core ATen IR opset (what a decomposed ``torch.export`` graph holds): every overload has a
rule or a reviewed reason to need none; each family's ATen forms prune exactly against the
masked original, or pin / mark inexact the axis they mix, with the reason.

Most models below call ``torch.ops.aten.<op>`` in their forward, which torch.fx records as
that overload (fast: no export); one test prunes a decomposed ``torch.export`` graph.
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import build, exact, group_of, keys

import graphprune as gp
from graphprune.rules import base
from graphprune.rules.core_aten import NO_RULE, core_overloads, coverage, report

aten = torch.ops.aten


# --- enumeration -------------------------------------------------------------------------------


def test_every_core_aten_overload_has_a_rule_or_a_reason_for_none():
    cov = coverage()
    assert not cov["undecided"], (
        f"core ATen overloads with no rule and no entry in graphprune.rules.core_aten.NO_RULE: "
        f"{cov['undecided']}; write a rule in the op's family file, or say why it needs none")
    assert sum(len(v) for v in cov.values()) == len(core_overloads()) > 100
    assert len(cov["own"]) > len(cov["none"])


def test_the_no_rule_table_is_reviewed_and_current():
    core = {str(op) for op in core_overloads()}
    for name, reason in NO_RULE.items():
        assert isinstance(reason, str) and len(reason) > 20, name
        if name not in core:  # another torch: the op left the opset (not an error)
            continue
        op = eval(name.replace("aten.", "torch.ops.aten.", 1))  # noqa: S307  (names from the table)
        assert op not in base._FUNCTION_RULES, f"{name} has a rule now: remove it from NO_RULE"
        assert not any(t in base._TAG_RULES for t in op.tags), f"{name} has a tag rule: remove it from NO_RULE"


def test_core_aten_coverage_report_counts_every_overload():
    text = report()
    counts = {key: int(re.search(rf"{key}[^\d\n]*(\d+)", text).group(1)) for key in ("own", "tag", "undecided")}
    assert counts["undecided"] == 0 and counts["own"] == len(coverage()["own"]), text


class Fallback(nn.Module):
    def __init__(self, op):
        super().__init__()
        self.op = op
        self.a = nn.Conv2d(3, 6, 1)
        self.b = nn.Conv2d(3, 4, 1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        y = self.a(x)
        if self.op == "as_strided":  # declared: needs no rule
            y = aten.as_strided.default(y, [2, 6, 4, 4], [96, 16, 4, 1])
        else:  # cumprod: not core, no rule
            y = aten.cumprod.default(y, 1)
        z = aten.sum.dim_IntList(self.b(x), [2, 3])
        return self.fc(z), y


@pytest.mark.parametrize("op", ["as_strided", "cumprod"])
def test_ops_without_a_rule_are_pinned_with_a_reason_naming_them(op):
    assert torch.Tag.core not in aten.cumprod.default.tags and aten.cumprod.default not in base._FUNCTION_RULES
    model, x = Fallback(op), torch.randn(2, 3, 4, 4)
    dg = followed(model, x)
    g = group_of(dg, "a.weight", 0)
    assert not g.prunable and op in g.reason and "no rule" in g.reason
    assert group_of(dg, "b.weight", 0).prunable


# --- a producer, the op, a consumer ---------------------------------------------------------------


class Around(nn.Module):
    """``a`` (8 channels) -> ``op`` -> sum over the axes after the channel axis -> ``fc``."""

    def __init__(self, op, c=8, extra=None):
        super().__init__()
        self.op = op
        self.a = nn.Conv2d(3, c, 3, padding=1)
        self.fc = nn.Linear(c, 3)
        if extra is not None:
            self.w = nn.Parameter(extra)

    def forward(self, x):
        return self.head(self.op(self, self.a(x)))

    def head(self, y):
        return self.fc(aten.sum.dim_IntList(y.flatten(2), [2]))  # 3 or more axes


class Around2(Around):
    """``Around`` with a second input (an index tensor, a sampling grid) that ``op`` reads."""

    def forward(self, x, i):
        return self.head(self.op(self, self.a(x), i))


def around(op, inputs, **kw):
    return (Around2 if len(inputs) == 2 else Around)(op, **kw)


def followed(model, inputs):
    """The dependency graph, checking that no rule gave up on a node (a rule that raises is
    answered by pinning, which would make a test of that rule pass for the wrong reason)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dg = build(model, inputs)
    assert not [w for w in caught if "could not follow" in str(w.message)], [str(w.message) for w in caught]
    return dg


def check_exact(op, inputs, drop=(1, 5), zero=None, **kw):
    """The channels of ``a`` pass ``op``: one prunable group, exact against a copy with the
    consumer columns of the dropped channels zeroed (or ``zero``)."""
    model = around(op, inputs, **kw)
    dg = followed(model, inputs)
    assert not dg.gm.meta.get("graphprune_export")  # traced by torch.fx: the ATen call as written
    g = group_of(dg, "a.weight", 0)
    assert g.prunable and g.exact, (g.reason, g.inexact_reason)
    assert keys(g) >= {("a.weight", 0), ("a.bias", 0), ("fc.weight", 1)}
    return exact(model, inputs, {g.id: list(drop)}, dg=dg, zero=zero or {"fc.weight": (1, list(drop))})


def check_kept(op, inputs, words, inexact=False, **kw):
    """The op mixes or indexes ``a``'s channels: pinned (or inexact) with a reason saying so."""
    model = around(op, inputs, **kw)
    dg = followed(model, inputs)
    assert not dg.gm.meta.get("graphprune_export")
    g = group_of(dg, "a.weight", 0)
    if inexact:
        assert g.prunable and not g.exact and all(w in g.inexact_reason for w in words), g.inexact_reason
    else:
        assert not g.prunable and all(w in g.reason for w in words), g.reason
    return model, dg


X = (torch.randn(2, 3, 6, 6),)


# --- conv ------------------------------------------------------------------------------------------


class ConvNet(nn.Module):
    def __init__(self, transposed=False, groups=1):
        super().__init__()
        self.transposed, self.groups = transposed, groups
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        shape = (8, 6 // groups, 3, 3) if transposed else (6, 8 // groups, 3, 3)
        self.w = nn.Parameter(torch.randn(shape) * 0.2)
        self.bias = nn.Parameter(torch.randn(6))
        self.fc = nn.Linear(6, 2)

    def forward(self, x):
        y = aten.convolution.default(self.a(x), self.w, self.bias, [1, 1], [1, 1], [1, 1], self.transposed,
                                     [0, 0], self.groups)
        return self.fc(aten.sum.dim_IntList(y, [2, 3]))


@pytest.mark.parametrize("transposed", [False, True])
def test_aten_convolution_reads_its_input_channels_and_produces_its_own(transposed):
    model, x = ConvNet(transposed), X
    dg = followed(model, x)
    rule = base.find_rule(next(n for n in dg.gm.graph.nodes if n.target is aten.convolution.default), None)
    assert rule.kind == base.LAYER
    g = group_of(dg, "a.weight", 0)
    in_axis = 0 if transposed else 1
    assert g.prunable and ("w", in_axis) in keys(g)
    exact(model, x, {g.id: [2, 7]}, dg=dg, zero={"w": (in_axis, [2, 7])})
    out = group_of(dg, "w", 1 - in_axis)
    assert out.prunable and ("fc.weight", 1) in keys(out)
    slim = exact(model, x, {out.id: [0, 3]}, dg=dg, zero={"fc.weight": (1, [0, 3])})
    assert slim.w.shape[1 - in_axis] == 4


def test_aten_convolution_grouped_loses_whole_groups_and_its_groups_argument():
    model, x = ConvNet(groups=2), X
    dg = followed(model, x)
    g = group_of(dg, "a.weight", 0)
    assert g.prunable and g.size == 2  # two conv groups of four input channels
    slim = exact(model, x, {g.id: [1]}, dg=dg)
    node = next(n for n in slim.graph.nodes if n.target is aten.convolution.default)
    assert node.args[8] == 1 and tuple(slim.w.shape) == (3, 4, 3, 3)


# --- norm ------------------------------------------------------------------------------------------


def _bn_legit(m, y):
    return aten._native_batch_norm_legit.default(y, m.w, None, m.rm, m.rv, False, 0.1, 1e-5)[0]


def _bn_no_stats(m, y):
    return aten._native_batch_norm_legit.no_stats(y, m.w, None, True, 0.1, 1e-5)[0]


class Stats(Around):
    def __init__(self, op):
        super().__init__(op, extra=torch.rand(8) + 0.5)
        self.register_buffer("rm", torch.randn(8))
        self.register_buffer("rv", torch.rand(8) + 0.5)


@pytest.mark.parametrize("op", [_bn_legit, _bn_no_stats])
def test_native_batch_norm_is_per_channel(op):
    model, x = Stats(op), X
    dg = followed(model, x)
    g = group_of(dg, "a.weight", 0)
    assert g.prunable and g.exact and ("w", 0) in keys(g)
    if op is _bn_legit:
        assert {("rm", 0), ("rv", 0)} <= keys(g)
    exact(model, x, {g.id: [0, 6]}, dg=dg, zero={"fc.weight": (1, [0, 6])})


def test_native_layer_norm_over_a_spatial_axis_is_exact_and_over_channels_inexact():
    check_exact(lambda m, y: aten.native_layer_norm.default(y, [6], m.w, None, 1e-5)[0], X,
                extra=torch.rand(6) + 0.5)

    def channels_last(m, y):
        y = aten.permute.default(y, [0, 2, 3, 1])
        y = aten.native_layer_norm.default(y, [8], m.w, None, 1e-5)[0]
        return aten.permute.default(y, [0, 3, 1, 2])

    model, dg = check_kept(channels_last, X, ["native_layer_norm", "normalises over channels"], inexact=True,
                           extra=torch.rand(8) + 0.5)
    g = group_of(dg, "a.weight", 0)
    slim = gp.apply(model, dg, {g.id: [1, 2]})
    node = next(n for n in slim.graph.nodes if n.target is aten.native_layer_norm.default)
    assert list(node.args[1]) == [6] and slim(*X).shape == (2, 3)


def test_native_group_norm_loses_whole_groups_and_rewrites_its_widths():
    model, x = around(lambda m, y: aten.native_group_norm.default(y, m.w, None, 2, 8, 36, 4, 1e-5)[0], X,
                      extra=torch.rand(8) + 0.5), X
    dg = followed(model, x)
    g = group_of(dg, "a.weight", 0)
    assert g.prunable and g.exact and g.size == 4 and ("w", 0) in keys(g)
    slim = exact(model, x, {g.id: [1, 3]}, dg=dg, zero={"fc.weight": (1, [2, 3, 6, 7])})
    node = next(n for n in slim.graph.nodes if n.target is aten.native_group_norm.default)
    assert node.args[4] == 4 and node.args[6] == 2


# --- reduce ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", [
    lambda m, y: aten.max.dim(y, 3)[0],
    lambda m, y: aten.min.dim(y, 2, True)[0],
    lambda m, y: aten.topk.default(y, 2, 3)[0],
    lambda m, y: aten.sort.default(y, 2, True)[0],
    lambda m, y: aten.argmax.default(y, 3).float(),
    lambda m, y: aten.cumsum.default(y, 3),
    lambda m, y: aten.var.dim(y, [3], True, True),
    lambda m, y: aten.var.correction(y, [2], correction=0, keepdim=False),
    lambda m, y: aten.prod.dim_int(y * 0.5 + 1.0, 2),
    lambda m, y: aten._log_softmax.default(y, 2, False),
    lambda m, y: aten.where.self(aten.any.dim(y > 0, 3, True), y, -y),
    lambda m, y: aten.abs.default(aten._fft_r2c.default(y, [3], 0, True)),
], ids=["max.dim", "min.dim", "topk", "sort", "argmax", "cumsum", "var.dim", "var.correction", "prod",
        "_log_softmax", "any", "_fft_r2c"])
def test_ordering_and_reductions_along_a_spatial_axis_keep_channels_exactly(op):
    check_exact(op, X)


@pytest.mark.parametrize("op, words, inexact", [
    (lambda m, y: aten.max.dim(y, 1, True)[0] + y, ["max", "extreme over channels"], True),
    (lambda m, y: aten.max.dim(y, 1, True)[1].float() + y, ["max", "orders or indexes"], False),
    (lambda m, y: aten.topk.default(y, 3, 1)[0][:, :1] + y, ["topk", "orders or indexes"], False),
    (lambda m, y: aten.sort.default(y, 1)[0], ["sort", "orders or indexes"], False),
    (lambda m, y: aten.argmin.default(y, 1, True).float() + y, ["argmin", "positions along a channel axis"],
     False),
    (lambda m, y: aten.cumsum.default(y, 1), ["cumsum", "mixes values along a channel axis"], False),
    (lambda m, y: aten.var.dim(y, [1], True, True) + y, ["var", "reduces over channels"], True),
    (lambda m, y: aten.abs.default(aten._fft_r2c.default(y, [1], 0, False)), ["_fft_r2c", "mixes values"], False),
], ids=["max", "max-indices", "topk", "sort", "argmin", "cumsum", "var", "_fft_r2c"])
def test_ordering_or_reducing_along_the_channel_axis_pins_or_is_inexact(op, words, inexact):
    check_kept(op, X, words, inexact=inexact)


# --- pool ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", [
    lambda m, y: aten.max_pool2d_with_indices.default(y, [2, 2], [2, 2])[0],
    lambda m, y: aten._adaptive_avg_pool3d.default(aten.unsqueeze.default(y, 2), [1, 2, 2])[:, :, 0],
    lambda m, y: aten.reflection_pad2d.default(y, [1, 2, 0, 1]),
    lambda m, y: aten.replication_pad2d.default(y, [2, 0, 1, 1]) * 1.5,
    lambda m, y: aten.reflection_pad1d.default(y[:, :, 0], [2, 1]),
], ids=["max_pool2d_with_indices", "_adaptive_avg_pool3d", "reflection_pad2d", "replication_pad2d",
        "reflection_pad1d"])
def test_spatial_ops_keep_channels_exactly(op):
    check_exact(op, X)


def test_grid_sampler_samples_each_channel_on_its_own():
    grid = torch.rand(2, 4, 5, 2) * 2 - 1
    check_exact(lambda m, y, g: aten.grid_sampler_2d.default(y, g, 0, 0, False), X + (grid,))


def test_padding_a_channel_axis_pins_it():
    def pad(m, y):  # [B, C, W] -> [B, W, C + 2] -> [B, C, W]
        y = aten.reflection_pad1d.default(aten.permute.default(y[:, :, 0], [0, 2, 1]), [1, 1])
        return aten.permute.default(y, [0, 2, 1])[:, 1:9]
    check_kept(pad, X, ["reflection_pad1d", "pads a channel axis"])


# --- shape -----------------------------------------------------------------------------------------


def test_repeat_of_spatial_axes_keeps_channels_and_of_the_channel_axis_pins():
    check_exact(lambda m, y: aten.repeat.default(y, [1, 1, 2, 3]), X)
    check_kept(lambda m, y: aten.repeat.default(y, [1, 2, 1, 1])[:, 4:12], X, ["repeat", "repeats a channel axis"])


def test_sym_size_of_a_channel_axis_is_a_width_the_slim_view_rewrites():
    def view(m, y):  # what export writes for y.view(y.size(0), y.size(1), -1) with a dynamic size
        return aten.view.default(y, [aten.sym_size.int(y, 0), aten.sym_size.int(y, 1), 36])
    slim = check_exact(view, X)
    assert slim(*X).shape == (2, 3)


@pytest.mark.parametrize("form", ["aten.col2im", "F.fold"])
def test_col2im_folds_kernel_blocks_of_each_channel(form):
    def fold(m, y):  # [2, 8, 6, 6] -> [2, 8 * 4, 9] (the unfold as a reshape) -> fold to [2, 8, 6, 6]
        cols = aten.reshape.default(aten.permute.default(aten.view.default(y, [2, 8, 3, 2, 3, 2]),
                                                         [0, 1, 3, 5, 2, 4]), [2, 32, 9])
        if form == "F.fold":
            return F.fold(cols, (6, 6), 2, stride=2)
        return aten.col2im.default(cols, [6, 6], [2, 2], [1, 1], [0, 0], [2, 2])
    slim = check_exact(fold, X)
    assert slim(*X).shape == (2, 3)


# --- index -----------------------------------------------------------------------------------------


IDX = torch.randint(0, 6, (2, 8, 6, 4))


def _order(y, dim, n=4):
    """Positions along ``dim`` computed from ``y`` itself, per channel (an index tensor of the model's
    own: its channel axis goes with ``y``'s; an index given as an input could not shrink)."""
    idx = aten.sort.default(y, dim)[1]
    return aten.slice.Tensor(idx, dim, 0, n)


@pytest.mark.parametrize("op, more", [
    (lambda m, y: aten.gather.default(y, 3, _order(y, 3)), ()),
    (lambda m, y: aten.scatter_add.default(y, 3, _order(y, 3), y[:, :, :, :4]), ()),
    (lambda m, y: aten.scatter.value(y, 2, _order(y, 2), 0.5), ()),
    (lambda m, y: aten.scatter_reduce.two(y, 3, _order(y, 3), y[:, :, :, :4] * 2, "amax", include_self=True), ()),
    (lambda m, y, i: aten.index_select.default(y, 2, i), (torch.tensor([5, 0, 2]),)),
    (lambda m, y, i: aten.index_put.default(y, [i], y[:1] * 3.0), (torch.tensor([1]),)),
    (lambda m, y: aten.slice_scatter.default(y, y[:, :, :, 1:3] * 2, 3, 0, 4, 2), ()),
    (lambda m, y: aten.select_scatter.default(y, y[:, :, 1] * 2, 2, 4), ()),
    (lambda m, y: aten.diagonal.default(y, 1, 2, 3), ()),
], ids=["gather", "scatter_add", "scatter.value", "scatter_reduce", "index_select", "index_put",
        "slice_scatter", "select_scatter", "diagonal"])
def test_positional_ops_along_other_axes_keep_channels_exactly(op, more):
    check_exact(op, X + more)


def test_an_index_given_as_an_input_keeps_the_channels_it_lines_up_with():
    check_kept(lambda m, y, i: aten.gather.default(y, 3, i), X + (IDX,), ["gather", "lines up a channel axis"])


@pytest.mark.parametrize("op, more, words", [
    (lambda m, y, i: aten.gather.default(y, 1, i), (IDX,), ["gather", "reads positions along a channel axis"]),
    (lambda m, y, i: aten.scatter_add.default(y, 1, i, y), (IDX,), ["scatter_add", "writes at positions"]),
    (lambda m, y, i: aten.index_select.default(y, 1, i)[:, :1] + y, (torch.tensor([0, 2]),), ["picks channels"]),
    (lambda m, y: aten.slice_scatter.default(y, y[:, 2:4] * 2, 1, 2, 4), (), ["writes into a slice"]),
    (lambda m, y: aten.view.default(aten.sum.default(aten.diagonal.default(y, 0, 1, 2)), [1, 1, 1, 1]) + y, (),
     ["diagonal across a channel axis"]),
], ids=["gather", "scatter_add", "index_select", "slice_scatter", "diagonal"])
def test_positional_ops_along_the_channel_axis_pin_it(op, more, words):
    check_kept(op, X + more, words)


# --- linear, pointwise --------------------------------------------------------------------------------


class Bag(nn.Module):
    def __init__(self, mode):
        super().__init__()
        self.mode = mode
        self.table = nn.Parameter(torch.randn(10, 6))
        self.fc = nn.Linear(6, 2)

    def forward(self, idx, offsets):
        return self.fc(aten._embedding_bag.default(self.table, idx, offsets, False, self.mode)[0])


@pytest.mark.parametrize("mode", [0, 1, 2])
def test_embedding_bag_columns_are_output_channels(mode):
    model, x = Bag(mode), (torch.tensor([1, 2, 4, 5, 4, 3, 2, 9]), torch.tensor([0, 4]))
    dg = followed(model, x)
    g = group_of(dg, "table", 1)
    assert g.prunable and ("fc.weight", 1) in keys(g)
    slim = exact(model, x, {g.id: [1, 4]}, dg=dg, zero={"fc.weight": (1, [1, 4])})
    assert tuple(slim.table.shape) == (10, 4)


def test_cdist_ties_the_features_of_both_sides():
    def cdist(m, y):
        t = aten.permute.default(aten.view.default(y, [2, 8, 36]), [0, 2, 1])  # [2, 36, 8]
        return aten.permute.default(aten._cdist_forward.default(t, t[:, :5] * 2, 2.0, None), [0, 2, 1])
    model, x = around(cdist, X), X
    model.fc = nn.Linear(5, 3)
    dg = followed(model, x)
    g = group_of(dg, "a.weight", 0)
    assert g.prunable and g.exact and ("fc.weight", 1) not in keys(g)  # the distance ate the features
    exact(model, x, {g.id: [0, 7]}, dg=dg)


def test_pdist_sums_over_the_features():
    def pdist(m, y):  # the distance between the two samples' channel sums scales y
        d = aten._pdist_forward.default(aten.sum.dim_IntList(y, [2, 3]), 2.0)
        return y * aten.view.default(d, [1, 1, 1, 1])
    # pdist reads the channels too: the masked original zeroes them where they are made
    check_exact(pdist, X, zero={"a.weight": (0, [1, 5]), "a.bias": (0, [1, 5])})


@pytest.mark.parametrize("op", [
    lambda m, y: aten.native_dropout.default(y, 0.5, False)[0],
    lambda m, y: y + aten.full_like.default(y, 2.0),
    lambda m, y: aten.fill.Scalar(y, 1.0) * y,
    lambda m, y: aten.copy.default(aten.full_like.default(y, 0.0), y),
], ids=["native_dropout", "full_like", "fill", "copy"])
def test_pointwise_core_forms_keep_channels(op):
    check_exact(op, X)


# --- a decomposed torch.export graph ---------------------------------------------------------------


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.gn = nn.GroupNorm(4, 8)
        self.pad = nn.ZeroPad2d((1, 2, 0, 1))
        self.pool = nn.MaxPool2d(2)
        self.b = nn.ConvTranspose2d(8, 6, 2, stride=2)
        self.c = nn.Conv2d(6, 6, 3, padding=1, groups=3)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        y = self.pool(self.pad(self.gn(self.bn(self.a(x)).relu())))
        y = self.c(self.b(y))
        return self.fc(torch.amax(y, dim=(2, 3)))


@pytest.mark.slow  # torch.export and its decompositions: ~9 s in a fresh process
def test_a_decomposed_export_graph_holds_only_core_ops_and_prunes_exactly():
    model, x = Net().eval(), torch.randn(2, 3, 6, 6)
    with gp.tracing.TRACE_LOCK:
        gm = torch.export.export(model, (x,)).run_decompositions().module()
    targets = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    assert aten.convolution.default in targets and aten.native_group_norm.default in targets
    dg = gp.DependencyGraph.build(gm, (x,))
    assert "no rule" not in dg.describe()
    sizes = sorted((g.size, g.prunable) for g in dg.groups)
    assert sizes == [(3, True), (4, True)], sizes  # conv groups of c, GroupNorm groups
    for g in dg.groups:
        if g.prunable:
            plan = {g.id: [1]}
            slim = gp.apply(gm, dg, plan)
            assert gp.verify(gm, (x,), plan, dg=dg, slim=slim) <= 1e-5
