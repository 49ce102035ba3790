"""graphprune.select: scopes, floors, rounding, MACs/params targets and ignore lists."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import graphprune as gp


def _two_layer() -> tuple[nn.Module, torch.Tensor, gp.DependencyGraph]:
    """Two prunable groups: 8 and 16 channels."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 16, 3), nn.ReLU(), nn.Conv2d(16, 2, 1))
    x = torch.randn(1, 3, 12, 12)
    return model, x, gp.DependencyGraph.build(model, x)


@pytest.fixture(scope="module")
def resnet20():
    model, x = gp.zoo.create("resnet20", width=8)
    return model, x, gp.DependencyGraph.build(model, x)


def test_local_removes_the_same_fraction_of_every_group() -> None:
    _, _, dg = _two_layer()
    scores = {0: np.arange(8.0)[::-1], 1: np.arange(16.0)}
    plan = gp.select(dg, scores, 0.5)
    assert plan[0] == (4, 5, 6, 7) and plan[1] == tuple(range(8))
    assert gp.select(dg, scores, 0.3) == {0: [6, 7], 1: [0, 1, 2, 3]}  # floor(size * ratio)


def test_global_ranks_channels_across_groups() -> None:
    _, _, dg = _two_layer()
    scores = {0: np.full(8, 1.0) + np.arange(8) * 1e-3, 1: np.full(16, 5.0) + np.arange(16) * 1e-3}
    local = gp.select(dg, scores, 0.25)
    assert len(local[0]) == 2 and len(local[1]) == 4
    glob = gp.select(dg, scores, 0.25, scope="global")  # 6 of 24 channels, all from the low group
    assert glob == {0: [0, 1, 2, 3, 4, 5]}
    # the floor holds: group 0 keeps one channel, the rest comes from group 1
    glob = gp.select(dg, scores, 0.5, scope="global")
    assert glob[0] == tuple(range(7)) and glob[1] == (0, 1, 2, 3, 4)
    # normalising each group makes the groups comparable again
    norm = gp.select(dg, scores, 0.25, scope="global", normalize="std")
    assert 0 < len(norm[0]) < 6 and len(norm[1]) > 0


def test_min_keep_and_round_to() -> None:
    model = nn.Sequential(nn.Linear(4, 40), nn.ReLU(), nn.Linear(40, 2))
    dg = gp.DependencyGraph.build(model, torch.randn(1, 4))
    s = {0: np.arange(40.0)}
    assert len(gp.select(dg, s, 0.9)[0]) == 36
    assert len(gp.select(dg, s, 0.9, min_keep=10)[0]) == 30
    assert len(gp.select(dg, s, 0.9, min_keep=0.5)[0]) == 20
    assert len(gp.select(dg, s, 0.99999, scope="global")[0]) == 39  # never below one channel
    for ratio in (0.1, 0.3, 0.45, 0.6, 0.8, 0.95):
        for scope in ("local", "global"):
            kept = 40 - len(gp.select(dg, s, ratio, round_to=8, scope=scope).get(0, ()))
            assert kept % 8 == 0 and kept >= 8
            assert abs(kept - max(8, 40 * (1 - ratio))) <= 4  # the nearest multiple
    assert gp.select(dg, s, 0.5, round_to=8)[0] == tuple(range(16))  # lowest scores go


def test_global_round_to_ranks_blocks_by_their_own_mean() -> None:
    model = nn.Sequential(nn.Linear(4, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 2))
    dg = gp.DependencyGraph.build(model, torch.randn(1, 4))
    # blocks of 4 in score order: group 0 means 0, 1 (then 100, kept); group 1 means 0.5, 2 (then 3)
    scores = {0: np.repeat([0.0, 1.0, 100.0], 4), 1: np.repeat([0.5, 2.0, 3.0], 4)}
    plan = gp.select(dg, scores, 0.5, round_to=4, scope="global")  # 12 of 24 channels: three blocks
    assert plan == {0: list(range(8)), 1: [0, 1, 2, 3]}


