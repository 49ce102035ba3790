"""Tests for the reference model zoo (graphprune.zoo)."""

from __future__ import annotations

import time

import pytest
import torch
import torch.fx

from graphprune import zoo

MODELS = zoo.list_models()
DENSE_PREDICTION = {"mini_unet", "msd"}
DEFAULT_CLASSES = {"mini_unet": 2, "msd": 2}
EXPECTED_MODELS = {
    "conv1d",
    "mini_densenet",
    "mini_inception",
    "mlp",
    "mini_mobilenet_v2",
    "msd",
    "mini_resnet18",
    "resnet20",
    "mini_resnet50",
    "resnet56",
    "se_resnet20",
    "mini_unet",
    "mini_vgg11_bn",
}


def _expected_shape(name: str, inputs: tuple[torch.Tensor, ...], classes: int) -> tuple:
    x = inputs[0]
    if name in DENSE_PREDICTION:
        return (x.shape[0], classes, *x.shape[2:])
    return (x.shape[0], classes)


def test_list_models_sorted_and_complete() -> None:
    assert MODELS == sorted(MODELS)
    assert EXPECTED_MODELS <= set(MODELS)


def test_names_do_not_collide_with_torchvision_or_timm() -> None:
    """A zoo model is never listed under the name of a different (larger) torchvision/timm network."""
    taken = {"resnet18", "resnet50", "vgg11_bn", "mobilenet_v2", "mobilenet_v3", "shufflenet_v2",
             "squeezenet", "efficientnet", "convnext", "densenet", "inception", "resnext", "vit_tiny", "se_resnet",
             "vit_mha", "swin_block", "unet"}
    assert not taken & set(MODELS)
    assert all(zoo.ALIASES[old] in MODELS for old in taken)


@pytest.mark.parametrize("old", sorted(zoo.ALIASES))
def test_former_names_build_the_same_model(old: str) -> None:
    new = zoo.ALIASES[old]
    assert zoo.canonical(old) == zoo.canonical(new) == new and zoo.exists(old)
    (a, xa), (b, xb) = zoo.create(old), zoo.create(new)
    assert type(a) is type(b) and torch.equal(xa[0], xb[0])
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_param_count_without_building_weights() -> None:
    assert zoo.param_count("mini_resnet18") == 703_386 == zoo.param_count("resnet18")
    assert zoo.param_count("resnet20") == 272_474 and zoo.param_count("mlp", num_classes=3) < 17_482
    for name in MODELS:  # equal to the built model's, for every model (meta device or CPU fallback)
        model, _ = zoo.create(name)
        assert zoo.param_count(name) == sum(p.numel() for p in model.parameters()), name
    with pytest.raises(ValueError, match="unknown zoo model 'nosuch'"):
        zoo.param_count("nosuch")


def test_unknown_model_raises() -> None:
    with pytest.raises(ValueError, match="unknown zoo model 'nope'"):
        zoo.create("nope")


def test_create_restores_global_rng() -> None:
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    zoo.create("resnet20")
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("name", MODELS)
def test_forward_shape_and_eval(name: str) -> None:
    model, inputs = zoo.create(name)
    assert isinstance(inputs, tuple) and inputs
    assert all(isinstance(t, torch.Tensor) for t in inputs)
    assert inputs[0].shape[0] == 2
    assert not any(m.training for m in model.modules())
    with torch.no_grad():
        out = model(*inputs)
    assert isinstance(out, torch.Tensor)
    assert torch.isfinite(out).all()
    assert tuple(out.shape) == _expected_shape(
        name, inputs, DEFAULT_CLASSES.get(name, 10)
    )
    spread = (out[0] - out[1]).abs().max()
    assert spread > 1e-2 * out.abs().max(), "output barely depends on the input"


@pytest.mark.parametrize("name", MODELS)
def test_num_classes_kwarg(name: str) -> None:
    model, inputs = zoo.create(name, num_classes=3)
    with torch.no_grad():
        out = model(*inputs)
    assert tuple(out.shape) == _expected_shape(name, inputs, 3)


@pytest.mark.parametrize("name", MODELS)
def test_norm_layers_randomized(name: str) -> None:
    model, _ = zoo.create(name)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            assert not torch.allclose(module.weight, torch.ones_like(module.weight))
            assert not torch.allclose(
                module.running_var, torch.ones_like(module.running_var)
            )
            assert (module.running_var > 0).all()


@pytest.mark.parametrize("name", MODELS)
def test_fx_trace_matches_eager(name: str) -> None:
    model, inputs = zoo.create(name)
    traced = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        expected = model(*inputs)
        actual = traced(*inputs)
    torch.testing.assert_close(actual, expected)


@pytest.mark.parametrize("name", MODELS)
def test_create_is_deterministic(name: str) -> None:
    model_a, inputs_a = zoo.create(name)
    torch.manual_seed(999)
    model_b, inputs_b = zoo.create(name)
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key
    assert len(inputs_a) == len(inputs_b)
    for a, b in zip(inputs_a, inputs_b, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", MODELS)
def test_forward_is_fast(name: str) -> None:
    model, inputs = zoo.create(name)
    with torch.no_grad():
        model(*inputs)
        start = time.perf_counter()
        model(*inputs)
        elapsed = time.perf_counter() - start
    assert elapsed < 2.0, f"{name} forward took {elapsed:.2f} s"
