"""gp.save / gp.load round trips (exact), chains of plans, origins, trust, the file format, export."""

from __future__ import annotations

import importlib.util
import json
import sys
import textwrap

import pytest
import torch

import graphprune as gp
from graphprune import gpfile
from graphprune import io as gpio

TINY = textwrap.dedent("""
    import torch
    import torch.nn as nn

    class Tiny(nn.Module):
        def __init__(self, width=8, act="relu"):
            super().__init__()
            self.act = act
            self.c1 = nn.Conv2d(3, width, 3, padding=1)
            self.bn = nn.BatchNorm2d(width)
            self.c2 = nn.Conv2d(width, width, 3, padding=1)
            self.head = nn.Conv2d(width, 4, 1)
            self.register_buffer("steps", torch.arange(3))
            self.register_buffer("mask", torch.tensor([True, False, True]))
            self.register_buffer("phase", torch.randn(3, dtype=torch.complex128))
            self.register_buffer("phase64", torch.randn(3, dtype=torch.complex64))

        def forward(self, x):
            f = torch.relu if self.act == "relu" else torch.tanh
            x = torch.where(self.mask.view(1, 3, 1, 1), torch.index_select(x, 1, self.steps), -x)
            x = (x.to(torch.complex128) * self.phase.view(1, 3, 1, 1)).abs().float() \
                + (x.to(torch.complex64) * self.phase64.view(1, 3, 1, 1)).abs()
            y = f(self.bn(self.c1(x)))
            return self.head(f(self.c2(y)) + y)

    def make(width=8, act="relu"):
        torch.manual_seed(0)
        return Tiny(width, act).eval()
""")


@pytest.fixture(scope="module")
def mlp():
    model, x = gp.zoo.create("mlp")
    return model, x, gp.prune(model, x, ratio=0.5)


@pytest.fixture(scope="module")
def resnet():
    model, x = gp.zoo.create("resnet20")
    return model, x, gp.prune(model, x, ratio=0.5)


@pytest.fixture
def tiny_module(tmp_path, monkeypatch):
    name = "gp_test_io_tiny"
    (tmp_path / f"{name}.py").write_text(TINY)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop(name, None)
    yield name
    sys.modules.pop(name, None)


def _same(a: torch.nn.Module, b: torch.nn.Module, x: tuple) -> bool:
    with torch.no_grad():
        return torch.equal(a(*x), b(*x))


@pytest.mark.parametrize("fixture", ["mlp", "resnet"])
def test_round_trip_is_exact(fixture, request, tmp_path):
    model, x, result = request.getfixturevalue(fixture)
    name = "mlp" if fixture == "mlp" else "resnet20"
    path = tmp_path / "slim.gp"
    gp.save(result.model, path, origin=name)
    loaded = gp.load(path)
    assert _same(loaded, result.model, x)
    assert {k: v.shape for k, v in loaded.state_dict().items()} == \
        {k: v.shape for k, v in result.model.state_dict().items()}
    assert gp.count(loaded, x) == result.after
    rec = loaded.meta["graphprune"]
    assert rec["origin"] == {"zoo": name, "kwargs": {}}
    assert gp.Plan.from_json(rec["plan"]) == result.plan
    assert not loaded.training
    assert "origin" not in result.model.meta["graphprune"]  # save did not touch the slim model


def test_file_is_safetensors_with_the_spec_in_its_metadata(mlp, tmp_path):
    from safetensors import safe_open

    _, _, result = mlp
    path = tmp_path / "slim.gp"
    gp.save(result.model, path, origin={"zoo": "mlp"})
    with safe_open(str(path), framework="pt") as f:
        assert set(f.metadata()) == {"format", "spec", "sha256"}
        assert set(f.keys()) == set(result.model.state_dict())
    spec = gpio.read_spec(path)
    assert spec["version"] == gpio.FORMAT_VERSION == 3
    assert spec["origin"] == {"zoo": "mlp", "kwargs": {}}
    assert spec["inputs"] == [{"shape": [2, 64], "dtype": "float32"}]
    assert len(spec["plans"]) == len(spec["builds"]) == 1
    assert sorted(tmp_path.iterdir()) == [path]  # no temporary file left


