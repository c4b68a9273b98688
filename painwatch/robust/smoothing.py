"""Randomized smoothing: the batched noise sampler, Cohen et al. (2019) and soft (expected-score) smoothing.

Every smoothing method draws its noise through :func:`noisy_logits` (the one place noise is drawn), from
the ``torch.Generator`` the caller passes: the same seed gives the same certificate. Noisy images are
*not* clipped to [0, 1]: the Gaussian ``N(x, sigma^2 I)`` is what the guarantees are about.

Classifiers certified here:

- ``SmoothedClassifier``: the hard smoothed classifier ``g(x) = argmax_c P_xi[argmax f(x + xi) = c]``
  (Cohen, Rosenfeld, Kolter 2019), with their PREDICT and CERTIFY, exactly.
- :func:`soft_smoothing_certify`: the soft smoothed classifier ``argmax_c G_c(x)``,
  ``G(x) = E_xi[softmax f(x + xi)]`` (Salman et al. 2019, Lemma 2: ``PhiInv(G_c)`` is ``1/sigma``-Lipschitz).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from scipy.stats import beta as beta_distribution
from scipy.stats import binomtest, norm

from painwatch.robust.certificates import ABSTAIN, Certificate
from painwatch.robust.validation import (
    Model,
    check_alpha,
    check_count,
    check_generator,
    check_image,
    check_logits,
    check_model,
    check_num_classes,
    check_same_device,
    check_sigma,
)

__all__ = [
    "CONCENTRATION_BOUNDS",
    "SmoothedClassifier",
    "clopper_pearson_lower",
    "empirical_bernstein_radius",
    "evaluation_mode",
    "expected_logits",
    "expected_softmax",
    "hoeffding_radius",
    "mean_confidence_bounds",
    "noisy_logits",
    "soft_smoothing_certify",
]

CONCENTRATION_BOUNDS: tuple[str, ...] = ("hoeffding", "bernstein", "best")
"""Confidence bounds for means of [0, 1] scores: Hoeffding, empirical Bernstein (Maurer & Pontil 2009),
or the smaller of both (each at half the failure probability, so the pair is union-bounded)."""


@contextmanager
def evaluation_mode(model: Model) -> Iterator[None]:
    """Put an ``nn.Module`` (and every submodule) in eval mode for the block, then restore each flag.

    Certificates are statements about the deterministic network: dropout and batch-norm statistics
    must not change between forward passes. Plain callables are left alone.
    """
    if not isinstance(model, torch.nn.Module):
        yield
        return
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


def _resolve_generator(generator: torch.Generator | None) -> torch.Generator:
    """The caller's generator, or a fresh one seeded non-deterministically (results then vary by run)."""
    check_generator(generator)
    if generator is not None:
        return generator
    fresh = torch.Generator()
    fresh.seed()
    return fresh


def _noisy_logit_batches(
    model: Model, x: torch.Tensor, sigma: float, num: int, batch_size: int, generator: torch.Generator,
    num_classes: int | None = None,
) -> Iterator[torch.Tensor]:
    """Yield float64 logits of ``model`` on ``x + N(0, sigma^2 I)`` in batches of at most ``batch_size``.

    Noise is drawn on the generator's device (so a seed gives the same noise whatever device ``x`` is on)
    and moved to ``x``'s device. Inputs are already validated by the public callers.
    """
    check_same_device(model, x)
    remaining = num
    with evaluation_mode(model), torch.no_grad():
        while remaining > 0:
            this_batch = min(batch_size, remaining)
            noise = torch.randn((this_batch, *x.shape), generator=generator, device=generator.device,
                                dtype=x.dtype)
            batch = x.unsqueeze(0) + sigma * noise.to(x.device)
            logits = check_logits(model(batch), this_batch, num_classes)
            remaining -= this_batch
            yield logits.detach().to(torch.float64)


