"""Tests that the mutation run over painwatch.robust showed missing (results/mutation/README.md).

Each test names the behaviour that a surviving mutant changed without any fast test noticing: the
default failure probabilities of the public certify functions, a certificate's record of how it was
made, checks that only fired on one shape of input.
"""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import torch
from synthetic_models import OnePixelVote, X
from torch import nn

from painwatch.robust import (
    SmoothedClassifier,
    certify,
    empirical_bernstein_radius,
    hoeffding_radius,
    lipschitz_certify,
    lipschitz_certify_batch,
    logit_margin,
    margin_for_class,
    mean_confidence_bounds,
    smoothed_margin_certify,
    smoothed_robustness,
    soft_smoothing_certify,
)
from painwatch.robust.sequential import sequential_certify


def test_default_settings_of_the_certify_functions() -> None:
    """The documented defaults (docs/design.md, "The certificates"): a silently larger default alpha would
    weaken every certificate made without one."""
    expected = {
        soft_smoothing_certify: {"n0": 100, "n": 1000, "alpha": 0.001, "batch_size": 1000,
                                 "concentration": "best", "score_temperature": 1.0},
        smoothed_margin_certify: {"n0": 100, "n": 1000, "alpha": 0.001, "batch_size": 1000},
        sequential_certify: {"alpha": 0.001, "n0": 64, "max_n": 100_000, "first_batch": 64, "max_batch": 2048,
                             "batch_size": 256,
                             "rel_tol": 0.05, "min_radius": 0.0, "scores": "soft", "score_temperature": 1.0,
                             "bound": "anytime", "target_radius": None},
        SmoothedClassifier.certify: {"batch_size": 1000},
    }
    for function, defaults in expected.items():
        parameters = inspect.signature(function).parameters
        assert {name: parameters[name].default for name in defaults} == defaults, function.__qualname__


def test_soft_smoothing_hoeffding_needs_one_draw_and_bernstein_two() -> None:
    model = OnePixelVote.with_vote_probability(0.9, 0.5)
    certificate = soft_smoothing_certify(model, X, sigma=0.5, n0=3, n=1, alpha=0.1, concentration="hoeffding",
                                         generator=torch.Generator().manual_seed(0))
    assert certificate.n == 1 and certificate.forward_passes == 4
    for concentration in ("bernstein", "best"):
        with pytest.raises(ValueError, match="n must be >= 2, got 1"):
            soft_smoothing_certify(model, X, sigma=0.5, n0=3, n=1, alpha=0.1, concentration=concentration)


def test_logit_margin_names_what_it_rejects() -> None:
    with pytest.raises(ValueError, match=r"K >= 2, got \(4,\)"):
        logit_margin(torch.ones(4))
    with pytest.raises(ValueError, match=r"K >= 2, got \(3, 1\)"):
        logit_margin(torch.ones(3, 1))
    with pytest.raises(ValueError, match="K >= 2, got list"):
        logit_margin([[1.0, 2.0]])


