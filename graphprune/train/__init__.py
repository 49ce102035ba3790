"""Recovery and training-time pruning: fine-tuning, restarts, schedules, regularisers, SPP, C-SGD, AOFP.

=========================  ========================================================================
``finetune``/``evaluate``  plain-torch training loop (progress bar, eval callback, early stop, plugins)
``restart``                slim model initialised by ``continue`` / ``rewind`` / ``reinit``
``iterative_prune``        N prune-retrain steps, constant or geometric, optional per-group ceilings
``capped_select``          selection under a target that respects per-group ceilings
``sensitivity``            per-group sensitivity curves -> ceilings
``redundancy``             gradient-singularity estimate of each group's prunable fraction ("auto")
``L1``/``L2``/...          regulariser plugins: ``GroupLasso``, ``BNSparsity``, ``AutoBalanced``
``spp``/``SPP``            structured probabilistic pruning
``csgd``/``CSGD``/``merge``  centripetal SGD and the lossless merge of identical channels
``aofp``/``AOFP``          approximated oracle filter pruning to a MACs target
``to_structured``          unstructured magnitude sparsity -> removal of dead channels
``ChannelMasker``          train with channels masked exactly as removed
=========================  ========================================================================
"""

from graphprune.train.aofp import AOFP, AOFPResult, aofp
from graphprune.train.csgd import CSGD, CSGDResult, cluster_channels, csgd, kmeans, merge, unify
from graphprune.train.finetune import FinetuneResult, accuracy, evaluate, finetune, make_optimizer
from graphprune.train.masking import ChannelMasker
from graphprune.train.redundancy import Redundancy, effective_rank, redundancy
from graphprune.train.regularizers import L1, L2, AutoBalanced, BNSparsity, GroupLasso, GroupRegularizer
from graphprune.train.restart import MODES, Snapshot, reinitialize, restart, snapshot
from graphprune.train.schedules import (
    ScheduleResult,
    Sensitivity,
    capped_select,
    iterative_prune,
    schedule_fractions,
    sensitivity,
)
from graphprune.train.spp import SPP, SPPResult, spp, spp_increment
from graphprune.train.unstructured import (
    StructuredResult,
    WeightMask,
    dead_channels,
    magnitude_sparsify,
    to_structured,
)

__all__ = [
    "AOFP", "AOFPResult", "aofp", "CSGD", "CSGDResult", "cluster_channels", "csgd", "kmeans", "merge", "unify",
    "FinetuneResult", "accuracy", "evaluate", "finetune", "make_optimizer", "ChannelMasker",
    "Redundancy", "effective_rank", "redundancy", "L1", "L2", "AutoBalanced", "BNSparsity", "GroupLasso",
    "GroupRegularizer", "MODES", "Snapshot", "reinitialize", "restart", "snapshot", "ScheduleResult",
    "Sensitivity", "capped_select", "iterative_prune", "schedule_fractions", "sensitivity", "SPP", "SPPResult",
    "spp", "spp_increment", "StructuredResult", "WeightMask", "dead_channels", "magnitude_sparsify",
    "to_structured",
]