@pytest.mark.parametrize("name", ["mlp", "resnet20", "mini_mobilenet_v2", "mini_densenet", "mini_vit"])
def test_iterative_pruning_saves_the_whole_chain(name, tmp_path):
    if name not in gp.zoo.list_models():
        pytest.skip(f"zoo has no {name}")
    model, x = gp.zoo.create(name)
    result = gp.prune(model, x, ratio=0.5, steps=3)
    assert len(result.model.meta["graphprune"]["plans"]) == 3
    gp.save(result.model, tmp_path / "s.gp", origin=name)
    loaded = gp.load(tmp_path / "s.gp")
    assert len(loaded.meta["graphprune"]["plans"]) == 3
    assert _same(loaded, result.model, x)
    again = gp.prune(loaded, x, method="random", ratio=0.3, steps=2).model  # a slim model pruned again
    gp.save(again, tmp_path / "t.gp")                                      # knows its origin
    reloaded = gp.load(tmp_path / "t.gp")
    assert len(reloaded.meta["graphprune"]["plans"]) == 5
    assert _same(reloaded, again, x)


def test_save_without_origin_says_what_to_pass(mlp, tmp_path):
    _, _, result = mlp
    with pytest.raises(gp.SerializationError, match="origin="):
        gp.save(result.model, tmp_path / "x.gp")
    assert not (tmp_path / "x.gp").exists()


def test_set_origin_then_save(mlp, tmp_path):
    _, x, _ = mlp
    model, _ = gp.zoo.create("mlp")
    slim = gp.prune(model, x, ratio=0.25).model
    assert gp.set_origin(slim, "mlp") is slim
    gp.save(slim, tmp_path / "s.gp")
    assert _same(gp.load(tmp_path / "s.gp"), slim, x)
    assert gpio.origin_of(slim) == {"zoo": "mlp", "kwargs": {}}


def test_zoo_kwargs_survive(tmp_path):
    model, x = gp.zoo.create("mlp", num_classes=3)
    slim = gp.prune(model, x, ratio=0.5).model
    gp.save(slim, tmp_path / "k.gp", origin={"zoo": "mlp", "kwargs": {"num_classes": 3}})
    loaded = gp.load(tmp_path / "k.gp")
    assert loaded(*x).shape == (2, 3)
    assert _same(loaded, slim, x)


def test_import_spec_origin_needs_trust_and_keeps_dtypes(tiny_module, tmp_path):
    module = __import__(tiny_module)
    model = module.make(width=6)
    x = torch.randn(2, 3, 8, 8)
    slim = gp.prune(model, x, ratio=0.5).model
    gp.save(slim, tmp_path / "t.gp", origin={"factory": f"{tiny_module}:make", "kwargs": {"width": 6}},
            example_inputs=x)
    with pytest.raises(gp.SerializationError, match=rf"not trusted.*trust=\['{tiny_module}'\]"):
        gp.load(tmp_path / "t.gp")
    loaded = gp.load(tmp_path / "t.gp", trust=[tiny_module])
    assert _same(loaded, slim, (x,))
    assert loaded.c1.out_channels == 3
    kept = {k: v for k, v in slim.state_dict().items() if not v.is_floating_point()}
    assert {v.dtype for v in kept.values()} == {torch.int64, torch.bool, torch.complex128, torch.complex64}
    got = loaded.state_dict()
    for name, want in kept.items():  # integer, bool and complex tensors keep their dtype and values
        assert got[name].dtype == want.dtype and torch.equal(got[name], want), name
    assert set(gpio.read_spec(tmp_path / "t.gp")["views"].values()) == {"complex128", "complex64"}
    assert _same(gp.load(tmp_path / "t.gp", trust=module), slim, (x,))  # a module object works too


