"""Shared test set-up: offline hubs, few threads, seeded generators, a bundle factory, and the binomial
tolerance that statistical tests use."""

from __future__ import annotations

import os

# timm retries the hub for ~45 s before failing when it is unreachable.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from scipy.stats import binom

# Tiny test models run fastest on one thread (thread start-up dominates); override to compare.
torch.set_num_threads(int(os.environ.get("PAINWATCH_TEST_THREADS", "1")))

TEST_ARCH = "test_resnet"
"""The tiny timm backbone of the tests (a few thousand parameters)."""


@pytest.fixture
def generator() -> torch.Generator:
    """A seeded generator: every random draw in painwatch comes from an explicit one."""
    return torch.Generator().manual_seed(0)


def allowed_failures(trials: int, rate: float, *, confidence: float = 0.999) -> int:
    """The most failures a correct bound at failure ``rate`` shows in ``trials`` independent trials,
    except with probability ``1 - confidence``: the ``confidence`` quantile of Binomial(trials, rate).

    A statistical test asserts ``failures <= allowed_failures(trials, alpha)``; sized with enough
    trials, a bound at twice its alpha exceeds it (check that with :func:`binom` in the test)."""
    return int(binom.ppf(confidence, trials, rate))


def make_bundle(
    folder: Path,
    *,
    model: torch.nn.Module | None = None,
    input_size: int = 32,
    seed: int = 0,
    training: Mapping[str, Any] | None = None,
    certification: Mapping[str, Any] | None = None,
    **metadata: Any,
) -> Path:
    """Save a real bundle of the tiny test backbone (or of ``model``) at ``folder``.

    ``training`` defaults to two individuals trained without noise records; ``certification`` entries
    update the defaults at the training noise sigma (0.25 unless ``training`` says otherwise); other
    keyword arguments go into model.json (``temperature``, ``classes``...)."""
    from painwatch.models import create_model, default_certification, save_bundle

    if model is None:
        model = create_model(TEST_ARCH, num_classes=2, input_size=input_size, seed=seed).eval()
    training = dict(training or {"individuals": ["m01", "m02"], "num_frames": 8, "loss": "ce",
                                 "noise_sigma": 0.25, "epochs": 1})
    content: dict[str, Any] = {"training": training, **metadata}
    if certification is not None:
        defaults = default_certification(training.get("noise_sigma"))
        content["certification"] = {**defaults, **certification}
    return save_bundle(folder, model, content)


@pytest.fixture(scope="session")
def bundle_factory() -> Callable[..., Path]:
    """:func:`make_bundle`, for tests that need their own bundle."""
    return make_bundle


@pytest.fixture(autouse=True)
def _records_outside_the_repository(tmp_path_factory: pytest.TempPathFactory,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test's page and command line keep their records and accounts in a folder of the test run,
    never in the repository's data/ (a test that needs its own sets PAINWATCH_DATABASE itself)."""
    folder = tmp_path_factory.getbasetemp() / "records-default"
    folder.mkdir(exist_ok=True)
    monkeypatch.setenv("PAINWATCH_DATABASE", f"sqlite:///{folder / 'painwatch.db'}")
    monkeypatch.setenv("PAINWATCH_ACCOUNTS", str(folder / "painwatch-accounts.json"))
