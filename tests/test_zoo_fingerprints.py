"""Slim zoo models stay what they were: groups, plans, code, widths, state shapes, counts.

The reference is ``tests/data/zoo_fingerprints.json`` (see ``tests/fingerprints.py``).
A failure means a change altered the slim model of a zoo model: either a regression, or
an intended change, after which the reference is rewritten and the commit says why.
"""

from __future__ import annotations

import json

import pytest
from fingerprints import BUILDS, REFERENCE, fingerprint

import graphprune as gp

EXPECTED = json.loads(REFERENCE.read_text())


@pytest.mark.parametrize("name", gp.zoo.list_models())
@pytest.mark.parametrize("build", list(BUILDS))
def test_slim_zoo_model_unchanged(name: str, build: str) -> None:
    assert fingerprint(name, build) == EXPECTED[f"{name}/{build}"]
