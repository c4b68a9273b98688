"""Checks of settings and arrays above the robustness core: one place, messages that name the bad value.

Every check returns the value in its canonical type or raises ``ValueError`` whose message names the
setting (``owner.name`` for a dataclass field, or the argument's name) and the offending value, in the
style of scikit-learn's ``check_*`` helpers. ``painwatch.robust`` has its own checks
(``painwatch.robust.validation``) because it imports nothing of the project.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np


def is_integer(value: Any) -> bool:
    """True for a Python or NumPy integer that is not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def is_number(value: Any) -> bool:
    """True for a finite int or float (NumPy scalars included) that is not a bool."""
    return (
        isinstance(value, (int, float, np.integer, np.floating))
        and not isinstance(value, (bool, np.bool_))
        and math.isfinite(float(value))
    )


def check_integer(value: Any, name: str, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` as an ``int`` within ``[minimum, maximum]`` (either end optional)."""
    if not is_integer(value):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ValueError(f"{name} must be an integer in {_interval(minimum, maximum)}, got {value!r}")
    return int(value)


def check_number(
    value: Any,
    name: str,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    exclusive_minimum: bool = False,
    exclusive_maximum: bool = False,
) -> float:
    """``value`` as a finite ``float`` within the given bounds (open or closed at each end)."""
    if not is_number(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    number = float(value)
    too_low = minimum is not None and (number <= minimum if exclusive_minimum else number < minimum)
    too_high = maximum is not None and (number >= maximum if exclusive_maximum else number > maximum)
    if too_low or too_high:
        left = "(" if exclusive_minimum else "["
        right = ")" if exclusive_maximum else "]"
        low = "-inf" if minimum is None else f"{minimum:g}"
        high = "inf" if maximum is None else f"{maximum:g}"
        raise ValueError(f"{name} must be a number in {left}{low}, {high}{right}, got {value!r}")
    return number


def check_bool(value: Any, name: str) -> bool:
    """``value`` when it is exactly True or False."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def check_choice(value: Any, name: str, choices: Iterable[Any]) -> Any:
    """``value`` when it is one of ``choices``."""
    allowed = list(choices)
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return value


def check_labels(
    labels: Any, *, num_classes: int | None = None, num_samples: int | None = None, name: str = "labels"
) -> np.ndarray:
    """Integer class indices as int64 ``(N,)``, each in ``[0, num_classes)`` when that is given.

    Accepts NumPy arrays, sequences and torch tensors (anything with ``detach``). Booleans count as 0/1;
    floats must be whole numbers. The message names the first bad entry and its index.
    """
    if hasattr(labels, "detach"):
        labels = labels.detach().cpu().numpy()
    array = np.asarray(labels)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D (N,), got shape {array.shape}")
    if num_samples is not None and array.shape[0] != num_samples:
        raise ValueError(f"{name} must have shape ({num_samples},) to match the data, got {array.shape}")
    if array.size and array.dtype == bool:
        array = array.astype(np.int64)
    elif array.size and not np.issubdtype(array.dtype, np.integer) and (
        not np.issubdtype(array.dtype, np.number)
        or not np.all(np.isfinite(array))
        or not np.all(array == np.round(array))
    ):
        raise ValueError(f"{name} must be integer class indices, got dtype {array.dtype}")
    array = array.astype(np.int64)
    bad = array < 0 if num_classes is None else (array < 0) | (array >= num_classes)
    if np.any(bad):
        index = int(np.flatnonzero(bad)[0])
        allowed = ">= 0" if num_classes is None else f"in [0, {num_classes - 1}]"
        raise ValueError(f"{name} must be {allowed}; found {int(array[index])} at index {index}")
    return array


def _interval(minimum: int | None, maximum: int | None) -> str:
    if maximum is None:
        return f"[{minimum}, inf)"
    if minimum is None:
        return f"(-inf, {maximum}]"
    return f"[{minimum}, {maximum}]"