def test_save_refuses_a_file_that_would_load_differently(tiny_module, tmp_path):
    module = __import__(tiny_module)
    x = torch.randn(2, 3, 8, 8)
    slim = gp.prune(module.make(), x, ratio=0.5).model
    bad = {"factory": f"{tiny_module}:make", "kwargs": {"act": "tanh"}}  # same weights, other forward
    with pytest.raises(gp.SerializationError, match="other outputs; nothing was written"):
        gp.save(slim, tmp_path / "a.gp", origin=bad, example_inputs=x)
    with pytest.raises(gp.SerializationError, match="does not load"):
        gp.save(slim, tmp_path / "b.gp", origin={"factory": f"{tiny_module}:make", "kwargs": {"width": 5}},
                example_inputs=x)
    assert list(tmp_path.glob("*.gp*")) == []


def test_main_origins_are_refused_at_save_time(mlp, tmp_path):
    _, _, result = mlp
    with pytest.raises(gp.SerializationError, match=r"__main__.*mymodels.*trust=\['mymodels'\]"):
        gp.save(result.model, tmp_path / "m.gp", origin="__main__:Net")

    def local_factory():  # defined in a function body: not importable either
        return gp.zoo.create("mlp")[0]

    with pytest.raises(gp.SerializationError, match="function body"):
        gp.save(result.model, tmp_path / "m.gp", origin=local_factory)
    assert not (tmp_path / "m.gp").exists()


def test_pruning_a_loaded_model_again(resnet, tmp_path):
    _, x, result = resnet
    gp.save(result.model, tmp_path / "a.gp", origin="resnet20")
    first = gp.load(tmp_path / "a.gp")
    second = gp.prune(first, x, method="random", ratio=0.3)
    gp.save(second.model, tmp_path / "b.gp", origin=first)
    loaded = gp.load(tmp_path / "b.gp")
    assert len(loaded.meta["graphprune"]["plans"]) == 2
    assert _same(loaded, second.model, x)
    gp.save(loaded, tmp_path / "c.gp")  # a loaded model knows its origin
    assert _same(gp.load(tmp_path / "c.gp"), second.model, x)


def _write_v1(path, spec: dict, state: dict) -> None:
    """A format-1 file, as graphprune 0.1 wrote it (torch.save of tensors and a JSON string)."""
    torch.save({"format": gpio.FORMAT, "spec": json.dumps(spec), "state_dict": state}, path)


def test_format_1_files_still_load(mlp, tmp_path):
    _, x, result = mlp
    spec = {"format": gpio.FORMAT, "version": 1, "origin": {"zoo": "mlp", "kwargs": {}},
            "inputs": [{"shape": [2, 64], "dtype": "float32"}], "plans": [result.plan.to_json()],
            "training": False}
    _write_v1(tmp_path / "old.gp", spec, result.model.state_dict())
    loaded = gp.load(tmp_path / "old.gp")
    assert _same(loaded, result.model, x)
    gp.save(loaded, tmp_path / "new.gp")  # re-saved in the current format
    assert gpio.read_spec(tmp_path / "new.gp")["version"] == 3


@pytest.mark.parametrize("grouped", ["channels", "groups"])
def test_grouped_conv_files_rebuild_with_the_grouped_option_they_were_made_with(grouped, tmp_path):
    model, x = gp.zoo.create("mini_resnext")
    slim = gp.prune(model, x, ratio=0.5, grouped=grouped).model
    gp.save(slim, tmp_path / "s.gp", origin="mini_resnext")
    spec = gpio.read_spec(tmp_path / "s.gp")
    assert spec["builds"] == [{} if grouped == "channels" else {"grouped": "groups"}]  # the default is left out
    assert _same(gp.load(tmp_path / "s.gp"), slim, x)


def test_a_format_2_file_without_grouped_was_made_with_whole_conv_groups(tmp_path):
    model, x = gp.zoo.create("mini_resnext")
    slim = gp.prune(model, x, ratio=0.5, grouped="groups").model
    gp.save(slim, tmp_path / "s.gp", origin="mini_resnext")
    spec, state = gpfile.read(tmp_path / "s.gp")
    old = {**spec, "version": 2, "builds": [{}]}  # as format 2 wrote the default of its time
    gpfile.write(tmp_path / "old.gp", old, state)
    loaded = gp.load(tmp_path / "old.gp")
    assert _same(loaded, slim, x)
    assert loaded.meta["graphprune"]["builds"] == [{"grouped": "groups"}]
    gp.save(loaded, tmp_path / "again.gp")  # re-saved in format 3, which names the option
    assert gpio.read_spec(tmp_path / "again.gp")["builds"] == [{"grouped": "groups"}]


