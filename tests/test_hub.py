"""graphprune.hub: ``timm:NAME`` and ``hf:CONFIG_OR_DIR`` model sources.

The real packages are used where they import; where they do not, the error a user gets
is checked instead. A stand-in ``timm`` package (a module on a temporary path) checks
graphprune's side of ``timm:`` everywhere, and a broken one the import failure message.
"""

from __future__ import annotations

import importlib
import sys
import textwrap

import pytest
import torch

import graphprune as gp
from graphprune import cli, sources
from graphprune.errors import InputError

FAKE_TIMM = textwrap.dedent("""
    import torch.nn as nn

    calls = []

    class Net(nn.Module):
        def __init__(self, num_classes=10):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.bn = nn.BatchNorm2d(8)
            self.head = nn.Linear(8, num_classes)
            self.pretrained_cfg = {"input_size": (3, 20, 20), "num_classes": num_classes}

        def forward(self, x):
            return self.head(self.bn(self.conv(x)).relu().mean((2, 3)))

    def create_model(model_name, pretrained=False, **kwargs):
        calls.append((model_name, pretrained, kwargs))
        if model_name != "fakenet":
            raise RuntimeError(f"Unknown model ({model_name})")
        return Net(**kwargs)
""")


def _imports(name: str) -> bool:
    try:
        importlib.import_module(name)
    except Exception:
        return False
    return True


