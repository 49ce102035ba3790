"""graphprune.api: gp.prune with MACs targets, global scope and rounding; checked options, build
options, per-module ratios, max_ratio and module objects in ignore."""

from __future__ import annotations

import pytest
import torch

import graphprune as gp
from graphprune.select import resolve_ratios


@pytest.fixture(scope="module")
def resnet20():
    model, x = gp.zoo.create("resnet20", width=8)
    return model, x, gp.DependencyGraph.build(model, x)


def test_prune_with_targets_rounding_and_scope(resnet20) -> None:
    model, x, _ = resnet20
    r = gp.prune(model, x, "l1", 0.5, target="macs", scope="global", normalize="mean")
    assert abs(1 - r.after.macs / r.before.macs - 0.5) <= 0.01
    r = gp.prune(model, x, "l1", 0.5, round_to=4)
    for g in r.graph.groups:
        if g.id in r.plan:
            assert (g.size - len(r.plan[g.id])) % 4 == 0


# --- options are checked --------------------------------------------------------------------------
@pytest.mark.parametrize("typo, hint", [({"round_to_": 8}, "'round_to'"), ({"pp": 3}, "'p'"),
                                        ({"rati0": 0.3}, "'ratio'")])
def test_unknown_options_raise_and_name_the_valid_ones(resnet20, typo, hint) -> None:
    model, x, _ = resnet20
    with pytest.raises(gp.InputError, match=f"unknown option.*did you mean {hint}") as err:
        gp.prune(model, x, "magnitude", 0.5, **typo)
    assert "p, roles, normalize" in str(err.value) and "round_to" in str(err.value)


def test_options_are_checked_against_each_criterion(resnet20) -> None:
    model, x, dg = resnet20
    with pytest.raises(gp.InputError, match="'seed'.*criterion 'l1' takes"):
        gp.prune(model, x, "l1", 0.5, seed=3)  # random's option, not magnitude's
    with pytest.raises(gp.InputError, match="'p'"):
        gp.score("l1", model, dg, p=2)  # l1 fixes p
    with pytest.raises(gp.InputError, match="permutations"):
        gp.score("taylor", model, dg, permutations=3)
    gp.score("magnitude", model, dg, data=None, loss_fn=None, p=1)  # the common options are fine
    assert gp.score(lambda model, dg, **options: {}, model, dg, anything=1) == {}  # a catch-all that reads them


def test_lean_takes_its_own_options_only(resnet20) -> None:
    model, x, _ = resnet20
    with pytest.raises(gp.InputError, match="'nn'.*did you mean 'n'"):
        gp.prune(model, x, "lean", 0.5, nn=8)
    with pytest.raises(gp.InputError, match="lean.*does not take target"):
        gp.prune(model, x, "lean", 0.5, target="macs")


# --- build options reach the build ---------------------------------------------------------------
def test_factor_chooses_heads_or_head_dims_from_prune() -> None:
    model, x = gp.zoo.create("vit_mha")
    shapes = {}
    for factor in ("largest", "heads"):
        r = gp.prune(model, x, ratio=0.5, factor=factor)
        attn = r.model.get_submodule("encoder.layers.0.self_attention")
        shapes[factor] = (attn.num_heads, attn.head_dim)
        assert r.graph.build_options["factor"] == factor
    assert shapes == {"largest": (4, 8), "heads": (2, 16)}
    with pytest.raises(gp.InputError, match="factor"):
        gp.prune(model, x, factor="head")


def test_grouped_reaches_the_build() -> None:
    model, x = gp.zoo.create("resnext")
    groups = {g: gp.prune(model, x, ratio=0.5, grouped=g).model.get_submodule("layer1.0.conv2").groups
              for g in ("groups", "channels")}
    assert groups == {"groups": 4, "channels": 8}


# --- Torch-Pruning habits ------------------------------------------------------------------------
def _width(result, name: str) -> int:
    return result.model.get_submodule(name).out_channels


def test_per_module_ratios_local(resnet20) -> None:
    model, x, _ = resnet20  # width 8: stages of 8, 16, 32 channels
    r = gp.prune(model, x, ratio={"layer3": 0.5, "layer2.*.conv1": 0.25})
    assert [_width(r, n) for n in ("layer3.0.conv1", "layer3.1.conv2", "layer2.0.conv1", "layer2.0.conv2",
                                   "layer1.0.conv1", "conv1")] == [16, 16, 12, 16, 8, 8]
    # a number ratio is the default; the most specific entry wins; modules as keys
    r = gp.prune(model, x, ratio=0.5, ratios={"*": 0.25, "layer3": 0.75, model.layer3[0].conv1: 0.0})
    assert [_width(r, n) for n in ("conv1", "layer2.0.conv1", "layer3.0.conv1", "layer3.1.conv1")] == [6, 12, 32, 8]


