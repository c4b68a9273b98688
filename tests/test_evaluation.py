"""Certified accuracy (painwatch.robust.evaluation): values by hand, the curve, the exact interval."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import allowed_failures
from scipy.stats import beta

from painwatch.robust import (
    certified_accuracy_at,
    certified_accuracy_curve,
    certified_accuracy_interval,
)

# Five points: correct at radii 0.5 and 0.2, wrong at 0.9, an abstention (never correct, radius 0),
# and a correct point certified at radius 0 (a tie: the answer is right but nothing is certified).
CORRECT = [True, True, False, False, True]
RADII = [0.5, 0.2, 0.9, 0.0, 0.0]


def test_certified_accuracy_counts_correct_and_certified_points() -> None:
    assert certified_accuracy_at(CORRECT, RADII, 0.0) == pytest.approx(3 / 5)  # the accuracy of the answers
    assert certified_accuracy_at(CORRECT, RADII, 0.2) == pytest.approx(2 / 5)  # ">= radius" counts 0.2
    assert certified_accuracy_at(CORRECT, RADII, 0.3) == pytest.approx(1 / 5)
    assert certified_accuracy_at(CORRECT, RADII, 0.9) == 0.0  # the point certified at 0.9 is wrong
    saturated = certified_accuracy_at(np.array([1, 0, 1]), np.array([1.0, 1.0, math.inf]), 1.0)
    assert saturated == pytest.approx(2 / 3)
    assert certified_accuracy_at([], [], 0.5) == 0.0


def test_curve_agrees_with_pointwise_values_and_never_increases() -> None:
    rng = np.random.default_rng(0)
    correct = rng.random(200) < 0.7
    radii = np.where(rng.random(200) < 0.1, 0.0, rng.exponential(0.3, 200))
    grid = np.linspace(0.0, 1.5, 31)
    curve = certified_accuracy_curve(correct, radii, grid)
    assert curve.shape == (31,) and curve.dtype == np.float64
    assert curve.tolist() == [certified_accuracy_at(correct, radii, r) for r in grid]
    assert (np.diff(curve) <= 0).all() and curve[0] == correct.mean()
    assert certified_accuracy_curve([], [], [0.0, 1.0]).tolist() == [0.0, 0.0]


def test_interval_is_the_exact_clopper_pearson_interval() -> None:
    low, high = certified_accuracy_interval(CORRECT, RADII, 0.2)
    k, n = 2, 5
    assert low == pytest.approx(beta.ppf(0.025, k, n - k + 1))
    assert high == pytest.approx(beta.ppf(0.975, k + 1, n - k))
    assert low < 2 / 5 < high
    assert certified_accuracy_interval([True] * 10, [1.0] * 10, 0.5)[1] == 1.0
    assert certified_accuracy_interval([False] * 10, [1.0] * 10, 0.5)[0] == 0.0
    wide, narrow = (certified_accuracy_interval(CORRECT, RADII, 0.2, confidence=c) for c in (0.99, 0.5))
    assert wide[0] < narrow[0] and narrow[1] < wide[1]
    assert certified_accuracy_interval([], [], 0.1) == (0.0, 1.0)


def test_interval_covers_the_true_certified_accuracy_at_least_95_percent_of_the_time() -> None:
    rng = np.random.default_rng(1)
    true_rate, n, trials = 0.3, 40, 400
    misses = 0
    for _ in range(trials):
        correct = rng.random(n) < true_rate
        low, high = certified_accuracy_interval(correct, np.ones(n), 0.5)
        misses += not low <= true_rate <= high
    assert misses <= allowed_failures(trials, 0.05)


@pytest.mark.parametrize(
    ("correct", "radii", "radius", "match"),
    [
        ([True, False], [0.1], 0.0, "same length"),
        ([True, 2], [0.1, 0.2], 0.0, "correct must hold booleans, got 2 at point 1"),
        ([True, True], [0.1, math.nan], 0.0, "radii must be >= 0.*got nan at point 1"),
        ([True, True], [-0.1, 0.1], 0.0, "got -0.1 at point 0"),
        ([True], [0.1], -1.0, "radius must be a number >= 0"),
        ([True], [0.1], math.nan, "radius must be a number >= 0"),
    ],
)
def test_bad_input_names_the_value_and_the_point(correct, radii, radius, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        certified_accuracy_at(correct, radii, radius)


def test_bad_grid_and_confidence_are_refused() -> None:
    with pytest.raises(ValueError, match="radius must be a number >= 0"):
        certified_accuracy_curve(CORRECT, RADII, [0.0, -0.5])
    with pytest.raises(ValueError, match="grid must be a 1-D"):
        certified_accuracy_curve(CORRECT, RADII, [[0.0]])
    with pytest.raises(ValueError, match="confidence must be strictly between 0 and 1"):
        certified_accuracy_interval(CORRECT, RADII, 0.0, confidence=1.0)
