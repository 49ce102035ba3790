"""Reference model zoo: small, deterministic networks covering common topologies.

Usage::

    from graphprune import zoo

    zoo.list_models()
    model, example_inputs = zoo.create("resnet20")
    out = model(*example_inputs)

Names say what a model is. ``resnet20``, ``resnet56`` and ``se_resnet20`` are the CIFAR
networks at their published widths; models named ``mini_<architecture>`` follow a known
ImageNet architecture at a fraction of its width and input size, so ``mini_resnet18`` has
703,386 parameters where torchvision's ``resnet18`` has 11.7 M. The names these models
had before (``resnet18``, ``vit_tiny``, ...) still work everywhere a zoo name does
(``ALIASES``; files saved with them still load), but ``list_models()`` lists only the
current ones. ``param_count(name)`` counts a model's parameters without building its
weights.

>>> canonical("resnet18"), param_count("mini_resnet18")
('mini_resnet18', 703386)

Every model is built under ``torch.manual_seed(0)`` (the caller's global RNG state
is restored afterwards). Normalisation layers get random affine parameters
(weight in [0.5, 1.5), bias ~ 0.1 * N(0, 1)) and running statistics calibrated on
a seeded random batch, so eval-mode BatchNorm is a non-trivial affine map and deep
networks keep input-dependent activations. Models are returned in ``eval()`` mode
and are traceable by ``torch.fx.symbolic_trace``. Example inputs have batch size 2.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

__all__ = ["ZooEntry", "ALIASES", "canonical", "create", "exists", "list_models", "param_count", "register"]

BATCH_SIZE = 2
_MODEL_SEED = 0
_INPUT_SEED = 0
_NORM_SEED = 1
_CALIBRATION_BATCH = 16


class ZooEntry(NamedTuple):
    """A registered model: its factory and the per-sample example input shape."""

    factory: Callable[..., nn.Module]
    input_shape: tuple[int, ...]


_REGISTRY: dict[str, ZooEntry] = {}

#: Former names of renamed zoo models -> current names. They collided with torchvision
#: and timm models of the same name and much larger size.
ALIASES: dict[str, str] = {
    "resnet18": "mini_resnet18", "resnet50": "mini_resnet50", "vgg11_bn": "mini_vgg11_bn",
    "mobilenet_v2": "mini_mobilenet_v2", "mobilenet_v3": "mini_mobilenet_v3",
    "shufflenet_v2": "mini_shufflenet_v2", "squeezenet": "mini_squeezenet",
    "efficientnet": "mini_efficientnet", "convnext": "mini_convnext", "densenet": "mini_densenet",
    "inception": "mini_inception", "resnext": "mini_resnext", "se_resnet": "se_resnet20",
    "vit_tiny": "mini_vit", "vit_mha": "mini_vit_mha", "swin_block": "mini_swin", "unet": "mini_unet",
}


def register(
    name: str, input_shape: tuple[int, ...]
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Register a model factory under ``name`` with its per-sample input shape."""

    def decorator(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"zoo model {name!r} is already registered")
        _REGISTRY[name] = ZooEntry(factory, tuple(input_shape))
        return factory

    return decorator


def list_models() -> list[str]:
    """Return the sorted names of all registered models (current names, not ``ALIASES``)."""
    return sorted(_REGISTRY)


def canonical(name: str) -> str:
    """The current name of zoo model ``name`` (itself, or what a former name in ``ALIASES`` became).

    Raises ``ValueError`` for a name that is neither.
    """
    name = ALIASES.get(name, name) if isinstance(name, str) else name
    if name not in _REGISTRY:
        raise ValueError(f"unknown zoo model {name!r}; choose one of: {', '.join(list_models())}")
    return name


def exists(name: object) -> bool:
    """Whether ``name`` is a zoo model's current or former name."""
    return isinstance(name, str) and ALIASES.get(name, name) in _REGISTRY


def param_count(name: str, **kwargs: object) -> int:
    """Parameters of zoo model ``name`` built with ``kwargs``: counted on the meta device (no
    weights), or on the CPU for a factory that cannot run there; the global RNG is untouched."""
    entry = _REGISTRY[canonical(name)]
    with torch.random.fork_rng(devices=[]):
        try:
            with torch.device("meta"):
                model = entry.factory(**kwargs)
        except RuntimeError:  # a factory that reads tensor values (.item()) while building
            model = entry.factory(**kwargs)
    return sum(p.numel() for p in model.parameters())


def create(name: str, **kwargs: object) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """Build zoo model ``name`` and deterministic example inputs (batch size 2).

    Keyword arguments are forwarded to the model factory (e.g. ``num_classes``,
    ``width``, ``depth``). The model is returned in ``eval()`` mode. A former name
    (``ALIASES``) builds the same model as its current name.
    """
    entry = _REGISTRY[canonical(name)]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_MODEL_SEED)
        model = entry.factory(**kwargs)
        gen = torch.Generator().manual_seed(_NORM_SEED)
        _randomize_norm_affine(model, gen)
        _calibrate_norm_stats(model, entry.input_shape, gen)
    model.eval()
    gen = torch.Generator().manual_seed(_INPUT_SEED)
    example_inputs = (torch.randn(BATCH_SIZE, *entry.input_shape, generator=gen),)
    return model, example_inputs


@torch.no_grad()
def _randomize_norm_affine(model: nn.Module, gen: torch.Generator) -> None:
    """Give every normalisation layer random positive scales and small shifts."""
    for module in model.modules():
        if not isinstance(module, (_NormBase, nn.GroupNorm, nn.LayerNorm)):
            continue
        weight = getattr(module, "weight", None)
        bias = getattr(module, "bias", None)
        if weight is not None:
            weight.copy_(torch.rand(weight.shape, generator=gen) + 0.5)
        if bias is not None:
            bias.copy_(torch.randn(bias.shape, generator=gen) * 0.1)


@torch.no_grad()
def _calibrate_norm_stats(
    model: nn.Module, input_shape: tuple[int, ...], gen: torch.Generator
) -> None:
    """Set running statistics to those of a random calibration batch.

    Only the normalisation layers run in training mode; without this, default
    initialisation shrinks activations layer by layer until deep networks
    (MobileNetV2, VGG) barely depend on their input.
    """
    norms = [
        m for m in model.modules() if isinstance(m, _NormBase) and m.track_running_stats
    ]
    if not norms:
        return
    model.eval()
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    model(torch.randn(_CALIBRATION_BATCH, *input_shape, generator=gen))
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
        m.eval()


# Family modules register their factories on import.
from . import (  # noqa: E402, F401
    convnext,
    densenet,
    efficientnet,
    inception,
    misc,
    mobilenet,
    mobilenetv3,
    msd,
    resnet,
    resnext,
    shufflenet,
    squeezenet,
    swin,
    unet,
    vgg,
    vit,
)
