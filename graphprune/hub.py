"""Models from model hubs, built on this machine: ``timm:NAME`` and ``hf:CONFIG_OR_DIR``.

``graphprune.sources.resolve`` sends those two schemes here. Nothing is downloaded
unless the user's environment allows it and asks for it:

- ``timm:NAME`` calls ``timm.create_model(NAME, pretrained=False, **kwargs)`` (random
  weights; ``{"pretrained": true}`` in ``kwargs`` lets timm fetch its weights). The
  example input takes its shape from the model's ``pretrained_cfg["input_size"]``.
  A slim model saved from it records the origin ``timm:create_model`` and loads with
  ``trust=["timm"]``.
- ``hf:DIR`` builds a Hugging Face ``transformers`` model from a local directory (its
  ``config.json``, and its weights when the directory has them); ``hf:CONFIG.json``
  from a configuration file; ``hf:ORG/NAME`` from the configuration of a Hub model
  (only ``config.json`` is fetched, and only where the environment reaches the Hub;
  the weights are random). The class is the config's ``architectures[0]`` (``AutoModel``
  without one); ``kwargs`` override configuration values (``{"num_hidden_layers": 2}``)
  and ``architecture`` picks another class. Remote code is never run, and the config's
  ``use_cache`` is turned off (no key/value cache among the outputs). Example inputs are
  keyword arguments: ``input_ids`` (2 x 16 token ids) or ``pixel_values`` (from the
  config's image size). A slim model saved from it records ``graphprune.hub:hf_model``
  and loads with ``trust=["graphprune.hub"]``.

Both packages are imported only here, only when asked for; a missing or broken
package is an ``InputError`` saying which and why.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import torch

from graphprune.errors import GraphPruneError, InputError

__all__ = ["timm_source", "hf_source", "hf_model", "inputs_from_model", "BATCH"]

#: Batch size of the example inputs made here (2, like the zoo's: batch 1 would be specialised
#: away by torch.export).
BATCH = 2
_SEQ = 16  # token ids per example sequence
_NO_ORIGIN = ("pretrained", "pretrained_cfg_overlay", "checkpoint_path")  # weights, not architecture
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
            "pytorch_model.bin.index.json")


def _package(name: str, scheme: str) -> Any:
    """Import ``name`` or raise an ``InputError`` saying it is missing or why it failed to import."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] != name:
            raise InputError(f"{scheme}: model sources need the {name} package, which failed to import: "
                             f"{type(exc).__name__}: {exc}") from exc
        raise InputError(f"{scheme}: model sources need the {name} package, which is not installed "
                         f"(pip install {name})") from exc
    except Exception as exc:  # a broken installation (e.g. torchvision's C++ ops for another torch)
        what = " ".join(str(exc).split())[:300]
        raise InputError(f"{scheme}: model sources need the {name} package, which failed to import: "
                         f"{type(exc).__name__}: {what}") from exc


def _randn(shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(0))


def inputs_from_model(model: torch.nn.Module) -> tuple[torch.Tensor, ...] | None:
    """An example input whose shape the model states (timm's ``pretrained_cfg["input_size"]``,
    or ``default_cfg``), batch ``BATCH``; None when it states none."""
    for attr in ("pretrained_cfg", "default_cfg"):
        cfg = getattr(model, attr, None)
        size = cfg.get("input_size") if isinstance(cfg, dict) else None
        if isinstance(size, (tuple, list)) and size and all(isinstance(s, int) and s > 0 for s in size):
            return (_randn((BATCH, *size)),)
    return None


# --- timm -----------------------------------------------------------------------------------------
def timm_source(name: str, kwargs: dict[str, Any]) -> tuple[torch.nn.Module, Any, dict[str, Any]]:
    """``timm:NAME``: the model, its example inputs (None if it states no input size), its origin."""
    timm = _package("timm", "timm")
    kwargs = {"pretrained": False, **kwargs}
    try:
        model = timm.create_model(name, **kwargs)
    except GraphPruneError:
        raise
    except Exception as exc:
        what = " ".join(str(exc).split())[:300]
        if "Unknown model" in what:
            raise InputError(f"timm has no model {name!r} (timm.list_models('*{name[:20]}*') lists similar "
                             "names)") from exc
        raise InputError(f"timm.create_model({name!r}, **{kwargs}) failed: {type(exc).__name__}: {what}") from exc
    origin = {"factory": "timm:create_model",
              "kwargs": {"model_name": name, **{k: v for k, v in kwargs.items() if k not in _NO_ORIGIN}}}
    return model.eval(), inputs_from_model(model), origin


