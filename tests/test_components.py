"""graphprune.components: the array union-find numbers components as scipy does."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

import graphprune.components
from graphprune.components import components


@pytest.mark.parametrize("rounds", [0, 1, 64])
@pytest.mark.parametrize("seed", range(6))
def test_components_number_classes_as_scipy_does(seed, rounds, monkeypatch):
    monkeypatch.setattr(graphprune.components, "_ROUNDS", rounds)  # 0, 1: scipy joins the trees left after that many
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 400))
    m = int(rng.integers(0, 3 * n))
    a, b = rng.integers(0, n, m), rng.integers(0, n, m)
    if seed % 2:  # long chains, as a residual stream couples one axis to the next
        a, b = np.arange(n - 1)[::-1], np.arange(1, n)[::-1]
    a32, b32 = a.astype(np.int32), b.astype(np.int32)
    expected = connected_components(coo_matrix((np.ones(len(a)), (a, b)), shape=(n, n)), directed=False)[1]
    assert components(n, a32, b32).tolist() == expected.tolist()
    assert a32.tolist() == a.tolist() and b32.tolist() == b.tolist()  # inputs untouched
