"""Temperature scaling: recovers a known temperature, keeps the arg-max, validates input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.special import softmax

from painwatch.calibration import (
    TEMPERATURE_BOUNDS,
    apply_temperature,
    calibrated_probabilities,
    fit_temperature,
    negative_log_likelihood,
)


def _sample_with_temperature(true_temperature: float, num_samples: int, num_classes: int, seed: int):
    """Logits z whose labels are drawn from softmax(z / T): T is then the NLL minimiser (in the limit)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 3.0, size=(num_samples, num_classes))
    probabilities = softmax(logits / true_temperature, axis=1)
    cumulative = probabilities.cumsum(axis=1)
    labels = (rng.random((num_samples, 1)) > cumulative).sum(axis=1)
    return logits, np.minimum(labels, num_classes - 1)


@pytest.mark.parametrize(("true_temperature", "num_classes"), [(0.5, 2), (2.0, 2), (3.0, 10)])
def test_recovers_known_temperature(true_temperature: float, num_classes: int) -> None:
    logits, labels = _sample_with_temperature(true_temperature, 20000, num_classes, seed=1)
    fitted = fit_temperature(logits, labels)
    assert fitted == pytest.approx(true_temperature, rel=0.08)


def test_fitted_temperature_minimises_nll() -> None:
    logits, labels = _sample_with_temperature(1.7, 3000, 3, seed=2)
    fitted = fit_temperature(logits, labels)
    best = negative_log_likelihood(logits, labels, fitted)
    for other in (fitted * 0.9, fitted * 1.1, 1.0):
        assert best <= negative_log_likelihood(logits, labels, other) + 1e-12


def test_accepts_torch_tensors_and_matches_numpy() -> None:
    logits, labels = _sample_with_temperature(2.0, 2000, 2, seed=3)
    from_numpy = fit_temperature(logits, labels)
    from_torch = fit_temperature(torch.tensor(logits, dtype=torch.float32), torch.tensor(labels))
    assert from_torch == pytest.approx(from_numpy, rel=1e-4)


def test_separable_data_hits_lower_bound_and_constant_logits_give_one() -> None:
    logits = np.array([[3.0, -3.0], [-2.0, 2.0], [4.0, 0.0]])
    labels = np.array([0, 1, 0])
    assert fit_temperature(logits, labels) == TEMPERATURE_BOUNDS[0]  # exactly the bound
    assert fit_temperature(np.zeros((4, 2)), np.array([0, 1, 0, 1])) == 1.0


def test_all_wrong_confident_logits_push_temperature_up() -> None:
    logits = np.array([[5.0, -5.0], [-5.0, 5.0]] * 10)
    labels = np.array([1, 0] * 10)
    assert fit_temperature(logits, labels) == TEMPERATURE_BOUNDS[1]


def test_apply_temperature_keeps_argmax_and_probabilities_sum_to_one() -> None:
    logits = np.random.default_rng(4).normal(size=(50, 5))
    scaled = apply_temperature(logits, 2.5)
    np.testing.assert_allclose(scaled, logits / 2.5)
    np.testing.assert_array_equal(scaled.argmax(axis=1), logits.argmax(axis=1))
    probabilities = calibrated_probabilities(logits, 2.5)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0)
    np.testing.assert_allclose(probabilities, softmax(logits / 2.5, axis=1))


def test_nll_is_stable_for_huge_logits() -> None:
    logits = np.array([[1000.0, -1000.0]])
    assert negative_log_likelihood(logits, [0]) == pytest.approx(0.0, abs=1e-12)
    assert negative_log_likelihood(logits, [1]) == pytest.approx(2000.0)


@pytest.mark.parametrize(
    ("logits", "labels", "message"),
    [
        (np.zeros(4), [0, 1, 0, 1], "2-D"),
        (np.zeros((0, 2)), [], "empty"),
        (np.zeros((3, 1)), [0, 0, 0], "at least 2 classes"),
        (np.array([[0.0, np.nan]]), [0], "finite"),
        (np.zeros((2, 2)), [0], r"shape \(2,\)"),
        (np.zeros((2, 2)), [0, 2], r"found 2 at index 1"),
        (np.zeros((2, 2)), [0.5, 1.0], "integer"),
    ],
)
def test_bad_input_names_the_problem(logits, labels, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        fit_temperature(logits, labels)


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_temperature_is_rejected(temperature: float) -> None:
    with pytest.raises(ValueError, match="temperature"):
        apply_temperature(np.zeros((1, 2)), temperature)


def test_bad_bounds_are_rejected() -> None:
    with pytest.raises(ValueError, match="bounds"):
        fit_temperature(np.array([[1.0, 0.0], [1.0, 0.0]]), [0, 1], bounds=(2.0, 5.0))
