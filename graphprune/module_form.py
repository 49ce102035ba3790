"""The slim model in the user's own classes: ``gp.apply(model, dg, plan, output="module")``.

``own_classes(model, dg, removal, reference, inputs)`` deep-copies ``model`` (its classes,
methods, config: ``generate()``, ``save_pretrained()``, timm's and ultralytics' own tools
keep working), slices every tensor the plan cuts (ties stay ties), lets each op's rule
update the width attributes of the layers it knows (``in_features``, ``num_features``,
``normalized_shape``, a pruned ``nn.MultiheadAttention`` becomes a
``SlimMultiheadAttention``), and then sets the widths the model's own code reads from
attributes or its config (``self.head_dim``, ``config.intermediate_size``): an integer
attribute whose name says it is a width and whose value is a width the plan changed in
exactly one way takes the new value. The copy is then run against ``reference`` (the
slim GraphModule) on probe inputs; if they differ, a ``RewriteError`` names the widths
it could not place and how to give them (``attributes={"path.to.attr": value}``).
Nothing unchecked is returned; on the meta device (structure without weights) the check compares
output shapes, or, where the model's code needs values to run, the shapes of its tensors.

>>> import torch, graphprune as gp
>>> model, x = gp.zoo.create("resnet20")
>>> dg = gp.DependencyGraph.build(model, x)
>>> slim = gp.apply(model, dg, {1: [0, 1, 2]}, output="module")
>>> type(slim) is type(model), slim.layer1[0].conv1.out_channels
(True, 13)
"""

from __future__ import annotations

import contextlib
import copy
import re
from collections.abc import Mapping
from typing import Any

import torch

from graphprune.errors import InputError, RewriteError
from graphprune.inputs import BoundInputs, fresh_inputs
from graphprune.removal import Removal
from graphprune.rules.base import find_module_rule, find_rule, iter_arrays
from graphprune.tracing import eval_mode, on_meta_device

__all__ = ["own_classes", "width_changes"]

# attribute names that hold a width in model code and configs (head_dim, hidden_size, n_embd,
# intermediate_size, num_key_value_heads, d_model, embed_dim, ffn_dim, out_channels ...)
_WIDTH_NAME = re.compile(r"(dim|size|shape|features|channels|heads?|width|embd|inner|hidden|d_model|d_ff)$|"
                         r"^(dim|hidden)", re.IGNORECASE)


def width_changes(removal: Removal) -> dict[int, set[int]]:
    """Old width -> new widths of every labelled axis (node outputs and parameters) that narrows."""
    dg, out = removal.dg, {}
    arrays = [a for n in dg.gm.graph.nodes for a in iter_arrays(dg.node_labels.get(n.name))]
    arrays += list(dg.member_labels.values())
    for labels in arrays:
        new = int(removal.keep(labels).sum())
        if new != len(labels):
            out.setdefault(len(labels), set()).add(new)
    return out


def _attribute_owners(root: torch.nn.Module, touched: set[str]) -> list[tuple[str, Any]]:
    """``(path, module)`` of the modules above a cut tensor that are not torch's own layers (those
    follow their rules). Configs are left to ``_rebuilt``, which checks what it changes."""
    return [(name, module) for name, module in root.named_modules()
            if name in touched and not type(module).__module__.startswith("torch.")]


def _set_widths(root: torch.nn.Module, changes: Mapping[int, set[int]], touched: set[str]) -> tuple[list, list]:
    """Set integer width attributes whose value changed one way; return (set, ambiguous)."""
    done, ambiguous = [], []
    for path, owner in _attribute_owners(root, touched):
        for attr, value in list(vars(owner).items()):
            ints = value if type(value) in (tuple, list) else (value,)
            if not ints or not all(type(v) is int for v in ints) or not _WIDTH_NAME.search(attr) \
                    or not any(v in changes for v in ints):
                continue
            where = f"{path}.{attr}" if path else attr
            if any(len(changes.get(v, ())) > 1 for v in ints):
                ambiguous.append((where, value, sorted(set().union(*(changes.get(v, set()) for v in ints)))))
                continue
            new = [next(iter(changes[v])) if v in changes else v for v in ints]
            new_value = type(value)(new) if type(value) in (tuple, list) else new[0]
            setattr(owner, attr, new_value)
            done.append((where, value, new_value))
    return done, ambiguous


def _shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict(keep_vars=True).items()}


