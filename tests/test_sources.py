"""graphprune.sources: a model named by text, and the trust gate that saved files go through."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch

import graphprune as gp
from graphprune import io as gpio
from graphprune import sources
from graphprune.errors import InputError

MODELS = textwrap.dedent("""
    import os
    from os import system
    from collections import OrderedDict as Imported

    import torch
    import torch.nn as nn

    class Net(nn.Module):
        def __init__(self, width=4):
            super().__init__()
            self.fc1 = nn.Linear(6, width)
            self.fc2 = nn.Linear(width, 2)

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x)))

        @classmethod
        def build(cls):
            return cls()

    def make(width=4):
        torch.manual_seed(0)
        return Net(width).eval()

    def make_with_inputs():
        return make(), torch.randn(2, 6)

    def not_a_model():
        return 3

    def broken():
        raise KeyError("boom")

    value = 3
    _private = make
""")


@pytest.fixture
def models(tmp_path, monkeypatch):
    """A package ``gp_src_pkg`` with ``gp_src_pkg.models`` (MODELS) and a module whose import leaves a canary."""
    pkg = tmp_path / "gp_src_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "models.py").write_text(MODELS)
    canary = tmp_path / "canary"
    (tmp_path / "gp_src_canary.py").write_text(f"open({str(canary)!r}, 'w').close()\ndef make():\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    names = ("gp_src_pkg", "gp_src_pkg.models", "gp_src_canary")
    for n in names:
        sys.modules.pop(n, None)
    yield canary
    for n in names:
        sys.modules.pop(n, None)


def test_zoo_name():
    src = sources.resolve("mlp")
    assert (src.kind, src.name, src.origin) == ("zoo", "mlp", {"zoo": "mlp", "kwargs": {}})
    assert src.describe_inputs() == "2x64 float32"
    src = sources.resolve("mlp", kwargs={"num_classes": 3}, example_inputs=torch.randn(5, 64))
    assert src.model(*src.inputs).shape == (5, 3)


def test_import_spec_is_the_callers_choice(models):
    src = sources.resolve("gp_src_pkg.models:make_with_inputs")
    assert src.kind == "import" and src.inputs[0].shape == (2, 6)
    src = sources.resolve("gp_src_pkg.models:make", kwargs={"width": 3}, example_inputs=torch.randn(1, 6))
    assert src.model.fc1.out_features == 3
    assert src.origin == {"factory": "gp_src_pkg.models:make", "kwargs": {"width": 3}}
    with pytest.raises(InputError, match="needs example inputs"):
        sources.resolve("gp_src_pkg.models:make")
    with pytest.raises(InputError, match="must return an nn.Module"):
        sources.resolve("gp_src_pkg.models:not_a_model", example_inputs=torch.randn(1, 6))
    with pytest.raises(InputError, match="KeyError: 'boom'"):
        sources.resolve("gp_src_pkg.models:broken", example_inputs=torch.randn(1, 6))


def test_file_path_and_factory(tmp_path, monkeypatch):
    path = tmp_path / "gp_src_pathmodels.py"
    path.write_text(MODELS)
    monkeypatch.delitem(sys.modules, "gp_src_pathmodels", raising=False)
    src = sources.resolve(f"{path}:make_with_inputs")
    assert src.kind == "path" and src.origin["factory"] == "gp_src_pathmodels:make_with_inputs"
    assert sys.modules["gp_src_pathmodels"].__file__ == str(path)
    again = sources.resolve(f"{path}:make", example_inputs=torch.randn(1, 6))  # imported once
    assert type(again.model) is type(src.model)
    other = tmp_path / "sub" / "gp_src_pathmodels.py"
    other.parent.mkdir()
    other.write_text(MODELS)
    with pytest.raises(InputError, match="already imported"):
        sources.resolve(f"{other}:make")
    with pytest.raises(InputError, match="no such file"):
        sources.resolve(f"{tmp_path}/missing.py:make")
    sys.modules.pop("gp_src_pathmodels")


def test_saved_file(tmp_path):
    model, x = gp.zoo.create("mlp")
    gp.save(gp.prune(model, x, ratio=0.5).model, tmp_path / "m.gp", origin="mlp")
    src = sources.resolve(str(tmp_path / "m.gp"))
    assert src.kind == "file" and src.origin is src.model
    assert src.inputs[0].shape == (2, 64) and src.inputs[0].std() > 0.5  # seeded normal values, not zeros
    with pytest.raises(InputError, match="not to saved files"):
        sources.resolve(str(tmp_path / "m.gp"), kwargs={"num_classes": 3})
    with pytest.raises(gp.SerializationError, match="no such file"):
        sources.resolve(str(tmp_path / "missing.gp"))


@pytest.mark.parametrize("text, needle", [
    ("nosuchmodel", "unknown MODEL 'nosuchmodel'.*timm:NAME, hf:CONFIG_OR_DIR"),
    ("timm:", "names no model"),
    ("hf:", "names no model"),
    ("", "non-empty string"),
])
def test_unsupported_sources_are_typed_errors(text, needle):
    with pytest.raises(InputError, match=needle):
        sources.resolve(text)


def test_former_zoo_names_resolve_to_the_renamed_models(tmp_path):
    src = sources.resolve("resnet18")
    assert src.name == "mini_resnet18" and src.origin == {"zoo": "mini_resnet18", "kwargs": {}}
    model, inputs = sources.build_origin({"zoo": "vit_tiny"})
    assert type(model).__name__ == "VisionTransformer" and inputs[0].shape == (2, 3, 32, 32)
    # a file saved under a former name (before the rename) still loads
    mlp_model, x = gp.zoo.create("mini_unet")
    slim = gp.prune(mlp_model, x, ratio=0.5).model
    gp.save(slim, tmp_path / "old.gp", origin="unet")
    assert gpio.read_spec(tmp_path / "old.gp")["origin"]["zoo"] == "unet"
    assert torch.equal(gp.load(tmp_path / "old.gp")(*x), slim(*x))
    with pytest.raises(InputError, match="which does not exist"):
        sources.build_origin({"zoo": "resnet1"})


def test_input_shape_stated_by_the_model(models, tmp_path, monkeypatch):
    path = tmp_path / "gp_src_cfgmodels.py"
    path.write_text(MODELS + textwrap.dedent("""
        def make_with_cfg():
            net = make()
            net.pretrained_cfg = {"input_size": (6,)}
            return net
    """))
    monkeypatch.delitem(sys.modules, "gp_src_cfgmodels", raising=False)
    src = sources.resolve(f"{path}:make_with_cfg")
    assert tuple(src.inputs[0].shape) == (2, 6)  # timm's pretrained_cfg["input_size"], batch 2
    with pytest.raises(InputError, match="needs example inputs"):
        sources.resolve(f"{path}:make")
    sys.modules.pop("gp_src_cfgmodels", None)


def test_trusted_names_cover_submodules_only(models):
    for trust in ([], ["gp_src"], ["gp_src_pkg.models.sub"], ["other"]):
        with pytest.raises(InputError, match="not trusted"):
            sources.import_trusted("gp_src_pkg.models:make", trust)
    assert "gp_src_pkg" not in sys.modules  # refused before anything was imported
    assert sources.import_trusted("gp_src_pkg.models:make", ["gp_src_pkg"])().fc1.out_features == 4
    assert sources.import_trusted("gp_src_pkg.models:Net.build", ["gp_src_pkg.models"])().fc2.in_features == 4


def test_untrusted_module_is_never_imported(models):
    canary = models
    with pytest.raises(InputError, match=r"pass trust=\['gp_src_canary'\]"):
        sources.import_trusted("gp_src_canary:make", ["gp_src_pkg"])
    assert not canary.exists() and "gp_src_canary" not in sys.modules


@pytest.mark.parametrize("spec, needle", [
    ("gp_src_pkg.models:os.system", "classes only"),
    ("gp_src_pkg.models:system", "'posix'"),           # re-exported from os
    ("gp_src_pkg.models:Imported", "'collections'"),   # a class defined elsewhere
    ("gp_src_pkg.models:_private", "private attribute"),
    ("gp_src_pkg.models:Net.__init__", "private attribute"),
    ("gp_src_pkg.models:Net.__init__.__globals__", "private attribute"),
    ("gp_src_pkg.models:Net.mro", "defined in module '\\?'"),  # a builtin method of the class
    ("gp_src_pkg.models:value", "not a function or class"),
    ("gp_src_pkg.models:missing", "has no attribute"),
    ("gp_src_pkg.__init__:make", "not a module name"),
    ("gp_src_pkg.models:make:x", "not an import spec"),
    ("gp_src_pkg.models", "not an import spec"),
    ("gp_src_pkg.models:make()", "not a dotted name"),
    ("gp_src_pkg.models:import", "not a dotted name"),
])
def test_specs_are_checked_before_and_after_import(models, spec, needle):
    with pytest.raises(InputError, match=needle):
        sources.import_trusted(spec, ["gp_src_pkg"])


def test_owner_check_can_be_skipped_for_the_callers_own_spec(models):
    import os

    assert sources.import_trusted("gp_src_pkg.models:system", ["gp_src_pkg"], owner_check=False) is os.system
    assert sources.import_trusted("gp_src_pkg.models:os.getcwd", ["gp_src_pkg"], owner_check=False) is os.getcwd


def test_a_module_that_fails_to_import(tmp_path, monkeypatch):
    (tmp_path / "gp_src_fails.py").write_text("raise ValueError('bad module')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(InputError, match="failed: ValueError: bad module"):
        sources.import_trusted("gp_src_fails:make", ["gp_src_fails"])
    sys.modules.pop("gp_src_fails", None)


@pytest.mark.parametrize("trust, names", [
    (None, ()), ("a.b", ("a.b",)), (["a", "b_c.d"], ("a", "b_c.d")), (torch.nn, ("torch.nn",)),
])
def test_normalize_trust(trust, names):
    assert sources.normalize_trust(trust) == names


@pytest.mark.parametrize("trust", ["__main__", ["a b"], [3], ["a..b"], 3, ["x.__init__"]])
def test_normalize_trust_refuses_non_module_names(trust):
    with pytest.raises(InputError, match="trust"):
        sources.normalize_trust(trust)


def test_leaf_types(models):
    assert sources.leaf_types(["block", "torch.nn.modules.container:Sequential"]) == ["block", torch.nn.Sequential]
    assert sources.leaf_types(["gp_src_pkg.models:Net"], ["gp_src_pkg"])[0].__name__ == "Net"
    with pytest.raises(InputError, match="not trusted"):
        sources.leaf_types(["gp_src_pkg.models:Net"])
    with pytest.raises(InputError, match="not an nn.Module class"):
        sources.leaf_types(["gp_src_pkg.models:make"], ["gp_src_pkg"])
    with pytest.raises(InputError, match="strings"):
        sources.leaf_types([3])


def test_importable_by_name(models, tmp_path):
    assert sources.importable_by_name("graphprune.zoo") and sources.importable_by_name("gp_src_pkg.models")
    assert not sources.importable_by_name("nosuchpkg_xyz.models")
    assert not sources.importable_by_name("__main__")


def test_build_origin_measures_kwargs_before_allocating():
    with pytest.raises(InputError, match=r"would allocate .* GiB, over the limit"):
        sources.build_origin({"zoo": "mlp", "kwargs": {"hidden": [10**6, 10**6]}})
    model, _ = sources.build_origin({"zoo": "mlp", "kwargs": {"hidden": [8, 4]}}, max_bytes=10**6)
    assert model.fc2.out_features == 4
    with pytest.raises(InputError, match="over the limit"):
        sources.build_origin({"zoo": "mlp", "kwargs": {"hidden": [8, 4]}}, max_bytes=100)
    with pytest.raises(InputError, match="does not exist"):
        sources.build_origin({"zoo": "nosuch"})
    with pytest.raises(InputError, match="string keys"):
        sources.build_origin({"zoo": "mlp", "kwargs": [1]})
