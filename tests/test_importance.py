"""Importance criteria against answers computed by hand."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphprune as gp
from graphprune.importance import CRITERIA, bn_scale, hessian, magnitude, oracle, shapley, taylor


class ResNetlet(nn.Module):
    """Conv-BN stem, one residual block, flatten into a Linear: every kind of member."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(4)
        self.conv1 = nn.Conv2d(4, 5, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(5)
        self.conv2 = nn.Conv2d(5, 4, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 2 * 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn0(self.stem(x)))
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        x = F.relu(x + y)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 2), 1))


def _resnetlet() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = ResNetlet()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    model.eval()
    x = torch.randn(12, 3, 6, 6)
    y = torch.randint(0, 3, (12,))
    return model, x, y


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return F.cross_entropy(model(x), y).item()


def _mlp(hidden: int = 5, seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, hidden), nn.ReLU(), nn.Linear(hidden, 3))
    return model, torch.randn(32, 4), torch.randint(0, 3, (32,))


def _mlp_loss_without(model: nn.Module, x: torch.Tensor, y: torch.Tensor, removed) -> float:
    """Loss with hidden units ``removed`` zeroed, by hand."""
    with torch.no_grad():
        h = model[1](model[0](x))
        h[:, list(removed)] = 0
        return F.cross_entropy(model[2](h), y).item()


# --- magnitude, bn_scale, random -----------------------------------------------------------------
def test_zero_channel_scores_lowest_by_magnitude() -> None:
    model, x, _ = _resnetlet()
    with torch.no_grad():
        model.conv1.weight[2].zero_()
        model.bn1.weight[2] = 0
        model.bn1.bias[2] = 0
        model.conv2.weight[:, 2].zero_()
    dg = gp.DependencyGraph.build(model, x)
    gid = next(g.id for g in dg.groups if any(m.param == "conv1.weight" and m.dim == 0 for m in g.members))
    for p in (1, 2):
        s = magnitude(model, dg, p=p)[gid]
        assert int(np.argmin(s)) == 2 and s[2] == pytest.approx(0.0, abs=1e-7)
    s = gp.score("l1", model, dg)[gid]
    assert s[2] == min(s)


def test_magnitude_values_and_normalisation() -> None:
    model = nn.Sequential(nn.Linear(2, 3, bias=False), nn.Linear(3, 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, -2.0], [0.0, 3.0], [4.0, 0.0]]))
        model[1].weight.copy_(torch.tensor([[1.0, 1.0, -1.0]]))
    dg = gp.DependencyGraph.build(model, torch.randn(1, 2))
    np.testing.assert_allclose(magnitude(model, dg, p=1)[0], [4.0, 4.0, 5.0])
    np.testing.assert_allclose(magnitude(model, dg, p=2)[0], np.sqrt([6.0, 10.0, 17.0]))
    np.testing.assert_allclose(magnitude(model, dg, p=1, normalize="max")[0], [0.8, 0.8, 1.0])
    np.testing.assert_allclose(magnitude(model, dg, p=1, normalize=True)[0], [0.8, 0.8, 1.0])
    np.testing.assert_allclose(magnitude(model, dg, p=1, normalize="sum")[0], [4 / 13, 4 / 13, 5 / 13])
    np.testing.assert_allclose(magnitude(model, dg, p=1, roles=("out",))[0], [3.0, 3.0, 4.0])


def test_bn_scale_is_mean_abs_gamma_over_the_groups_norms() -> None:
    model, x, _ = _resnetlet()
    with torch.no_grad():
        model.bn0.weight.copy_(torch.tensor([1.0, -2.0, 0.5, 3.0]))
        model.bn2.weight.copy_(torch.tensor([3.0, 2.0, -0.5, 1.0]))
        model.bn1.weight.copy_(torch.tensor([0.1, -0.2, 0.3, -0.4, 0.5]))
    dg = gp.DependencyGraph.build(model, x)
    scores = bn_scale(model, dg)
    by_param = {m.param: g.id for g in dg.groups for m in g.members if m.role != "in"}
    np.testing.assert_allclose(scores[by_param["bn0.weight"]], [2.0, 2.0, 0.5, 2.0])
    np.testing.assert_allclose(scores[by_param["bn1.weight"]], [0.1, 0.2, 0.3, 0.4, 0.5])
    np.testing.assert_allclose(bn_scale(model, dg, reduce="max")[by_param["bn0.weight"]], [3, 2, 0.5, 3])
    # a group without a norm layer is not scored, so selection leaves it whole
    mlp, xm, _ = _mlp()
    assert bn_scale(mlp, gp.DependencyGraph.build(mlp, xm)) == {}


