"""Fixtures shared by the daemon unit tests that run sessions over in-process servers (tests/support/swarms.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import torch

from tests.support.swarms import LocalSwarm, N
from tests.support.tinymodels import tiny_llama


@pytest.fixture
def model() -> torch.nn.Module:
    """The tiny random Llama LocalSwarm's servers serve (N blocks)."""
    return tiny_llama(num_hidden_layers=N)


@pytest.fixture
async def swarm(model: torch.nn.Module) -> AsyncIterator[LocalSwarm]:
    """A started LocalSwarm with no servers yet; each test adds the spans it needs."""
    s = LocalSwarm(model)
    await s.start()
    yield s
    await s.close()
