"""graphprune.checkpoint: trained weights loaded into a model built from its code."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import graphprune as gp
from graphprune import sources
from graphprune.checkpoint import load_checkpoint


def _trained(seed: int = 5) -> dict[str, torch.Tensor]:
    model, _ = gp.zoo.create("mlp")
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=gen).to(v.dtype) if v.is_floating_point() else v
            for k, v in model.state_dict().items()}


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "model", "module_prefix", "safetensors"])
def test_formats(tmp_path, wrap):
    state = _trained()
    path = tmp_path / ("w.safetensors" if wrap == "safetensors" else "w.pt")
    if wrap == "safetensors":
        save_file(state, str(path))
    else:
        blob = {"plain": state, "state_dict": {"state_dict": state, "epoch": 3},
                "model": {"model": state, "optimizer": {"lr": 0.1}},
                "module_prefix": {f"module.{k}": v for k, v in state.items()}}[wrap]
        torch.save(blob, path)
    model, _ = gp.zoo.create("mlp")
    assert load_checkpoint(model, path) is model
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_what_does_not_fit_is_named(tmp_path):
    state = _trained()
    path = tmp_path / "w.pt"
    torch.save({k: v for k, v in state.items() if k != "fc1.bias"} | {"extra.weight": torch.zeros(1)}, path)
    model, _ = gp.zoo.create("mlp")
    with pytest.raises(gp.InputError, match=r"1 missing \(fc1\.bias\); 1 unexpected \(extra\.weight\)"):
        load_checkpoint(model, path)
    model, _ = gp.zoo.create("mlp", num_classes=3)
    torch.save(state, path)
    with pytest.raises(gp.InputError, match=r"wrong shape \(fc3\.weight is \(10, 64\) in the file, \(3, 64\)"):
        load_checkpoint(model, path)


def test_unreadable_files(tmp_path):
    model, _ = gp.zoo.create("mlp")
    with pytest.raises(gp.InputError, match="no such file"):
        load_checkpoint(model, tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(gp.InputError, match="cannot be read as a state dict"):
        load_checkpoint(model, tmp_path / "junk.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(gp.InputError, match="holds a list, not a state dict"):
        load_checkpoint(model, tmp_path / "list.pt")

    class Evil:
        def __reduce__(self):
            return (print, ("pickled code ran",))

    torch.save({"state_dict": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(gp.InputError, match="weights_only"):  # no pickled code runs
        load_checkpoint(model, tmp_path / "evil.pt")


def test_resolve_loads_the_checkpoint(tmp_path):
    torch.save(_trained(), tmp_path / "w.pt")
    src = sources.resolve("mlp", checkpoint=tmp_path / "w.pt")
    assert torch.equal(src.model.fc1.weight, _trained()["fc1.weight"])
    assert src.origin == {"zoo": "mlp", "kwargs": {}}  # the architecture's origin; weights go in the file
