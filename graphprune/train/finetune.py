"""Plain-torch fine-tuning loop: works on any nn.Module, including slim torch.fx GraphModules.

``data`` is any re-iterable of batches (a list, a DataLoader) in one of these forms:

- ``(inputs, targets)``: ``inputs`` a tensor (``model(inputs)``), a tuple or list of tensors
  (``model(*inputs)``) or a dict (``model(**inputs)``);
- ``(inputs, targets, *extra)``: the same, the extra items (sample ids, weights, paths) ignored;
- a dict, Hugging Face style (``{"input_ids": ..., "attention_mask": ..., "labels": ...}``):
  the targets are ``batch[target_key]`` (``"labels"``); a model whose ``forward`` takes
  ``labels`` gets the whole dict (and may return its own loss), any other (a slim GraphModule)
  the rest of it, as keywords.

The loss is ``loss_fn(outputs, targets)``; with ``loss_fn=None`` (the default) it is the loss
the model returns (``outputs.loss`` or ``outputs["loss"]``), else cross-entropy. Outputs that
carry ``logits`` (a Hugging Face ``ModelOutput`` or a dict) hand those to ``loss_fn`` and metrics.
``device="auto"`` picks CUDA when it is available, else the CPU.
"""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from graphprune.errors import InputError

Batch = Any  # (inputs, targets), (inputs, targets, *extra) or a dict with a target key
Plugin = Callable[[nn.Module], "torch.Tensor | None"]


@dataclass
class FinetuneResult:
    """The trained model and one history row per epoch (``epoch``, ``loss``, ``lr``, optional ``eval``)."""

    model: nn.Module
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = -1
    stopped_early: bool = False

    @property
    def best_eval(self) -> float | None:
        """Best evaluation score seen, if an evaluation ran."""
        scores = [h["eval"] for h in self.history if "eval" in h]
        return max(scores) if scores else None


def resolve_device(device: torch.device | str) -> torch.device | str:
    """``"auto"``: ``"cuda"`` when CUDA is available, else ``"cpu"``; anything else as given.

    >>> resolve_device("cpu")
    'cpu'
    """
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _to(x: Any, device: torch.device | str) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, Mapping):
        return {k: _to(v, device) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(_to(v, device) for v in x)
    return x


def _takes(model: nn.Module, name: str) -> bool:
    """Whether ``model.forward`` has a parameter ``name`` (Hugging Face models take ``labels``)."""
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _split(batch: Any, target_key: str, pass_target: bool) -> tuple[Any, Any]:
    """``(inputs, targets)`` of a batch; dict inputs keep the target when the model takes it."""
    if isinstance(batch, Mapping):
        if pass_target:
            return dict(batch), batch.get(target_key)
        return {k: v for k, v in batch.items() if k != target_key}, batch.get(target_key)
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise InputError(f"a batch must be (inputs, targets), (inputs, targets, *extra) or a dict with a "
                     f"{target_key!r} entry, got {type(batch).__name__}"
                     + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else ""))


def _call(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, Mapping):
        return model(**inputs)
    return model(*inputs) if isinstance(inputs, (tuple, list)) else model(inputs)


def _logits(output: Any) -> Any:
    """``output.logits`` / ``output["logits"]`` of a Hugging Face style output, else the output."""
    if isinstance(output, Mapping) and "logits" in output:
        return output["logits"]
    return getattr(output, "logits", output) if not isinstance(output, (torch.Tensor, tuple, list)) else output


def _model_loss(output: Any) -> torch.Tensor | None:
    loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
    return loss if isinstance(loss, torch.Tensor) else None


def _loss(output: Any, target: Any, loss_fn: Callable | None) -> torch.Tensor:
    if loss_fn is not None:
        return loss_fn(_logits(output), target)
    own = _model_loss(output)
    if own is not None:
        return own
    if target is None:
        raise InputError("the batch has no targets and the model returned no loss: give batches with "
                         "targets (or a 'labels' entry) or a model that computes its loss")
    return F.cross_entropy(_logits(output), target)


def accuracy(output: torch.Tensor, target: torch.Tensor) -> float:
    """Sum of correct top-1 predictions in a batch (``evaluate`` divides by the sample count).

    For dense outputs ``[N, C, *spatial]`` with targets ``[N, *spatial]`` this counts correct pixels.
    """
    return float((output.argmax(1) == target).sum())


