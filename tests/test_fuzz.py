"""Fuzzing: random architectures and random plans.

The architectures (``strategies.architectures``) are small DAGs of convolutions (plain,
grouped, depthwise, functional, transposed), BatchNorm/LayerNorm/GroupNorm, activations,
add/mul/cat/split, pooling, upsampling, flatten, Linear layers, attention over spatial
tokens (``nn.MultiheadAttention`` or a hand-written SDPA block) and ``again`` (an earlier
op's module called a second time, on another value), on one input or two.

The dependency graph is built with random options (``grouped="groups"|"channels"``,
``factor="largest"|"heads"``).

Property: for any architecture the strategy draws and any plan, either the slim model
is exact (``gp.verify`` <= 1e-4, so the outputs keep their shapes) or graphprune raises
a typed ``gp.GraphPruneError``; never another exception. The user's model is never
changed, whatever happens.

CI runs 200 derandomised examples per property (float64, so 1e-4 measures structure,
not rounding). ``GRAPHPRUNE_FUZZ_LONG=1`` runs thousands with fresh randomness
(``GRAPHPRUNE_FUZZ_EXAMPLES=N`` sets how many, ``GRAPHPRUNE_FUZZ_MAX_OPS=N`` the largest
networks) and prints a tally of outcomes (``GRAPHPRUNE_FUZZ_REPORT=1`` prints it in CI
mode too)::

    GRAPHPRUNE_FUZZ_LONG=1 python -m pytest -q -s tests/test_fuzz.py
"""

from __future__ import annotations

import collections
import copy
import os
import warnings

import pytest
import torch
from helpers import assert_state, snapshot
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st
from strategies import Arch, FuzzNet, Op, architectures, build, plans

import graphprune as gp
from graphprune import tracing