def _axis_sizes(removal: Removal) -> dict[int, set[int]]:
    """Old size -> new sizes of every labelled axis (node outputs and parameters), unchanged
    ones included."""
    dg, out = removal.dg, {}
    for labels in [a for n in dg.gm.graph.nodes for a in iter_arrays(dg.node_labels.get(n.name))] + \
            list(dg.member_labels.values()):
        out.setdefault(len(labels), set()).add(int(removal.keep(labels).sum()))
    return out


def _rebuilt(model: torch.nn.Module, work: torch.nn.Module, removal: Removal) -> tuple[torch.nn.Module | None, str]:
    """``type(model)(config')`` with the sliced weights of ``work``, for models built from a
    config (Hugging Face): every integer field whose doubling changes parameter shapes
    (probed on the meta device) gets the size its axes now have. ``(None, why)`` if the
    model is not built that way or a field cannot be placed."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return None, "it is not built from a config"
    cls = type(model)
    base, target = _shapes(model), _shapes(work)
    try:
        with torch.device("meta"):
            if _shapes(cls(copy.deepcopy(config))) != base:
                return None, f"{cls.__name__}(config) does not rebuild its parameters"
    except Exception as exc:
        return None, f"{cls.__name__}(config) fails: {type(exc).__name__}"
    sizes = _axis_sizes(removal)
    new_config, placed = copy.deepcopy(config), []
    for key, value in config.to_dict().items():
        if type(value) is not int or value < 1 or not hasattr(config, key):
            continue
        variant = copy.deepcopy(config)
        setattr(variant, key, 2 * value)
        try:
            with torch.device("meta"):
                probe = _shapes(cls(variant))
        except Exception:  # a field the class checks against others (heads vs hidden size)
            probe = None
        if probe is None or probe.keys() != base.keys():
            continue
        affected = [(k, d) for k in base for d, (a, b) in enumerate(zip(base[k], probe[k])) if a != b]
        if not affected:  # read only by forward (a head count): the axes of its size, if they agree
            seen = sizes.get(value, set())
            if _WIDTH_NAME.search(key) and len(seen) == 1 and value not in seen:
                setattr(new_config, key, next(iter(seen)))
                placed.append(f"config.{key}: {value} -> {next(iter(seen))}")
            continue
        ratios = {target[k][d] * value / base[k][d] for k, d in affected}
        candidates = {int(r) for r in ratios if float(r).is_integer()}
        seen = sizes.get(value, set())
        agreed = candidates & seen if seen else candidates
        new = agreed or (seen if len(seen) == 1 else candidates)
        if len(new) != 1:
            return None, f"config.{key} = {value} could be any of {sorted(candidates | seen)}"
        new_value = next(iter(new))
        if new_value != value:
            setattr(new_config, key, new_value)
            placed.append(f"config.{key}: {value} -> {new_value}")
    on_meta = on_meta_device(model)
    try:
        with torch.device("meta") if on_meta else contextlib.nullcontext():
            rebuilt = cls(new_config)
        rebuilt.load_state_dict(work.state_dict(), strict=True, assign=on_meta)
    except Exception as exc:
        return None, f"{cls.__name__}(config) with {', '.join(placed) or 'no change'} does not take the slim " \
                     f"weights: {' '.join(str(exc).split())[:200]}"
    rebuilt.train(model.training)
    return rebuilt, ", ".join(placed)


def _set_given(root: torch.nn.Module, attributes: Mapping[str, Any]) -> None:
    for path, value in attributes.items():
        owner_path, _, attr = path.rpartition(".")
        owner: Any = root
        for part in owner_path.split(".") if owner_path else ():
            owner = getattr(owner, part, None)
        if owner is None or not hasattr(owner, attr):
            raise InputError(f"attributes names {path!r}, which the model does not have")
        setattr(owner, attr, value)


def _flatten(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flatten(o)]
    return []


def _probe(dg: Any) -> BoundInputs:
    """Inputs shaped like the example: normal floats, ones for integers and booleans."""
    gen = torch.Generator().manual_seed(0)
    tensors = tuple(torch.randn(s, generator=gen, dtype=d) if d.is_floating_point else torch.ones(s, dtype=d)
                    for s, d in zip(dg.example_shapes, dg.example_dtypes))
    return BoundInputs(tensors, getattr(dg, "example_names", None), dict(getattr(dg, "example_constants", {})))


def own_classes(model: torch.nn.Module, dg: Any, removal: Removal, reference: torch.nn.Module, *,
                slice_state: Any, rewrite_context: Any, attributes: Mapping[str, Any] | None = None,
                graph_edits: list[str] = ()) -> torch.nn.Module:
    """A copy of ``model`` with the plan's channels removed, checked against ``reference``
    (see the module docstring). ``slice_state`` and ``rewrite_context`` are the rewrite's own
    slicer and patch context, so both outputs are made the same way."""
    if removal.vanished:
        raise RewriteError(f"the plan removes whole layers ({', '.join(sorted(removal.vanished)[:4])}), which "
                           f"{type(model).__name__}'s own code still calls; keep a channel in them, or use the "
                           "GraphModule (output='graph'), which drops them")
    work = copy.deepcopy(model)
    changed = slice_state(work, removal.cuts())
    touched = {""} | {".".join(c.split(".")[:i]) for c in changed for i in range(1, c.count(".") + 2)}
    modules = dict(work.named_modules())
    rw = rewrite_context(removal, modules, work)
    graph = copy.deepcopy(dg.gm.graph)  # patches may edit node arguments: not the user's code
    called = set()
    for node in graph.nodes:
        if node.op != "call_module" or node.target not in modules:
            continue
        module = modules[node.target]
        rule = find_rule(node, module)
        if rule is None:
            continue
        called.add(node.target)
        rw.rule = rule
        if rule.resize is not None and node.target in touched:
            rule.resize(module)
        if rule.patch is not None:
            rule.patch(rw, node)
    for name, module in modules.items():  # layers the graph inlined (torch.export): widths from their tensors
        rule = find_module_rule(type(module)) if name in touched and name not in called else None
        if rule is not None and rule.resize is not None:
            rule.resize(module)
    rebuilt, rebuild_note = _rebuilt(model, work, removal)
    changes = width_changes(removal)
    done, ambiguous = _set_widths(work, changes, touched)
    if attributes:
        _set_given(work, attributes)
        if rebuilt is not None:
            _set_given(rebuilt, attributes)
    example = getattr(dg, "example", None)
    probe = example if example is not None else _probe(dg)
    why = ""
    config_built = rebuilt is not None or not rebuild_note.startswith(("it is not built", f"{type(model).__name__}(config)"))
    for candidate in ([rebuilt] if rebuilt is not None else []) + [work]:
        why = _differs(candidate, reference, probe)
        if not why and candidate is work and config_built:
            why = (f"its config cannot describe the slim widths ({rebuild_note}), so save_pretrained / "
                   "from_pretrained would not rebuild it; prune only what the config can express (e.g. "
                   "ignore= the attention groups whose head size the config derives from other fields)")
        if not why:
            return candidate
    placed = ", ".join(f"{p}: {a} -> {b}" for p, a, b in done[:8]) or "none"
    unsure = ", ".join(f"{p} (= {a}: {b})" for p, a, b in ambiguous[:8])
    raise RewriteError(
        f"the slim model in {type(model).__name__}'s own classes could not be checked: {why}. Widths "
        f"set from attributes: {placed}." + (f" Attributes whose width changed in several ways: {unsure}."
                                             if unsure else "")
        + (f" Rebuilding it from its config did not work either: {rebuild_note}." if rebuilt is None and
           getattr(model, "config", None) is not None else "")
        + (f" The slim graph also rewrote these calls, which the model's code makes itself: "
           f"{', '.join(graph_edits[:6])}." if graph_edits else "")
        + " Give the widths your model's code reads as apply(..., output='module', attributes="
        "{'path.to.attribute': value}), or use the GraphModule (output='graph')")


def _differs(candidate: torch.nn.Module, reference: torch.nn.Module, probe: BoundInputs) -> str:
    """Why ``candidate`` does not compute what ``reference`` does on ``probe``; '' if it does.
    On the meta device (structure without values) output shapes are compared, and a model
    whose code needs values to run (``.item()``) is taken on the shapes of its tensors alone,
    which ``own_classes`` has already matched to the slim ones."""
    meta = on_meta_device(candidate)
    if meta:
        probe = BoundInputs(tuple(t.to("meta") for t in probe.tensors), probe.names, probe.constants)
    try:
        with torch.no_grad(), eval_mode(candidate), eval_mode(reference):
            want = _flatten(reference(*fresh_inputs(probe.tensors)))
            got = _flatten(probe.run(candidate, fresh_inputs(probe.tensors)))
    except Exception as exc:  # the model's code read a width from somewhere this could not place
        if meta and "meta" in str(exc):
            return ""
        return f"it fails to run: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
    if meta:
        same = [a.shape for a in want] == [b.shape for b in got]
    else:
        same = len(want) == len(got) and all(
            a.shape == b.shape and bool(((a.double() - b.double()).abs() <= 1e-5 * (1 + a.double().abs().max())).all())
            for a, b in zip(want, got))
    return "" if same else "its outputs differ from the slim graph's"