def _count(output: torch.Tensor, target: torch.Tensor) -> int:
    return int(target.numel())


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: Iterable[Batch],
    metric: Callable[[torch.Tensor, torch.Tensor], float] = accuracy,
    *,
    device: torch.device | str = "cpu",
    reduction: str = "mean",
    target_key: str = "labels",
) -> float:
    """Average ``metric`` over ``data``; ``metric`` returns a per-batch sum (``accuracy``) by default.

    ``reduction="mean"`` divides the summed metric by the number of target elements; ``"batch"`` averages
    per-batch metric values instead (for metrics that already return a mean, e.g. a loss). Batches take
    the forms ``finetune`` takes (the targets of a dict batch are never passed to the model here).
    """
    device = resolve_device(device)
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    try:
        for batch in data:
            inputs, target = _split(batch, target_key, False)
            if target is None:
                raise InputError(f"evaluate needs targets: a dict batch must hold {target_key!r}")
            inputs, target = _to(inputs, device), _to(target, device)
            out = _logits(_call(model, inputs))
            total += float(metric(out, target))
            n += _count(out, target) if reduction == "mean" else 1
    finally:
        model.train(was_training)
    return total / max(n, 1)


_HOOKS = ("penalty", "after_backward", "after_step", "on_epoch_end")


def _penalty_of(plugin: Any) -> Callable[[nn.Module], Any] | None:
    fn = getattr(plugin, "penalty", None)
    if fn is None and callable(plugin) and not any(hasattr(plugin, h) for h in _HOOKS):
        return plugin
    return fn