LONG = os.environ.get("GRAPHPRUNE_FUZZ_LONG", "") not in ("", "0")
EXAMPLES = int(os.environ.get("GRAPHPRUNE_FUZZ_EXAMPLES", "2000" if LONG else "200"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=not LONG,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
MAX_OPS = int(os.environ.get("GRAPHPRUNE_FUZZ_MAX_OPS", "12"))
TOLERANCE = 1e-4
REPORT = LONG or os.environ.get("GRAPHPRUNE_FUZZ_REPORT", "") not in ("", "0")
TALLY: collections.Counter = collections.Counter()
# how grouped convolutions shrink and which factor of a split channel axis is pruned
BUILD_OPTIONS = st.fixed_dictionaries({"grouped": st.sampled_from(["groups", "channels"]),
                                       "factor": st.sampled_from(["largest", "heads"])})
FIRST: dict[str, str] = {}  # outcome -> first error message, for the report



def _assert_unchanged(model: torch.nn.Module, snap: dict, params: dict, training: bool) -> None:
    assert_state(model, snap, "the user's model: ")
    assert {k: id(v) for k, v in model.named_parameters()} == params, "parameters were replaced"
    assert model.training == training


def _outputs(out) -> list[torch.Tensor]:
    return [out] if isinstance(out, torch.Tensor) else list(out)


def _inputs(x) -> tuple[torch.Tensor, ...]:
    """Example inputs as call arguments: a tensor, or a tuple of them, as ``model(*inputs)``."""
    return (x,) if isinstance(x, torch.Tensor) else tuple(x)


def check_prune(model: torch.nn.Module, x, data: st.DataObject) -> str:
    """Build, draw a plan, apply, verify. Returns the outcome for the tally."""
    snap, training = snapshot(model), model.training
    params = {k: id(v) for k, v in model.named_parameters()}
    try:
        options = data.draw(BUILD_OPTIONS, label="build options")
        dg = gp.DependencyGraph.build(model, x, **options)
        mode, plan = data.draw(plans(dg), label="plan")
        note(f"{mode} plan: {dict(plan.items())}")
        slim = gp.apply(model, dg, plan)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # inexact groups: verify warns and checks shapes only
            err = gp.verify(model, x, plan, dg=dg, slim=slim)
        assert err <= TOLERANCE, f"slim differs from the masked original by {err}"
        inputs = _inputs(x)
        with torch.no_grad():
            want = [o.shape for o in _outputs(model(*inputs))]
            got = [o.shape for o in _outputs(slim(*inputs))]
        assert want == got, f"output shapes changed: {want} -> {got}"
        outcome = f"exact ({mode}, {'empty' if not plan else 'pruned'})"
        assert mode != "broken", "a broken plan was accepted"
    except gp.GraphPruneError as exc:
        outcome = f"{type(exc).__name__} ({mode if 'mode' in locals() else 'build'})"
        FIRST.setdefault(outcome, str(exc)[:300])
    finally:
        _assert_unchanged(model, snap, params, training)
    event(outcome)
    TALLY[outcome] += 1
    return outcome


@FUZZ
@given(arch=architectures(max_ops=MAX_OPS), data=st.data())
def test_random_architectures_prune_exactly_or_raise_typed_errors(arch, data):
    model, x = build(arch)
    check_prune(model, x, data)


SMALL_ZOO = ["resnet20", "mini_densenet", "mini_mobilenet_v2", "vgg11", "mini_shufflenet_v2", "mini_vit",
             "mini_unet", "mini_squeezenet", "convnext_tiny", "efficientnet_b0", "mobilenet_v3_small",
             "mini_resnext", "mini_inception", "msd", "swin_tiny", "mini_vit_mha"]


class _Zoo(dict):
    def __repr__(self) -> str:  # hypothesis prints the fixture in a falsifying example
        return f"<zoo models {sorted(self)}>"


@pytest.fixture(scope="module")
def zoo_models():
    return _Zoo({n: gp.zoo.create(n) for n in SMALL_ZOO if n in gp.zoo.list_models()})


@settings(FUZZ, max_examples=max(20, EXAMPLES // 5))
@given(data=st.data())
def test_random_plans_on_zoo_models(zoo_models, data):
    name = data.draw(st.sampled_from(sorted(zoo_models)), label="model")
    model, x = zoo_models[name]
    check_prune(model, x, data)


@settings(FUZZ, max_examples=max(20, EXAMPLES // 4))
@given(arch=architectures())
def test_recorded_shapes_match_the_model_outputs(arch):
    """The output shapes recorded in node.meta are those the model computes (a guard for
    any faster shape propagation)."""
    model, x = build(arch)
    gm = tracing.trace(model, x)
    with torch.no_grad():
        outs = _outputs(model(*_inputs(x)))
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    args = out_node.args[0]
    recorded = [args.meta["shape"]] if isinstance(args, torch.fx.Node) else [a.meta["shape"] for a in args]
    assert recorded == [o.shape for o in outs]


def _op_tags(arch: Arch, op: Op) -> list[str]:
    """What an op exercises: its kind, refined (``conv grouped``, ``convT stride 2``, ...)."""
    kind, a = op.kind, op.args
    tags = [f"{kind} {a[0]}"] if kind == "ln" else [kind]
    if kind in ("conv", "convT"):
        groups, c_in = a[3] if kind == "conv" else a[5], arch.shapes[op.inputs[0]][0]
        tags = [kind + (" depthwise" if groups == c_in > 1 else " grouped" if groups > 1 else "")]
        tags += [f"convT stride {a[2]}"] if kind == "convT" else []
    if kind in ("mha", "sdpa"):
        tags += [f"{kind} {a[-2]} sizes"] + ([f"{kind} residual"] if a[-1] else [])
    if kind == "again":  # which module is called a second time
        tags.append(f"again {arch.ops[a[0]].kind}")
    if arch.c_in2 and 1 in op.inputs:
        tags.append("second input used")
    return tags


def test_strategy_covers_the_listed_operations():
    """The strategy can draw every operation family the issue lists."""
    kinds = collections.Counter()

    @settings(max_examples=300, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(arch=architectures())
    def collect(arch):
        kinds["two inputs" if arch.c_in2 else "one input"] += 1
        for op in arch.ops:
            kinds.update(_op_tags(arch, op))

    collect()
    for kind in ("conv", "conv depthwise", "conv grouped", "fconv", "bn", "act", "add", "mul", "cat",
                 "split", "pool", "up", "flatten", "linear", "gap", "se",
                 "ln flat", "ln channels", "gn", "convT", "convT grouped", "convT depthwise",
                 "convT stride 1", "convT stride 2", "mha", "mha residual", "mha batch sizes",
                 "mha literal sizes", "sdpa", "sdpa residual", "sdpa batch sizes", "sdpa literal sizes",
                 "again", "again conv", "again bn", "one input", "two inputs", "second input used"):
        assert kinds[kind] > 0, f"the strategy never drew {kind}: {dict(kinds)}"


def test_fuzznet_is_traceable_and_runs():
    arch = Arch(c_in=3, hw=8, shapes=[(3, 8, 8)])
    arch.ops += [Op("conv", (0,), (6, 3, 1, 1, True)), Op("split", (1,), ((2, 4),)),
                 Op("cat", (2, 3)), Op("gap", (4,), ("mean",)), Op("linear", (5,), (2, True))]
    arch.shapes += [(6, 8, 8), (2, 8, 8), (4, 8, 8), (6, 8, 8), (6,), (2,)]
    arch.outputs = (6,)
    model, x = build(arch)
    assert isinstance(model, FuzzNet)
    assert model(x).shape == (1, 2)
    dg = gp.DependencyGraph.build(model, x)
    assert any(g.prunable for g in dg.groups)


@pytest.fixture(scope="module", autouse=True)
def _print_tally():
    yield
    if REPORT and TALLY:
        print(f"\nfuzz outcomes over {sum(TALLY.values())} examples:")
        for outcome, n in sorted(TALLY.items()):
            print(f"  {n:6d}  {outcome}" + (f"\n          e.g. {FIRST[outcome]}" if outcome in FIRST else ""))


# --- regressions the fuzzer found ------------------------------------------------------------


class _InplaceUnused(torch.nn.Module):
    """An in-place op whose result is not used, and a layer that a plan removes whole."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.dead = torch.nn.Conv2d(3, 2, 1)  # nothing reads it: removable whole
        self.conv = torch.nn.Conv2d(3, 4, 1)
        self.act = torch.nn.ReLU(inplace=True)
        self.head = torch.nn.Conv2d(4, 2, 1)

    def forward(self, x):
        self.dead(x)
        y = self.conv(x)
        if self.how == "module":
            self.act(y)
        elif self.how == "method":
            y.relu_()
        elif self.how == "function":
            torch.relu_(y)
        else:
            y += 1.0
        return self.head(y)


@pytest.mark.parametrize("how", ["module", "method", "function", "iadd"])
def test_dropping_a_vanished_layer_keeps_unused_inplace_ops(how):
    """Found by fuzzing: removing a layer whole ran fx's dead-code elimination, which took
    in-place ops with unused results (nn.ReLU(inplace=True)(y), y.relu_()) for dead code."""
    model = _InplaceUnused(how).eval()
    x = torch.randn(1, 3, 4, 4)
    dg = gp.DependencyGraph.build(model, x)
    dead = next(g for g in dg.groups if any(m.param == "dead.weight" for m in g.members))
    assert dead.removable
    plan = {dead.id: list(range(dead.size))}
    slim = gp.apply(model, dg, plan)
    assert not hasattr(slim, "dead")
    with torch.no_grad():
        assert torch.allclose(slim(x), model(x), atol=1e-6)
    assert gp.verify(model, x, plan, dg=dg, slim=slim) <= TOLERANCE


@pytest.mark.parametrize("factor", ["largest", "heads"])
def test_attention_inner_groups_cannot_be_emptied(factor):
    """Found by fuzzing: nn.MultiheadAttention's inner dims were marked removable, so a plan
    emptying them passed validation and the rewrite failed; now the plan is refused."""
    model, x = gp.zoo.create("mini_vit_mha")
    dg = gp.DependencyGraph.build(model, x, factor=factor)
    inner = [g for g in dg.groups if g.prunable and any(p.endswith("in_proj_weight") for p in g.producers)]
    assert inner and not any(g.removable for g in inner)
    with pytest.raises(gp.PlanError, match="keep one or more"):
        gp.apply(model, dg, {inner[0].id: list(range(inner[0].size))})
    keep_one = {inner[0].id: list(range(1, inner[0].size))}
    assert gp.verify(model, x, keep_one, dg=dg) <= TOLERANCE


class _InplaceThroughView(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Conv2d(2, 4, 1)
        self.act = torch.nn.ReLU(inplace=True)
        self.b = torch.nn.Conv2d(4, 1, 1)

    def forward(self, x):
        y = self.a(x)
        self.act(y.flatten(1))  # changes y through a view of it
        return self.b(y)


def test_verify_follows_inplace_ops_through_views():
    """Found by fuzzing: verify's masked run zeroed removed channels out of place, so an
    in-place op on a view of a masked tensor no longer reached the tensor itself and the
    reference (not the slim model) was wrong."""
    model = _InplaceThroughView().eval()
    x = torch.randn(1, 2, 4, 4)
    dg = gp.DependencyGraph.build(model, x)
    plan = {0: [2]}
    slim = gp.apply(model, dg, plan)
    reference = copy.deepcopy(model)
    with torch.no_grad():
        reference.b.weight[:, 2] = 0.0  # the removed channel's consumer column
        assert torch.allclose(slim(x), reference(x), atol=1e-6)
    assert gp.verify(model, x, plan, dg=dg, slim=slim) <= TOLERANCE