def test_lipschitz_certificate_of_a_colour_image_records_how_it_was_made() -> None:
    """Three channels (a single-channel image hides which axis the batch dimension goes on)."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(3, 3 * 4 * 4, generator=generator, dtype=torch.float64)
    layer = nn.Linear(48, 3, bias=False, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(weight)
    model = nn.Sequential(nn.Flatten(), layer)
    constant = float(torch.linalg.svdvals(weight)[0])
    images = torch.rand((2, 3, 4, 4), generator=generator, dtype=torch.float64)
    batch = lipschitz_certify_batch(model, images, constant)
    for image, batched in zip(images, batch, strict=True):
        certificate = lipschitz_certify(model, image, constant)
        logits = weight @ image.flatten()
        top2 = torch.topk(logits, 2).values
        # Batched BLAS may differ in the last bit.
        assert certificate.prediction == batched.prediction
        assert certificate.radius == pytest.approx(batched.radius, rel=1e-12)
        assert certificate.prediction == int(logits.argmax())
        assert certificate.bound == pytest.approx(float(top2[0] - top2[1]), rel=1e-12)
        assert certificate.radius == pytest.approx(certificate.bound / (math.sqrt(2) * constant), rel=1e-12)
        made = (certificate.sigma, certificate.n, certificate.alpha, certificate.forward_passes)
        assert made == (0.0, 0, 0.0, 1)


def test_lipschitz_certify_checks_the_device_of_the_model() -> None:
    on_meta = nn.Sequential(nn.Flatten(), nn.Linear(4, 2, device="meta"))
    with pytest.raises(ValueError, match="x is on cpu but the model's weights are on meta"):
        lipschitz_certify_batch(on_meta, torch.rand(2, 1, 2, 2), 1.0)


def test_bounds_name_the_bad_setting() -> None:
    with pytest.raises(ValueError, match="n must be >= 1, got 0"):
        hoeffding_radius(0, 0.1)
    with pytest.raises(ValueError, match=r"delta must be strictly between 0 and 1.*1\.5"):
        hoeffding_radius(10, 1.5)
    with pytest.raises(ValueError, match="n must be >= 2, got 1"):
        empirical_bernstein_radius(np.zeros(1), 1, 0.1)
    with pytest.raises(ValueError, match=r"delta must be strictly between 0 and 1.*0\.0"):
        empirical_bernstein_radius(np.zeros(1), 10, 0.0)
    with pytest.raises(ValueError, match=r"scores must have shape \(n, m\) with n >= 1, got \(5,\)"):
        mean_confidence_bounds(np.ones(5), 0.1)
    with pytest.raises(ValueError, match=r"scores must have shape \(n, m\) with n >= 1, got \(0, 2\)"):
        mean_confidence_bounds(np.ones((0, 2)), 0.1)
    with pytest.raises(ValueError, match=r"method must be one of .*'chernoff'"):
        mean_confidence_bounds(np.ones((3, 2)), 0.1, "chernoff")
    with pytest.raises(ValueError, match="empirical Bernstein bound needs n >= 2 samples, got n=1"):
        mean_confidence_bounds(np.ones((1, 2)), 0.1, "best")


def test_vote_counts_are_integers_and_a_model_changing_its_classes_is_named() -> None:
    model = OnePixelVote.with_vote_probability(0.7, 0.5)
    counts = SmoothedClassifier(model, 2, 0.5).class_counts(X, num=50, batch_size=20,
                                                            generator=torch.Generator().manual_seed(0))
    assert counts.dtype == np.int64 and counts.sum() == 50

    calls = []

    def growing(batch: torch.Tensor) -> torch.Tensor:
        calls.append(batch.shape[0])
        return torch.zeros(batch.shape[0], 2 if len(calls) == 1 else 3, dtype=batch.dtype)

    with pytest.raises(ValueError, match="returned 3 logits per image after 2 in an earlier batch"):
        certify("randomized_smoothing", growing, X, sigma=0.5, n0=30, n=10, batch_size=20, stop_early=False)


def test_sequential_settings_are_checked_at_their_limits() -> None:
    model = OnePixelVote.with_vote_probability(0.9, 0.5)
    for rel_tol in (1.0, "0.1", False):
        with pytest.raises(ValueError, match="rel_tol must be a number in"):
            sequential_certify(model, X, sigma=0.5, rel_tol=rel_tol)
    with pytest.raises(ValueError, match="max_n must be >= 2, got 1"):
        sequential_certify(model, X, sigma=0.5, max_n=1)
    smallest = sequential_certify(model, X, sigma=0.5, n0=4, max_n=2, scores="hard", rel_tol=0.0,
                                  generator=torch.Generator().manual_seed(0))
    assert smallest.certificate.n == 2 and smallest.forward_passes == 6


def test_mean_bounds_are_clipped_to_the_unit_interval_and_reject_negative_scores() -> None:
    lower, upper = mean_confidence_bounds(np.zeros((10, 2)), 0.1, "hoeffding")
    assert lower.tolist() == [0.0, 0.0] and upper.tolist() == pytest.approx([hoeffding_radius(10, 0.1)] * 2)
    lower, upper = mean_confidence_bounds(np.ones((10, 1)), 0.1, "hoeffding")
    assert upper.tolist() == [1.0]
    with pytest.raises(ValueError, match=r"scores must lie in \[0, 1\]"):
        mean_confidence_bounds(np.array([[0.5], [-0.1]]), 0.1)
    # A negative variance (rounding) counts as zero.
    assert empirical_bernstein_radius(np.array([-1e-3]), 10, 0.1)[0] == empirical_bernstein_radius(
        np.zeros(1), 10, 0.1)[0]


def test_smoothed_robustness_away_from_saturation() -> None:
    """``1 - exp(-(1 - sqrt(2) 0.2)^2 / (4 * 1 * 0.5^2)) = 0.4017``: pins the 4 and the L^2."""
    expected = 1 - math.exp(-((1.0 - math.sqrt(2) * 0.2) ** 2) / (4 * 1.0**2 * 0.5**2))
    assert 0.3 < expected < 0.5
    assert smoothed_robustness(1.0, lipschitz_constant=1.0, eps=0.2, sigma=0.5).item() == pytest.approx(
        expected, rel=1e-12)
    scaled = 1 - math.exp(-((1.0 - math.sqrt(2) * 2.0 * 0.1) ** 2) / (4 * 2.0**2 * 0.25**2))
    assert smoothed_robustness(1.0, lipschitz_constant=2.0, eps=0.1, sigma=0.25).item() == pytest.approx(
        scaled, rel=1e-12)
    with pytest.raises(ValueError, match="sigma must be finite and >= 0"):
        smoothed_robustness(1.0, lipschitz_constant=1.0, eps=0.1, sigma=-0.1)


def test_sequential_min_radius_must_be_a_non_negative_number() -> None:
    model = OnePixelVote.with_vote_probability(0.9, 0.5)
    for min_radius in (-0.1, True):
        with pytest.raises(ValueError, match="min_radius must be a number >= 0"):
            sequential_certify(model, X, sigma=0.5, min_radius=min_radius)


def test_smoothed_classifier_is_seeded_shows_its_draws_and_checks_the_classes() -> None:
    model = OnePixelVote.with_vote_probability(0.6, 0.5)
    smoothed = SmoothedClassifier(model, 2, 0.5)
    seen: list[torch.Tensor] = []
    first = smoothed.class_counts(X, num=40, batch_size=16, generator=torch.Generator().manual_seed(3),
                                  logits_callback=seen.append)
    again = smoothed.class_counts(X, num=40, batch_size=16, generator=torch.Generator().manual_seed(3))
    assert first.tolist() == again.tolist() and sum(len(batch) for batch in seen) == 40
    runs = [[smoothed.predict(X, n=50, alpha=0.3, generator=torch.Generator().manual_seed(seed))
             for seed in range(12)] for _ in range(2)]
    assert runs[0] == runs[1] and len(set(runs[0])) > 1  # seeded, and the seed matters
    seen.clear()
    smoothed.certify(X, n0=7, n=30, alpha=0.1, batch_size=16, generator=torch.Generator().manual_seed(0),
                     logits_callback=seen.append)
    assert sum(len(batch) for batch in seen) == 37
    with pytest.raises(ValueError, match="has 2 logits per image but num_classes is 3"):
        SmoothedClassifier(model, 3, 0.5).class_counts(X, num=5)


def test_certify_functions_called_with_their_defaults() -> None:
    """The defaults at work, not only in the signature (a wrapper can keep a signature and change them)."""
    model = OnePixelVote.with_vote_probability(0.9, 0.5)
    soft = soft_smoothing_certify(model, X, sigma=0.5, generator=torch.Generator().manual_seed(0))
    assert (soft.n, soft.forward_passes, soft.alpha) == (1000, 1100, 0.001)
    margin = smoothed_margin_certify(model, X, sigma=0.5, lipschitz_constant=math.sqrt(2),
                                     generator=torch.Generator().manual_seed(0))
    assert (margin.n, margin.forward_passes, margin.alpha) == (1000, 1100, 0.001)
    decided = sequential_certify(model, X, sigma=0.5, target_radius=0.05,
                                 generator=torch.Generator().manual_seed(0))
    assert decided.certificate.alpha == 0.001 and decided.forward_passes == 64 + decided.certificate.n


def test_margins_of_a_fixed_class_are_float64() -> None:
    """docs/design.md, "Units and conventions": margins are computed in float64, whatever the logits."""
    logits = torch.tensor([[1.0, 1.0 + 1e-7, 0.0]], dtype=torch.float32)
    margin = margin_for_class(logits, torch.tensor([1]))
    assert margin.dtype == torch.float64
    assert float(margin[0]) == float(logits[0, 1].double() - logits[0, 0].double())
