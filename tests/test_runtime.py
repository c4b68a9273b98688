"""painwatch.runtime: device names checked with errors that name the device; global seeding."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from painwatch.runtime import resolve_device, seed_everything


def test_cpu_and_auto() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    expected = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("auto") == expected and resolve_device(None) == expected


def test_auto_takes_cuda_when_there_is_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")


@pytest.mark.parametrize("name", ["gpu", "tpu", "cuda:", "cuda:x", "cuda:-1", "cpu:0", "", "auto:0"])
def test_unknown_names_are_refused_by_name(name: str) -> None:
    with pytest.raises(ValueError, match=f"device '{name}' is not one of auto, cpu, cuda, cuda:N, mps"):
        resolve_device(name)


def test_missing_accelerators_are_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name in ("cuda", "cuda:1"):
        with pytest.raises(ValueError, match=f"device '{name}' was requested but CUDA is not available"):
            resolve_device(name)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match=r"device 'cuda:2' was requested but this machine has 2 CUDA device"):
        resolve_device("cuda:2")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ValueError, match="device 'mps' was requested but MPS is not available"):
        resolve_device("mps")


def test_seed_everything_repeats_every_global_generator() -> None:
    def draws() -> tuple[float, float, list[float]]:
        return random.random(), float(np.random.rand()), torch.rand(3).tolist()

    seed_everything(7)
    first = draws()
    seed_everything(7)
    assert draws() == first
    seed_everything(8)
    assert draws() != first
    seed_everything(np.int64(7))  # NumPy integers are integers
    assert draws() == first
    seed_everything(-1)  # NumPy's generator takes the seed mod 2**32
    for bad in (1.5, "7", True, None):
        with pytest.raises(TypeError, match="seed must be an integer"):
            seed_everything(bad)  # type: ignore[arg-type]
