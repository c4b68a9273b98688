"""Randomized smoothing [Cohen19] and soft (expected-score) smoothing [Salman19; RC, Ch. 4].

Classifiers certified here (docs/design.md, "The certificates", items 4 and 5), with ``xi ~ N(0,
sigma^2 I)``, ``sigma`` and every radius L2 norms in [0, 1] pixel units:

- :class:`SmoothedClassifier`: the vote classifier ``g(x) = argmax_c P_xi[argmax f(x + xi) = c]``,
  with Cohen's PREDICT and CERTIFY, exactly.
- :func:`soft_smoothing_certify`: the soft smoothed classifier ``argmax_c G_c(x)``,
  ``G(x) = E_xi[softmax(f(x + xi) / T)]`` ([Salman19], Lemma 2: ``PhiInv(G_c)`` is ``1/sigma``-Lipschitz).

Noise comes from :mod:`painwatch.robust.noise`, from the caller's generator: the same seed gives the
same certificate. This module registers ``randomized_smoothing`` (fixed n, or with ``stop_early`` the
fixed-budget sampler of :mod:`painwatch.robust.sequential` that stops only to abstain) and
``soft_smoothing``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from scipy.stats import binomtest, norm

from painwatch.robust.bounds import CONCENTRATION_BOUNDS, clopper_pearson_lower, mean_confidence_bounds
from painwatch.robust.certificate import (
    ABSTAIN,
    Certificate,
    CertificationOutcome,
    CertificationSettings,
    MethodSpec,
    register_method,
)
from painwatch.robust.noise import noisy_logit_batches, resolve_generator
from painwatch.robust.sequential import sequential_certify
from painwatch.robust.validation import (
    Model,
    check_alpha,
    check_count,
    check_image,
    check_logits,
    check_model,
    check_num_classes,
    check_sigma,
)

__all__ = [
    "SmoothedClassifier",
    "soft_smoothing_certify",
]

LogitsCallback = Callable[[torch.Tensor], None]


def _class_counts(
    model: Model, x: torch.Tensor, *, sigma: float, num: int, batch_size: int, generator: torch.Generator,
    num_classes: int | None, logits_callback: LogitsCallback | None,
) -> np.ndarray:
    """Votes ``argmax f(x + xi)`` per class over ``num`` draws: int64 ``(K,)`` (``K`` from the model's
    output when ``num_classes`` is None)."""
    counts: torch.Tensor | None = None
    for logits in noisy_logit_batches(model, x, sigma=sigma, num=num, batch_size=batch_size,
                                      generator=generator, num_classes=num_classes,
                                      logits_callback=logits_callback):
        votes = torch.bincount(logits.argmax(dim=1).cpu(), minlength=logits.shape[1])
        if counts is not None and votes.shape != counts.shape:
            raise ValueError(f"the model returned {votes.shape[0]} logits per image after "
                             f"{counts.shape[0]} in an earlier batch")
        counts = votes if counts is None else counts + votes
    assert counts is not None  # num >= 1 draws at least one batch
    return counts.numpy().astype(np.int64)


def _cohen_certify(
    model: Model, x: torch.Tensor, *, sigma: float, n0: int, n: int, alpha: float, batch_size: int,
    generator: torch.Generator | None, num_classes: int | None, logits_callback: LogitsCallback | None,
) -> Certificate:
    """Cohen's CERTIFY (see :meth:`SmoothedClassifier.certify`); inputs checked here."""
    check_image(x)
    n0 = check_count(n0, "n0")
    n = check_count(n, "n")
    alpha = check_alpha(alpha)
    batch_size = check_count(batch_size, "batch_size")
    generator = resolve_generator(generator)
    draw = {"model": model, "x": x, "sigma": sigma, "batch_size": batch_size, "generator": generator,
            "num_classes": num_classes, "logits_callback": logits_callback}
    candidate = int(np.argmax(_class_counts(num=n0, **draw)))
    counts = _class_counts(num=n, **draw)
    p_lower = clopper_pearson_lower(int(counts[candidate]), n, alpha)
    certified = p_lower >= 0.5
    return Certificate(
        prediction=candidate if certified else ABSTAIN,
        radius=sigma * float(norm.ppf(p_lower)) if certified else 0.0,
        method=_RANDOMIZED_SMOOTHING.name, sigma=sigma, n=n, alpha=alpha, bound=p_lower,
        forward_passes=n0 + n,
    )


