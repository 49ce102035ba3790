"""graphprune.distributed: two ranks on the CPU (gloo), launched with torchrun, give the
one-process scores, plan and fine-tuned weights on the union of their data.

The file is also the worker script: ``python -m torch.distributed.run --nproc_per_node 2
tests/test_distributed.py OUT`` runs ``worker`` on each rank, which writes what it computed
to ``OUT/rank<r>.pt``; the tests compare that with the same computations in this process.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import graphprune as gp
from graphprune.distributed import plan_digest, shard
from graphprune.errors import InputError, PlanMismatchError

REPO = Path(__file__).resolve().parents[1]
WORLD = 2
SHAPLEY = dict(permutations=3, seed=1, batch_ablations=4)  # 7 ablations per permutation: blocks of 4 to share
TRAIN = dict(epochs=1, lr=0.05, momentum=0.0, schedule=None, progress=False)


def make_model() -> torch.nn.Module:
    # no BatchNorm: under DDP each rank would normalise its own batch, not the union
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 6, 3, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(6, 4)).eval()


def make_data(n: int = 6) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 3, 6, 6, generator=g), torch.randint(0, 4, (4,), generator=g)) for _ in range(n)]


EXAMPLE = (torch.randn(1, 3, 6, 6),)


def flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def compute(data, *, ablation_data, train_data, shared: bool) -> dict:
    """Everything the tests compare; with ``shared`` through graphprune.distributed (this
    rank's shards), else in one process on all the data."""
    dist = gp.distributed
    model = make_model()
    dg = gp.DependencyGraph.build(model, EXAMPLE)
    fn = dist.score if shared else (lambda m, *a, split=None, **k: gp.score(m, *a, **k))
    out = {
        "taylor": fn("taylor", model, dg, data=data, loss_fn=F.cross_entropy),
        "hessian": fn("hessian", model, dg, data=data, loss_fn=F.cross_entropy),
        "oracle": fn("oracle", model, dg, data=data, loss_fn=F.cross_entropy),
        "activation": fn("activation", model, dg, data=data),
        # truncated: how many ablations run depends on the (all-reduced) losses
        "shapley_truncated": fn("shapley", model, dg, data=data, loss_fn=F.cross_entropy, truncation=0.2,
                                permutations=2, seed=2, batch_ablations=2, progress=False),
    }
    with dist.scoring(split="ablations" if shared else "data") as share:
        out["shapley"] = gp.score("shapley", model, dg, data=ablation_data, loss_fn=F.cross_entropy,
                                  progress=False, **SHAPLEY)
    out["ablations"] = getattr(share, "ablations", None)
    if shared:
        out["plan"] = dist.plan(model, dg, "taylor", 0.5, data=data, loss_fn=F.cross_entropy).to_json()
    else:
        out["plan"] = gp.select(dg, out["taylor"], 0.5).to_json()
    tuned = copy.deepcopy(model)
    gp.train.finetune(tuned, train_data, loss_fn=F.cross_entropy, ddp=shared, **TRAIN)
    out["finetuned"] = flat(tuned)
    result = dist.iterative_prune(model, EXAMPLE, ratio=0.5, steps=2, method="taylor", data=data,
                                  retrain=dict(TRAIN, data=train_data))
    out["iterative"] = [p.to_json() for p in result.history]
    out["iterative_params"] = flat(result.model)
    return out


def worker(out_dir: str) -> None:
    import torch.distributed as tdist

    torch.set_num_threads(1)
    tdist.init_process_group("gloo")
    rank = tdist.get_rank()
    try:
        data = make_data()
        train = [(x, y) for x, y in data]
        res = compute(shard(data), ablation_data=data, train_data=shard(train), shared=True)
        try:  # each rank proposes its own plan: every rank must refuse it
            gp.distributed.check_plan(gp.Plan({0: [rank]}))
            res["mismatch"] = None
        except PlanMismatchError as exc:
            res["mismatch"] = str(exc)
        gathered = [torch.zeros_like(res["finetuned"]) for _ in range(WORLD)]
        tdist.all_gather(gathered, res["finetuned"])
        res["finetuned_all"] = gathered
        torch.save(res, Path(out_dir) / f"rank{rank}.pt")
    finally:
        tdist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
           str(Path(__file__).resolve()), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    ranks_said = "\n".join(line for line in proc.stderr.splitlines() if line.startswith("[rank"))
    assert proc.returncode == 0, (ranks_said or proc.stderr)[-4000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.fixture(scope="module")
def single():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        data = make_data()
        # DDP averages the gradients of equal batches: one step = one step on both ranks' batches
        train = [(torch.cat([data[i][0], data[i + 1][0]]), torch.cat([data[i][1], data[i + 1][1]]))
                 for i in range(0, len(data), WORLD)]
        return compute(data, ablation_data=data, train_data=train, shared=False)
    finally:
        torch.set_num_threads(threads)


def close(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9 * max(1e-30, float(np.abs(b).max())))


@pytest.mark.parametrize("criterion", ["taylor", "hessian", "activation", "oracle", "shapley",
                                       "shapley_truncated"])
def test_scores_equal_one_process(ranks, single, criterion):
    for res in ranks:
        assert sorted(res[criterion]) == sorted(single[criterion])
        for gid, s in single[criterion].items():
            close(res[criterion][gid], s)
        assert any(np.abs(s).max() > 0 for s in single[criterion].values())


def test_ablations_shared_out(ranks):
    # shapley on groups of 8 and 6 channels: first (none, all removed), one block of 2, then
    # 3 permutations x (size - 1) ablations in blocks of 4, block k on rank k % 2:
    # 21 = 4+4+4+4+4+1 -> 12 | 9 and 15 = 4+4+4+3 -> 8 | 7
    assert [res["ablations"] for res in ranks] == [2 + 12 + 2 + 8, 9 + 7]


def test_plan_equals_one_process(ranks, single):
    assert gp.Plan.from_json(single["plan"]).n_removed > 0
    assert [res["plan"] for res in ranks] == [single["plan"]] * WORLD


def test_digest_mismatch_raises_on_every_rank(ranks):
    for res in ranks:
        assert res["mismatch"] is not None and "ranks [1]" in res["mismatch"]


def test_ddp_finetune_same_on_every_rank_and_as_one_process(ranks, single):
    a, b = ranks[0]["finetuned_all"]
    assert torch.equal(a, b)
    assert not torch.equal(a, flat(make_model()))  # it trained
    close(a, single["finetuned"])


def test_iterative_prune(ranks, single):
    for res in ranks:
        assert res["iterative"] == single["iterative"]
        close(res["iterative_params"], single["iterative_params"])
    assert torch.equal(ranks[0]["iterative_params"], ranks[1]["iterative_params"])


# --- one process -------------------------------------------------------------------------------
def test_shard():
    assert [list(shard(range(5), r, 2)) for r in range(2)] == [[0, 2, 4], [1, 3]]
    assert [len(shard(range(5), r, 2)) for r in range(2)] == [3, 2]
    assert list(shard(range(3))) == [0, 1, 2]  # one process: everything
    with pytest.raises(InputError):
        shard(range(3), 2, 2)


def test_one_process_is_unchanged():
    model, data = make_model(), make_data(2)
    dg = gp.DependencyGraph.build(model, EXAMPLE)
    a = gp.distributed.score("taylor", model, dg, data=data, loss_fn=F.cross_entropy)
    b = gp.score("taylor", model, dg, data=data, loss_fn=F.cross_entropy)
    assert all(np.array_equal(a[g], b[g]) for g in b)
    plan = gp.Plan({0: [1, 2]})
    assert gp.distributed.broadcast_plan(plan) == plan
    assert gp.distributed.check_plan(plan, dg) == plan_digest(plan, dg) != plan_digest(plan)
    with pytest.raises(InputError, match="split"):
        gp.distributed.score("taylor", model, dg, data=data, loss_fn=F.cross_entropy, split="rows")


def test_several_processes_without_a_group_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    model = make_model()
    dg = gp.DependencyGraph.build(model, EXAMPLE)
    with pytest.raises(InputError, match="init_process_group"):
        gp.distributed.score("magnitude", model, dg)
    with pytest.raises(InputError, match="process group"):
        gp.train.finetune(model, make_data(1), ddp=True, progress=False)


if __name__ == "__main__":
    worker(sys.argv[1])
