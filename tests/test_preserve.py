"""preserve.untouched: attribute tables and the containers they reach come back as they were."""

from __future__ import annotations

import torch.nn as nn

from graphprune.preserve import untouched


def test_empty_and_filled_containers_and_tables_are_restored_in_place():
    model = nn.Sequential(nn.Linear(2, 2))
    model.log, model.seen, model.cache, model.full = [], set(), {}, {"k": [1]}
    log, seen, cache, full, inner = model.log, model.seen, model.cache, model.full, model.full["k"]
    weight = model[0].weight
    with untouched(model):
        model.log.append(1)
        model.seen.add(2)
        model.cache["x"] = 3
        model.full["new"] = 4
        inner.append(5)
        model[0].register_forward_hook(lambda *_: None)
        model[0].weight = nn.Parameter(weight.detach().clone())
        model.added = 6
        model.training = False
    assert model.log is log and log == [] and seen == set() and cache == {}
    assert full == {"k": [1]} and inner == [1] and model.full is full
    assert not model[0]._forward_hooks and model[0].weight is weight
    assert not hasattr(model, "added") and model.training
    assert list(model._modules) == ["0"]
