"""Anytime-valid sequential smoothing certificates: stop sampling as soon as the answer is decided.

Randomized smoothing [Cohen19] and soft smoothing [Salman19] (docs/design.md, "The certificates",
items 4 and 5) draw a fixed number ``n`` of noisy copies of the input, typically ``n = 100 000``. Most
frames a person uploads are either clearly decided after a few hundred draws or clearly undecidable; a
fixed ``n`` wastes the difference. This module samples in growing batches and, after every draw,
updates a lower confidence bound on the smoothed score of the selected class that holds **uniformly
over time**, so that the certificate is valid at whatever moment the sampler decides to stop (the
stopping rule may look at everything seen so far): the betting confidence sequence [WSR23] of
:class:`painwatch.robust.bounds.BettingLowerBound`, whose validity argument (Ville's inequality) is
written out in :mod:`painwatch.robust.bounds`. These are item 6 of "The certificates".

The certificate
---------------
``n0`` selection draws pick the class ``c`` (as Cohen's CERTIFY); fresh draws then feed the confidence
sequence with ``X_i = softmax(f(x + xi_i))_c`` (soft smoothing, ``G_c(x) = E X``) or with
``X_i = 1[argmax f(x + xi_i) = c]`` (hard counts, ``p_c(x) = E X``). With ``L = L_t`` at the stopping
time and the runner-up bounded by ``1 - L`` (exact for two classes, conservative for more), the radius
is ``r = sigma / 2 * (PhiInv(L) - PhiInv(1 - L)) = sigma * PhiInv(L)`` when ``L > 1/2``, and the answer is
an abstention otherwise. With probability at least ``1 - alpha`` the smoothed classifier
(``argmax G`` for soft scores, Cohen's ``g`` for hard counts) predicts ``c`` on the whole L2 ball of
radius ``r`` around ``x`` (pixels in [0, 1], radius in the same units as ``sigma``).

Stopping rules never affect this guarantee; they only decide how many forward passes are spent:
the radius reached ``target_radius``; it is within ``rel_tol`` (or ``min_radius``) of the best this
budget could give (judged with an upper confidence bound, a heuristic); that best fell below
``min_radius`` or the upper bound fell to 1/2 (nothing worth certifying: stop early, abstaining when
no radius is certified yet); or the budget ``max_n`` is spent.

The fixed-budget bound (``bound="fixed"``, hard votes)
------------------------------------------------------
A time-uniform bound pays for its freedom to stop: at a budget of about 1 000 draws it certifies a few
per cent less than Clopper-Pearson on all draws when every draw agrees, and up to ~10% less below that.
When sampling rarely stops early at such a budget anyway, ``bound="fixed"`` keeps Cohen's CERTIFY
exactly: the radius is ``sigma * PhiInv(pA_low)`` with ``pA_low`` the one-sided Clopper-Pearson bound of
the votes over all ``max_n`` draws. Sampling stops early only to *abstain* (the futility rule above).
That keeps the ``1 - alpha`` guarantee: a certificate is only ever issued from the full ``max_n`` draws,
so a wrong one implies that the Clopper-Pearson bound of those ``max_n`` draws exceeds ``p_A``, an event
of probability at most ``alpha``; stopping early only removes certificates.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np
import torch
from scipy.stats import norm
from torch import Tensor

from painwatch.robust.bounds import BettingLowerBound, best_attainable_lower_bound, clopper_pearson_lower
from painwatch.robust.certificate import (
    ABSTAIN,
    SEQUENTIAL_BOUNDS,
    Certificate,
    CertificationOutcome,
    CertificationSettings,
    MethodSpec,
    register_method,
)
from painwatch.robust.noise import noisy_logits
from painwatch.robust.validation import (
    Model,
    check_alpha,
    check_count,
    check_generator,
    check_image,
    check_model,
    check_sigma,
)

__all__ = [
    "SCORE_KINDS",
    "SEQUENTIAL_BOUNDS",
    "SEQUENTIAL_METHODS",
    "STOP_REASONS",
    "SequentialCertificate",
    "sequential_certify",
]

SCORE_KINDS: tuple[str, ...] = ("soft", "hard")
"""``soft``: softmax score of the selected class (soft smoothing); ``hard``: 0/1 vote [Cohen19]."""

STOP_REASONS: tuple[str, ...] = ("target", "saturated", "futile", "budget")
"""Why a sequential run stopped sampling (see :class:`SequentialCertificate`)."""


def _check_fraction(value: object, name: str) -> float:
    """A real number in [0, 1) (a relative tolerance)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
    return float(value)


