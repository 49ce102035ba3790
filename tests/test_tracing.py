"""tracing.trace: what it leaves untouched (model, attributes, inputs), thread safety, and the
torch.export fallback (export_trace: eval mode, output structure, dynamic batch)."""

from __future__ import annotations

import collections
import copy
import inspect
import threading
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils._pytree as pytree
from helpers import TOL, InputInPlace, assert_state, flat_outputs, snapshot

import graphprune as gp
from graphprune import tracing
from graphprune.errors import InputError, TraceError

X = torch.randn(2, 3, 8, 8)


def _export_only(fx_model: nn.Module) -> bool:
    """Whether ``fx_model`` needs the export fallback (symbolic tracing fails)."""
    try:
        gp.trace(fx_model, X, export_fallback=False)
    except TraceError:
        return True
    return False


# --- models -----------------------------------------------------------------------------
class Branchy(nn.Module):
    """conv-bn-dropout-linear with a shape-dependent branch: only torch.export traces it."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.5)
        self.d = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8 * 6 * 6, 4)

    def forward(self, x):
        y = F.relu(self.bn(self.c(x)))
        if y.shape[-1] > 4:
            y = self.d(y)
        return self.fc(self.drop(y.reshape(y.shape[0], -1)))  # the batch size as a value


class NestedOut(Branchy):
    Pair = collections.namedtuple("Pair", "first second")

    def forward(self, x):
        y = F.relu(self.bn(self.c(x)))
        if y.shape[-1] > 4:
            y = self.d(y)
        z = y.flatten(1)
        return {"logits": self.fc(z), "extra": [y.mean((2, 3)), (z, self.Pair(y, y.sum()))]}


class Attn(nn.Module):
    """nn.MultiheadAttention (its views fold batch into heads) behind a shape branch."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 16)
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
        self.mid = nn.Linear(16, 12)
        self.out = nn.Linear(12, 5)

    def forward(self, x):
        h = self.inp(x)
        if h.shape[1] > 1:
            h = h + self.attn(h, h, h, need_weights=False)[0]
        return self.out(F.relu(self.mid(h)))


class VarArgs(nn.Module):
    """``forward(*xs)``: torch.export wants dynamic shapes shaped like the signature."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = Branchy()

    def forward(self, *xs):
        return self.inner(xs[0]) if xs[0].shape[0] > 0 else self.inner(xs[0]) * 0


class Stores(nn.Module):
    """A forward that keeps activations on ``self``: attribute, list, dict, counter."""

    def __init__(self, branch: bool) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 8, 3)
        self.d = nn.Conv2d(8, 4, 1)
        self.branch = branch
        self.acts: list = []
        self.cache: dict = {"keep": 1}
        self.calls = 0

    def forward(self, x):
        y = F.relu(self.c(x))
        if self.branch and y.shape[0] > 1:
            y = y * 2
        self.last = y
        self.acts.append(y)
        self.cache["y"] = y
        self.calls += 1
        self.c.seen = y  # on a submodule too
        return self.d(y)


class InPlaceInput(nn.Module):
    def __init__(self, branch: bool = False) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 8, 3)
        self.d = nn.Conv2d(8, 4, 1)
        self.branch = branch

    def forward(self, x):
        x.mul_(2)
        x += 1
        if self.branch and x.shape[0] > 1:
            x = x - 1
        return self.d(F.relu(self.c(x)))


class Lazy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.LazyConv2d(8, 3)
        self.d = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.d(F.relu(self.c(x)))


def _attrs(model: nn.Module) -> dict:
    """Every module's attributes (identity of values) and the contents of its containers."""
    out = {}
    for name, m in model.named_modules():
        for key, value in vars(m).items():
            out[(name, key)] = (id(value), type(value),
                                [id(v) for v in value] if isinstance(value, (list, dict)) else None)
    return out


