"""gp.save / gp.load round trips (exact), origins, refusals, and export."""

from __future__ import annotations

import importlib.util
import sys
import textwrap

import pytest
import torch

import graphprune as gp
from graphprune import io as gpio

TINY = textwrap.dedent("""
    import torch
    import torch.nn as nn

    class Tiny(nn.Module):
        def __init__(self, width=8):
            super().__init__()
            self.c1 = nn.Conv2d(3, width, 3, padding=1)
            self.bn = nn.BatchNorm2d(width)
            self.c2 = nn.Conv2d(width, width, 3, padding=1)
            self.head = nn.Conv2d(width, 4, 1)

        def forward(self, x):
            y = torch.relu(self.bn(self.c1(x)))
            return self.head(torch.relu(self.c2(y)) + y)

    def make(width=8):
        torch.manual_seed(0)
        return Tiny(width).eval()
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


def test_file_holds_only_tensors_and_json(mlp, tmp_path):
    _, _, result = mlp
    path = tmp_path / "slim.gp"
    gp.save(result.model, path, origin={"zoo": "mlp"})
    blob = torch.load(path, weights_only=True)
    assert set(blob) == {"format", "spec", "state_dict"}
    spec = gpio.read_spec(path)
    assert spec["origin"] == {"zoo": "mlp", "kwargs": {}}
    assert spec["inputs"] == [{"shape": [2, 64], "dtype": "float32"}]
    assert len(spec["plans"]) == 1


def test_save_without_origin_says_what_to_pass(mlp, tmp_path):
    _, _, result = mlp
    with pytest.raises(gp.SerializationError, match="origin="):
        gp.save(result.model, tmp_path / "x.gp")
    assert not (tmp_path / "x.gp").exists()


def test_set_origin_then_save(mlp, tmp_path):
    _, x, _ = mlp
    model, _ = gp.zoo.create("mlp")
    slim = gp.prune(model, x, ratio=0.25).model
    gp.set_origin(slim, "mlp")
    gp.save(slim, tmp_path / "s.gp")
    assert _same(gp.load(tmp_path / "s.gp"), slim, x)


def test_zoo_kwargs_survive(tmp_path):
    model, x = gp.zoo.create("mlp", num_classes=3)
    slim = gp.prune(model, x, ratio=0.5).model
    gp.save(slim, tmp_path / "k.gp", origin={"zoo": "mlp", "kwargs": {"num_classes": 3}})
    loaded = gp.load(tmp_path / "k.gp")
    assert loaded(*x).shape == (2, 3)
    assert _same(loaded, slim, x)


def test_import_spec_origin(tiny_module, tmp_path):
    module = __import__(tiny_module)
    model = module.make(width=6)
    x = torch.randn(2, 3, 8, 8)
    slim = gp.prune(model, x, ratio=0.5).model
    gp.save(slim, tmp_path / "t.gp", origin={"factory": f"{tiny_module}:make", "kwargs": {"width": 6}},
            example_inputs=x)
    loaded = gp.load(tmp_path / "t.gp")
    assert _same(loaded, slim, (x,))
    assert loaded.c1.out_channels == 3


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


@pytest.mark.parametrize("content", [b"garbage", None])
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
    blob = torch.load(path, weights_only=True)
    blob["state_dict"]["fc1.weight"] = torch.zeros(3, 3)
    torch.save(blob, path)
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


def test_export_torch_export(mlp, tmp_path):
    _, x, result = mlp
    path = gp.export(result.model, x, tmp_path / "slim.pt2")
    program = torch.export.load(str(path))
    with torch.no_grad():
        assert torch.allclose(program.module()(*x), result.model(*x), atol=1e-6)


@pytest.mark.skipif(importlib.util.find_spec("onnx") is None or importlib.util.find_spec("onnxscript") is None,
                    reason="onnx/onnxscript not installed")
def test_export_onnx(mlp, tmp_path):  # pragma: no cover - needs onnx
    import onnx

    _, x, result = mlp
    path = gp.export(result.model, x, tmp_path / "slim.onnx")
    onnx.checker.check_model(onnx.load(str(path)))


@pytest.mark.skipif(importlib.util.find_spec("onnx") is not None and importlib.util.find_spec("onnxscript") is not None,
                    reason="onnx is installed")
def test_export_onnx_missing_says_what_to_install(mlp, tmp_path):
    _, x, result = mlp
    with pytest.raises(gp.SerializationError, match="pip install"):
        gp.export(result.model, x, tmp_path / "slim.onnx")


@pytest.mark.parametrize("name", ["msd", "densenet", "vit_tiny", "shufflenet_v2", "unet"])
def test_round_trip_across_topologies(name, tmp_path):
    if name not in gp.zoo.list_models():
        pytest.skip(f"zoo has no {name}")
    model, x = gp.zoo.create(name)
    slim = gp.prune(model, x, ratio=0.5).model
    gp.save(slim, tmp_path / "m.gp", origin=name)
    assert _same(gp.load(tmp_path / "m.gp"), slim, x)


def test_build_options_in_origin(tmp_path):
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.block = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU())
            self.c2 = torch.nn.Conv2d(8, 8, 3, padding=1)
            self.head = torch.nn.Conv2d(8, 2, 1)

        def forward(self, x):
            return self.head(torch.relu(self.c2(self.block(self.c1(x)))))

    torch.manual_seed(0)
    model, x = Net().eval(), torch.randn(2, 3, 8, 8)
    dg = gp.DependencyGraph.build(model, x, leaf_modules=["block"])
    plan = gp.select(dg, gp.score("magnitude", model, dg), ratio=0.5)
    slim = gp.apply(model, dg, plan)
    assert slim.c2.out_channels == 4 and slim.c1.out_channels == 8   # "block" pins c1's channels
    # the rewrite records the build options, so save needs only the factory ...
    gp.save(slim, tmp_path / "auto.gp", origin=_Factory.register(model), example_inputs=x)
    assert _same(gp.load(tmp_path / "auto.gp"), slim, (x,))
    # ... and an origin that contradicts them cannot rebuild the weights' shapes
    slim.meta["graphprune"].pop("build")
    gp.save(slim, tmp_path / "bad.gp", origin=_Factory.register(model), example_inputs=x)
    with pytest.raises(gp.SerializationError, match="leaf_modules"):
        gp.load(tmp_path / "bad.gp")
    gp.save(slim, tmp_path / "good.gp", example_inputs=x,
            origin={**_Factory.register(model), "leaf_modules": ["block"]})
    assert _same(gp.load(tmp_path / "good.gp"), slim, (x,))


class _Factory:
    """A factory importable as tests.test_io:_Factory.make returning a registered model."""

    model = None

    @classmethod
    def register(cls, model):
        cls.model = model
        return {"factory": f"{__name__}:_Factory.make"}

    @classmethod
    def make(cls):
        import copy

        return copy.deepcopy(cls.model)