class SmoothedClassifier:
    """The vote classifier ``g(x) = argmax_c P_xi[argmax f(x + xi) = c]``, ``xi ~ N(0, sigma^2 I)``.

    [Cohen19], Algorithm PREDICT and CERTIFY, exactly: selection and estimation use independent
    samples; the bound is one-sided Clopper-Pearson [CP34]; PREDICT is a two-sided binomial test on the
    top two counts (``scipy.stats.binomtest``). ``model`` maps ``(B, C, H, W)`` in [0, 1] to logits
    ``(B, num_classes)``; ``sigma`` is the noise std in [0, 1] pixel units.
    """

    def __init__(self, model: Model, num_classes: int, sigma: float) -> None:
        self.model = check_model(model)
        self.num_classes = check_num_classes(num_classes)
        self.sigma = check_sigma(sigma)

    def class_counts(self, x: torch.Tensor, *, num: int, batch_size: int = 1000,
                     generator: torch.Generator | None = None,
                     logits_callback: LogitsCallback | None = None) -> np.ndarray:
        """How often ``argmax f`` picks each class in ``num`` noise draws: int64 array ``(K,)``."""
        check_image(x)
        return _class_counts(
            self.model, x, sigma=self.sigma, num=check_count(num, "num"),
            batch_size=check_count(batch_size, "batch_size"), generator=resolve_generator(generator),
            num_classes=self.num_classes, logits_callback=logits_callback,
        )

    def predict(self, x: torch.Tensor, *, n: int, alpha: float, batch_size: int = 1000,
                generator: torch.Generator | None = None) -> int:
        """PREDICT: the top class of ``n`` noisy votes, or ``ABSTAIN`` (-1).

        Guarantee ([Cohen19], Prop. 1): the probability of returning a class other than ``g(x)`` is at
        most ``alpha``. Abstains when the two-sided binomial test of the top two counts against 1/2 has
        p-value ``> alpha``.
        """
        n = check_count(n, "n")
        alpha = check_alpha(alpha)
        counts = self.class_counts(x, num=n, batch_size=batch_size, generator=generator)
        order = np.argsort(counts, kind="stable")[::-1]
        top, runner_up = int(order[0]), int(order[1])
        count_top, count_runner_up = int(counts[top]), int(counts[runner_up])
        p_value = binomtest(count_top, count_top + count_runner_up, p=0.5).pvalue
        return ABSTAIN if p_value > alpha else top

    def certify(self, x: torch.Tensor, *, n0: int, n: int, alpha: float, batch_size: int = 1000,
                generator: torch.Generator | None = None,
                logits_callback: LogitsCallback | None = None) -> Certificate:
        """CERTIFY: a class and an L2 radius within which ``g`` is constant, or an abstention.

        ``n0`` samples select ``cA``; ``n`` fresh samples count it; ``pA_low`` is the one-sided
        Clopper-Pearson lower bound at level ``1 - alpha``. Abstains when ``pA_low < 1/2``, else
        ``radius = sigma * PhiInv(pA_low)`` (L2, [0, 1] pixel units). Guarantee ([Cohen19], Thm 1): with
        probability at least ``1 - alpha``, ``g(x + delta) = cA`` for every ``||delta||_2 < radius``. The
        radius can never exceed ``sigma * PhiInv(alpha ** (1 / n))`` (all ``n`` votes for ``cA``).
        ``logits_callback`` sees every batch of noisy logits (float64), selection draws first.
        """
        return _cohen_certify(self.model, x, sigma=self.sigma, n0=n0, n=n, alpha=alpha, batch_size=batch_size,
                              generator=generator, num_classes=self.num_classes,
                              logits_callback=logits_callback)


class _TemperatureScaled(torch.nn.Module):
    """``f(x) / T`` in the model's own dtype; the unscaled logits go to ``logits_callback`` (float64)."""

    def __init__(self, model: Model, temperature: float, logits_callback: LogitsCallback | None) -> None:
        super().__init__()
        self.model, self.temperature, self.logits_callback = model, float(temperature), logits_callback

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        logits = self.model(batch)
        if self.logits_callback is not None:
            self.logits_callback(check_logits(logits, batch.shape[0]).detach().to(torch.float64))
        return logits / self.temperature


