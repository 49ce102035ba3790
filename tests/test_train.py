"""graphprune.train: fine-tuning, restarts, schedules, regularisers, SPP, C-SGD, AOFP, dead channels."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphprune as gp
from graphprune import train as gt


class Net(nn.Module):
    """conv-BN-ReLU, a residual pair, a flatten into a linear head: three prunable groups."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(1, c, 3, padding=1), nn.BatchNorm2d(c)
        self.c2, self.b2 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.c3 = nn.Conv2d(c, c, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(4 * c, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.b1(self.c1(x)))
        y = torch.relu(self.b2(self.c2(y)) + y)
        y = torch.relu(self.c3(y))
        return self.fc(self.pool(y).flatten(1))


def _data(n: int = 96, batch: int = 32, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 6, 6, generator=g)
    y = (x[:, 0, :3].mean((1, 2)) > 0).long() + (x[:, 0, 3:].mean((1, 2)) > 0.3).long()
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, n, batch)]


@pytest.fixture
def setup():
    model = Net()
    ex = (torch.randn(2, 1, 6, 6),)
    dg = gp.DependencyGraph.build(model, ex)
    return model, ex, dg


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> bool:
    return float((a - b).detach().abs().max()) < tol


# --- fine-tuning ------------------------------------------------------------------------------------
def test_finetune_trains_a_slim_graph_module(setup):
    model, ex, dg = setup
    data = _data()
    slim = gp.apply(model, dg, gp.select(dg, gp.score("l1", model, dg), 0.5))
    assert isinstance(slim, torch.fx.GraphModule)
    before = gt.evaluate(slim, data, metric=lambda o, t: float(F.cross_entropy(o, t, reduction="sum")))
    res = gt.finetune(slim, data, epochs=4, lr=0.05, eval_data=data, progress=False)
    after = gt.evaluate(slim, data, metric=lambda o, t: float(F.cross_entropy(o, t, reduction="sum")))
    assert res.model is slim and len(res.history) == 4 and after < before
    assert {"epoch", "loss", "lr", "eval"} <= set(res.history[0])
    assert 0.0 <= gt.evaluate(slim, data) <= 1.0


def test_finetune_early_stopping_and_restore_best(setup):
    model, _, _ = setup
    scores = iter([0.5, 0.7, 0.6, 0.6, 0.6, 0.6])
    snaps = []

    def eval_fn(m):
        snaps.append(copy.deepcopy(m.state_dict()))
        return next(scores)
    res = gt.finetune(model, _data(), epochs=6, lr=0.05, eval_fn=eval_fn, patience=2, restore_best=True,
                      progress=False)
    assert res.stopped_early and len(res.history) == 4 and res.best_epoch == 1 and res.best_eval == 0.7
    assert all(torch.equal(v, snaps[1][k]) for k, v in model.state_dict().items())


def test_finetune_max_steps_and_adam(setup):
    model, _, _ = setup
    res = gt.finetune(model, _data(), epochs=5, optimizer="adam", lr=1e-3, max_steps=4, progress=False)
    assert res.history[-1]["steps"] == 4
    with pytest.raises(ValueError):
        gt.finetune(model, _data(), optimizer="nope", progress=False)