@pytest.fixture
def fake_timm(tmp_path, monkeypatch):
    """A ``timm`` package with one model, importable by name, shadowing any real one."""
    (tmp_path / "timm").mkdir()
    (tmp_path / "timm" / "__init__.py").write_text(FAKE_TIMM)
    for name in [m for m in sys.modules if m == "timm" or m.startswith("timm.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield importlib.import_module("timm")
    sys.modules.pop("timm", None)


def test_timm_source_with_the_real_package_or_a_clear_error():
    if not _imports("timm"):
        with pytest.raises(InputError, match=r"^timm: model sources need the timm package, which "
                                             r"(is not installed \(pip install timm\)|failed to import: )"):
            sources.resolve("timm:resnet18")
        return
    src = sources.resolve("timm:resnet18")
    assert src.kind == "timm" and tuple(src.inputs[0].shape) == (2, 3, 224, 224)
    assert src.origin == {"factory": "timm:create_model", "kwargs": {"model_name": "resnet18"}}
    assert sum(p.numel() for p in src.model.parameters()) == 11_689_512


def test_timm_source_builds_with_kwargs_and_the_stated_input_size(fake_timm, tmp_path):
    src = sources.resolve("timm:fakenet", kwargs={"num_classes": 4})
    assert fake_timm.calls == [("fakenet", False, {"num_classes": 4})]  # no weights unless asked for
    assert src.kind == "timm" and src.name == "fakenet" and not src.model.training
    assert tuple(src.inputs[0].shape) == (2, 3, 20, 20)  # pretrained_cfg["input_size"]
    assert src.origin == {"factory": "timm:create_model", "kwargs": {"model_name": "fakenet", "num_classes": 4}}
    sources.resolve("timm:fakenet", kwargs={"pretrained": True})
    assert fake_timm.calls[-1][1] is True
    assert sources.resolve("timm:fakenet", kwargs={"pretrained": True}).origin["kwargs"] == {"model_name": "fakenet"}
    given = sources.resolve("timm:fakenet", example_inputs=torch.randn(1, 3, 8, 8))
    assert tuple(given.inputs[0].shape) == (1, 3, 8, 8)
    with pytest.raises(InputError, match=r"timm has no model 'nosuch' \(timm.list_models"):
        sources.resolve("timm:nosuch")
    with pytest.raises(InputError, match="names no model"):
        sources.resolve("timm:")
    # a slim model saved from it loads where timm is trusted
    slim = gp.prune(src.model, src.inputs, ratio=0.5).model
    gp.save(slim, tmp_path / "t.gp", origin=src.origin, example_inputs=src.inputs)
    with pytest.raises(gp.SerializationError, match=r"--trust timm"):
        gp.load(tmp_path / "t.gp")
    again = gp.load(tmp_path / "t.gp", trust=["timm"])
    assert torch.equal(again(*src.inputs), slim(*src.inputs))


def test_a_broken_timm_installation_is_one_clear_error(tmp_path, monkeypatch):
    (tmp_path / "timm").mkdir()
    (tmp_path / "timm" / "__init__.py").write_text(
        "raise RuntimeError('operator torchvision::nms does not exist')\n")
    for name in [m for m in sys.modules if m == "timm" or m.startswith("timm.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(InputError, match=r"failed to import: RuntimeError: operator torchvision::nms does not exist"):
        sources.resolve("timm:resnet18")
    sys.modules.pop("timm", None)


def test_missing_package_messages(monkeypatch):
    for name in ("timm", "transformers"):
        monkeypatch.setitem(sys.modules, name, None)  # import fails as if not installed
    with pytest.raises(InputError, match=r"pip install timm"):
        sources.resolve("timm:resnet18")
    with pytest.raises(InputError, match=r"^hf: model sources need the transformers package.*pip install transformers"):
        sources.resolve("hf:some/model")


# --- Hugging Face -----------------------------------------------------------------------------------
HAVE_TRANSFORMERS = _imports("transformers")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    if not HAVE_TRANSFORMERS:
        return None
    import transformers

    path = tmp_path_factory.mktemp("hf") / "tiny-llama"
    transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                             architectures=["LlamaForCausalLM"]).save_pretrained(path)
    return path


def test_hf_source_from_a_local_config(llama_dir, tmp_path):
    if not HAVE_TRANSFORMERS:
        with pytest.raises(InputError, match=r"^hf: model sources need the transformers package"):
            sources.resolve("hf:anything")
        return
    src = sources.resolve(f"hf:{llama_dir}")
    assert src.kind == "hf" and type(src.model).__name__ == "LlamaForCausalLM" and not src.model.training
    assert set(src.inputs) == {"input_ids"} and tuple(src.inputs["input_ids"].shape) == (2, 16)
    assert src.describe_inputs() == "input_ids=2x16 int64"
    assert src.model.config.use_cache is False
    assert src.origin == {"factory": "graphprune.hub:hf_model", "kwargs": {"name": str(llama_dir.resolve())}}
    one = sources.resolve(f"hf:{llama_dir / 'config.json'}", kwargs={"num_hidden_layers": 1,
                                                                    "architecture": "LlamaModel"})
    assert one.model.config.num_hidden_layers == 1 and type(one.model).__name__ == "LlamaModel"
    # a directory with weights: they are loaded
    src.model.save_pretrained(tmp_path / "trained")
    again = sources.resolve(f"hf:{tmp_path / 'trained'}")
    assert torch.equal(again.model.lm_head.weight, src.model.lm_head.weight)
    assert again.model.lm_head.weight.dtype == torch.float32


def test_hf_errors(llama_dir, tmp_path, monkeypatch):
    if not HAVE_TRANSFORMERS:
        with pytest.raises(InputError, match="transformers"):
            sources.resolve(f"hf:{tmp_path}")
        return
    with pytest.raises(InputError, match="the directory has no config.json"):
        sources.resolve(f"hf:{tmp_path}")
    with pytest.raises(InputError, match=r"configuration \(LlamaConfig\) has no field 'nosuch'"):
        sources.resolve(f"hf:{llama_dir}", kwargs={"nosuch": 1})
    with pytest.raises(InputError, match="transformers has no model class 'NoSuchModel'"):
        sources.resolve(f"hf:{llama_dir}", kwargs={"architecture": "NoSuchModel"})
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no waiting for a network that may not be there
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True, raising=False)
    with pytest.raises(InputError, match="not a local directory or config file"):
        sources.resolve("hf:graphprune-tests/no-such-model-xyz")


def test_hf_prune_save_and_load_from_the_command_line(llama_dir, tmp_path, capsys):
    if not HAVE_TRANSFORMERS:
        assert cli.main(["inspect", "hf:anything"]) == 1
        assert "transformers" in capsys.readouterr().err
        return
    out = tmp_path / "llama.gp"
    assert cli.main(["prune", f"hf:{llama_dir}", "--ratio", "0.5", "--out", str(out), "--repeats", "0"]) == 0
    text = capsys.readouterr().out
    assert "trust=['graphprune.hub']" in text
    assert cli.main(["inspect", str(out)]) == 1
    assert "--trust graphprune.hub" in capsys.readouterr().err
    assert cli.main(["inspect", str(out), "--trust", "graphprune.hub"]) == 0
    assert "example inputs 2x16 int64" in capsys.readouterr().out