def test_a_group_whose_producers_disagree_takes_the_smallest_ratio(resnet20) -> None:
    model, x, dg = resnet20
    # layer2's residual stream is produced by layer2.0.conv2, its shortcut and layer2.{1,2}.conv2
    r = gp.prune(model, x, ratio={"layer2.0.conv2": 0.5, "layer2.1.conv2": 0.25})
    assert _width(r, "layer2.0.conv2") == _width(r, "layer2.2.conv2") == 12
    stream = next(g.id for g in dg.groups if "layer2.0.shortcut.0.weight" in g.producers)
    got = resolve_ratios(dg, {"layer2": 0.5, "layer2.0.shortcut": 0.0})
    assert got.pop(stream) == 0.0 and list(got.values()) == [0.5] * 3  # and layer2's three conv1s


def test_per_module_ratios_are_ceilings_in_global_scope_and_for_macs(resnet20) -> None:
    model, x, _ = resnet20
    free = gp.prune(model, x, ratio=0.3, scope="global", normalize="mean")
    capped = gp.prune(model, x, ratio=0.3, scope="global", normalize="mean", ratios={"layer3": 0.1})
    assert _width(capped, "layer3.0.conv1") >= 29 and _width(free, "layer3.0.conv1") < 29
    assert capped.plan.n_removed == free.plan.n_removed  # the ranking takes the rest elsewhere
    r = gp.prune(model, x, ratio=0.4, target="macs", ratios={"layer1": 0.0})
    assert abs(1 - r.after.macs / r.before.macs - 0.4) <= 0.01 and _width(r, "layer1.0.conv1") == 8
    with pytest.raises(gp.InputError, match="ratios=\\{"):
        gp.prune(model, x, ratio={"layer1": 0.5}, scope="global")


def test_max_ratio_caps_every_group_in_global_scope(resnet20) -> None:
    model, x, _ = resnet20
    r = gp.prune(model, x, ratio=0.5, scope="global", max_ratio=0.6)
    assert r.plan and all(len(ch) <= 0.6 * r.graph.groups[gid].size for gid, ch in r.plan.items())
    free = gp.prune(model, x, ratio=0.5, scope="global")
    assert any(len(ch) > 0.6 * free.graph.groups[gid].size for gid, ch in free.plan.items())
    with pytest.raises(gp.InputError, match="max_ratio"):
        gp.prune(model, x, max_ratio=1.5)


def test_ratios_over_steps_reach_the_same_widths(resnet20) -> None:
    model, x, _ = resnet20
    one = gp.prune(model, x, ratio=0.5, ratios={"layer3": 0.75, "layer1": 0.0})
    three = gp.prune(model, x, ratio=0.5, ratios={"layer3": 0.75, "layer1": 0.0}, steps=3)
    for name in ("layer1.0.conv1", "layer2.0.conv1", "layer3.0.conv1"):
        assert abs(_width(one, name) - _width(three, name)) <= 1, name
    with pytest.raises(gp.InputError, match="group id"):
        gp.prune(model, x, ratios={3: 0.5}, steps=2)


def test_ignore_takes_module_objects_and_patterns(resnet20) -> None:
    model, x, dg = resnet20
    r = gp.prune(model, x, ratio=0.5, ignore=[model.layer3[0].conv1, "layer2.*.conv1"])
    assert _width(r, "layer3.0.conv1") == 32 and _width(r, "layer2.1.conv1") == 16
    assert _width(r, "layer3.1.conv1") == 16
    scores = gp.score("l1", model, dg)
    assert gp.select(dg, scores, 0.5, ignore=[model.conv1]) == gp.select(dg, scores, 0.5, ignore=["conv1"])
    with pytest.raises(gp.InputError, match="not a submodule"):
        gp.prune(model, x, ignore=[torch.nn.Linear(2, 2)])
    with pytest.raises(gp.InputError, match="layer9"):
        gp.prune(model, x, ratios={"layer9": 0.5})