def test_random_is_seeded() -> None:
    model, x, _ = _resnetlet()
    dg = gp.DependencyGraph.build(model, x)
    a, b, c = (gp.score("random", model, dg, seed=s) for s in (3, 3, 4))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert any(not np.array_equal(a[k], c[k]) for k in a)


# --- oracle ---------------------------------------------------------------------------------------
def test_oracle_equals_loss_change_of_the_slim_model() -> None:
    model, x, y = _resnetlet()
    dg = gp.DependencyGraph.build(model, x)
    data = [(x[:5], y[:5]), (x[5:], y[5:])]  # unequal batches: weighted by size
    scores = oracle(model, dg, data=data, loss_fn=F.cross_entropy)
    base = _loss(model, x, y)
    prunable = [g for g in dg.groups if g.prunable]
    assert len(prunable) == 2 and set(scores) == {g.id for g in prunable}
    for g in prunable:
        for c in range(g.size):
            slim = gp.apply(model, dg, {g.id: [c]})
            assert scores[g.id][c] == pytest.approx(_loss(slim, x, y) - base, abs=2e-6)


def test_oracle_batching_does_not_change_the_answer() -> None:
    model, x, y = _resnetlet()
    dg = gp.DependencyGraph.build(model, x)
    one = oracle(model, dg, data=[(x, y)], loss_fn=F.cross_entropy, batch_ablations=1)
    many = oracle(model, dg, data=[(x, y)], loss_fn=F.cross_entropy, batch_ablations=64)
    for k in one:
        np.testing.assert_allclose(one[k], many[k], atol=1e-6)


def test_oracle_falls_back_when_the_loss_cannot_be_vectorised() -> None:
    model, x, y = _mlp()
    dg = gp.DependencyGraph.build(model, x)

    def loss_fn(out, t):  # float() of a batched tensor fails under vmap
        return F.cross_entropy(out, t) * (1.0 + 0.0 * float(out.detach().sum()))

    got = oracle(model, dg, data=[(x, y)], loss_fn=loss_fn)[0]
    base = _mlp_loss_without(model, x, y, [])
    want = [_mlp_loss_without(model, x, y, [c]) - base for c in range(5)]
    np.testing.assert_allclose(got, want, atol=1e-6)


# --- shapley --------------------------------------------------------------------------------------
def _exact_shapley(model, x, y, n: int) -> np.ndarray:
    value = {s: _mlp_loss_without(model, x, y, s) for r in range(n + 1)
             for s in itertools.combinations(range(n), r)}
    phi = np.zeros(n)
    for i in range(n):
        for s, v in value.items():
            if i in s:
                continue
            w = math.factorial(len(s)) * math.factorial(n - len(s) - 1) / math.factorial(n)
            phi[i] += w * (value[tuple(sorted(s + (i,)))] - v)
    return phi


def test_shapley_converges_to_exact_shapley_values() -> None:
    model, x, y = _mlp()
    dg = gp.DependencyGraph.build(model, x)
    exact = _exact_shapley(model, x, y, 5)
    est = shapley(model, dg, data=[(x, y)], loss_fn=F.cross_entropy, permutations=1500, progress=False)[0]
    assert np.abs(est - exact).max() < 0.05 * np.abs(exact).max()
    assert np.argsort(est).tolist() == np.argsort(exact).tolist()


def test_shapley_efficiency_seed_and_truncation() -> None:
    model, x, y = _mlp(hidden=6, seed=1)
    dg = gp.DependencyGraph.build(model, x)
    data = [(x[:20], y[:20]), (x[20:], y[20:])]
    a = shapley(model, dg, data=data, loss_fn=F.cross_entropy, permutations=3, seed=7, progress=False)[0]
    b = shapley(model, dg, data=data, loss_fn=F.cross_entropy, permutations=3, seed=7, progress=False)[0]
    np.testing.assert_array_equal(a, b)
    # every permutation's marginals add up to L(all removed) - L(none removed)
    total = _mlp_loss_without(model, x, y, range(6)) - _mlp_loss_without(model, x, y, [])
    assert a.sum() == pytest.approx(total, abs=1e-5)
    # truncation: a huge tolerance stops every permutation at its first removal
    t = shapley(model, dg, data=data, loss_fn=F.cross_entropy, permutations=1, seed=7, truncation=10.0,
                progress=False)[0]
    assert np.count_nonzero(t) == 1


