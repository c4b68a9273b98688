"""Where computations run and how the global generators are seeded: the one copy of each.

Every certificate draws its noise from an explicit ``torch.Generator`` (docs/design.md, "Units and
conventions"); :func:`seed_everything` covers what third-party code still draws from the global
generators (weight initialisation, dropout, augmentation).
"""

from __future__ import annotations

import random
import re
from numbers import Integral

import numpy as np
import torch

__all__ = ["DEVICE_CHOICES", "resolve_device", "seed_everything"]

DEVICE_CHOICES: tuple[str, ...] = ("auto", "cpu", "cuda", "cuda:N", "mps")
"""The device names :func:`resolve_device` accepts (``N`` a CUDA device index)."""

_DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(?::(\d+))?)$")


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """The ``torch.device`` named by ``device``: ``"auto"`` (or ``None``) is CUDA when available, else
    the CPU; ``"cpu"``, ``"cuda"``, ``"cuda:N"`` and ``"mps"`` are checked to exist on this machine.

    Raises:
        ValueError: naming the device, for a name outside :data:`DEVICE_CHOICES`, or a device this
            machine does not have (no CUDA, a CUDA index beyond the devices present, no MPS).
    """
    name = "auto" if device is None else str(device).strip().lower()
    match = _DEVICE_PATTERN.match(name)
    if match is None:
        raise ValueError(f"device {str(device)!r} is not one of {', '.join(DEVICE_CHOICES)}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} was requested but CUDA is not available on this machine")
        count = torch.cuda.device_count()
        index = match.group(2)
        if index is not None and int(index) >= count:
            raise ValueError(
                f"device {name!r} was requested but this machine has {count} CUDA device(s) "
                f"(cuda:0 to cuda:{count - 1})"
            )
    if name == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {name!r} was requested but MPS is not available on this machine")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy's legacy global generator (with ``seed mod 2**32``) and torch's
    global generator (CPU and every CUDA device) with ``seed``.

    Raises:
        TypeError: naming the value, when ``seed`` is not an integer.
    """
    if isinstance(seed, bool) or not isinstance(seed, Integral):
        raise TypeError(f"seed must be an integer, got {seed!r}")
    seed = int(seed)
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