# --- Hugging Face transformers ---------------------------------------------------------------------
def _config(transformers: Any, name: str) -> Any:
    path = Path(name).expanduser()
    if path.is_dir() and not (path / "config.json").is_file():
        raise InputError(f"hf:{name}: the directory has no config.json")
    try:
        if path.is_file():
            return transformers.AutoConfig.from_pretrained(str(path))
        return transformers.AutoConfig.from_pretrained(str(path) if path.is_dir() else name)
    except Exception as exc:
        what = " ".join(str(exc).split())[:300]
        where = ("" if path.exists() else
                 " (not a local directory or config file; fetching its config.json from the Hugging Face Hub "
                 "failed or is not allowed here)")
        raise InputError(f"hf:{name}: cannot read the model configuration{where}: {type(exc).__name__}: "
                         f"{what}") from exc


def _model_class(transformers: Any, config: Any, architecture: str | None) -> Any:
    arch = architecture or next(iter(getattr(config, "architectures", None) or []), None)
    if arch is None:
        return transformers.AutoModel
    cls = getattr(transformers, arch, None) if isinstance(arch, str) and arch.isidentifier() else None
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
        raise InputError(f"transformers has no model class {arch!r} (from the config's architectures, or "
                         "'architecture' in --kwargs)")
    return cls


def _quietly(transformers: Any, fn: Any) -> Any:
    """``fn()`` without transformers' progress bars (they would break the command's one-line output)."""
    logging = getattr(getattr(transformers, "utils", None), "logging", None)
    bars = getattr(logging, "is_progress_bar_enabled", lambda: False)()
    if bars:
        logging.disable_progress_bar()
    try:
        return fn()
    finally:
        if bars:
            logging.enable_progress_bar()


def hf_model(name: str, architecture: str | None = None, weights: bool = False, **overrides: Any) -> torch.nn.Module:
    """A ``transformers`` model built from ``name`` (a local directory, a config file or a Hub id).

    ``overrides`` replace configuration values; ``architecture`` names the class (default:
    the config's ``architectures[0]``, else ``AutoModel``); ``weights=True`` loads the weights
    a local directory holds (otherwise they are random). ``use_cache`` is off unless
    ``overrides`` set it. Returned in eval mode.
    """
    transformers = _package("transformers", "hf")
    config = _config(transformers, name)
    for key, value in overrides.items():
        if not hasattr(config, key):
            raise InputError(f"hf:{name}: the configuration ({type(config).__name__}) has no field {key!r}")
        setattr(config, key, value)
    if getattr(config, "use_cache", None) and "use_cache" not in overrides:
        config.use_cache = False  # no key/value cache in the outputs: pruning runs whole sequences
    cls = _model_class(transformers, config, architecture)
    try:
        if weights:
            model = _quietly(transformers, lambda: cls.from_pretrained(
                str(Path(name).expanduser()), config=config, dtype=torch.float32))
        elif cls.__name__.startswith("Auto"):
            model = cls.from_config(config)
        else:
            model = cls(config)
    except GraphPruneError:
        raise
    except Exception as exc:
        what = " ".join(str(exc).split())[:300]
        raise InputError(f"hf:{name}: building {cls.__name__} failed: {type(exc).__name__}: {what}") from exc
    return model.eval()


def _hf_inputs(model: torch.nn.Module) -> dict[str, Any] | None:
    config, main = getattr(model, "config", None), getattr(model, "main_input_name", "input_ids")
    out: dict[str, Any]
    if main == "input_ids":
        vocab = int(getattr(config, "vocab_size", 0) or 0)
        if vocab <= 0:
            return None
        limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        seq = min(_SEQ, int(limit)) if isinstance(limit, int) and limit > 0 else _SEQ
        gen = torch.Generator().manual_seed(0)
        out = {"input_ids": torch.randint(0, vocab, (BATCH, seq), generator=gen)}
    elif main == "pixel_values":
        size, channels = getattr(config, "image_size", None), getattr(config, "num_channels", 3)
        if isinstance(size, (tuple, list)):
            size = tuple(size)
        elif isinstance(size, int):
            size = (size, size)
        else:
            return None
        out = {"pixel_values": _randn((BATCH, int(channels), *size))}
    else:
        return None
    return out


def hf_source(name: str, kwargs: dict[str, Any]) -> tuple[torch.nn.Module, Any, dict[str, Any]]:
    """``hf:CONFIG_OR_DIR``: the model, its example inputs (None if unknown), its origin."""
    path = Path(name).expanduser()
    local = path.exists()
    weights = path.is_dir() and any((path / f).is_file() for f in _WEIGHTS)
    model = hf_model(name, weights=weights, **kwargs)
    origin = {"factory": "graphprune.hub:hf_model",
              "kwargs": {"name": str(path.resolve()) if local else name,
                         **{k: v for k, v in kwargs.items() if k != "weights"}}}
    return model, _hf_inputs(model), origin
