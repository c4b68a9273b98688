"""Temperature scaling (Guo et al. 2017): one scalar that calibrates a classifier's confidences.

A temperature ``T > 0`` divides the logits before the softmax: ``p = softmax(z / T)``. It never
changes the predicted class (the arg-max of ``z / T`` is the arg-max of ``z``), only how confident
the probabilities are. ``T`` is fitted on held-out data (in painwatch: the inner validation
individuals of a fold) by minimising the mean negative log-likelihood in float64.

Accepts NumPy arrays or torch tensors (moved to the CPU); computes in float64 NumPy.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax

from painwatch.validation import check_labels

#: Search range of the temperature. Outside it a fitted value means the held-out data carry no
#: usable signal (``T -> inf``: predict the uniform distribution) or are perfectly separated
#: (``T -> 0``), and the bounded result is the honest answer.
TEMPERATURE_BOUNDS: tuple[float, float] = (0.05, 100.0)


def _as_float64_logits(logits: Any, name: str = "logits") -> np.ndarray:
    if hasattr(logits, "detach"):  # a torch tensor: no torch import needed for NumPy callers
        logits = logits.detach().cpu().numpy()
    array = np.asarray(logits, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (N, K); got shape {array.shape}")
    if array.shape[0] == 0:
        raise ValueError(f"{name} is empty (shape {array.shape}): need at least one sample")
    if array.shape[1] < 2:
        raise ValueError(f"{name} must have at least 2 classes (K >= 2); got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        bad = tuple(int(i) for i in np.argwhere(~np.isfinite(array))[0])
        raise ValueError(f"{name} must be finite; found {array[bad]} at index {bad}")
    return array


def _check_temperature(temperature: float) -> float:
    value = float(temperature)
    if not math.isfinite(value) or value <= 0.0:
        raise ValueError(f"temperature must be a finite number > 0; got {temperature!r}")
    return value


def negative_log_likelihood(logits: Any, labels: Any, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood (nats per sample) of ``softmax(logits / temperature)``.

    Computed with a float64 log-softmax, so it is exact for very confident logits as well.
    """
    z = _as_float64_logits(logits)
    y = check_labels(labels, num_classes=z.shape[1], num_samples=z.shape[0])
    t = _check_temperature(temperature)
    log_probabilities = log_softmax(z / t, axis=1)
    return float(-np.mean(log_probabilities[np.arange(z.shape[0]), y]))


def fit_temperature(
    logits: Any,
    labels: Any,
    bounds: tuple[float, float] = TEMPERATURE_BOUNDS,
) -> float:
    """Fit the temperature ``T`` that minimises the mean NLL of ``softmax(logits / T)``.

    Args:
        logits: ``(N, K)`` held-out logits (NumPy or torch, any float dtype), ``K >= 2``, finite.
        labels: ``(N,)`` integer true classes in ``[0, K)``.
        bounds: search interval ``(lo, hi)`` for ``T``, ``0 < lo < 1 < hi``.

    Returns:
        ``T`` in ``[lo, hi]`` as a Python float. The NLL is convex in ``1 / T``; the search is a
        bounded Brent minimisation over ``log T`` in float64 (tolerance ``1e-6`` in ``log T``), so
        the result is the global minimiser up to that tolerance, clipped to ``bounds``. Returns
        exactly 1.0 when every logit row is constant (the temperature then has no effect).

    Raises:
        ValueError: naming the bad shape, value or index.
    """
    z = _as_float64_logits(logits)
    y = check_labels(labels, num_classes=z.shape[1], num_samples=z.shape[0])
    lo, hi = (float(bounds[0]), float(bounds[1]))
    if not (math.isfinite(lo) and math.isfinite(hi) and 0.0 < lo < 1.0 < hi):
        raise ValueError(f"bounds must satisfy 0 < lo < 1 < hi; got {bounds!r}")
    if np.all(np.ptp(z, axis=1) == 0.0):
        return 1.0
    rows = np.arange(z.shape[0])

    def objective(log_temperature: float) -> float:
        log_probabilities = log_softmax(z / math.exp(log_temperature), axis=1)
        return float(-np.mean(log_probabilities[rows, y]))

    result = minimize_scalar(
        objective, bounds=(math.log(lo), math.log(hi)), method="bounded", options={"xatol": 1e-6}
    )
    # Brent's bounded method never evaluates the end points themselves; check them so a minimum
    # on the boundary is reported exactly.
    candidates = [
        (float(result.fun), float(result.x)),
        (objective(math.log(lo)), math.log(lo)),
        (objective(math.log(hi)), math.log(hi)),
    ]
    best_log_temperature = min(candidates)[1]
    if best_log_temperature == math.log(lo):  # exp(log(lo)) may differ from lo in the last bit
        return lo
    if best_log_temperature == math.log(hi):
        return hi
    return float(min(max(math.exp(best_log_temperature), lo), hi))


def apply_temperature(logits: Any, temperature: float) -> np.ndarray:
    """Return ``logits / temperature`` as a float64 ``(N, K)`` NumPy array (class order unchanged)."""
    z = _as_float64_logits(logits)
    return z / _check_temperature(temperature)


def calibrated_probabilities(logits: Any, temperature: float = 1.0) -> np.ndarray:
    """Return ``softmax(logits / temperature)`` as float64 ``(N, K)``; rows sum to 1."""
    z = apply_temperature(logits, temperature)
    return np.exp(log_softmax(z, axis=1))