def test_load_executes_no_pickled_code(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.gp"
    torch.save({"format": gpio.FORMAT, "spec": "{}", "state_dict": {}, "x": Evil()}, path)
    with pytest.raises(gp.SerializationError, match="not a graphprune file"):
        gp.load(path)
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"garbage", b"", None])
def test_load_rejects_foreign_files(tmp_path, content):
    path = tmp_path / "f.gp"
    if content is None:
        torch.save({"weight": torch.zeros(2)}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(gp.SerializationError, match="not a graphprune file"):
        gp.load(path)
    with pytest.raises(gp.SerializationError, match="no such file"):
        gp.load(tmp_path / "missing.gp")


def test_load_reports_weights_that_do_not_fit(mlp, tmp_path):
    _, _, result = mlp
    path = tmp_path / "m.gp"
    gp.save(result.model, path, origin="mlp")
    state = dict(result.model.state_dict())
    state["fc1.weight"] = torch.zeros(3, 3)
    gpfile.write(path, gpio.read_spec(path), state)
    with pytest.raises(gp.SerializationError, match="do not fit"):
        gp.load(path)


def test_save_rejects_unpruned_models_and_bad_origins(mlp, tmp_path):
    model, _, result = mlp
    with pytest.raises(gp.SerializationError, match="state_dict"):
        gp.save(model, tmp_path / "u.gp", origin="mlp")
    with pytest.raises(gp.SerializationError, match="zoo model 'nosuch'"):
        gp.save(result.model, tmp_path / "u.gp", origin="nosuch")
    with pytest.raises(gp.SerializationError, match="import spec"):
        gp.save(result.model, tmp_path / "u.gp", origin={"factory": "no_colon"})
    with pytest.raises(gp.SerializationError, match="JSON"):
        gp.save(result.model, tmp_path / "u.gp", origin={"zoo": "mlp", "kwargs": {"f": object()}})
    with pytest.raises(gp.SerializationError, match="cannot be imported by name"):
        gp.save(result.model, tmp_path / "u.gp", origin="nosuchpkg_xyz.models:make")
    with pytest.raises(gp.SerializationError, match="kwargs must be a dict"):
        gp.save(result.model, tmp_path / "u.gp", origin={"zoo": "mlp", "kwargs": [1]})
    assert not (tmp_path / "u.gp").exists()
    (tmp_path / "afile").write_text("")
    with pytest.raises(gp.SerializationError, match="cannot write"):
        gp.save(result.model, tmp_path / "afile" / "x.gp", origin="mlp")


@pytest.mark.parametrize("fixture", ["mlp", "resnet"])
def test_export_torch_export_has_a_dynamic_batch(fixture, request, tmp_path):
    _, x, result = request.getfixturevalue(fixture)
    path = gp.export(result.model, x, tmp_path / "slim.pt2")
    program = torch.export.load(str(path))
    for batch in (2, 5):
        xb = torch.randn(batch, *x[0].shape[1:])
        with torch.no_grad():
            assert torch.allclose(program.module()(xb), result.model(xb), atol=1e-5)
    static = torch.export.load(str(gp.export(result.model, x, tmp_path / "s.pt2", dynamic_shapes=False)))
    with pytest.raises(Exception):  # noqa: B017 - torch raises several types for a shape guard
        static.module()(torch.randn(5, *x[0].shape[1:]))


def test_export_keeps_the_models_flags(resnet, tmp_path):
    _, x, result = resnet
    slim = result.model
    slim.train()
    slim.layer1.eval() if hasattr(slim, "layer1") else None
    flags = [m.training for m in slim.modules()]
    try:
        gp.export(slim, x, tmp_path / "r.pt2")
        assert [m.training for m in slim.modules()] == flags
    finally:
        slim.eval()


_HAVE_ONNX = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxscript", "onnxruntime"))


@pytest.mark.skipif(not _HAVE_ONNX, reason="onnx/onnxscript/onnxruntime not installed")
@pytest.mark.parametrize("fixture", ["mlp", "resnet"])
def test_export_onnx_runs_at_two_batch_sizes(fixture, request, tmp_path):  # pragma: no cover - needs onnx
    import onnx
    import onnxruntime

    _, x, result = request.getfixturevalue(fixture)
    path = gp.export(result.model, x, tmp_path / "slim.onnx")
    onnx.checker.check_model(onnx.load(str(path)))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    for batch in (2, 7):
        xb = torch.randn(batch, *x[0].shape[1:])
        (got,) = session.run(None, {name: xb.numpy()})
        with torch.no_grad():
            assert torch.allclose(torch.from_numpy(got), result.model(xb), atol=1e-4)


@pytest.mark.skipif(importlib.util.find_spec("onnx") is not None and importlib.util.find_spec("onnxscript") is not None,
                    reason="onnx is installed")
def test_export_onnx_missing_says_what_to_install(mlp, tmp_path):
    _, x, result = mlp
    with pytest.raises(gp.SerializationError, match="pip install"):
        gp.export(result.model, x, tmp_path / "slim.onnx")


@pytest.mark.parametrize("name", ["msd", "mini_shufflenet_v2", "mini_unet"])
def test_round_trip_across_topologies(name, tmp_path):
    if name not in gp.zoo.list_models():
        pytest.skip(f"zoo has no {name}")
    model, x = gp.zoo.create(name)
    slim = gp.prune(model, x, ratio=0.5).model
    gp.save(slim, tmp_path / "m.gp", origin=name)
    assert _same(gp.load(tmp_path / "m.gp"), slim, x)


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.block = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU())
        self.c2 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.head = torch.nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.head(torch.relu(self.c2(self.block(self.c1(x)))))


