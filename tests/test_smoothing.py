"""Randomized and soft smoothing on models whose smoothed classifier is known in closed form.

Binary linear model ``f(x) = (t, -t)``, ``t = s (w . x + b)``: under ``xi ~ N(0, sigma^2 I)`` the base
class is 0 with probability ``pA = Phi(d / sigma)``, ``d = (w . x + b) / ||w||`` the signed distance to
the boundary, so Cohen's exact smoothed radius is ``sigma * PhiInv(pA) = d``; the expected softmax is
``E[sigmoid(2 t)]`` with ``t`` Gaussian, computed by Gauss-Hermite quadrature. Statistical claims are
checked over many seeds with a large alpha and a binomial tolerance, so the tests are fast and a
bound that is too optimistic (e.g. a point estimate) fails them.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import allowed_failures
from numpy.polynomial.hermite_e import hermegauss
from scipy.stats import binomtest, norm
from torch import nn

from painwatch.robust import (
    ABSTAIN,
    SmoothedClassifier,
    clopper_pearson_lower,
    empirical_bernstein_radius,
    evaluation_mode,
    expected_logits,
    expected_softmax,
    hoeffding_radius,
    mean_confidence_bounds,
    noisy_logits,
    soft_smoothing_certify,
)

SHAPE = (1, 3, 3)
DIM = 9



class BinaryLinear(nn.Module):
    """``x -> (t, -t)``, ``t = scale * (w . vec(x) + b)``; ``||w|| = 1``, so ``w . x + b`` is a distance."""

    def __init__(self, seed: int, scale: float = 1.0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        w = torch.randn(DIM, generator=generator)
        self.register_buffer("w", w / w.norm())
        self.scale = scale
        self.offset = 0.0

    def distance(self, x: torch.Tensor) -> float:
        """Signed distance of ``x`` to the boundary (positive on class 0's side)."""
        return float(self.w @ x.flatten()) + self.offset

    def place(self, x: torch.Tensor, distance: float) -> None:
        """Choose the offset so that ``x`` lies at signed ``distance`` from the boundary."""
        self.offset = distance - float(self.w @ x.flatten())

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        t = self.scale * (batch.flatten(1) @ self.w + self.offset)
        return torch.stack([t, -t], dim=1)


def exact_soft_score(distance: float, sigma: float, scale: float) -> float:
    """``E[softmax_0] = E[sigmoid(2 scale (distance + sigma Z))]`` by 80-point Gauss-Hermite quadrature."""
    nodes, weights = hermegauss(80)
    values = 1.0 / (1.0 + np.exp(-2.0 * scale * (distance + sigma * nodes)))
    return float(np.sum(weights * values) / math.sqrt(2.0 * math.pi))


X = torch.full(SHAPE, 0.5)


# --- the sampler ------------------------------------------------------------------------------------

def test_noisy_logits_shape_dtype_and_reproducibility() -> None:
    model = BinaryLinear(0)
    first, again, other = (
        noisy_logits(model, X, sigma=0.3, num=250, batch_size=64,
                     generator=torch.Generator().manual_seed(seed))
        for seed in (1, 1, 2)
    )
    assert first.shape == (250, 2) and first.dtype == torch.float64 and not first.requires_grad
    assert torch.equal(first, again) and not torch.equal(first, other)
    # The logit of a unit-norm linear map under N(0, sigma^2) noise has std sigma.
    assert float(first[:, 0].std()) == pytest.approx(0.3, rel=0.15)


def test_noise_is_gaussian_unclipped_and_model_runs_in_eval_mode() -> None:
    seen: list[torch.Tensor] = []

    class Recorder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.dropout = nn.Dropout(0.9)

        def forward(self, batch: torch.Tensor) -> torch.Tensor:
            assert not self.training and not torch.is_grad_enabled()
            seen.append(batch.clone())
            kept = self.dropout(batch.flatten(1))
            return torch.stack([kept.sum(1), -kept.sum(1)], dim=1)

    model = Recorder()
    model.dropout.train()
    model.train()
    noisy_logits(model, torch.zeros(SHAPE), sigma=0.5, num=300, batch_size=128,
                 generator=torch.Generator().manual_seed(0))
    assert model.training and model.dropout.training  # flags restored
    noisy = torch.cat(seen)
    assert [len(b) for b in seen] == [128, 128, 44]
    assert float(noisy.min()) < 0.0  # x = 0: noise below 0 is kept, not clipped
    assert float(noisy.std()) == pytest.approx(0.5, rel=0.05)
    assert float(noisy.mean()) == pytest.approx(0.0, abs=0.05)


def test_evaluation_mode_restores_mixed_flags() -> None:
    model = nn.Sequential(nn.Dropout(), nn.Sequential(nn.Dropout(), nn.BatchNorm1d(3)))
    model.train()
    model[1][0].eval()
    before = [m.training for m in model.modules()]
    with evaluation_mode(model):
        assert not any(m.training for m in model.modules())
    assert [m.training for m in model.modules()] == before


def test_expected_scores_match_closed_form() -> None:
    model = BinaryLinear(1, scale=2.0)
    model.place(X, 0.2)
    generator = torch.Generator().manual_seed(0)
    logits = expected_logits(model, X, sigma=0.4, num=20000, batch_size=5000, generator=generator)
    assert float(logits[0]) == pytest.approx(2.0 * 0.2, abs=0.03)  # E[f] = f for a linear model
    scores = expected_softmax(model, X, sigma=0.4, num=20000, batch_size=5000, generator=generator)
    assert float(scores[0]) == pytest.approx(exact_soft_score(0.2, 0.4, 2.0), abs=0.01)


# --- Cohen et al.: CERTIFY and PREDICT ---------------------------------------------------------------

def test_clopper_pearson_matches_scipy_exact_interval() -> None:
    for successes, trials, alpha in [(90, 100, 0.001), (7, 10, 0.05), (100, 100, 0.01), (1, 5, 0.2)]:
        two_sided = binomtest(successes, trials).proportion_ci(confidence_level=1 - 2 * alpha, method="exact")
        assert clopper_pearson_lower(successes, trials, alpha) == pytest.approx(two_sided.low, rel=1e-9)
    assert clopper_pearson_lower(0, 10, 0.05) == 0.0
    with pytest.raises(ValueError, match=r"successes \(11\) cannot exceed trials \(10\)"):
        clopper_pearson_lower(11, 10, 0.05)


def test_cohen_radius_exceeds_the_true_radius_at_most_alpha_often() -> None:
    """True smoothed radius sigma * PhiInv(pA) = d; the certified radius may exceed it w.p. <= alpha."""
    model = BinaryLinear(2)
    sigma, distance, alpha, trials = 0.5, 0.4, 0.1, 300
    model.place(X, distance)
    true_radius = sigma * norm.ppf(norm.cdf(distance / sigma))
    smoothed = SmoothedClassifier(model, num_classes=2, sigma=sigma)
    certificates = [smoothed.certify(X, n0=10, n=100, alpha=alpha, batch_size=110,
                                     generator=torch.Generator().manual_seed(seed)) for seed in range(trials)]
    too_large = sum(c.radius > true_radius for c in certificates)
    assert too_large <= allowed_failures(trials, alpha)
    certified = [c for c in certificates if not c.abstained]
    assert len(certified) > trials / 2 and all(c.prediction == 0 for c in certified)
    assert all(c.forward_passes == 110 and c.method == "randomized_smoothing" for c in certificates)
    # Each radius comes from its Clopper-Pearson bound.
    assert all(c.radius == pytest.approx(sigma * norm.ppf(c.bound)) for c in certified)


def test_cohen_abstains_on_the_boundary() -> None:
    model = BinaryLinear(3)
    model.place(X, 0.0)  # pA = 1/2 exactly
    smoothed = SmoothedClassifier(model, 2, 0.25)
    alpha, trials = 0.1, 100
    certify_abstained = sum(
        smoothed.certify(X, n0=10, n=100, alpha=alpha, batch_size=200,
                         generator=torch.Generator().manual_seed(seed)).abstained
        for seed in range(trials)
    )
    predict_abstained = sum(
        smoothed.predict(X, n=100, alpha=alpha, batch_size=200,
                         generator=torch.Generator().manual_seed(seed)) == ABSTAIN
        for seed in range(trials)
    )
    assert certify_abstained >= trials - allowed_failures(trials, alpha)
    assert predict_abstained >= trials - allowed_failures(trials, alpha)


class Buckets(nn.Module):
    """Base classifier whose class is decided by the noise on one pixel: P(class k) = probs[k] exactly."""

    def __init__(self, probs: list[float], sigma: float) -> None:
        super().__init__()
        edges = np.cumsum(probs)[:-1]
        self.register_buffer("edges", torch.tensor(sigma * norm.ppf(edges), dtype=torch.float32))
        self.num_classes = len(probs)

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        labels = torch.bucketize(batch[:, 0, 0, 0] - 0.5, self.edges)
        return nn.functional.one_hot(labels, self.num_classes).float()


def test_cohen_abstains_when_pa_is_below_one_half_but_predict_finds_the_plurality() -> None:
    model = Buckets([0.4, 0.3, 0.3], sigma=0.3)
    smoothed = SmoothedClassifier(model, 3, 0.3)
    alpha, trials = 0.1, 60
    certificates = [smoothed.certify(X, n0=50, n=200, alpha=alpha, batch_size=250,
                                    generator=torch.Generator().manual_seed(s))
                    for s in range(trials)]
    assert sum(c.abstained for c in certificates) >= trials - allowed_failures(trials, alpha)
    counts = smoothed.class_counts(X, num=20000, batch_size=5000, generator=torch.Generator().manual_seed(0))
    assert counts.sum() == 20000 and counts / 20000 == pytest.approx([0.4, 0.3, 0.3], abs=0.015)
    predictions = [smoothed.predict(X, n=2000, alpha=alpha, batch_size=2000,
                                    generator=torch.Generator().manual_seed(s))
                   for s in range(20)]
    # PREDICT returns a class other than g(x) = 0 with probability <= alpha; it may abstain.
    assert sum(p not in (0, ABSTAIN) for p in predictions) <= allowed_failures(20, alpha)
    assert predictions.count(0) >= 15


def test_cohen_radius_cap_and_reproducibility() -> None:
    model = Buckets([1.0], sigma=0.3)  # one bucket: every vote is class 0
    model.num_classes = 2
    smoothed = SmoothedClassifier(model, 2, 0.3)
    cert = smoothed.certify(X, n0=10, n=1000, alpha=0.001, batch_size=500,
                            generator=torch.Generator().manual_seed(0))
    assert cert.prediction == 0
    assert cert.bound == pytest.approx(0.001 ** (1 / 1000))
    assert cert.radius == pytest.approx(0.3 * norm.ppf(0.001 ** (1 / 1000)))
    far = BinaryLinear(4)
    far.place(X, 0.3)
    smoothed = SmoothedClassifier(far, 2, 0.25)
    first, again = (smoothed.certify(X, n0=20, n=500, alpha=0.01, batch_size=128,
                                                    generator=torch.Generator().manual_seed(9))
                    for _ in range(2))
    assert first == again and not first.abstained


# --- soft smoothing ---------------------------------------------------------------------------------

def test_concentration_bounds_cover_the_mean() -> None:
    """Each one-sided bound fails with probability <= delta (Beta-distributed scores with a known mean)."""
    rng = np.random.default_rng(0)
    delta, trials, n = 0.1, 400, 30
    a, b = 8.0, 2.0  # mean 0.8, small variance: empirical Bernstein matters
    mean = a / (a + b)
    for method in ("hoeffding", "bernstein", "best"):
        lower_fail = upper_fail = 0
        for _ in range(trials):
            lower, upper = mean_confidence_bounds(rng.beta(a, b, size=(n, 1)), delta, method)
            lower_fail += lower[0] > mean
            upper_fail += upper[0] < mean
        assert lower_fail <= allowed_failures(trials, delta) and upper_fail <= allowed_failures(trials, delta)
    low_variance = np.full((1000, 1), 0.99)
    assert empirical_bernstein_radius(np.zeros(1), 1000, 0.01)[0] < hoeffding_radius(1000, 0.01)
    lower, _ = mean_confidence_bounds(low_variance, 0.01, "best")
    assert lower[0] == pytest.approx(0.99 - 7 * math.log(400) / (3 * 999))


@pytest.mark.parametrize("concentration", ["hoeffding", "bernstein", "best"])
def test_soft_radius_exceeds_the_exact_one_at_most_alpha_often(concentration: str) -> None:
    """Exact G_0 by quadrature; the best radius G allows is sigma * PhiInv(G_0) (two classes)."""
    model = BinaryLinear(5, scale=3.0)
    sigma, distance, alpha, trials = 0.3, 0.25, 0.1, 150
    model.place(X, distance)
    exact = exact_soft_score(distance, sigma, 3.0)
    exact_radius = sigma * norm.ppf(exact)
    assert exact_radius <= distance  # argmax G flips exactly at the boundary (symmetric sigmoid)
    certificates = [
        soft_smoothing_certify(model, X, sigma=sigma, n0=10, n=100, alpha=alpha, batch_size=110,
                               generator=torch.Generator().manual_seed(seed), concentration=concentration)
        for seed in range(trials)
    ]
    assert sum(c.bound > exact for c in certificates) <= allowed_failures(trials, alpha)
    assert sum(c.radius > exact_radius for c in certificates) <= allowed_failures(trials, alpha)
    certified = [c for c in certificates if not c.abstained]
    assert len(certified) > trials / 2 and all(c.prediction == 0 for c in certified)
    # Two classes: runner-up bound 1 - G_c_low, so r = sigma * PhiInv(G_c_low).
    assert all(c.radius == pytest.approx(sigma * norm.ppf(c.bound)) for c in certified)


def test_soft_smoothing_union_bound_for_more_classes() -> None:
    """Constant scores (0.7, 0.2, 0.1): zero variance, so every bound is mean -/+ 7 ln(2K/alpha)/(3(n-1))."""
    logits = torch.log(torch.tensor([0.1, 0.7, 0.2]))

    def constant(batch: torch.Tensor) -> torch.Tensor:
        return logits.expand(batch.shape[0], 3)

    sigma, n, alpha = 0.5, 500, 0.01
    cert = soft_smoothing_certify(constant, X, sigma=sigma, n0=20, n=n, alpha=alpha, batch_size=256,
                                  generator=torch.Generator().manual_seed(0), concentration="bernstein")
    slack = 7 * math.log(2 * 3 / alpha) / (3 * (n - 1))
    low, up = 0.7 - slack, min(1 - (0.7 - slack), 0.2 + slack)
    assert cert.prediction == 1 and cert.bound == pytest.approx(low)
    assert cert.radius == pytest.approx(sigma / 2 * (norm.ppf(low) - norm.ppf(up)))


def test_soft_smoothing_abstains_on_the_boundary_and_is_reproducible() -> None:
    model = BinaryLinear(6, scale=2.0)
    model.place(X, 0.0)
    alpha, trials = 0.1, 60
    abstained = sum(soft_smoothing_certify(model, X, sigma=0.3, n0=10, n=100, alpha=alpha, batch_size=128,
                                           generator=torch.Generator().manual_seed(s)).abstained
                    for s in range(trials))
    assert abstained >= trials - allowed_failures(trials, alpha)
    model.place(X, 0.3)
    first, again = (soft_smoothing_certify(model, X, sigma=0.3, n0=10, n=200, alpha=0.01, batch_size=64,
                                           generator=torch.Generator().manual_seed(3))
                    for _ in range(2))
    assert first == again and first.forward_passes == 210


# --- validation -------------------------------------------------------------------------------------

def test_smoothing_validates_inputs() -> None:
    model = BinaryLinear(0)
    with pytest.raises(ValueError, match="num_classes must be >= 2"):
        SmoothedClassifier(model, 1, 0.1)
    with pytest.raises(ValueError, match="sigma must be a finite number > 0"):
        SmoothedClassifier(model, 2, 0.0)
    with pytest.raises(ValueError, match="has 2 logits per image but num_classes is 3"):
        SmoothedClassifier(model, 3, 0.1).certify(X, n0=5, n=10, alpha=0.01)
    smoothed = SmoothedClassifier(model, 2, 0.1)
    with pytest.raises(ValueError, match="n0 must be >= 1"):
        smoothed.certify(X, n0=0, n=10, alpha=0.01)
    with pytest.raises(ValueError, match="alpha must be strictly between 0 and 1"):
        smoothed.predict(X, n=10, alpha=1.2)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        smoothed.predict(X, n=10, alpha=0.1, batch_size=0)
    with pytest.raises(ValueError, match=r"pixels in \[0, 1\]"):
        smoothed.certify(X - 1.0, n0=5, n=10, alpha=0.01)
    with pytest.raises(ValueError, match="concentration must be one of"):
        soft_smoothing_certify(model, X, sigma=0.1, n0=5, n=10, alpha=0.01, concentration="chernoff")
    with pytest.raises(ValueError, match="n must be >= 2"):
        soft_smoothing_certify(model, X, sigma=0.1, n0=5, n=1, alpha=0.01)
    with pytest.raises(ValueError, match="num must be >= 1"):
        noisy_logits(model, X, sigma=0.1, num=0)
    with pytest.raises(TypeError, match=r"generator must be a torch\.Generator"):
        noisy_logits(model, X, sigma=0.1, num=5, generator=np.random.default_rng(0))
    on_meta = nn.Sequential(nn.Flatten(), nn.Linear(DIM, 2, device="meta"))
    with pytest.raises(ValueError, match="x is on cpu but the model's weights are on meta"):
        noisy_logits(on_meta, X, sigma=0.1, num=5)
    with pytest.raises(ValueError, match=r"scores must lie in \[0, 1\]"):
        mean_confidence_bounds(np.array([[1.5]]), 0.1)
