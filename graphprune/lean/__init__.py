"""LEAN: operator-norm channel graph and longest-chain extraction (Schoonhoven et al.).

LEAN ranks *chains* of convolutions rather than filters one by one. Every kernel
``W[j, i]`` of a layer (input channel ``i`` to output channel ``j``) is an edge of a
channel graph, weighted by its operator norm as a convolution (BatchNorm scaling
folded in). The value of a path is the product of its edge weights; LEAN repeatedly
extracts the highest-valued path whose running product stays ``>= 1``, keeps its
kernels, deletes them from the graph and recomputes, until a kernel budget is met;
the budget is then filled with the largest remaining single edges. A channel
survives when a kept kernel enters it and one leaves it.

One job per module, each usable alone:

- ``norms``: ``kernel_operator_norms(weight, stride, n)`` (exact per-kernel operator
  norms of periodic convolutions, batched), ``kernel_l1_norms``, ``layer_operator_norm``.
- ``channel_graph``: ``ChannelGraph.build(model, dg)``, the layered channel DAG,
  built from the rule table (so fx and ``torch.export`` graphs give the same one).
- ``paths``: ``extract(cg, keep)``, longest-path extraction or a global threshold.
- ``kernels``: ``plan_from_kernels(dg, cg, extraction)``, surviving channels as a
  ``gp.Plan`` plus kernel masks; ``KernelMasker`` keeps masked kernels at zero.
- ``prune``: ``prune(model, example_inputs, ratio, steps=...)``, the method behind
  ``gp.prune(method="lean")``, with LEAN's geometric schedule.

>>> import torch, graphprune as gp
>>> model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(),
...                             torch.nn.Conv2d(4, 4, 3, padding=1), torch.nn.ReLU(),
...                             torch.nn.Conv2d(4, 2, 1))
>>> dg = gp.DependencyGraph.build(model, torch.randn(1, 1, 8, 8))
>>> cg = ChannelGraph.build(model, dg)  # the output layer is left out by default
>>> cg.n_kernels
20
>>> ext = extract(cg, keep=10)
>>> ext.n_kept
10
>>> lp = plan_from_kernels(dg, cg, ext)
>>> lp.kept_kernels <= 10
True
"""

from graphprune.lean.channel_graph import CRITERIA, Block, ChannelGraph
from graphprune.lean.kernels import (
    KernelMasker,
    LeanPlan,
    apply_kernel_masks,
    plan_from_kernels,
    slim_kernel_masks,
)
from graphprune.lean.norms import kernel_l1_norms, kernel_operator_norms, layer_operator_norm
from graphprune.lean.paths import Extraction, extract
from graphprune.lean.prune import LeanPlanner, geometric_keep, lean_plan, prune

__all__ = [
    "kernel_operator_norms", "kernel_l1_norms", "layer_operator_norm", "Block", "ChannelGraph",
    "Extraction", "extract", "LeanPlan", "plan_from_kernels", "slim_kernel_masks",
    "apply_kernel_masks", "KernelMasker", "geometric_keep", "lean_plan", "prune", "CRITERIA", "LeanPlanner",
]
