"""Shared test set-up: offline hubs, few threads, deterministic seeds."""

from __future__ import annotations

import os

# timm retries the hub for ~45 s before failing when it is unreachable.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest
import torch

# Tiny test models run fastest on one thread (thread start-up dominates); override to compare.
torch.set_num_threads(int(os.environ.get("PAINWATCH_TEST_THREADS", "1")))


@pytest.fixture
def generator() -> torch.Generator:
    """A seeded generator: every random draw in painwatch comes from an explicit one."""
    return torch.Generator().manual_seed(0)
