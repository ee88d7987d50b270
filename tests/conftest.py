"""Shared fixtures. Keep each fixture small and documented; models here are tiny unless marked smollm2."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedModel


def pytest_configure(config: pytest.Config) -> None:
    """One torch thread per test process unless PETAL_TEST_THREADS says otherwise.

    Test runs share small machines with other jobs; with two OpenMP threads on two busy cores, SmolLM2 tests
    ran 8x slower (100 s vs 12 s) than with one. Benchmarks set their own thread count.
    """
    torch.set_num_threads(int(os.environ.get("PETAL_TEST_THREADS", "1")))


@pytest.fixture
def save_model(tmp_path: Path) -> Callable[..., Path]:
    """`save_model(model, name="m", max_shard_size=None) -> dir`: save a model as safetensors under tmp_path."""

    def save(model: PreTrainedModel, name: str = "m", max_shard_size: str | int | None = None) -> Path:
        out = tmp_path / name
        kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
        model.save_pretrained(out, safe_serialization=True, **kwargs)
        return out

    return save


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real SmolLM2-135M-Instruct, pulled once (about 30 s cold) into the default models dir and reused."""
    from petal.daemon.pull import pull_model

    return pull_model("smollm2", progress=False)


@pytest.fixture(autouse=True)
def _grad_mode_is_restored() -> Iterator[None]:
    """Each test starts with autograd on, whatever the one before left behind.

    Grad mode is per thread, not per asyncio task, so a ``no_grad`` block spanning an ``await`` in one task can
    leave it off for everything after (tests/test_layout.py forbids that in the library; tests may still slip).
    """
    torch.set_grad_enabled(True)
    yield
    torch.set_grad_enabled(True)