# --- taylor ---------------------------------------------------------------------------------------
def test_taylor_is_squared_gradient_times_weight_averaged_over_batches() -> None:
    model, x, y = _mlp()
    dg = gp.DependencyGraph.build(model, x)
    data = [(x[:16], y[:16]), (x[16:], y[16:])]
    want = np.zeros(5)
    for xb, yb in data:
        w = model[2].weight.detach().clone().requires_grad_(True)
        loss = F.cross_entropy(F.linear(model[1](model[0](xb)), w, model[2].bias), yb)
        (g,) = torch.autograd.grad(loss, w)
        want += ((g * w).sum(0).detach().numpy() ** 2) / 2
    np.testing.assert_allclose(taylor(model, dg, data=data, loss_fn=F.cross_entropy)[0], want, rtol=1e-5)
    assert all(p.grad is None for p in model.parameters())


def test_taylor_tracks_oracle_for_small_perturbations() -> None:
    model, x, y = _resnetlet()
    model, x = model.double(), x.double()
    with torch.no_grad():  # make every channel's contribution small: removal is a small step
        model.conv2.weight.mul_(1e-3)
        model.fc.weight.mul_(1e-3)
    dg = gp.DependencyGraph.build(model, x)
    data = [(x, y)]
    exact = oracle(model, dg, data=data, loss_fn=F.cross_entropy)
    first = taylor(model, dg, data=data, loss_fn=F.cross_entropy, square=False)
    squared = taylor(model, dg, data=data, loss_fn=F.cross_entropy)
    for gid in exact:
        scale = np.abs(exact[gid]).max()
        assert scale > 1e-8
        assert np.abs(first[gid] - exact[gid]).max() < 0.02 * scale
        np.testing.assert_allclose(squared[gid], first[gid] ** 2, rtol=1e-6)