@dataclass(frozen=True, kw_only=True)
class SequentialCertificate:
    """A sequential certificate and what it cost.

    Attributes:
        certificate: the :class:`Certificate` (``n`` = estimation draws, ``bound`` = the lower
            confidence bound on the selected class's smoothed score; ``prediction = -1`` and
            ``radius = 0.0`` when it abstains).
        method: the certificate's method: ``soft_smoothing_sequential`` or
            ``randomized_smoothing_sequential``; with ``bound="fixed"`` ``randomized_smoothing``
            (Cohen's CERTIFY over the budget).
        forward_passes: network evaluations spent (selection draws + estimation draws).
        stop_reason: one of ``target``, ``saturated``, ``futile``, ``budget`` (``futile`` or ``budget``
            with ``bound="fixed"``).
        upper_bound: an upper confidence bound on the same score, used only to decide when to
            stop; it is not part of the guarantee.
        point_estimate: the running mean of the estimation draws.
    """

    certificate: Certificate
    method: str
    forward_passes: int
    stop_reason: str
    upper_bound: float
    point_estimate: float


def _selection_class(logits: Tensor, scores: str, score_temperature: float) -> int:
    if scores == "soft":
        return int(torch.softmax(logits / score_temperature, dim=1).mean(dim=0).argmax())
    counts = torch.bincount(logits.argmax(dim=1), minlength=logits.shape[1])
    return int(counts.argmax())


def _class_scores(logits: Tensor, predicted: int, scores: str, score_temperature: float) -> np.ndarray:
    if scores == "soft":
        values = torch.softmax(logits / score_temperature, dim=1)[:, predicted]
    else:
        values = (logits.argmax(dim=1) == predicted).to(torch.float64)
    return values.clamp(0.0, 1.0).cpu().numpy()


