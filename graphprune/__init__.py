"""graphprune: structural channel pruning of PyTorch models through torch.fx graphs."""

from graphprune import distributed, errors, importance, lean, train, zoo
from graphprune.api import PruneResult, prune
from graphprune.errors import (
    GraphPruneError,
    InputError,
    LossError,
    PlanError,
    RewriteError,
    SerializationError,
    TraceError,
    UnsupportedOpError,
)
from graphprune.graph import DependencyGraph, Group, Member
from graphprune.importance import CRITERIA, score
from graphprune.io import export, load, save, set_origin
from graphprune.metrics import Counts, count, latency
from graphprune.parts import PartsResult, prune_parts
from graphprune.plan import Plan
from graphprune.rewrite import apply
from graphprune.rules import register
from graphprune.select import select
from graphprune.steps import Pruner
from graphprune.streaming import SlimCheckpoint, apply_checkpoint, score_checkpoint
from graphprune.tracing import trace
from graphprune.verify import Verification, masked_model, verify

__version__ = "0.1.0"

__all__ = [
    "Counts", "DependencyGraph", "GraphPruneError", "Group", "InputError", "Member", "Plan",
    "PlanError", "PruneResult", "RewriteError", "SerializationError", "TraceError",
    "UnsupportedOpError", "apply", "count", "errors", "export", "latency", "lean", "load", "masked_model", "prune",
    "register", "save", "score", "select", "set_origin", "trace", "train", "verify", "zoo",
    "CRITERIA", "LossError", "importance", "Pruner", "Verification", "PartsResult", "prune_parts",
    "SlimCheckpoint", "apply_checkpoint", "score_checkpoint", "distributed",
]
