"""graphprune.parts: models that cannot be traced whole are pruned part by part, exactly."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import graphprune as gp
from graphprune.parts import _end_to_end, _with_parts


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, 2 * c, 3, padding=1), nn.BatchNorm2d(2 * c)
        self.conv2, self.bn2 = nn.Conv2d(2 * c, c, 3, padding=1), nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class Head(nn.Module):
    """Shared over feature levels: called once per level, at different spatial sizes."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.tower = nn.Sequential(nn.Conv2d(c, 24, 3, padding=1), nn.ReLU(), nn.Conv2d(24, 5, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tower(x)


class Neck(nn.Module):
    """Takes a list of tensors: not a part on its own, its convolutions are."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.lateral = nn.ModuleList([nn.Conv2d(c, c, 1), nn.Conv2d(c, c, 1)])

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        return [conv(f) for conv, f in zip(self.lateral, feats)]


class Detector(nn.Module):
    """Data-dependent Python at the top: neither torch.fx nor torch.export gives one graph."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.stage1, self.stage2 = Block(8), Block(8)
        self.neck = Neck(8)
        self.head = Head(8)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        f1 = self.stage1(self.stem(images))
        f2 = self.stage2(nn.functional.max_pool2d(f1, 2))
        scores = [self.head(f) for f in self.neck([f1, f2])]
        flat = torch.cat([s.flatten(2) for s in scores], 2)
        keep = torch.nonzero(flat[:, 0].amax(0) > flat[:, 0].mean()).flatten()
        return {"scores": flat[:, :, : len(keep) + 1], "levels": torch.tensor(len(scores))}


def _detector() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = Detector().eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model, torch.randn(2, 3, 16, 16)


def test_untraceable_model_is_pruned_part_by_part_exactly():
    model, x = _detector()
    with pytest.raises(gp.TraceError, match="gp.prune_parts"):
        gp.trace(model, x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    result = gp.prune_parts(model, x, ratio=0.5)
    assert set(result.parts) == {"stem", "stage1", "stage2", "neck.lateral.0", "neck.lateral.1", "head"}
    assert result.after_params < 0.75 * result.before_params
    assert result.max_diff < 1e-4 and result.output_diff < 1e-4
    assert set(result.part_diffs) == set(result.parts)  # the head was checked on both of its calls
    # each part lost channels inside it; its outputs kept their widths
    assert result.parts["head"].after.params < result.parts["head"].before.params
    assert result.parts["stage1"].model.conv1.out_channels == 8
    # the slim model is the user's class, returns the same structure, and runs at another size
    assert type(result.model) is Detector
    out = result.model(torch.randn(1, 3, 24, 24))
    assert set(out) == {"scores", "levels"} and out["scores"].shape[1] == 5
    # nothing the user gave changed
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert isinstance(model.head, Head)


def test_what_stays_whole_is_named_with_why():
    model, x = _detector()
    result = gp.prune_parts(model, x, ratio=0.5)
    assert "neck" not in result.parts
    assert "stage1" in result.summary() and "parameters" in result.summary()
    assert not result.unpruned  # every module with parameters is inside a part


def test_a_model_that_traces_is_one_part():
    model, x = gp.zoo.create("resnet20")
    result = gp.prune_parts(model, x, ratio=0.5)
    assert list(result.parts) == [""]
    assert isinstance(result.model, torch.fx.GraphModule)
    assert result.max_diff < 1e-4


def test_named_parts_must_trace():
    model, x = _detector()
    with pytest.raises(gp.InputError, match="'neck'"):
        gp.prune_parts(model, x, parts=["neck"])
    with pytest.raises(gp.InputError, match="not a submodule"):
        gp.prune_parts(model, x, parts=["nope"])
    result = gp.prune_parts(model, x, parts=["head"], ratio=0.5)
    assert list(result.parts) == ["head"] and result.max_diff < 1e-4


def test_criteria_that_need_data_are_refused():
    model, x = _detector()
    with pytest.raises(gp.InputError, match="without data"):
        gp.prune_parts(model, x, method="taylor")


def test_a_model_that_does_not_run_is_refused():
    model, _ = _detector()
    with pytest.raises(gp.InputError, match="does not run"):
        gp.prune_parts(model, torch.randn(2, 4, 16, 16))


def test_end_to_end_check_sees_a_wrong_part():
    model, x = _detector()
    result = gp.prune_parts(model, x, ratio=0.5)
    masked = _with_parts(model, {n: gp.masked_model(model.get_submodule(n), r.graph, r.plan)
                                 for n, r in result.parts.items()})
    assert _end_to_end(result.model, masked, x) == result.output_diff < 1e-4
    with torch.no_grad():
        result.model.head.get_submodule("tower.0").weight.add_(0.1)
    assert _end_to_end(result.model, masked, x) > 1e-3


def test_each_part_is_checked_on_every_call_it_received(monkeypatch):
    import graphprune.parts as parts

    seen = []
    replay = parts._replay
    monkeypatch.setattr(parts, "_replay", lambda part, slim, masked, calls: seen.append(
        (type(part).__name__, len(calls))) or replay(part, slim, masked, calls))
    model, x = _detector()
    gp.prune_parts(model, x, ratio=0.5)
    assert ("Head", 2) in seen and ("Block", 1) in seen