def sequential_certify(
    model: Callable[[Tensor], Tensor],
    x: Tensor,
    *,
    sigma: float,
    alpha: float = 0.001,
    n0: int = 64,
    max_n: int = 100_000,
    first_batch: int = 64,
    max_batch: int = 2048,
    batch_size: int = 256,
    target_radius: float | None = None,
    rel_tol: float = 0.05,
    min_radius: float = 0.0,
    scores: str = "soft",
    score_temperature: float = 1.0,
    bound: str = "anytime",
    generator: torch.Generator | None = None,
    logits_callback: Callable[[Tensor], None] | None = None,
) -> SequentialCertificate:
    """Certify ``x`` with a smoothing certificate that stops sampling once the answer is decided.

    Args:
        model: maps a float tensor ``(B, C, H, W)`` of pixels in [0, 1] to logits ``(B, K)``.
        x: one image ``(C, H, W)`` with pixels in [0, 1].
        sigma: standard deviation of the Gaussian noise, L2 units of [0, 1] pixels (> 0).
        alpha: the certificate is wrong with probability at most ``alpha``.
        n0: selection draws that pick the class (not reused for the bound).
        max_n: the most estimation draws (the budget; forward passes are at most ``n0 + max_n``).
        first_batch, max_batch: estimation batches start at ``first_batch`` draws and double up to
            ``max_batch``; the stopping rules are checked between batches.
        batch_size: the most images per forward pass through the model (memory only).
        target_radius: stop as soon as the certified radius reaches it (None: no target).
        rel_tol: stop once the radius is within this fraction of the best the remaining budget
            could plausibly give.
        min_radius: radii smaller than this (L2, pixel units) are not worth sampling for: stop once
            the best plausible radius is below it, or the radius is within it of that best.
        scores: ``"soft"`` (soft smoothing) or ``"hard"`` (Cohen-style votes).
        score_temperature: soft scores are ``softmax(f / score_temperature)``; the certified classifier
            is then ``argmax E softmax(f(x + xi) / score_temperature)``. Below 1 the scores sharpen
            towards votes (larger smoothed score, so larger radii, when the network is not saturated)
            while keeping the low variance of soft scores. 1 is the standard soft smoothing.
        bound: ``"anytime"`` (the betting confidence sequence; every stopping rule applies) or
            ``"fixed"`` (hard votes only: Cohen's Clopper-Pearson bound over all ``max_n`` draws, and
            sampling stops early only to abstain; ``target_radius`` and ``rel_tol`` are then unused).
        generator: the source of every noise draw; the same seed gives the same certificate.
        logits_callback: called with every batch of noisy logits (float64 ``(b, K)``, selection draws
            included), e.g. to estimate calibrated smoothed probabilities without extra passes.

    Returns:
        a :class:`SequentialCertificate`. Guarantee: with probability at least ``1 - alpha`` over the
        noise, whenever the certificate does not abstain, the smoothed classifier (``argmax_k
        E softmax(f(x + xi))_k`` for soft scores, the majority vote for hard ones) returns the
        certificate's class at every ``x'`` with ``||x' - x||_2 <= radius``.
    """
    if scores not in SCORE_KINDS:
        raise ValueError(f"scores must be one of {SCORE_KINDS}, got {scores!r}")
    if bound not in SEQUENTIAL_BOUNDS:
        raise ValueError(f"bound must be one of {SEQUENTIAL_BOUNDS}, got {bound!r}")
    if bound == "fixed" and scores != "hard":
        raise ValueError("bound='fixed' (Clopper-Pearson) needs scores='hard'; soft scores need 'anytime'")
    check_model(model)
    check_image(x)
    check_generator(generator)
    sigma = check_sigma(sigma)
    alpha = check_alpha(alpha)
    n0 = check_count(n0, "n0")
    max_n = check_count(max_n, "max_n", minimum=2)
    first_batch = check_count(first_batch, "first_batch")
    max_batch = check_count(max_batch, "max_batch")
    batch_size = check_count(batch_size, "batch_size")
    rel_tol = _check_fraction(rel_tol, "rel_tol")
    score_temperature = check_sigma(score_temperature, "score_temperature")
    if isinstance(min_radius, bool) or not isinstance(min_radius, (int, float)) or not min_radius >= 0.0:
        raise ValueError(f"min_radius must be a number >= 0, got {min_radius!r}")
    if target_radius is not None:
        target_radius = check_sigma(target_radius, "target_radius")
    if generator is None:
        # One generator for the selection and every batch (noisy_logits would seed each call afresh).
        generator = torch.Generator(device="cpu")
        generator.seed()

    if logits_callback is not None and not callable(logits_callback):
        raise TypeError(f"logits_callback must be callable or None, got {type(logits_callback).__name__}")
    selection = noisy_logits(model, x, sigma=sigma, num=n0, batch_size=batch_size, generator=generator)
    if logits_callback is not None:
        logits_callback(selection)
    predicted = _selection_class(selection, scores, score_temperature)

    lower_bound = BettingLowerBound(alpha, probit_min=0.0)
    # An upper bound on the same score (a lower bound on 1 - score); it only steers stopping.
    upper_tracker = BettingLowerBound(alpha, probit_step=0.02)
    fixed = bound == "fixed"
    attainable = sigma * norm.ppf(
        alpha ** (1.0 / max_n) if fixed else best_attainable_lower_bound(alpha, max_n, lower_bound.max_bet)
    )
    votes = 0  # estimation draws that voted for the selected class (fixed bound)
    used = 0
    batch = min(first_batch, max_batch)
    stop_reason = "budget"
    radius = 0.0
    while used < max_n:
        draws = min(batch, max_n - used)
        logits = noisy_logits(model, x, sigma=sigma, num=draws, batch_size=batch_size, generator=generator)
        if logits_callback is not None:
            logits_callback(logits)
        values = _class_scores(logits, predicted, scores, score_temperature)
        upper = 1.0 - upper_tracker.update(1.0 - values)
        used += draws
        batch = min(2 * batch, max_batch)
        best = min(attainable, sigma * float(norm.ppf(upper))) if upper > 0.5 else 0.0
        if fixed:
            votes += int(values.sum())
            if used < max_n and (best <= 0.0 or best < min_radius):
                stop_reason = "futile"
                break
            continue
        lower = lower_bound.update(values)
        radius = sigma * float(norm.ppf(lower)) if lower > 0.5 else 0.0
        if target_radius is not None and radius >= target_radius:
            stop_reason = "target"
            break
        if best <= 0.0 or best < min_radius:
            stop_reason = "futile"
            break
        if radius > 0.0 and best - radius <= max(rel_tol * best, min_radius):
            stop_reason = "saturated"
            break
    if fixed:
        # Clopper-Pearson of the whole budget; after an early stop (futile) nothing is certified.
        lower = clopper_pearson_lower(votes, max_n, alpha) if used == max_n else 0.0
        radius = sigma * float(norm.ppf(lower)) if lower > 0.5 else 0.0
    else:
        lower = lower_bound.lower
    certified = lower > 0.5 and radius > 0.0
    # The fixed bound is Cohen's CERTIFY over the whole budget: the base method's certificate.
    method = _SEQUENTIAL_SPECS[scores].base if fixed else _SEQUENTIAL_SPECS[scores].name
    certificate = Certificate(
        prediction=predicted if certified else ABSTAIN,
        radius=radius if certified else 0.0,
        method=method,
        sigma=sigma,
        n=used,
        alpha=alpha,
        bound=lower,
        forward_passes=n0 + used,
    )
    return SequentialCertificate(
        certificate=certificate,
        method=method,
        forward_passes=n0 + used,
        stop_reason=stop_reason,
        upper_bound=1.0 - upper_tracker.lower,
        point_estimate=votes / used if fixed else lower_bound.mean,
    )


