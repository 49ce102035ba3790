"""Connected components of an undirected graph given as two arrays of edge ends.

The labelling pass (``graphprune.labels``) joins coupled channel elements into classes, and
grouping (``graphprune.graph``) joins classes that share a producer, both with
``components``: an array union-find that numbers components as scipy's
``connected_components`` does, with a few integers per edge of temporaries (scipy's makes
two float64 sparse copies of the graph, which dominated the memory of a 70B-shaped plan).
"""

from __future__ import annotations

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

__all__ = ["components"]

_ROUNDS = 64  # hooking rounds before components hands the rest to scipy


def components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Connected component of every node ``0 .. n-1`` of the undirected graph with edges
    ``a[i] -- b[i]``, numbered in order of their smallest node (as scipy's ``connected_components``).

    Union-find on arrays: every round, each root hooks under the smallest root it shares an
    edge with (when that one is smaller), then pointers jump until each node points at its
    root; edges inside one tree are dropped. Two or three rounds join a Llama's couplings. Temporaries are a few ints per edge at most
    (scipy's copies the graph twice, as float64 sparse matrices).

    >>> components(5, np.array([3, 1]), np.array([4, 3])).tolist()
    [0, 1, 2, 1, 1]
    """
    dtype = np.int32 if n <= 2**31 - 1 else np.int64
    parent = np.arange(n, dtype=dtype)
    rounds = 0
    while a.size:
        ra = parent[a]
        rb = parent[b]
        live = ra != rb
        if not live.any():
            break
        rounds += 1
        if rounds > _ROUNDS:  # not seen on real graphs: scipy joins the trees left
            ra, rb = ra[live], rb[live]
            adj = coo_matrix((np.ones(len(ra), dtype=np.int8), (ra, rb)), shape=(n, n))
            joined = connected_components(adj, directed=False)[1][parent]
            _, first, inverse = np.unique(joined, return_index=True, return_inverse=True)
            rank = np.empty(len(first), dtype=dtype)
            rank[np.argsort(first, kind="stable")] = np.arange(len(first), dtype=dtype)
            return rank[inverse.reshape(-1)]
        if not live.all():  # one array at a time: the old one goes as its filtered copy comes
            a = a[live]
            b = b[live]
            ra = ra[live]
            rb = rb[live]
        del live
        lo = np.minimum(ra, rb)
        hi = np.maximum(ra, rb, out=ra)
        del rb
        np.minimum.at(parent, hi, lo)  # each root hooks under its smallest neighbouring root: a forest
        del hi, lo
        while True:
            up = parent[parent]
            if np.array_equal(up, parent):
                break
            parent = up
    root = parent == np.arange(n, dtype=dtype)
    return (np.cumsum(root, dtype=dtype) - 1)[parent]