def soft_smoothing_certify(
    model: Model,
    x: torch.Tensor,
    *,
    sigma: float,
    n0: int = 100,
    n: int = 1000,
    alpha: float = 0.001,
    batch_size: int = 1000,
    generator: torch.Generator | None = None,
    concentration: str = "best",
    score_temperature: float = 1.0,
    logits_callback: LogitsCallback | None = None,
) -> Certificate:
    """Soft smoothing certificate [Salman19; RC, Ch. 4] (docs/design.md, "The certificates", item 5) of
    ``argmax_c G_c(x)``, ``G = E[softmax(f(x + xi) / T)]`` with ``T = score_temperature``.

    1. ``n0`` noisy samples select ``c``, the argmax of their mean softmax.
    2. ``n`` fresh samples bound ``G_c`` from below and the runner-up ``max_{j != c} G_j`` from above:
       with ``K = 2`` only ``G_c_low`` is computed (at level ``alpha``) and ``G_b_up = 1 - G_c_low``;
       with ``K > 2`` each of the ``K`` bounds (``G_c`` below, every ``G_j`` above) is taken at
       ``alpha / K`` (union bound) and ``G_b_up = min(1 - G_c_low, max_j G_j_up)``, valid because the
       scores sum to 1. ``concentration`` picks the bound (see :func:`mean_confidence_bounds`).

    Guarantee: with probability at least ``1 - alpha``, ``argmax G(x + delta) = c`` for every
    ``||delta||_2 < r = sigma / 2 * (PhiInv(G_c_low) - PhiInv(G_b_up))`` (L2, [0, 1] pixel units;
    ``PhiInv(G_j)`` is ``1/sigma``-Lipschitz for every j). Abstains when that difference is not
    positive. ``bound`` holds ``G_c_low``. The logits are divided by ``T`` in the model's dtype;
    ``logits_callback`` sees every batch of undivided noisy logits (float64), selection draws first.
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
    temperature = check_sigma(score_temperature, "score_temperature")
    generator = resolve_generator(generator)
    scored, callback = model, logits_callback
    if temperature != 1.0:
        scored, callback = _TemperatureScaled(model, temperature, logits_callback), None

    def softmax_scores(num: int) -> torch.Tensor:
        batches = noisy_logit_batches(scored, x, sigma=sigma, num=num, batch_size=batch_size,
                                      generator=generator, logits_callback=callback)
        return torch.softmax(torch.cat(list(batches), dim=0), dim=1)

    candidate = int(torch.argmax(softmax_scores(n0).mean(dim=0)))
    scores = softmax_scores(n).cpu().numpy()
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
    radius = 0.0
    if top_low > runner_up_up:
        radius = 0.5 * sigma * float(norm.ppf(top_low) - norm.ppf(runner_up_up))
    certified = radius > 0.0
    return Certificate(
        prediction=candidate if certified else ABSTAIN, radius=radius if certified else 0.0,
        method=_SOFT_SMOOTHING.name, sigma=sigma, n=n, alpha=alpha, bound=top_low, forward_passes=n0 + n,
    )


def _run_randomized_smoothing(model: Model, x: torch.Tensor,
                              settings: CertificationSettings) -> CertificationOutcome:
    if settings.stop_early:
        # Cohen's Clopper-Pearson bound over the whole budget; sampling stops early only to abstain.
        result = sequential_certify(
            model, x, sigma=settings.sigma, alpha=settings.alpha, n0=settings.n0, max_n=settings.n,
            batch_size=settings.batch_size, rel_tol=settings.rel_tol, min_radius=settings.min_radius,
            scores="hard", bound="fixed", generator=settings.generator,
            logits_callback=settings.logits_callback,
        )
        return CertificationOutcome(result.certificate, result.stop_reason)
    check_model(model)
    certificate = _cohen_certify(
        model, x, sigma=check_sigma(settings.sigma), n0=settings.n0, n=settings.n, alpha=settings.alpha,
        batch_size=settings.batch_size, generator=settings.generator, num_classes=None,
        logits_callback=settings.logits_callback,
    )
    return CertificationOutcome(certificate)


def _run_soft_smoothing(
    model: Model, x: torch.Tensor, settings: CertificationSettings
) -> CertificationOutcome:
    certificate = soft_smoothing_certify(
        model, x, sigma=settings.sigma, n0=settings.n0, n=settings.n, alpha=settings.alpha,
        batch_size=settings.batch_size, generator=settings.generator,
        score_temperature=settings.score_temperature, logits_callback=settings.logits_callback,
    )
    return CertificationOutcome(certificate)


_RANDOMIZED_SMOOTHING = register_method(MethodSpec(
    name="randomized_smoothing",
    certifies="the majority vote under Gaussian noise",
    needs_lipschitz_constant=False,
    needs_noise=True,
    deterministic=False,
    sequential=False,
    base="randomized_smoothing",
    stops_early_to_abstain=True,
    runner=_run_randomized_smoothing,
))
_SOFT_SMOOTHING = register_method(MethodSpec(
    name="soft_smoothing",
    certifies="argmax of the expected softmax (the mean softmax over Gaussian noise)",
    needs_lipschitz_constant=False,
    needs_noise=True,
    deterministic=False,
    sequential=False,
    base="soft_smoothing",
    uses_score_temperature=True,
    runner=_run_soft_smoothing,
))