def _sequential_runner(scores: str) -> Callable[[Model, Tensor, CertificationSettings], CertificationOutcome]:
    def run(model: Model, x: Tensor, settings: CertificationSettings) -> CertificationOutcome:
        result = sequential_certify(
            model, x, sigma=settings.sigma, alpha=settings.alpha, n0=settings.n0, max_n=settings.n,
            batch_size=settings.batch_size, rel_tol=settings.rel_tol, min_radius=settings.min_radius,
            scores=scores, score_temperature=settings.score_temperature if scores == "soft" else 1.0,
            bound="anytime", generator=settings.generator, logits_callback=settings.logits_callback,
        )
        return CertificationOutcome(result.certificate, result.stop_reason)

    return run


_SEQUENTIAL_SPECS: dict[str, MethodSpec] = {
    "hard": register_method(MethodSpec(
        name="randomized_smoothing_sequential",
        certifies="the majority vote under Gaussian noise",
        needs_lipschitz_constant=False,
        needs_noise=True,
        deterministic=False,
        sequential=True,
        base="randomized_smoothing",
        runner=_sequential_runner("hard"),
    )),
    "soft": register_method(MethodSpec(
        name="soft_smoothing_sequential",
        certifies="argmax of the expected softmax (the mean softmax over Gaussian noise)",
        needs_lipschitz_constant=False,
        needs_noise=True,
        deterministic=False,
        sequential=True,
        base="soft_smoothing",
        uses_score_temperature=True,
        runner=_sequential_runner("soft"),
    )),
}

SEQUENTIAL_METHODS: MappingProxyType[str, str] = MappingProxyType(
    {scores: spec.name for scores, spec in _SEQUENTIAL_SPECS.items()}
)
"""The registered name of the sequential certificate of each score kind."""