# --- hessian --------------------------------------------------------------------------------------
def _linear_pair() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """Linear(4, 4) = identity, then Linear(4, 2): the loss is quadratic in the second layer."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(4))
        model[0].bias.zero_()
    hadamard = torch.tensor([[1, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]], dtype=torch.float)
    x = hadamard * torch.tensor([1.0, 2.0, 0.5, 3.0])  # orthogonal columns: the Hessian is diagonal
    return model, x, torch.randn(4, 2)


def test_hessian_hutchinson_is_exact_for_a_diagonal_hessian() -> None:
    model, x, y = _linear_pair()
    dg = gp.DependencyGraph.build(model, x)
    got = hessian(model, dg, data=[(x, y)], loss_fn=F.mse_loss, estimator="hutchinson", probes=2)[0]
    # L = mean over 4x2 outputs of squared error: d2L/dW[o, j]^2 = 2 / 8 * sum_b x[b, j]^2
    h = 2 / 8 * (x ** 2).sum(0)
    w2 = (model[1].weight.detach() ** 2).sum(0)
    np.testing.assert_allclose(got, 0.5 * (h * w2).numpy(), rtol=1e-5)


def test_hessian_fisher_is_mean_squared_per_sample_gradient() -> None:
    model, x, y = _mlp()
    dg = gp.DependencyGraph.build(model, x)
    fisher = torch.zeros_like(model[2].weight)
    for i in range(len(x)):
        w = model[2].weight.detach().clone().requires_grad_(True)
        loss = F.cross_entropy(F.linear(model[1](model[0](x[i:i + 1])), w, model[2].bias), y[i:i + 1])
        (g,) = torch.autograd.grad(loss, w)
        fisher += g ** 2 / len(x)
    want = 0.5 * (fisher * model[2].weight.detach() ** 2).sum(0).numpy()
    data = [(x[:10], y[:10]), (x[10:], y[10:])]
    np.testing.assert_allclose(hessian(model, dg, data=data, loss_fn=F.cross_entropy)[0], want, rtol=1e-4)


# --- errors and contracts ---------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["taylor", "hessian", "oracle", "shapley"])
def test_data_driven_criteria_reject_missing_or_bad_input(method: str) -> None:
    model, x, y = _mlp()
    dg = gp.DependencyGraph.build(model, x)
    with pytest.raises(gp.InputError, match="data"):
        gp.score(method, model, dg, loss_fn=F.cross_entropy)
    with pytest.raises(gp.InputError, match="empty"):
        gp.score(method, model, dg, data=[], loss_fn=F.cross_entropy)
    with pytest.raises(gp.InputError, match="loss_fn"):
        gp.score(method, model, dg, data=[(x, y)])
    with pytest.raises(gp.InputError, match=r"\(inputs, targets\)"):
        gp.score(method, model, dg, data=[x], loss_fn=F.cross_entropy)
    bad = x.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(gp.LossError, match="NaN|nan") as info:
        gp.score(method, model, dg, data=[(bad, y)], loss_fn=F.cross_entropy)
    assert isinstance(info.value, gp.GraphPruneError)


def test_criteria_leave_the_model_untouched_and_restore_train_mode() -> None:
    model, x, y = _resnetlet()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dg = gp.DependencyGraph.build(model, x)
    for name, options in (("taylor", {}), ("hessian", {}), ("oracle", {"progress": False}),
                          ("shapley", {"permutations": 1, "progress": False})):
        gp.score(name, model, dg, data=[(x, y)], loss_fn=F.cross_entropy, **options)
    assert all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_every_criterion_prunes_through_gp_prune() -> None:
    model, x, y = _resnetlet()
    for name in ("magnitude", "l1", "l2", "bn_scale", "random", "taylor", "hessian", "oracle", "shapley"):
        assert name in CRITERIA
        options = {"shapley": {"permutations": 2, "progress": False}, "oracle": {"progress": False}}.get(name, {})
        result = gp.prune(model, x, method=name, ratio=0.5, data=[(x, y)], loss_fn=F.cross_entropy, **options)
        assert result.after.macs < result.before.macs
        assert gp.verify(model, x, result.plan) < 1e-5


def test_score_accepts_callables_and_checks_shapes() -> None:
    model, x, _ = _mlp()
    dg = gp.DependencyGraph.build(model, x)
    s = gp.score(lambda model, dg, **kw: {0: np.arange(5.0)}, model, dg)
    assert s[0].tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(gp.PlanError, match="shape"):
        gp.score(lambda model, dg, **kw: {0: np.arange(4.0)}, model, dg)
    with pytest.raises(gp.InputError, match="unknown method"):
        gp.score("nope", model, dg)


def test_unknown_criterion_options_raise_and_name_the_valid_ones() -> None:
    # criteria take **_, so a typo once went unnoticed
    model, x, _ = _mlp()
    dg = gp.DependencyGraph.build(model, x)
    with pytest.raises(gp.InputError, match=r"unknown option 'pp' \(did you mean 'p'\?\).*p, roles, normalize"):
        gp.score("magnitude", model, dg, pp=3)
    with pytest.raises(gp.InputError, match="unknown options 'sed' \\(did you mean 'seed'\\?\\), 'x'; criterion 'random' takes data, loss_fn, seed"):
        gp.score("random", model, dg, sed=1, x=2)
    from graphprune.importance import criterion_options

    assert criterion_options("l2") == ("data", "loss_fn", "roles", "normalize")
    assert criterion_options("shapley")[:3] == ("data", "loss_fn", "permutations")
    assert criterion_options(lambda model, dg, *, k=1, **_: {}) == ("data", "loss_fn", "k")
    assert criterion_options(lambda model, dg, **options: {}) is None


# --- activation (Wanda) -----------------------------------------------------------------------------
def test_activation_agrees_with_a_hand_computed_wanda_sum_on_a_two_layer_mlp() -> None:
    model, x, _ = _mlp(hidden=5)
    dg = gp.DependencyGraph.build(model, x)
    batches = [x[:10], x[10:]]
    w1, w2 = model[0].weight.detach().double(), model[2].weight.detach().double()
    with torch.no_grad():
        h = model[1](model[0](x)).double()
    x_norm = x.double().norm(dim=0)  # over every calibration sample, both batches
    h_norm = h.norm(dim=0)
    producer = (w1.abs() * x_norm).sum(1)  # rows of fc1: sum_i |W1[c, i]| * ||x_i||
    consumer = w2.abs().sum(0) * h_norm  # columns of fc2: ||h_c|| * sum_o |W2[o, c]|
    got = gp.score("activation", model, dg, data=batches)[0]
    np.testing.assert_allclose(got, (producer + consumer).numpy(), rtol=1e-6)
    only_in = gp.score("activation", model, dg, data=batches, roles=("in",))[0]
    np.testing.assert_allclose(only_in, consumer.numpy(), rtol=1e-6)


def test_activation_scores_a_never_active_channel_lowest_though_its_weights_are_large() -> None:
    model, x, y = _mlp(hidden=6)
    with torch.no_grad():
        model[0].weight[3] = 0.0
        model[0].bias[3] = -1.0  # ReLU(-1) = 0 on every input
        model[2].weight[:, 3] = 10.0  # the largest consumer column: magnitude keeps it
    dg = gp.DependencyGraph.build(model, x)
    act = gp.score("activation", model, dg, data=[(x, y)], roles=("in",))[0]
    assert int(np.argmin(act)) == 3 and act[3] == 0.0
    assert int(np.argmax(gp.score("magnitude", model, dg, roles=("in",))[0])) == 3
    result = gp.prune(model, x, method="activation", ratio=0.5, data=[(x, y)], roles=("in",))
    assert 3 in result.plan[0]
    assert gp.verify(model, x, result.plan) < 1e-5


def test_activation_pairs_grouped_conv_weights_with_the_input_channel_they_read() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 1), nn.ReLU(), nn.Conv2d(4, 6, 3, groups=2), nn.Flatten(), nn.Linear(6 * 16, 3))
    x = torch.randn(5, 2, 6, 6)
    dg = gp.DependencyGraph.build(model, x, grouped="channels")
    gid = next(g.id for g in dg.groups if any(m.param == "0.weight" and m.dim == 0 for m in g.members))
    with torch.no_grad():
        a = model[1](model[0](x)).double()
    norms = a.transpose(0, 1).reshape(4, -1).norm(dim=1)
    w0, w2 = model[0].weight.detach().double(), model[2].weight.detach().double()
    consumer = torch.zeros(4, dtype=torch.float64)
    for o in range(6):  # output o of the grouped conv reads input channels of its group
        g = o // 3
        consumer[g * 2:(g + 1) * 2] += w2[o].abs().sum((1, 2)) * norms[g * 2:(g + 1) * 2]
    producer = (w0.abs().sum((2, 3)) * x.double().transpose(0, 1).reshape(2, -1).norm(dim=1)).sum(1)
    per_channel = consumer + producer  # channel c of conv 0 is column c % 2 of conv 2's group c // 2
    member = next(m for m in dg.groups[gid].members if m.param == "0.weight" and m.dim == 0)
    want = np.zeros(dg.groups[gid].size)
    np.add.at(want, member.channels, per_channel.numpy()[member.positions])
    got = gp.score("activation", model, dg, data=[x])[gid]
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_activation_rejects_missing_or_bad_data_and_leaves_the_model_untouched() -> None:
    model, x, y = _resnetlet()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dg = gp.DependencyGraph.build(model, x)
    with pytest.raises(gp.InputError, match="data"):
        gp.score("activation", model, dg)
    with pytest.raises(gp.InputError, match="empty"):
        gp.score("activation", model, dg, data=[])
    with pytest.raises(gp.InputError, match="dict"):
        gp.score("activation", model, dg, data=[{"x": x}])
    scores = gp.score("activation", model, dg, data=[(x, y)], loss_fn=F.cross_entropy)
    assert set(scores) == {g.id for g in dg.groups if g.prunable}
    assert all(np.all(s >= 0) and np.all(np.isfinite(s)) for s in scores.values())
    assert all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@pytest.mark.slow  # torch.export of the model: ~10 s on a loaded machine
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_activation_takes_dict_batches_on_a_hugging_face_llama() -> None:
    tf = pytest.importorskip("transformers", reason="the integration extra installs transformers")
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32)).eval()
    ids = torch.randint(0, 64, (2, 8))
    dg = gp.DependencyGraph.build(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    batches = [{"input_ids": b, "attention_mask": torch.ones_like(b), "labels": b}  # labels: not a graph input
               for b in torch.randint(0, 64, (3, 2, 8))]
    seen = []
    hook = model.model.layers[0].mlp.down_proj.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    try:
        with torch.no_grad():
            for b in batches:
                model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    finally:
        hook.remove()
    x = torch.cat(seen).double().reshape(-1, 48)
    want = x.norm(dim=0) * model.model.layers[0].mlp.down_proj.weight.detach().double().abs().sum(0)
    gid = next(g.id for g in dg.groups if any(m.param.endswith("down_proj.weight") and m.dim == 1 for m in g.members))
    scores = gp.score("activation", model, dg, data=batches, roles=("in",))
    np.testing.assert_allclose(scores[gid], want.numpy(), rtol=1e-5)
    assert set(scores) == {g.id for g in dg.groups if g.prunable}
    assert all(s.shape == (dg.groups[k].size,) and np.all(np.isfinite(s)) for k, s in scores.items())
    with pytest.raises(gp.InputError, match="attention_mask"):
        gp.score("activation", model, dg, data=[{"input_ids": ids}])
