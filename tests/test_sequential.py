"""Anytime-valid sequential certificates (painwatch.robust.sequential)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import allowed_failures
from scipy.stats import norm

from painwatch.robust.bounds import BettingLowerBound, best_attainable_lower_bound, clopper_pearson_lower
from painwatch.robust.certificate import ABSTAIN
from painwatch.robust.sequential import sequential_certify


class LinearPair(torch.nn.Module):
    """Two logits ``[0, w.x + b]``: the expected soft score under Gaussian noise is a 1-D integral."""

    def __init__(self, weight: torch.Tensor, bias: float) -> None:
        super().__init__()
        self.weight = weight.to(torch.float32)
        self.bias = bias

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        score = batch.flatten(1) @ self.weight.flatten() + self.bias
        return torch.stack([torch.zeros_like(score), score], dim=1)

    def expected_pain_score(self, x: torch.Tensor, sigma: float, temperature: float = 1.0) -> float:
        """``E sigmoid((w.x + b + sigma ||w|| Z) / T)`` by Gauss-Hermite quadrature (exact to ~1e-12)."""
        nodes, weights = np.polynomial.hermite_e.hermegauss(120)
        centre = float(x.flatten() @ self.weight.flatten()) + self.bias
        spread = sigma * float(self.weight.norm())
        values = 1.0 / (1.0 + np.exp(-(centre + spread * nodes) / temperature))
        return float(np.sum(weights * values) / math.sqrt(2 * math.pi))


def test_lower_bound_is_time_uniform() -> None:
    # Checked after every batch of a doubling schedule: a bound that were only valid at a fixed n
    # (e.g. a normal approximation) fails far more often than alpha when looked at repeatedly.
    alpha, mean, trials = 0.1, 0.7, 200
    violations, finals = 0, []
    for seed in range(trials):
        draws = (np.random.default_rng(seed).random(1500) < mean).astype(float)
        bound = BettingLowerBound(alpha, probit_step=0.01)
        used, batch, crossed = 0, 8, False
        while used < draws.size:
            crossed |= bound.update(draws[used : used + batch]) > mean
            used += batch
            batch = min(2 * batch, 512)
        violations += crossed
        finals.append(bound.lower)
    assert violations <= allowed_failures(trials, alpha)
    # ...and it is not vacuous: close to the fixed-n Clopper-Pearson bound at the end.
    assert np.mean(finals) > clopper_pearson_lower(int(mean * 1500), 1500, alpha) - 0.03


def test_saturated_draws_reach_the_attainable_bound() -> None:
    bound = BettingLowerBound(0.001)
    for size in (64, 128, 256, 552):
        bound.update(np.ones(size))
    attainable = best_attainable_lower_bound(0.001, 1000)
    assert bound.lower <= attainable
    assert norm.ppf(bound.lower) > norm.ppf(attainable) - 0.1
    # Clopper-Pearson at n = 1000 with no failure, the best any fixed-n bound can do, is close.
    assert abs(norm.ppf(bound.lower) - norm.ppf(0.001 ** (1 / 1000))) < 0.1


def test_lower_bound_rejects_draws_outside_unit_interval() -> None:
    bound = BettingLowerBound(0.01)
    with pytest.raises(ValueError, match=r"\[0, 1\].*1\.5"):
        bound.update(np.array([0.2, 1.5]))
    with pytest.raises(ValueError, match="alpha"):
        BettingLowerBound(1.5)


def _pair_and_image(centre: float) -> tuple[LinearPair, torch.Tensor]:
    weight = torch.tensor([1.0, -1.0, 2.0, 0.5])
    x = torch.full((1, 2, 2), 0.5)
    bias = centre - float(x.flatten() @ weight)
    return LinearPair(weight, bias), x


def test_soft_certificate_holds_with_probability_one_minus_alpha() -> None:
    alpha, sigma, trials = 0.1, 0.5, 60
    model, x = _pair_and_image(centre=2.0)
    score = model.expected_pain_score(x, sigma)
    true_radius = sigma * norm.ppf(score)  # the radius the soft certificate estimates from below
    too_large, radii = 0, []
    for seed in range(trials):
        result = sequential_certify(model, x, sigma=sigma, alpha=alpha, n0=16, max_n=1000, first_batch=16,
                                    rel_tol=0.02, generator=torch.Generator().manual_seed(seed))
        certificate = result.certificate
        assert certificate.prediction in (1, ABSTAIN)
        too_large += certificate.radius > true_radius
        radii.append(certificate.radius)
        assert certificate.bound <= 1.0 and result.forward_passes == 16 + certificate.n
    assert too_large <= allowed_failures(trials, alpha)
    assert np.mean(radii) > 0.8 * true_radius


def test_sharpened_scores_hold_and_certify_more() -> None:
    alpha, sigma, trials = 0.1, 0.5, 30
    model, x = _pair_and_image(centre=1.0)
    sharp_radius = sigma * norm.ppf(model.expected_pain_score(x, sigma, temperature=0.2))
    plain_radius = sigma * norm.ppf(model.expected_pain_score(x, sigma))
    assert sharp_radius > plain_radius
    too_large, radii = 0, []
    for seed in range(trials):
        result = sequential_certify(model, x, sigma=sigma, alpha=alpha, n0=16, max_n=1000, first_batch=16,
                                    score_temperature=0.2, generator=torch.Generator().manual_seed(seed))
        too_large += result.certificate.radius > sharp_radius
        radii.append(result.certificate.radius)
    assert too_large <= allowed_failures(trials, alpha)
    assert np.mean(radii) > plain_radius
    with pytest.raises(ValueError, match="score_temperature"):
        sequential_certify(model, x, sigma=sigma, score_temperature=0.0)


def test_hard_votes_of_a_constant_model_give_the_attainable_bound() -> None:
    model, x = _pair_and_image(centre=50.0)  # every noisy copy is class 1
    result = sequential_certify(model, x, sigma=0.25, alpha=0.001, n0=8, max_n=1000, first_batch=1000,
                                scores="hard", rel_tol=0.0, generator=torch.Generator().manual_seed(0))
    assert result.certificate.prediction == 1
    assert result.method == "randomized_smoothing_sequential"
    assert result.stop_reason == "budget" and result.forward_passes == 1008
    attainable = best_attainable_lower_bound(0.001, 1000)
    assert result.certificate.bound <= attainable
    assert result.certificate.radius == pytest.approx(0.25 * norm.ppf(result.certificate.bound))
    assert result.certificate.radius > 0.25 * (norm.ppf(attainable) - 0.06)


def test_fixed_bound_is_clopper_pearson_of_the_whole_budget() -> None:
    model, x = _pair_and_image(centre=1.0)  # p_A = Phi(1.0 / (0.5 * ||w||)) = 0.79: many draws disagree
    batches: list[torch.Tensor] = []
    result = sequential_certify(model, x, sigma=0.5, alpha=0.001, n0=16, max_n=900, scores="hard",
                                bound="fixed", generator=torch.Generator().manual_seed(0),
                                logits_callback=batches.append)
    estimation = torch.cat(batches)[16:]  # the selection draws come first
    assert estimation.shape[0] == 900 and result.stop_reason == "budget" and result.forward_passes == 916
    votes = int((estimation.argmax(dim=1) == 1).sum())
    expected = clopper_pearson_lower(votes, 900, 0.001)
    assert result.certificate.prediction == 1 and result.certificate.bound == expected
    assert result.certificate.radius == pytest.approx(0.5 * norm.ppf(expected))
    assert result.method == result.certificate.method == "randomized_smoothing"
    assert result.point_estimate == pytest.approx(votes / 900)

    constant, x = _pair_and_image(centre=50.0)  # every draw votes 1: Cohen's cap at n = 1000, exactly
    capped = sequential_certify(constant, x, sigma=0.25, alpha=0.001, n0=8, max_n=1000, scores="hard",
                                bound="fixed", generator=torch.Generator().manual_seed(0))
    assert capped.certificate.radius == pytest.approx(0.25 * norm.ppf(0.001 ** (1 / 1000)))
    anytime = sequential_certify(constant, x, sigma=0.25, alpha=0.001, n0=8, max_n=1000, scores="hard",
                                 generator=torch.Generator().manual_seed(0))
    assert anytime.certificate.radius < capped.certificate.radius  # the price of stopping at any time


def test_fixed_bound_holds_and_stops_early_only_to_abstain() -> None:
    alpha, sigma, trials = 0.1, 0.5, 200
    model, x = _pair_and_image(centre=0.8)
    weight_norm = float(model.weight.norm())
    true_radius = sigma * norm.ppf(norm.cdf(0.8 / (sigma * weight_norm)))  # Cohen's g: exact p_A
    too_large = sum(
        sequential_certify(model, x, sigma=sigma, alpha=alpha, n0=8, max_n=300, scores="hard", bound="fixed",
                           generator=torch.Generator().manual_seed(seed)).certificate.radius > true_radius
        for seed in range(trials)
    )
    assert too_large <= allowed_failures(trials, alpha)
    coin, x = _pair_and_image(centre=0.0)  # p_A = 1/2: nothing can be certified
    futile = sequential_certify(coin, x, sigma=0.25, alpha=0.001, max_n=100_000, min_radius=0.01,
                                scores="hard", bound="fixed", generator=torch.Generator().manual_seed(0))
    assert futile.stop_reason == "futile" and futile.certificate.prediction == ABSTAIN
    assert futile.certificate.radius == 0.0 and futile.forward_passes < 100_000
    same_rule = sequential_certify(coin, x, sigma=0.25, alpha=0.001, max_n=100_000, min_radius=0.01,
                                   scores="hard", generator=torch.Generator().manual_seed(0))
    assert futile.forward_passes == same_rule.forward_passes  # the anytime bound's futility rule
    with pytest.raises(ValueError, match="needs scores='hard'"):
        sequential_certify(model, x, sigma=sigma, bound="fixed")
    with pytest.raises(ValueError, match="bound must be one of"):
        sequential_certify(model, x, sigma=sigma, scores="hard", bound="exact")


def test_same_seed_same_certificate() -> None:
    model, x = _pair_and_image(centre=1.0)
    runs = [sequential_certify(model, x, sigma=0.5, alpha=0.01, max_n=800,
                               generator=torch.Generator().manual_seed(seed)) for seed in (7, 7, 8)]
    assert runs[0] == runs[1]
    other = runs[2]
    assert other.certificate.bound != runs[0].certificate.bound


def test_stops_early_when_target_is_met_or_no_radius_is_possible() -> None:
    confident, x = _pair_and_image(centre=6.0)
    result = sequential_certify(confident, x, sigma=0.25, alpha=0.001, max_n=100_000, target_radius=0.25,
                                generator=torch.Generator().manual_seed(0))
    assert result.stop_reason == "target"
    assert result.certificate.radius >= 0.25
    assert result.forward_passes < 2_000

    saturated = sequential_certify(confident, x, sigma=0.25, alpha=0.001, max_n=100_000, rel_tol=0.05,
                                   generator=torch.Generator().manual_seed(0))
    assert saturated.stop_reason in ("saturated", "budget")
    assert saturated.certificate.radius > 0.25 * 1.5

    coin, x = _pair_and_image(centre=0.0)  # expected score exactly 1/2: nothing can be certified
    futile = sequential_certify(coin, x, sigma=0.25, alpha=0.001, max_n=100_000, min_radius=0.01,
                                generator=torch.Generator().manual_seed(0))
    assert futile.certificate.prediction == ABSTAIN and futile.certificate.radius == 0.0
    assert futile.stop_reason == "futile"
    assert futile.forward_passes < 20_000
    wrong_side, x = _pair_and_image(centre=-0.3)  # class 0 wins, but only just
    narrow = sequential_certify(wrong_side, x, sigma=0.25, alpha=0.001, max_n=100_000, min_radius=0.1,
                                generator=torch.Generator().manual_seed(0))
    assert narrow.stop_reason == "futile" and narrow.forward_passes < 5_000


def test_bad_arguments_are_named() -> None:
    model, x = _pair_and_image(centre=1.0)
    with pytest.raises(ValueError, match="scores"):
        sequential_certify(model, x, sigma=0.5, scores="votes")
    with pytest.raises(ValueError, match="rel_tol"):
        sequential_certify(model, x, sigma=0.5, rel_tol=1.5)
    with pytest.raises(ValueError, match=r"shape \(C, H, W\)"):
        sequential_certify(model, x.unsqueeze(0), sigma=0.5)
    with pytest.raises(ValueError, match="sigma"):
        sequential_certify(model, x, sigma=-0.1)