def test_width_one_layers_are_removed_whole() -> None:
    class Cat(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(3, 1, 1), nn.Conv2d(3, 1, 1), nn.Conv2d(3, 4, 1)
            self.head = nn.Conv2d(6, 2, 1)

        def forward(self, x):
            return self.head(torch.cat([self.a(x), self.b(x), self.c(x)], 1))

    model = Cat()
    x = torch.randn(1, 3, 4, 4)
    dg = gp.DependencyGraph.build(model, x)
    whole = [g.id for g in dg.groups if g.prunable and g.removable and g.size == 1]
    assert len(whole) == 2
    scores = gp.score("magnitude", model, dg)
    scores[whole[0]], scores[whole[1]] = np.array([5.0]), np.array([1.0])
    plan = gp.select(dg, scores, 0.5)
    assert plan.get(whole[1]) == (0,) and whole[0] not in plan
    assert gp.verify(model, x, plan) < 1e-6


def test_ignore_by_group_id_and_module_name(resnet20) -> None:
    model, _, dg = resnet20
    scores = gp.score("l1", model, dg)
    gid = next(g.id for g in dg.groups for m in g.members if m.param == "layer1.1.conv1.weight" and m.dim == 0)
    plan = gp.select(dg, scores, 0.5, ignore=[0, "layer1.1.conv1"])
    assert 0 not in plan and gid not in plan and len(plan) > 3
    with pytest.raises(gp.InputError, match="no_such_layer"):
        gp.select(dg, scores, 0.5, ignore=["no_such_layer"])


def test_bad_arguments_and_scores(resnet20) -> None:
    model, _, dg = resnet20
    scores = gp.score("l1", model, dg)
    for kwargs in ({"scope": "everywhere"}, {"target": "flops"}, {"round_to": 0}, {"min_keep": 0}):
        with pytest.raises(gp.InputError):
            gp.select(dg, scores, 0.5, **kwargs)
    with pytest.raises(gp.InputError, match="ratio"):
        gp.select(dg, scores, 1.0)
    bad = dict(scores)
    bad[0] = np.full_like(bad[0], np.nan)
    with pytest.raises(gp.PlanError, match="NaN"):
        gp.select(dg, bad, 0.5)
    partial = {k: v for k, v in scores.items() if k != 0}  # unscored groups stay whole
    assert 0 not in gp.select(dg, partial, 0.5)


@pytest.mark.parametrize("name", ["resnet20", "mini_mobilenet_v2", "mini_inception"])
def test_macs_and_params_targets_are_hit_within_one_percent(name: str) -> None:
    model, x = gp.zoo.create(name)
    dg = gp.DependencyGraph.build(model, x)
    scores = gp.score("l2", model, dg)
    before = gp.count(model, x)
    for target, ratio, scope in (("macs", 0.3, "local"), ("macs", 0.7, "global"), ("params", 0.5, "global")):
        plan = gp.select(dg, scores, ratio, target=target, scope=scope, normalize="mean",
                         model=model, example_inputs=x)
        after = gp.count(gp.apply(model, dg, plan), x)
        got = 1 - (after.macs / before.macs if target == "macs" else after.params / before.params)
        assert abs(got - ratio) <= 0.01, (name, target, scope, got)


def test_macs_target_keeps_split_channels_valid() -> None:
    model, x = gp.zoo.create("mini_shufflenet_v2")  # chunks split groups: a plan must not empty a half
    dg = gp.DependencyGraph.build(model, x)
    plan = gp.select(dg, gp.score("l2", model, dg), 0.7, target="macs", scope="global", normalize="mean")
    slim = gp.apply(model, dg, plan)
    assert abs(1 - gp.count(slim, x).macs / gp.count(model, x).macs - 0.7) <= 0.01


def test_unreachable_target_warns(resnet20) -> None:
    model, _, dg = resnet20
    with pytest.warns(RuntimeWarning, match="closest plan removes"):
        gp.select(dg, gp.score("l1", model, dg), 0.9, target="macs", min_keep=0.5)


def test_per_module_ratios_max_ratio_and_modules(resnet20) -> None:
    model, _, dg = resnet20
    scores = gp.score("l1", model, dg)
    sizes = {g.id: g.size for g in dg.groups}
    plan = gp.select(dg, scores, ratios={"layer3.*.conv1": 0.5, model.layer1[0].conv1: 0.25})
    gids = {gid for gid in plan}
    conv1s = {g.id for g in dg.groups if any(p.startswith("layer3.") and p.endswith("conv1.weight")
                                             for p in g.producers)}
    first = next(g.id for g in dg.groups if "layer1.0.conv1.weight" in g.producers)
    assert gids == conv1s | {first} and len(plan[first]) == 2
    assert all(len(plan[g]) == sizes[g] // 2 for g in conv1s)
    capped = gp.select(dg, scores, 0.5, scope="global", max_ratio=0.3)
    assert all(len(ch) <= 0.3 * sizes[g] for g, ch in capped.items())
    with pytest.raises(gp.InputError, match="ceilings"):
        gp.select(dg, scores, ratios={"layer3": 0.5}, scope="global")
    with pytest.raises(gp.InputError, match=r"ratios\['layer3'\]"):
        gp.select(dg, scores, ratios={"layer3": 1.0})


class _Blocks(nn.Module):
    """Three residual MLP blocks (hidden 12) and a head: ``blocks.{0,1,2}.up`` are one layer."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.ModuleDict({"up": nn.Linear(6, 12), "down": nn.Linear(12, 6)})
                                    for _ in range(3))
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        for b in self.blocks:
            x = x + b["down"](b["up"](x).relu())
        return self.head(x)


def _blocks():
    torch.manual_seed(0)
    model, x = _Blocks().eval(), torch.randn(4, 6)
    dg = gp.DependencyGraph.build(model, x)
    hidden = [next(g.id for g in dg.groups if any(m.param == f"blocks.{i}.up.weight" and m.role == "out"
                                                    for m in g.members)) for i in range(3)]
    # block i's channels score around i: a global ranking takes them from the first blocks
    scores = {g.id: np.linspace(0, 1, g.size) + 10 * hidden.index(g.id) if g.id in hidden else np.full(g.size, 50.0)
              for g in dg.groups if g.prunable}
    return model, x, dg, hidden, scores


def test_families_are_one_layer_of_repeated_blocks(resnet20) -> None:
    from graphprune.uniform import families, pattern

    assert pattern("model.layers.13.mlp.up_proj.weight") == "model.layers.*.mlp.up_proj.weight"
    assert pattern("layer1.0.conv1.weight") == "layer1.*.conv1.weight"  # 'layer1' is a name, not an index
    _, _, dg, hidden, _ = _blocks()
    assert families(dg, [g.id for g in dg.groups if g.prunable]) == [tuple(hidden)]
    dg = resnet20[2]
    fams = families(dg, [g.id for g in dg.groups if g.prunable])
    # layerN.*.conv1 of each stage: one family per stage, members of one size
    assert len(fams) == 3 and all(len({dg.groups[i].size for i in f}) == 1 for f in fams)


@pytest.mark.parametrize("how", [dict(scope="global"), dict(target="params"), dict(ceilings=True)])
def test_uniform_removes_the_same_count_from_every_member_of_a_family(how) -> None:
    model, x, dg, hidden, scores = _blocks()
    options = dict(how)
    if options.pop("ceilings", False):
        options["ceilings"] = {hidden[1]: 0.25}  # one member's ceiling holds the whole family
    plain = gp.select(dg, scores, 0.5, **options)
    assert len({len(plain.get(g, ())) for g in hidden}) > 1  # without it, the blocks end up of different widths
    plan = gp.select(dg, scores, 0.5, uniform=True, **options)
    counts = [len(plan.get(g, ())) for g in hidden]
    assert len(set(counts)) == 1 and counts[0] > 0
    for g in hidden:  # each member loses its own lowest-scored channels
        assert list(plan[g]) == sorted(np.argsort(scores[g], kind="stable")[:counts[0]].tolist())
    if "ceilings" in how:
        assert counts[0] == 3  # 25% of 12
    elif how.get("scope") == "global":  # half of all scored channels, the family taking its pooled share
        assert sum(len(c) for c in plan.values()) == sum(len(c) for c in plain.values())
    else:
        got = gp.count(gp.apply(model, dg, plan), x).params / gp.count(model, x).params
        assert abs(got - 0.5) <= 0.05
    assert gp.verify(model, x, plan, dg=dg) <= 1e-5


@pytest.mark.slow  # a torch.export trace of a tiny LLaMA, a save and a load: ~10 s
def test_uniform_llama_saves_one_width_per_config_field(tmp_path) -> None:
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    model = tf.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # layers of different scales: a global ranking prunes them differently
        model.model.layers[1].mlp.up_proj.weight.mul_(3.0)
        for i, scale in ((0, 0.02), (1, 0.6)):  # layer 0's KV groups score lowest, layer 1's above the cut
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                getattr(model.model.layers[i].self_attn, proj).weight.mul_(scale)
    ids = torch.randint(0, 128, (2, 8))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    result = gp.prune(model, inputs, ratio=0.5, factor="heads", scope="global", uniform=True)
    slim = gp.apply(model, result.graph, result.plan, output="module")
    assert type(slim) is type(model)
    mlp = {tuple(layer.mlp.up_proj.weight.shape) for layer in slim.model.layers}
    kv = {layer.self_attn.k_proj.weight.shape[0] for layer in slim.model.layers}
    assert len(mlp) == 1 and len(kv) == 1
    assert slim.config.intermediate_size == next(iter(mlp))[0] < 48
    assert (slim.config.num_key_value_heads, slim.config.num_attention_heads) == (1, 2)  # one KV group of two
    assert slim.config.num_key_value_heads * slim.config.head_dim == next(iter(kv))
    slim.save_pretrained(tmp_path)
    again = type(model).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(**inputs).logits, slim(**inputs).logits)
    # without uniform the layers keep different widths, which the config cannot hold
    plain = gp.select(result.graph, gp.score("magnitude", model, result.graph), 0.5, scope="global")
    heads = [g.id for g in result.graph.groups if g.prunable and g.size == 2]
    assert sorted(len(plain.get(g, ())) for g in heads) == [0, 1]  # a KV group goes from layer 0 only
    with pytest.raises(gp.RewriteError, match="config"):
        gp.apply(model, result.graph, plain, output="module")
