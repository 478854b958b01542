"""Shared set-up of the OT tests: one intra-op thread (the two-process gloo runs: tests/helpers/distributed.py)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny problems: one intra-op thread (on a shared, busy CPU, OpenMP barriers cost ms per op)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