class Factory:
    """A factory importable as <this module>:Factory.make returning a registered model."""

    model = None

    @classmethod
    def register(cls, model):
        cls.model = model
        return {"factory": f"{__name__}:Factory.make"}

    @classmethod
    def make(cls):
        import copy

        return copy.deepcopy(cls.model)


def test_build_options_are_recorded_per_plan(tmp_path):
    torch.manual_seed(0)
    model, x = Net().eval(), torch.randn(2, 3, 8, 8)
    dg = gp.DependencyGraph.build(model, x, leaf_modules=["block", torch.nn.Sequential])
    plan = gp.select(dg, gp.score("magnitude", model, dg), ratio=0.5)
    slim = gp.apply(model, dg, plan)
    assert slim.c2.out_channels == 4 and slim.c1.out_channels == 8   # "block" pins c1's channels
    # the rewrite records the build options of each plan, so save needs only the factory ...
    gp.save(slim, tmp_path / "auto.gp", origin=Factory.register(model), example_inputs=x)
    assert gpio.read_spec(tmp_path / "auto.gp")["builds"] == [
        {"leaf_modules": ["block", "torch.nn.modules.container:Sequential"]}]
    assert _same(gp.load(tmp_path / "auto.gp", trust=[__name__]), slim, (x,))
    # ... a second plan made with other options (none) keeps its own
    deeper = gp.prune(slim, x, ratio=0.5).model
    gp.save(deeper, tmp_path / "deeper.gp", origin=Factory.register(model), example_inputs=x)
    assert _same(gp.load(tmp_path / "deeper.gp", trust=[__name__]), deeper, (x,))
    # without recorded options, an origin that contradicts the plan cannot be saved (the round trip fails)
    slim.meta["graphprune"].pop("builds")
    slim.meta["graphprune"].pop("build")
    with pytest.raises(gp.SerializationError, match="does not load.*leaf_modules"):
        gp.save(slim, tmp_path / "bad.gp", origin=Factory.register(model), example_inputs=x)
    assert not (tmp_path / "bad.gp").exists()
    gp.save(slim, tmp_path / "good.gp", example_inputs=x,
            origin={**Factory.register(model), "leaf_modules": ["block"]})
    assert _same(gp.load(tmp_path / "good.gp", trust=[__name__]), slim, (x,))
