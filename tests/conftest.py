"""Shared test setup.

- One intra-op thread: the test models are tiny, and on a busy 2-core machine
  OpenMP's spinning threads make each small convolution ~50x slower.
- Every test starts from the same global RNG state, so randomly initialised test
  models are reproducible.
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed_torch():
    state = torch.get_rng_state()
    torch.manual_seed(0)
    yield
    torch.set_rng_state(state)
