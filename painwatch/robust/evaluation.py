"""Certified accuracy: the fraction of points that are correct *and* certified at a radius.

The quantity certified-robustness results report [Cohen19; RC] (and the certification gate judges):
for a radius ``r`` (L2, [0, 1] pixel units), a point counts when its
certified prediction is correct and its certified radius is at least ``r``. An abstention is never
correct (its prediction is -1): pass ``correct = False`` for it, so that at ``r = 0`` the certified
accuracy is the accuracy of the answers given.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.stats import binomtest

__all__ = [
    "certified_accuracy_at",
    "certified_accuracy_curve",
    "certified_accuracy_interval",
]


def _points(
    correct: Sequence[bool] | np.ndarray, radii: Sequence[float] | np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The checked ``(correct, radii)`` arrays of one set of certificates."""
    flags = np.asarray(correct)
    values = np.asarray(radii, dtype=np.float64)
    if flags.ndim != 1 or values.ndim != 1 or flags.shape != values.shape:
        raise ValueError(f"correct and radii must be 1-D and of the same length, got shapes {flags.shape} "
                         f"and {values.shape}")
    if flags.dtype != np.bool_:
        not_boolean = ~np.isin(flags, (0, 1))
        if not_boolean.any():
            bad = int(np.flatnonzero(not_boolean)[0])
            raise ValueError(f"correct must hold booleans, got {flags[bad].item()!r} at point {bad}")
    invalid = np.isnan(values) | (values < 0)
    if invalid.any():
        bad = int(np.flatnonzero(invalid)[0])
        raise ValueError(f"radii must be >= 0 (an abstention has radius 0), got {float(values[bad])!r} "
                         f"at point {bad}")
    return flags.astype(bool), values


def _check_radius(radius: float) -> float:
    value = float(radius)
    if not value >= 0.0:
        raise ValueError(f"radius must be a number >= 0 (L2, [0, 1] pixel units), got {radius!r}")
    return value


def certified_accuracy_at(
    correct: Sequence[bool] | np.ndarray, radii: Sequence[float] | np.ndarray, radius: float
) -> float:
    """The fraction of points that are correct and certified at ``>= radius`` (0.0 for no points).

    ``correct[i]`` says whether point i's certified prediction is its label (False for abstentions);
    ``radii[i]`` is its certified L2 radius.
    """
    flags, values = _points(correct, radii)
    threshold = _check_radius(radius)
    if flags.size == 0:
        return 0.0
    return int(np.count_nonzero(flags & (values >= threshold))) / flags.size


def certified_accuracy_curve(
    correct: Sequence[bool] | np.ndarray,
    radii: Sequence[float] | np.ndarray,
    grid: Sequence[float] | np.ndarray,
) -> np.ndarray:
    """:func:`certified_accuracy_at` at every radius of ``grid``: float64 array of ``len(grid)``,
    non-increasing in the radius."""
    flags, values = _points(correct, radii)
    thresholds = np.asarray(grid, dtype=np.float64)
    if thresholds.ndim != 1:
        raise ValueError(f"grid must be a 1-D sequence of radii, got shape {thresholds.shape}")
    for radius in thresholds:
        _check_radius(radius)
    if flags.size == 0:
        return np.zeros_like(thresholds)
    counts = (flags[None, :] & (values[None, :] >= thresholds[:, None])).sum(axis=1)
    return counts / flags.size


def certified_accuracy_interval(
    correct: Sequence[bool] | np.ndarray,
    radii: Sequence[float] | np.ndarray,
    radius: float,
    *,
    confidence: float = 0.95,
) -> tuple[float, float]:
    """Two-sided exact Clopper-Pearson [CP34] interval for the certified accuracy at ``radius``.

    Treats the points as independent draws: with probability at least ``confidence`` over them, the
    certified accuracy of the population they come from lies in ``(low, high)``
    (``scipy.stats.binomtest(...).proportion_ci(method="exact")``). With no points it is ``(0, 1)``.
    It says nothing about the certificates' own failure probability ``alpha``, which is per point.
    """
    if not 0.0 < float(confidence) < 1.0:
        raise ValueError(f"confidence must be strictly between 0 and 1, got {confidence!r}")
    flags, values = _points(correct, radii)
    threshold = _check_radius(radius)
    if flags.size == 0:
        return 0.0, 1.0
    successes = int(np.count_nonzero(flags & (values >= threshold)))
    interval = binomtest(successes, int(flags.size)).proportion_ci(confidence_level=float(confidence),
                                                                   method="exact")
    return float(interval.low), float(interval.high)