# --- C: the model, its attributes and the inputs stay as they were ------------------------
@pytest.mark.parametrize("branch", [False, True], ids=["fx", "export"])
def test_forward_storing_activations_on_self_leaves_the_model_as_it_was(branch):
    model = Stores(branch)
    assert _export_only(model) == branch
    model.acts.append("mine")
    before, state = _attrs(model), snapshot(model)
    dg = gp.DependencyGraph.build(model, X)
    gp.prune(model, X, ratio=0.5)
    assert _attrs(model) == before
    assert not hasattr(model, "last") and not hasattr(model.c, "seen")
    assert model.acts == ["mine"] and model.cache == {"keep": 1} and model.calls == 0
    assert_state(model, state)
    assert not any(isinstance(v, torch.fx.Proxy) for m in model.modules() for v in vars(m).values())
    assert dg.groups


@pytest.mark.parametrize("branch", [False, True], ids=["fx", "export"])
def test_in_place_op_on_the_input_leaves_the_example_tensor_alone(branch):
    model, x = InPlaceInput(branch), X.clone()
    assert _export_only(model) == branch
    dg = gp.DependencyGraph.build(model, x)
    assert torch.equal(x, X)
    gp.trace(model, x)
    plan = {g.id: [1, 2] for g in dg.groups if g.prunable}
    assert plan
    assert gp.verify(model, x, plan, dg=dg) <= 1e-5
    gp.prune(model, x, ratio=0.5)
    assert torch.equal(x, X)


def test_uninitialised_lazy_module_is_refused_and_left_lazy():
    model = Lazy()
    with pytest.raises(InputError, match=r"'c'.*LazyConv2d.*forward pass") as info:
        gp.DependencyGraph.build(model, X)
    assert "model(" in str(info.value)
    assert isinstance(model.c, nn.LazyConv2d) and model.c.has_uninitialized_params()
    model(X)  # materialised by the user: now it prunes
    assert gp.DependencyGraph.build(model, X).groups