def _ddp(model: nn.Module, options: bool | Mapping[str, Any], device: torch.device | str) -> nn.Module:
    """``model`` wrapped in ``DistributedDataParallel`` (same parameters) for the training forward."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise InputError("finetune(ddp=...) needs a torch.distributed process group: launch with torchrun and "
                         "call torch.distributed.init_process_group() first")
    kw = dict(options) if isinstance(options, Mapping) else {}
    dev = torch.device(device)
    if dev.type == "cuda":
        kw.setdefault("device_ids", [dev.index if dev.index is not None else torch.cuda.current_device()])
    return nn.parallel.DistributedDataParallel(model, **kw)


def make_optimizer(
    params: Iterable[nn.Parameter], optimizer: str | type[torch.optim.Optimizer], lr: float,
    weight_decay: float = 0.0, momentum: float = 0.9,
) -> torch.optim.Optimizer:
    """An SGD (momentum) or Adam optimizer, or any optimizer class given directly."""
    params = [p for p in params if p.requires_grad]
    if isinstance(optimizer, str):
        name = optimizer.lower()
        if name == "sgd":
            return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
        if name == "adam":
            return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
        if name == "adamw":
            return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        raise InputError(f"unknown optimizer {optimizer!r}; use 'sgd', 'adam', 'adamw' or an optimizer class")
    return optimizer(params, lr=lr, weight_decay=weight_decay)


def finetune(
    model: nn.Module,
    data: Iterable[Batch],
    *,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    epochs: int = 1,
    lr: float = 0.01,
    optimizer: str | type[torch.optim.Optimizer] = "sgd",
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    schedule: str | None = "cosine",
    eval_fn: Callable[[nn.Module], float] | None = None,
    eval_data: Iterable[Batch] | None = None,
    patience: int | None = None,
    restore_best: bool = False,
    plugins: Sequence[Any] = (),
    max_steps: int | None = None,
    progress: bool = True,
    device: torch.device | str = "cpu",
    target_key: str = "labels",
    ddp: bool | Mapping[str, Any] = False,
) -> FinetuneResult:
    """Train ``model`` in place on ``data`` and return it (in eval mode) with a per-epoch history.

    - ``eval_fn(model) -> float`` (higher is better) runs after every epoch; if it is None and ``eval_data``
      is given, top-1 accuracy on ``eval_data`` is used.
    - ``patience``: stop after that many epochs without improvement of the evaluation score.
    - ``restore_best``: load the weights of the best-scoring epoch at the end.
    - ``schedule``: ``"cosine"`` (per step, to 0), ``"step"`` (x0.1 at 50% and 75%), or None (constant).
    - ``plugins``: objects with optional ``penalty(model) -> Tensor`` (added to the loss),
      ``after_backward(model)`` (may edit grads), ``after_step(model)`` (may edit weights) and
      ``on_epoch_end(model, epoch)`` hooks; plain callables are treated as ``penalty``. A plugin whose
      ``stop`` attribute turns true ends training after the current step (SPP, AOFP use this).
    - ``max_steps`` caps the total number of optimizer steps (useful for short retrains).
    - ``loss_fn(outputs, targets)``; None: the loss the model returns, else cross-entropy.
    - Batches: ``(inputs, targets)``, ``(inputs, targets, *extra)`` or dicts with a ``target_key``
      entry (see the module docstring). ``device="auto"``: CUDA if available, else the CPU.
    - ``ddp``: train under ``torch.nn.parallel.DistributedDataParallel`` (``True``, or a dict of its
      keyword arguments) in an initialised ``torch.distributed`` process group: each rank passes
      its own shard of ``data`` (the same number of batches on every rank, e.g.
      ``graphprune.distributed.shard``), gradients are averaged over the ranks, and every rank
      ends with the same weights. Plugins, ``eval_fn`` and the result see ``model`` itself.

    >>> import torch
    >>> net = torch.nn.Linear(4, 3)
    >>> x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    >>> batches = [(x, y), (x, y, torch.arange(8)), {"input": x, "labels": y}]
    >>> len(finetune(net, batches, epochs=2, progress=False, device="auto").history)
    2
    """
    device = resolve_device(device)
    model.to(device)
    pass_target = _takes(model, target_key)
    if eval_fn is None and eval_data is not None:
        eval_fn = lambda m: evaluate(m, eval_data, device=device)  # noqa: E731
    opt = make_optimizer(model.parameters(), optimizer, lr, weight_decay, momentum)
    forward = _ddp(model, ddp, device) if ddp else model
    try:
        steps_per_epoch = len(data)  # type: ignore[arg-type]
    except TypeError:
        steps_per_epoch = None
    total = steps_per_epoch * epochs if steps_per_epoch is not None else None
    if max_steps is not None:
        total = min(total, max_steps) if total is not None else max_steps
    sched: torch.optim.lr_scheduler.LRScheduler | None = None
    if schedule == "cosine" and total:
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    elif schedule == "step" and total:
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, [int(total * 0.5), int(total * 0.75)], 0.1)
    elif schedule not in (None, "cosine", "step", "constant"):
        raise InputError(f"unknown schedule {schedule!r}")

    penalties = [_penalty_of(p) for p in plugins]
    penalties = [fn for fn in penalties if fn is not None]
    result = FinetuneResult(model)
    best, best_state, bad = -math.inf, None, 0
    step, stop = 0, False
    bar = tqdm(total=total, disable=not progress, desc="finetune", leave=False)
    try:
        for epoch in range(epochs):
            model.train()
            run_loss, n = 0.0, 0
            for batch in data:
                if max_steps is not None and step >= max_steps:
                    break
                inputs, target = _split(batch, target_key, pass_target)
                inputs, target = _to(inputs, device), _to(target, device)
                loss = _loss(_call(forward, inputs), target, loss_fn)
                full = loss
                for fn in penalties:
                    pen = fn(model)
                    if pen is not None:
                        full = full + pen
                opt.zero_grad(set_to_none=True)
                full.backward()
                for p in plugins:
                    if hasattr(p, "after_backward"):
                        p.after_backward(model)
                opt.step()
                for p in plugins:
                    if hasattr(p, "after_step"):
                        p.after_step(model)
                if sched is not None:
                    sched.step()
                step += 1
                if any(getattr(p, "stop", False) for p in plugins):
                    stop = True
                run_loss += float(loss.detach())
                n += 1
                bar.update(1)
                bar.set_postfix(epoch=epoch, loss=f"{run_loss / n:.4f}")
                if stop:
                    break
            row: dict[str, float] = {"epoch": epoch, "loss": run_loss / max(n, 1),
                                     "lr": opt.param_groups[0]["lr"], "steps": step}
            for p in plugins:
                if hasattr(p, "on_epoch_end"):
                    p.on_epoch_end(model, epoch)
            if eval_fn is not None:
                score = float(eval_fn(model))
                row["eval"] = score
                if score > best:
                    best, bad, result.best_epoch = score, 0, epoch
                    if restore_best:
                        best_state = copy.deepcopy(model.state_dict())
                else:
                    bad += 1
            result.history.append(row)
            if progress:
                bar.write(" ".join(f"{k}={v:.4g}" for k, v in row.items()))
            if patience is not None and eval_fn is not None and bad >= patience:
                result.stopped_early = True
                break
            if stop or (max_steps is not None and step >= max_steps):
                break
    finally:
        bar.close()
    if restore_best and best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return result
