"""Structure without weights: a model on the meta device is traced, grouped, planned, counted and
rewritten without computing a value (DESIGN: DependencyGraph.build(model_on_meta, inputs_on_meta))."""

from __future__ import annotations

import copy

import pytest

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



def _calls_and_sizes(model, x, traced=None, **options):
    """Nodes, groups, and Python calls made by build (tracing too, unless ``traced`` is given),
    random selection and the slim architecture of a meta model."""
    import cProfile
    import pstats

    import graphprune.graph as graph_module

    prof = cProfile.Profile()
    real = graph_module.trace
    if traced is not None:
        graph_module.trace = lambda *args, **kwargs: traced
    try:
        prof.enable()
        dg = gp.DependencyGraph.build(model, x, **options)
        slim = gp.apply(model, dg, gp.select(dg, gp.score("random", model, dg, seed=0), 0.5))
        prof.disable()
    finally:
        graph_module.trace = real
    assert all(p.device.type == "meta" for p in slim.parameters())
    return len(dg.gm.graph.nodes), len(dg.groups), pstats.Stats(prof).total_calls


def _assert_linear(measured):
    # not a timing test: nodes and groups grow by the same amount per layer, and so do the
    # Python calls (work per node or group that walks every node or group would not)
    (n1, g1, c1), (n2, g2, c2), (n3, g3, c3) = measured
    assert n3 - n2 == n2 - n1 > 0 and g3 - g2 == g2 - g1 > 0
    assert 0 < c3 - c2 <= 1.05 * (c2 - c1), (c1, c2, c3)


def test_tracing_grouping_planning_and_slimming_grow_linearly_with_depth():
    import torch

    from graphprune.zoo.vit import VisionTransformer

    x = torch.zeros(1, 3, 16, 16)
    models = [VisionTransformer(img_size=16, patch_size=4, embed_dim=16, depth=depth, num_heads=2).to("meta")
              for depth in (1, 2, 3)]
    gp.DependencyGraph.build(models[0], x)  # unprofiled: the first build pays lazy imports
    _assert_linear([_calls_and_sizes(model, x) for model in models])


@pytest.mark.slow  # three torch.export traces of a Hugging Face model
def test_structure_of_a_meta_llm_grows_linearly_with_depth():
    tf = pytest.importorskip("transformers", reason="the integration extra installs transformers")
    import torch

    measured = []
    for layers in (1, 1, 2, 3):  # the first run pays lazy imports
        config = tf.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=layers,
                                num_attention_heads=4, num_key_value_heads=2)
        with torch.device("meta"):
            model = tf.LlamaForCausalLM(config)
        x = {"input_ids": torch.zeros(1, 4, dtype=torch.long)}
        measured.append(_calls_and_sizes(model, x, traced=gp.trace(model, x), factor="heads"))
    _assert_linear(measured[1:])