def test_training_mode_flags_and_running_stats_survive_both_paths():
    for model in (Branchy(), nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Dropout())):
        model.train()
        state = snapshot(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gp.DependencyGraph.build(model, X)
        assert all(m.training for m in model.modules())
        assert_state(model, state)


# --- A: the torch.export fallback -----------------------------------------------------------
def test_export_of_a_training_mode_model_records_the_inference_graph():
    model = Branchy().train()
    assert _export_only(model)
    with pytest.warns(UserWarning, match="training mode"):
        dg = gp.DependencyGraph.build(model, X)
    slim = gp.apply(model, dg, {})
    assert gp.verify(model, X, {}, dg=dg, slim=slim) <= 1e-6
    ref = copy.deepcopy(model).eval()
    with torch.no_grad():
        assert torch.allclose(slim.eval()(X), ref(X), atol=1e-6)
        assert torch.allclose(slim.train()(X), ref(X), atol=1e-6)  # one graph: inference
    plan = {g.id: [0, 3] for g in dg.groups if g.prunable}
    assert plan and gp.verify(model, X, plan, dg=dg) <= 1e-5
    assert model.training


def test_export_keeps_the_output_structure():
    model = NestedOut().eval()
    assert _export_only(model)
    with pytest.warns(UserWarning, match="Pair.*plain dict or tuple"):  # fx code cannot build it
        dg = gp.DependencyGraph.build(model, X)
    plan = {g.id: [1, 2] for g in dg.groups if g.prunable}
    slim = gp.apply(model, dg, plan).eval()
    with torch.no_grad():
        got, want = slim(X), model(X)
    assert isinstance(got, dict) and list(got) == ["logits", "extra"]
    assert isinstance(got["extra"], list) and type(got["extra"][1]) is tuple
    assert type(got["extra"][1][1]) is tuple and len(got["extra"][1][1]) == 2
    assert got["logits"].shape == want["logits"].shape
    assert [t.shape for t in flat_outputs(got)] == [t.shape for t in flat_outputs(want)]
    assert gp.verify(model, X, plan, dg=dg, slim=slim) <= 1e-5


@pytest.mark.parametrize("make, shape", [(Branchy, (3, 8, 8)), (NestedOut, (3, 8, 8)), (Attn, (7, 6)),
                                         (VarArgs, (3, 8, 8))], ids=["conv", "nested", "attention", "varargs"])
def test_export_slim_model_runs_at_other_batch_sizes(make, shape):
    model = make().eval()
    x = torch.randn(2, *shape)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dg = gp.DependencyGraph.build(model, x)
    assert not [w for w in caught if "only run at" in str(w.message)]
    assert dg.gm.meta.get("graphprune_export")
    assert all(n.meta["shape"][0] == 2 for n in dg.gm.graph.nodes
               if n.op == "placeholder")  # recorded shapes stay concrete
    rng = np.random.default_rng(0)
    plan = {g.id: sorted(rng.choice(g.size, g.size // 2, replace=False).tolist())
            for g in dg.groups if g.prunable and g.exact and g.size > 1}
    assert plan
    slim = gp.apply(model, dg, plan).eval()
    assert gp.verify(model, x, plan, dg=dg, slim=slim) <= 1e-5
    with torch.no_grad():
        want = flat_outputs(slim(x))
        for batch in (1, 3, 5):  # samples are independent: each one's output is as in batch 2
            xb = torch.cat([x] * 3)[:batch]
            got = flat_outputs(slim(xb))
            for a, b in zip(got, want):
                if a.dim() and a.shape[0] == batch:
                    idx = torch.arange(batch) % 2
                    assert torch.allclose(a, b[idx], atol=1e-5), batch


def test_export_with_batch_one_warns_how_to_get_a_dynamic_batch():
    model = Branchy().eval()
    with pytest.warns(UserWarning, match="batch size is 1.*batch of 2 or more"):
        dg = gp.DependencyGraph.build(model, X[:1])
    assert gp.apply(model, dg, {})(X[:1]).shape == (1, 4)


# --- D: threads -----------------------------------------------------------------------------
def test_tracing_from_many_threads_gives_the_single_threaded_results():
    models = {name: gp.zoo.create(name) for name in ("resnet20", "mini_mobilenet_v2", "mini_vit", "msd")}
    models["branchy"] = (Branchy().eval(), (X,))  # the export fallback, in threads too
    expected = {name: gp.prune(m, x, ratio=0.5) for name, (m, x) in models.items()}
    shapes = {name: [tuple(p.shape) for p in r.model.parameters()] for name, r in expected.items()}
    failures: list[str] = []
    results: collections.Counter = collections.Counter()
    stop = threading.Event()

    def prune(name: str) -> None:
        model, x = models[name]
        for _ in range(2):
            try:
                result = gp.prune(model, x, ratio=0.5)
                dg = gp.DependencyGraph.build(model, x)
                assert result.plan == expected[name].plan, name
                assert [tuple(p.shape) for p in result.model.parameters()] == shapes[name]
                assert len(dg.groups) == len(expected[name].graph.groups)
                results[name] += 1
            except BaseException as exc:  # noqa: BLE001 - every failure is reported
                failures.append(f"{name}: {type(exc).__name__}: {exc}")

    def plain_calls() -> None:  # other threads keep calling modules while others trace
        layer = nn.Linear(4, 3)
        while not stop.is_set():
            try:
                layer(torch.randn(2, 4))
                layer.weight  # noqa: B018 - attribute access goes through Module.__getattr__
            except BaseException as exc:  # noqa: BLE001
                failures.append(f"plain call: {type(exc).__name__}: {exc}")
                return

    workers = [threading.Thread(target=prune, args=(name,)) for name in models for _ in range(2)]
    bystanders = [threading.Thread(target=plain_calls) for _ in range(2)]
    for t in bystanders + workers:
        t.start()
    for t in workers:
        t.join()
    stop.set()
    for t in bystanders:
        t.join()
    assert not failures, failures[:5]
    assert all(results[name] == 4 for name in models), results
    # nothing of fx's patching is left behind
    assert nn.Linear(4, 3)(torch.randn(1, 4)).shape == (1, 3)
    assert nn.Module.__call__ is torch.nn.modules.module.Module.__call__
    assert not torch.fx._symbolic_trace.is_fx_tracing()


class Keyworded(nn.Module):
    """A forward with optional tensors and settings, called with keywords (as Hugging Face models are)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.b = nn.Linear(8, 3)

    def forward(self, x, mask=None, scale=1.0, cache=None, return_dict=True):
        y = torch.relu(self.a(x)) * scale
        if mask is not None:
            y = y + mask.unsqueeze(-1)
        out = self.b(y)
        return {"logits": out, "cache": cache} if return_dict else out


@pytest.mark.parametrize("order", ["signature", "reversed"])
def test_dict_example_inputs_are_keyword_arguments(order):
    x, mask = torch.randn(2, 5, 4), torch.randn(2, 5)
    inputs = {"x": x, "mask": mask, "scale": 2.0, "return_dict": False}
    if order == "reversed":
        inputs = dict(reversed(list(inputs.items())))
    model = Keyworded().eval()
    bound = tracing.bind_inputs(model, inputs)
    assert bound.names == ("x", "mask") and bound.constants == {"scale": 2.0, "return_dict": False}
    result = gp.prune(model, inputs, ratio=0.5, steps=2)
    slim = result.model
    assert slim.get_submodule("a").out_features == 4
    assert list(inspect.signature(slim.forward).parameters) == ["x", "mask", "scale", "return_dict"]
    with torch.no_grad():
        want = slim(x, mask)
        assert torch.equal(slim(x=x, mask=mask), want)
        assert torch.equal(slim(**inputs), want)  # called as the model is, with the keywords it fixed
        with pytest.raises(gp.InputError, match="traced with scale=2.0 fixed"):
            slim(**{**inputs, "scale": 3.0})
    assert gp.count(slim, inputs).params == result.after.params  # graphprune takes the same dict again
    assert gp.verify(model, inputs, result.plan) < 1e-5
    with pytest.raises(gp.InputError, match="scale=2.0"):
        tracing.bind_inputs(slim, {**inputs, "scale": 3.0})


def test_dict_example_inputs_name_what_forward_does_not_take():
    with pytest.raises(gp.InputError, match=r"\['nope'\].*'x', 'mask'"):
        gp.DependencyGraph.build(Keyworded().eval(), {"x": torch.randn(2, 5, 4), "nope": torch.ones(1)})
    with pytest.raises(gp.InputError, match="needs"):
        class Needs(Keyworded):
            def forward(self, x, y):
                return self.b(torch.relu(self.a(x))) + y

        gp.DependencyGraph.build(Needs().eval(), {"x": torch.randn(2, 5, 4)})


# --- found by the hazard fuzzer (test_fuzz_hazards.py), reduced ------------------------
def _max_diff(a, b) -> float:
    a, b = pytree.tree_leaves(a), pytree.tree_leaves(b)
    assert [t.shape for t in a] == [t.shape for t in b]
    return max((u - v).abs().max().item() for u, v in zip(a, b))


def _eval_outputs(model, x):
    """What the model computes in eval mode, from a copy (it may change its input or itself)."""
    with torch.no_grad():
        return copy.deepcopy(model).eval()(x.clone())


@pytest.mark.parametrize("how", ["mul_", "relu_inplace"])
def test_building_leaves_the_example_inputs_unchanged(how):
    # tracing.py: the recording run (propagate_shapes) feeds the caller's tensors to the graph
    model, x = InputInPlace(how).eval(), torch.randn(1, 3, 6, 6)
    original = x.clone()
    gp.DependencyGraph.build(model, x)
    assert torch.equal(x, original), "DependencyGraph.build changed the example inputs"


class Stash(nn.Module):
    """A forward that keeps its last output on the module (feature-extraction style)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(4, 2, 1)
        self.last = None

    def forward(self, x):
        y = self.a(x)
        self.last = y
        return self.b(y)


def test_tracing_leaves_no_proxy_on_the_model():
    # tracing.py: _symbolic_trace deletes attributes that tracing added, but one the model
    # already had is left holding a torch.fx Proxy
    model, x = Stash().eval(), torch.randn(1, 3, 4, 4)
    gp.DependencyGraph.build(model, x)
    assert model.last is None, f"the model's attribute now holds a {type(model.last).__name__}"


class ShapeBranch(nn.Module):
    """Python control flow on a shape (torch.fx fails, the torch.export fallback traces it),
    with a BatchNorm, a functional dropout and structured outputs."""

    def __init__(self, form: str = "tensor", dropout: bool = False, branch: bool = True) -> None:
        super().__init__()
        self.form, self.dropout, self.branch = form, dropout, branch
        self.a = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.b = nn.Conv2d(6, 2, 1)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-1.0, 1.0)
            self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        if not self.branch or x.shape[0] > 0:  # without the branch, torch.fx traces it
            y = self.bn(self.a(x)).relu()
        else:
            y = self.a(x)
        if self.dropout:
            y = F.dropout(y, 0.5, self.training)
        out = self.b(y)
        if self.form == "dict":
            return {"out": out, "pooled": out.mean((2, 3))}
        if self.form == "list":
            return [out, out.mean((2, 3))]
        if self.form == "nested":
            return out, {"more": [out.mean((2, 3))]}
        return out


@pytest.mark.parametrize("form", ["dict", "list", "nested"])
def test_export_fallback_keeps_the_output_structure(form):
    # tracing.py: _export_trace replaces the exported module's codegen with a plain one, so the
    # slim model returns a flat tuple where the model returns a dict, a list or nested containers
    torch.manual_seed(0)
    model, x = ShapeBranch(form).eval(), torch.randn(2, 3, 6, 6)
    dg = gp.DependencyGraph.build(model, x)
    assert dg.gm.meta.get("graphprune_export")
    slim = gp.apply(model, dg, {0: [1, 4]})
    with torch.no_grad():
        want, got = model(x), slim(x)
    assert pytree.tree_structure(got) == pytree.tree_structure(want)


def test_export_fallback_of_a_model_in_training_mode():
    # tracing.py: torch.export traces the model as it is, in training mode, so the graph's
    # BatchNorm always takes batch statistics; the slim model in eval mode differs from the
    # model in eval mode by about 1 (verify cannot see it: both sides come from that graph)
    torch.manual_seed(0)
    model, x = ShapeBranch().train(), torch.randn(2, 3, 6, 6)
    want = _eval_outputs(model, x)
    dg = gp.DependencyGraph.build(model, x.clone())
    slim = gp.apply(model, dg, {}).eval()
    with torch.no_grad():
        assert _max_diff(slim(x.clone()), want) <= TOL
    assert model.training and model.bn.training


@pytest.mark.parametrize("export", [False, True], ids=["fx", "export"])
def test_functional_dropout_of_a_model_traced_in_training_mode(export):
    # tracing.py: F.dropout(y, p, self.training) is traced with self.training == True baked in,
    # so the slim model keeps dropping channels in eval mode: verify compares two random masks
    # (about 1.5) and the slim model is not the model in eval mode
    torch.manual_seed(0)
    model, x = ShapeBranch(dropout=True, branch=export).train(), torch.randn(2, 3, 6, 6)
    want = _eval_outputs(model, x)
    dg = gp.DependencyGraph.build(model, x.clone())
    assert bool(dg.gm.meta.get("graphprune_export")) == export
    slim = gp.apply(model, dg, {}).eval()
    with torch.no_grad():
        assert _max_diff(slim(x.clone()), want) <= TOL
    assert gp.verify(model, x.clone(), {0: [1, 4]}, dg=dg) <= TOL