def noisy_logits(
    model: Model,
    x: torch.Tensor,
    sigma: float,
    num: int,
    batch_size: int = 1000,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Logits of ``model`` at ``num`` Gaussian perturbations of one image: float64 tensor ``(num, K)``.

    ``x`` is ``(C, H, W)`` in [0, 1]; the k-th row is ``f(x + sigma * Z_k)`` with ``Z_k`` standard
    Gaussian drawn from ``generator`` (noisy images are not clipped). The model runs in eval mode under
    ``torch.no_grad`` in batches of at most ``batch_size`` images; its training flags are restored.
    Same generator state, same output.
    """
    check_model(model)
    check_image(x)
    sigma = check_sigma(sigma)
    num = check_count(num, "num")
    batch_size = check_count(batch_size, "batch_size")
    generator = _resolve_generator(generator)
    return torch.cat(list(_noisy_logit_batches(model, x, sigma, num, batch_size, generator)), dim=0)


def expected_logits(model: Model, x: torch.Tensor, sigma: float, num: int, batch_size: int = 1000,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """Monte Carlo estimate of ``E_xi[f(x + xi)]`` (float64 ``(K,)``) from ``num`` noise draws.

    Its argmax estimates the expected-logit classifier ``h`` certified by the smoothed margin.
    """
    return noisy_logits(model, x, sigma, num, batch_size, generator).mean(dim=0)


def expected_softmax(model: Model, x: torch.Tensor, sigma: float, num: int, batch_size: int = 1000,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Monte Carlo estimate of ``G(x) = E_xi[softmax f(x + xi)]`` (float64 ``(K,)``) from ``num`` draws."""
    return torch.softmax(noisy_logits(model, x, sigma, num, batch_size, generator), dim=1).mean(dim=0)


def clopper_pearson_lower(successes: int, trials: int, alpha: float) -> float:
    """One-sided Clopper-Pearson lower confidence bound on a binomial proportion at level ``1 - alpha``.

    ``P(p >= bound) >= 1 - alpha`` for ``successes ~ Binomial(trials, p)``: the ``alpha`` quantile of
    ``Beta(successes, trials - successes + 1)``, and 0 when ``successes == 0``.
    """
    trials = check_count(trials, "trials")
    successes = check_count(successes, "successes", minimum=0)
    if successes > trials:
        raise ValueError(f"successes ({successes}) cannot exceed trials ({trials})")
    alpha = check_alpha(alpha)
    if successes == 0:
        return 0.0
    return float(beta_distribution.ppf(alpha, successes, trials - successes + 1))


def hoeffding_radius(n: int, delta: float) -> float:
    """One-sided Hoeffding radius for the mean of ``n`` i.i.d. scores in [0, 1] at failure prob. ``delta``.

    ``P(E[Z] > mean + radius) <= delta`` (and likewise below), with ``radius = sqrt(ln(1/delta) / (2 n))``.
    """
    n = check_count(n, "n")
    return math.sqrt(math.log(1.0 / check_alpha(delta, "delta")) / (2.0 * n))


def empirical_bernstein_radius(sample_variance: np.ndarray, n: int, delta: float) -> np.ndarray:
    """One-sided empirical Bernstein radius (Maurer & Pontil 2009, Theorem 4) for scores in [0, 1].

    With probability at least ``1 - delta``,
    ``E[Z] <= mean + sqrt(2 V ln(2/delta) / n) + 7 ln(2/delta) / (3 (n-1))``, where ``V`` is the
    unbiased sample variance; applied to ``1 - Z`` the same radius bounds ``E[Z]`` from below.
    Needs ``n >= 2``. Much tighter than Hoeffding when the scores barely vary (a confident net).
    """
    n = check_count(n, "n", minimum=2)
    delta = check_alpha(delta, "delta")
    variance = np.clip(np.asarray(sample_variance, dtype=np.float64), 0.0, None)
    log_term = math.log(2.0 / delta)
    return np.sqrt(2.0 * variance * log_term / n) + 7.0 * log_term / (3.0 * (n - 1))


def mean_confidence_bounds(
    scores: np.ndarray, delta: float, method: str = "best"
) -> tuple[np.ndarray, np.ndarray]:
    """Per-column one-sided bounds on the means of scores in [0, 1]: ``(lower, upper)``, clipped to [0, 1].

    ``scores`` is ``(n, m)``. For each column, ``P(E < lower) <= delta`` and ``P(E > upper) <= delta``
    separately (a caller that uses several bounds at once must union-bound over them). ``method`` is one
    of :data:`CONCENTRATION_BOUNDS`; ``"best"`` takes the tighter of Hoeffding and empirical Bernstein,
    each computed at ``delta / 2``, which keeps every reported bound valid at ``delta``.
    """
    if method not in CONCENTRATION_BOUNDS:
        raise ValueError(f"method must be one of {CONCENTRATION_BOUNDS}, got {method!r}")
    values = np.asarray(scores, dtype=np.float64)
    if values.ndim != 2 or values.shape[0] < 1:
        raise ValueError(f"scores must have shape (n, m) with n >= 1, got {values.shape}")
    if np.isnan(values).any() or values.min() < 0.0 or values.max() > 1.0:
        raise ValueError("scores must lie in [0, 1] (softmax probabilities) and contain no NaN")
    n = values.shape[0]
    delta = check_alpha(delta, "delta")
    if method != "hoeffding" and n < 2:
        raise ValueError(f"the empirical Bernstein bound needs n >= 2 samples, got n={n}")
    mean = values.mean(axis=0)
    if method == "hoeffding":
        radius = np.full_like(mean, hoeffding_radius(n, delta))
    elif method == "bernstein":
        radius = empirical_bernstein_radius(values.var(axis=0, ddof=1), n, delta)
    else:
        radius = np.minimum(hoeffding_radius(n, delta / 2.0),
                            empirical_bernstein_radius(values.var(axis=0, ddof=1), n, delta / 2.0))
    return np.clip(mean - radius, 0.0, 1.0), np.clip(mean + radius, 0.0, 1.0)


class SmoothedClassifier:
    """The hard smoothed classifier ``g(x) = argmax_c P_xi[argmax f(x + xi) = c]``, ``xi ~ N(0, sigma^2 I)``.

    Cohen, Rosenfeld & Kolter (2019), Algorithm PREDICT and CERTIFY, exactly: selection and estimation
    use independent samples; the bound is one-sided Clopper-Pearson; PREDICT is a two-sided binomial
    test on the top two counts (``scipy.stats.binomtest``). ``model`` maps ``(B, C, H, W)`` in [0, 1]
    to logits ``(B, num_classes)``; ``sigma`` is the noise std in [0, 1] pixel units.
    """

    def __init__(self, model: Model, num_classes: int, sigma: float) -> None:
        self.model = check_model(model)
        self.num_classes = check_num_classes(num_classes)
        self.sigma = check_sigma(sigma)

    def class_counts(self, x: torch.Tensor, num: int, batch_size: int = 1000,
                     generator: torch.Generator | None = None) -> np.ndarray:
        """How often ``argmax f`` picks each class in ``num`` noise draws: int64 array ``(K,)``."""
        check_image(x)
        num = check_count(num, "num")
        batch_size = check_count(batch_size, "batch_size")
        generator = _resolve_generator(generator)
        counts = torch.zeros(self.num_classes, dtype=torch.long)
        for logits in _noisy_logit_batches(self.model, x, self.sigma, num, batch_size, generator,
                                           self.num_classes):
            counts += torch.bincount(logits.argmax(dim=1).cpu(), minlength=self.num_classes)
        return counts.numpy().astype(np.int64)

    def predict(self, x: torch.Tensor, n: int, alpha: float, batch_size: int = 1000,
                generator: torch.Generator | None = None) -> int:
        """PREDICT: the top class of ``n`` noisy votes, or ``ABSTAIN`` (-1).

        Guarantee (Cohen et al. Prop. 1): the probability of returning a class other than ``g(x)`` is at
        most ``alpha``. Abstains when the two-sided binomial test of the top two counts against 1/2 has
        p-value ``> alpha``.
        """
        n = check_count(n, "n")
        alpha = check_alpha(alpha)
        counts = self.class_counts(x, n, batch_size, generator)
        order = np.argsort(counts, kind="stable")[::-1]
        top, runner_up = int(order[0]), int(order[1])
        count_top, count_runner_up = int(counts[top]), int(counts[runner_up])
        p_value = binomtest(count_top, count_top + count_runner_up, p=0.5).pvalue
        return ABSTAIN if p_value > alpha else top

    def certify(self, x: torch.Tensor, n0: int, n: int, alpha: float, batch_size: int = 1000,
                generator: torch.Generator | None = None) -> Certificate:
        """CERTIFY: a class and an L2 radius within which ``g`` is constant, or an abstention.

        ``n0`` samples select ``cA``; ``n`` fresh samples count it; ``pA_low`` is the one-sided
        Clopper-Pearson lower bound at level ``1 - alpha``. Abstains when ``pA_low < 1/2``, else
        ``radius = sigma * PhiInv(pA_low)``. Guarantee (Cohen et al. Thm 1): with probability at least
        ``1 - alpha``, ``g(x + delta) = cA`` for every ``||delta||_2 < radius``. The radius can never
        exceed ``sigma * PhiInv(alpha ** (1 / n))`` (all ``n`` votes for ``cA``).
        """
        check_image(x)
        n0 = check_count(n0, "n0")
        n = check_count(n, "n")
        alpha = check_alpha(alpha)
        batch_size = check_count(batch_size, "batch_size")
        generator = _resolve_generator(generator)
        selection_counts = self.class_counts(x, n0, batch_size, generator)
        candidate = int(np.argmax(selection_counts))
        counts = self.class_counts(x, n, batch_size, generator)
        p_lower = clopper_pearson_lower(int(counts[candidate]), n, alpha)
        if p_lower < 0.5:
            return Certificate(ABSTAIN, 0.0, "randomized_smoothing", self.sigma, n, alpha, p_lower,
                               forward_passes=n0 + n)
        radius = self.sigma * float(norm.ppf(p_lower))
        return Certificate(candidate, radius, "randomized_smoothing", self.sigma, n, alpha, p_lower,
                           forward_passes=n0 + n)


def soft_smoothing_certify(
    model: Model,
    x: torch.Tensor,
    sigma: float,
    n0: int = 100,
    n: int = 1000,
    alpha: float = 0.001,
    batch_size: int = 1000,
    generator: torch.Generator | None = None,
    concentration: str = "best",
) -> Certificate:
    """Soft smoothing certificate (DESIGN item 5) of ``argmax_c G_c(x)``, ``G = E[softmax f(x + xi)]``.

    1. ``n0`` noisy samples select ``c``, the argmax of their mean softmax.
    2. ``n`` fresh samples bound ``G_c`` from below and the runner-up ``max_{j != c} G_j`` from above:
       with ``K = 2`` only ``G_c_low`` is computed (at level ``alpha``) and ``G_b_up = 1 - G_c_low``;
       with ``K > 2`` each of the ``K`` bounds (``G_c`` below, every ``G_j`` above) is taken at
       ``alpha / K`` (union bound) and ``G_b_up = min(1 - G_c_low, max_j G_j_up)``, valid because the
       scores sum to 1. ``concentration`` picks the bound (see :func:`mean_confidence_bounds`).

    Guarantee: with probability at least ``1 - alpha``, ``argmax G(x + delta) = c`` for every
    ``||delta||_2 < r = sigma / 2 * (PhiInv(G_c_low) - PhiInv(G_b_up))`` (``PhiInv(G_j)`` is
    ``1/sigma``-Lipschitz for every j). Abstains when that difference is not positive.
    ``bound`` holds ``G_c_low``.
    """
    check_model(model)
    check_image(x)
    sigma = check_sigma(sigma)
    n0 = check_count(n0, "n0")
    n = check_count(n, "n", minimum=1 if concentration == "hoeffding" else 2)
    alpha = check_alpha(alpha)
    batch_size = check_count(batch_size, "batch_size")
    if concentration not in CONCENTRATION_BOUNDS:
        raise ValueError(f"concentration must be one of {CONCENTRATION_BOUNDS}, got {concentration!r}")
    generator = _resolve_generator(generator)

    selection = torch.softmax(noisy_logits(model, x, sigma, n0, batch_size, generator), dim=1)
    candidate = int(torch.argmax(selection.mean(dim=0)))
    scores = torch.softmax(noisy_logits(model, x, sigma, n, batch_size, generator), dim=1).cpu().numpy()
    num_classes = scores.shape[1]
    if num_classes == 2:
        lower, _ = mean_confidence_bounds(scores[:, [candidate]], alpha, concentration)
        top_low = float(lower[0])
        runner_up_up = 1.0 - top_low
    else:
        lower, upper = mean_confidence_bounds(scores, alpha / num_classes, concentration)
        top_low = float(lower[candidate])
        others = np.delete(upper, candidate)
        runner_up_up = min(1.0 - top_low, float(others.max()))
    if top_low <= runner_up_up:
        return Certificate(ABSTAIN, 0.0, "soft_smoothing", sigma, n, alpha, top_low, forward_passes=n0 + n)
    radius = 0.5 * sigma * float(norm.ppf(top_low) - norm.ppf(runner_up_up))
    if not radius > 0.0:
        return Certificate(ABSTAIN, 0.0, "soft_smoothing", sigma, n, alpha, top_low, forward_passes=n0 + n)
    return Certificate(candidate, radius, "soft_smoothing", sigma, n, alpha, top_low, forward_passes=n0 + n)