class HFStyle(nn.Module):
    """Keyword inputs; given ``labels`` it returns its own loss, as Hugging Face models do."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.head = nn.Embedding(12, 8), nn.Linear(8, 3)

    def forward(self, input_ids, attention_mask, labels=None):
        h = (self.emb(input_ids) * attention_mask.unsqueeze(-1)).sum(1)
        logits = self.head(h)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits, labels) + 100.0  # marks the model's own loss
        return out


def _hf_batches(n: int = 3) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(0, 12, (4, 5), generator=g), "attention_mask": torch.ones(4, 5),
             "labels": torch.randint(0, 3, (4,), generator=g)} for _ in range(n)]


def test_finetune_takes_hugging_face_dict_batches():
    torch.manual_seed(0)
    model = HFStyle()
    res = gt.finetune(model, _hf_batches(), epochs=2, lr=0.01, progress=False)
    assert res.history[0]["loss"] > 100  # the loss the model computed from the labels it was given
    ids = _hf_batches(1)[0]
    slim = gp.prune(model, {"input_ids": ids["input_ids"], "attention_mask": ids["attention_mask"]},
                    ratio=0.5).model  # takes no labels: they become targets of cross-entropy on the logits
    res = gt.finetune(slim, _hf_batches(), epochs=2, lr=0.01, progress=False, eval_data=_hf_batches())
    assert res.history[0]["loss"] < 100 and 0 <= res.history[-1]["eval"] <= 1
    custom = gt.finetune(slim, _hf_batches(), loss_fn=lambda logits, t: F.cross_entropy(logits, t) * 0 + 7,
                         progress=False)
    assert custom.history[0]["loss"] == 7  # an explicit loss_fn gets the logits
    with pytest.raises(gp.InputError, match="labels"):
        gt.finetune(slim, [{"input_ids": ids["input_ids"], "attention_mask": ids["attention_mask"]}],
                    progress=False)


def test_finetune_takes_batches_with_extra_items_and_auto_device(setup):
    model, _, _ = setup
    data = [(x, y, torch.arange(len(x)), "paths") for x, y in _data()]
    res = gt.finetune(model, data, epochs=1, progress=False, device="auto")
    assert res.history[0]["steps"] == len(data)
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert next(model.parameters()).device.type == want and gt.finetune.__globals__["resolve_device"]("auto") == want
    assert 0 <= gt.evaluate(model, data, device="auto") <= 1
    with pytest.raises(gp.InputError, match="batch must be"):
        gt.finetune(model, [(torch.randn(2, 1, 6, 6),)], progress=False)


# --- restarts ---------------------------------------------------------------------------------------
def test_restart_modes(setup):
    model, ex, dg = setup
    ckpt = gt.snapshot(model)
    gt.finetune(model, _data(), epochs=1, lr=0.1, progress=False)
    plan = gp.select(dg, gp.score("l1", model, dg), 0.5)
    cont = gt.restart(model, dg, plan, "continue")
    rewind = gt.restart(model, dg, plan, "rewind", checkpoint=ckpt)
    fresh = gt.restart(model, dg, plan, "reinit", seed=1)
    early = copy.deepcopy(model)
    early.load_state_dict(ckpt)
    x = torch.randn(4, 1, 6, 6)
    for m in (model, cont, rewind, fresh, early):
        m.eval()
    assert _close(cont(x), gp.apply(model, dg, plan)(x))
    assert _close(rewind(x), gp.apply(early, dg, plan)(x))
    assert fresh(x).shape == cont(x).shape
    assert not torch.equal(fresh.get_submodule("c1").weight, cont.get_submodule("c1").weight)
    assert torch.equal(fresh.get_submodule("b1").running_var, torch.ones_like(fresh.get_submodule("b1").running_var))
    with pytest.raises(ValueError):
        gt.restart(model, dg, plan, "rewind")


# --- schedules and ceilings --------------------------------------------------------------------------
def test_schedule_fractions():
    assert gt.schedule_fractions(0.6, 3) == pytest.approx([0.2, 0.4, 0.6])
    geo = gt.schedule_fractions(0.75, 4, "geometric")
    kept = [1 - f for f in geo]
    assert geo[-1] == pytest.approx(0.75) and kept[1] / kept[0] == pytest.approx(kept[2] / kept[1])


def test_capped_select_respects_ceilings_and_target(setup):
    model, ex, dg = setup
    scores = gp.score("l1", model, dg)
    gids = [g.id for g in dg.groups if g.prunable]
    caps = {gids[0]: 0.0, gids[1]: 0.75}
    plan = gt.capped_select(dg, scores, 0.3, caps)
    assert gids[0] not in plan and len(plan[gids[1]]) <= 6
    assert plan.n_removed / sum(dg.groups[g].size for g in gids) >= 0.3 - 1e-9
    most = gt.capped_select(dg, scores, 0.9, caps)  # more than the ceilings allow: as much as they do
    assert gids[0] not in most and len(most[gids[1]]) == 6
    macs = gt.capped_select(dg, scores, 0.3, caps, target="macs")
    est = gp.plan.CountEstimator(dg)
    assert est.counts(macs)[1] <= 0.7 * est.counts({})[1] and gids[0] not in macs
    glob = gt.capped_select(dg, scores, 0.3, caps, scope="global", normalize="max")
    assert gids[0] not in glob and len(glob.get(gids[1], ())) <= 6


def test_iterative_prune_reaches_goal_with_ceilings(setup):
    model, ex, dg = setup
    data = _data()
    gids = [g.id for g in dg.groups if g.prunable]
    calls = []
    res = gt.iterative_prune(model, ex, ratio=0.5, steps=2, target="macs", data=data,
                             retrain={"epochs": 1, "lr": 0.05, "progress": False},
                             ceilings={gids[0]: 0.25}, eval_fn=lambda m: calls.append(1) or 0.0, progress=False)
    base = gp.count(model, ex).macs
    assert gp.count(res.model, ex).macs <= 0.5 * base * 1.02 and len(res.records) == 2 and len(res.history) == 2 and len(calls) == 4
    assert res.model.get_submodule("c1").out_channels >= 6  # the ceiling holds across both steps
    geo = gt.iterative_prune(model, ex, ratio=0.5, steps=2, schedule="geometric", progress=False,
                             retrain=lambda m, step: gt.finetune(m, data, progress=False).model)
    assert geo.model.get_submodule("c3").out_channels == 4


def test_sensitivity_gives_ceilings(setup):
    model, ex, dg = setup
    data = _data()
    gt.finetune(model, data, epochs=2, lr=0.05, progress=False)
    sens = gt.sensitivity(model, dg, lambda m: gt.evaluate(m, data), ratios=(0.25, 0.5), progress=False)
    caps = sens.ceilings(max_drop=1.0)
    assert set(caps) == {g.id for g in dg.groups if g.prunable} and all(c == 0.5 for c in caps.values())
    assert all(c in (0.0, 0.25, 0.5) for c in sens.ceilings(0.0).values())


def test_redundancy_sees_dead_channels(setup):
    model, ex, dg = setup
    with torch.no_grad():
        model.c3.weight[:, :4] = 0  # channels 0-3 of the residual group feed nothing downstream of c2 ...
        model.fc.weight[:, :8] = 0  # ... and c3 channels 0-1 reach nothing
    g_c3 = next(g.id for g in dg.groups if "c3.weight" in g.producers)
    red = gt.redundancy(model, dg, _data(), batches=3, energy=0.999999)
    assert red.fractions[g_c3] >= 0.25 - 1e-9 and red.ranks[g_c3] <= 6
    assert all(0 <= f <= 0.9 for f in red.ceilings.values())


# --- regularisers -----------------------------------------------------------------------------------
def _train(model, plugin, epochs=6, lr=0.05):
    gt.finetune(model, _data(), epochs=epochs, lr=lr, plugins=[plugin], schedule=None, progress=False)


def _norm(model, dg, gid, roles=("out", "pass", "in")):
    return float(gt.masking.channel_rows(dg.groups[gid], dict(model.named_parameters()), roles).detach().norm())


@pytest.mark.parametrize("kind", ["l1", "l2", "lasso"])
def test_regularisers_shrink_their_target(setup, kind):
    model, ex, dg = setup
    base = copy.deepcopy(model)
    gid = next(g.id for g in dg.groups if "c3.weight" in g.producers)
    cls = {"l1": gt.L1, "l2": gt.L2, "lasso": gt.GroupLasso}[kind]
    reg = cls(dg, {"l1": 3e-2, "l2": 0.3, "lasso": 0.2}[kind], groups=[gid])
    start = reg.value(model)
    _train(model, reg)
    _train(base, lambda m: None)
    assert reg.value(model) < 0.5 * start
    assert _norm(model, dg, gid) < 0.7 * _norm(base, dg, gid)


def test_group_lasso_zeroes_whole_channels(setup):
    model, ex, dg = setup
    gid = next(g.id for g in dg.groups if "c3.weight" in g.producers)
    reg = gt.GroupLasso(dg, 0.3, groups=[gid])
    _train(model, reg, epochs=10)
    rows = gt.masking.channel_rows(dg.groups[gid], dict(model.named_parameters()), ("out", "pass", "in"))
    norms = rows.norm(dim=1)
    assert (norms < 0.1 * norms.max()).sum() >= 2  # several channels collapse, not a uniform shrink


def test_bn_sparsity_shrinks_scales(setup):
    model, ex, dg = setup
    base = copy.deepcopy(model)
    reg = gt.BNSparsity(dg, 0.3)
    start = reg.value(model)
    _train(model, reg)
    _train(base, lambda m: None)
    assert reg.value(model) < 0.7 * start
    assert model.b1.weight.abs().sum() < base.b1.weight.abs().sum()
    assert torch.equal(model.c3.weight != 0, model.c3.weight != 0)  # untouched kinds still train


def test_auto_balanced_polarises(setup):
    model, ex, dg = setup
    gid = next(g.id for g in dg.groups if "c3.weight" in g.producers)
    reg = gt.AutoBalanced(dg, 0.5, 0.5, groups=[gid])
    sq0 = gt.masking.channel_rows(dg.groups[gid], dict(model.named_parameters()), ("out", "pass")).pow(2).sum(1)
    _train(model, reg)
    weak = torch.as_tensor(reg.weak[gid])
    sq = gt.masking.channel_rows(dg.groups[gid], dict(model.named_parameters()), ("out", "pass")).pow(2).sum(1)
    strong = torch.as_tensor([c for c in range(8) if c not in set(reg.weak[gid].tolist())])
    assert sq[weak].sum() < 0.5 * sq0[weak].sum() and sq[strong].sum() > sq0[strong].sum()


# --- masks, SPP, AOFP -----------------------------------------------------------------------------------
def test_masker_matches_removal_and_blocks_gradients(setup):
    model, ex, dg = setup
    model.eval()
    masker = gt.ChannelMasker(model, dg)
    plan = {g.id: [0, 3] for g in dg.groups if g.prunable}
    for gid, ch in plan.items():
        masker.prune(gid, ch)
    x = torch.randn(3, 1, 6, 6)
    assert _close(model(x), masker.slim()(x))
    model(x).sum().backward()
    w = gt.masking.member_params(model)["c3.weight"]
    assert float(w.grad[:, [0, 3]].abs().max()) == 0.0
    masker.remove()
    assert "c3.weight" in dict(model.named_parameters())


def test_spp_reaches_target(setup):
    model, ex, dg = setup
    res = gt.spp(model, dg, _data(), 0.5, epochs=20, A=0.2, lr=0.05, progress=False)
    assert res.reached
    for gid, p in res.probabilities.items():
        assert (p == 1.0).sum() == dg.groups[gid].size // 2 == len(res.plan[gid])
        assert set(np.flatnonzero(p == 1.0)) == set(res.plan[gid])
    assert res.model.get_submodule("c1").out_channels == 4 and "parametrizations" not in str(
        list(dict(model.named_parameters())))
    x = torch.randn(2, 1, 6, 6)
    assert res.model(x).shape == (2, 3)


def test_spp_increment_shape():
    d = gt.spp_increment(np.arange(10), 4, A=0.1, u=0.25)
    assert d[0] == pytest.approx(0.1) and (d[:4] > 0).all() and (d[4:] < 0).all()
    # central symmetry about the centre N_c: Delta(N_c - t) + Delta(N_c + t) = 2 u A
    nc = 3.5 / (2 - np.log(0.5) / np.log(0.25))
    t = np.array([0.3, 1.0, 2.0])
    assert np.allclose(gt.spp_increment(nc - t, 4, 0.1) + gt.spp_increment(nc + t, 4, 0.1), 2 * 0.25 * 0.1)


def test_aofp_reaches_macs_target(setup):
    model, ex, dg = setup
    base = gp.count(model, ex).macs
    res = gt.aofp(model, dg, _data(), 0.4, epochs=3, rounds=2, lr=0.05, progress=False)
    assert gp.count(res.model, ex).macs <= 0.6 * base and res.macs_after == gp.count(res.model, ex).macs
    assert res.log and res.macs_before == base


# --- C-SGD --------------------------------------------------------------------------------------------
def test_csgd_merge_is_exact(setup):
    model, ex, dg = setup
    gt.finetune(model, _data(), epochs=1, lr=0.05, progress=False)  # non-trivial running stats
    clusters = gt.cluster_channels(model, dg, 0.5)
    assert all(len(cl) == dg.groups[g].size - dg.groups[g].size // 2 for g, cl in clusters.items())
    identical = gt.unify(copy.deepcopy(model), dg, clusters).eval()
    slim = gt.merge(model, dg, clusters).eval()
    x = torch.randn(5, 1, 6, 6)
    assert _close(identical(x), slim(x))
    assert gp.count(slim, ex).macs < gp.count(model, ex).macs


def test_csgd_training_converges_clusters(setup):
    model, ex, dg = setup
    res = gt.csgd(model, dg, _data(), 0.5, epochs=8, centripetal=0.3, lr=0.02, progress=False)
    assert res.spread < 1e-2
    model.eval()
    res.model.eval()
    x = torch.randn(5, 1, 6, 6)
    assert float((model(x) - res.model(x)).detach().abs().max()) < 0.05  # merge costs ~nothing after C-SGD


# --- unstructured -> structured --------------------------------------------------------------------------
def test_dead_channel_removal_is_exact(setup):
    model, ex, dg = setup
    model.eval()
    with torch.no_grad():
        model.c2.weight[:, 2] = 0
        model.c3.weight[:, 2] = 0  # residual channel 2: every outgoing column is zero
        model.fc.weight[:, 24:28] = 0  # c3 channel 6: its 4 flattened positions read by nothing
        model.c3.weight[1] = 0
        model.c3.bias[1] = 0  # c3 channel 1: no incoming weights, computes relu(0) = 0
    res = gt.to_structured(model, ex)
    assert res.max_error < 1e-5
    gid_res = next(g.id for g in dg.groups if "c1.weight" in g.producers)
    gid_c3 = next(g.id for g in dg.groups if "c3.weight" in g.producers)
    assert res.plan[gid_res] == (2,) and res.plan[gid_c3] == (1, 6)
    assert gt.dead_channels(model, dg, mode="incoming") == gp.Plan({gid_c3: [1]})
    x = torch.randn(4, 1, 6, 6)
    assert _close(model(x), res.model(x))


def test_magnitude_sparsify_and_weight_mask(setup):
    model, ex, dg = setup
    masks = gt.magnitude_sparsify(model, 0.7)
    total = sum(m.numel() for m in masks.values())
    kept = sum(int(m.sum()) for m in masks.values())
    assert abs(kept / total - 0.3) < 0.01
    gt.finetune(model, _data(), epochs=1, lr=0.05, plugins=[gt.WeightMask(masks)], progress=False)
    params = dict(model.named_parameters())
    assert all(bool((params[n][~m] == 0).all()) for n, m in masks.items())
    layer = gt.magnitude_sparsify(Net(), 0.5, scope="layer")
    assert all(abs(float(m.float().mean()) - 0.5) < 0.05 for m in layer.values() if m.numel() > 20)
