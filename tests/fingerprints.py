"""Fingerprints of the slim zoo models, to show that a change of the engine's code keeps them.

A fingerprint pins what a slim model is, independently of the machine's floating-point
rounding: the dependency groups (members with their positions), the plan, the slim
GraphModule's generated code, every submodule's type and width attributes, the names,
shapes and dtypes of its state, and its parameter and MAC counts. Plans are drawn with
the seeded ``random`` criterion so that they do not depend on weight values. Values are
then fixed by construction (each slim tensor is the original sliced at the members'
positions) and checked by ``gp.verify`` elsewhere.

Regenerate the reference after a change that is meant to alter slim models, and say so
in the commit message::

    python tests/fingerprints.py --write
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch

import graphprune as gp

REFERENCE = Path(__file__).parent / "data" / "zoo_fingerprints.json"
BUILDS = {"default": {}, "heads": {"factor": "heads"}, "groups": {"grouped": "groups"}}
PLANS = {
    "local50": {"ratio": 0.5},
    "global30": {"ratio": 0.3, "scope": "global", "round_to": 4},
}


def _sha(value: object) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _groups(dg: gp.DependencyGraph) -> list:
    return [[g.id, g.size, g.prunable, g.reason, g.removable, g.exact, g.inexact_reason, list(g.producers),
             [[m.param, m.dim, m.role, m.positions.tolist(), m.channels.tolist()] for m in g.members]]
            for g in dg.groups]


def _modules(slim: torch.nn.Module) -> list:
    return [[name, type(m).__name__, m.extra_repr()] for name, m in slim.named_modules()]


def fingerprint(name: str, build: str) -> dict[str, dict[str, str]]:
    """Fingerprints of zoo model ``name`` built with ``BUILDS[build]``, one per plan of ``PLANS``."""
    model, inputs = gp.zoo.create(name)
    dg = gp.DependencyGraph.build(model, inputs, **BUILDS[build])
    scores = gp.score("random", model, dg, seed=0)
    out = {}
    for plan_name, options in PLANS.items():
        plan = gp.select(dg, scores, **options)
        slim = gp.apply(model, dg, plan)
        counts = gp.count(slim, inputs, batch_size=1)  # the whole example batch, as pinned
        out[plan_name] = {
            "groups": _sha(_groups(dg)),
            "plan": _sha(plan.to_json()),
            "code": _sha(slim.code),
            "modules": _sha(_modules(slim)),
            "state": _sha([[k, list(v.shape), str(v.dtype)] for k, v in slim.state_dict().items()]),
            "counts": f"{counts.params}/{counts.macs}",
        }
    return out


def all_fingerprints() -> dict[str, dict]:
    return {f"{name}/{build}": fingerprint(name, build) for name in gp.zoo.list_models() for build in BUILDS}


if __name__ == "__main__":
    torch.set_num_threads(1)
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python tests/fingerprints.py --write")
    REFERENCE.write_text(json.dumps(all_fingerprints(), indent=1, sort_keys=True) + "\n")
    print(f"wrote {REFERENCE}")
