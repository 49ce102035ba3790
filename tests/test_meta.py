"""Structure without weights: a model on the meta device is traced, grouped, planned, counted and
rewritten without computing a value (DESIGN: DependencyGraph.build(model_on_meta, inputs_on_meta))."""

from __future__ import annotations

import copy

import pytest
import torch

import graphprune as gp


def _groups(dg):
    return [(g.size, g.prunable, g.reason, g.exact, sorted((m.param, m.dim, tuple(m.positions)) for m in g.members))
            for g in dg.groups]


@pytest.mark.parametrize("name", ["resnet20", "mobilenet_v2", "vit_mha", "swin_block", "densenet"])
def test_meta_model_has_the_groups_counts_and_slim_shapes_of_the_real_one(name):
    model, x = gp.zoo.create(name)
    meta = copy.deepcopy(model).to("meta")
    real_dg, meta_dg = gp.DependencyGraph.build(model, x), gp.DependencyGraph.build(meta, x)
    assert _groups(meta_dg) == _groups(real_dg)
    assert gp.count(meta, x) == gp.count(model, x)
    plan = gp.select(real_dg, gp.score("random", model, real_dg, seed=0), 0.5)
    assert gp.select(meta_dg, gp.score("random", meta, meta_dg, seed=0), 0.5) == plan
    slim_meta, slim_real = gp.apply(meta, meta_dg, plan), gp.apply(model, real_dg, plan)
    assert all(t.device.type == "meta" for t in slim_meta.parameters())
    assert {k: v.shape for k, v in slim_meta.state_dict().items()} == \
        {k: v.shape for k, v in slim_real.state_dict().items()}
    assert gp.count(slim_meta, x) == gp.count(slim_real, x)
    assert all(t.device.type != "meta" for t in model.parameters())  # the user's model stays real


def test_what_needs_weights_says_so():
    model, x = gp.zoo.create("resnet20")
    meta = copy.deepcopy(model).to("meta")
    dg = gp.DependencyGraph.build(meta, x)
    for call in (lambda: gp.score("magnitude", meta, dg), lambda: gp.verify(meta, x, {}),
                 lambda: gp.lean.ChannelGraph.build(meta, dg)):
        with pytest.raises(gp.InputError, match="meta device"):
            call()


def test_a_model_partly_on_meta_or_real_model_with_meta_inputs_is_refused():
    model, x = gp.zoo.create("mlp")
    partly = copy.deepcopy(model)
    next(partly.children()).to("meta")
    with pytest.raises(gp.InputError, match="meta device"):
        gp.DependencyGraph.build(partly, x)
    with pytest.raises(gp.InputError, match="meta device"):
        gp.DependencyGraph.build(model, x[0].to("meta") if isinstance(x, tuple) else x.to("meta"))
