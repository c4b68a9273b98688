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

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

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
from painwatch.robust.noise import evaluation_mode, noisy_copies
from painwatch.robust.validation import (
    Model,
    check_alpha,
    check_count,
    check_generator,
    check_image,
    check_logits,
    check_model,
    check_same_device,
    check_sigma,
)

__all__ = [
    "SCORE_KINDS",
    "SEQUENTIAL_BOUNDS",
    "SEQUENTIAL_METHODS",
    "STOP_REASONS",
    "SequentialCertificate",
    "SequentialSampler",
    "sequential_certify",
    "sequential_certify_steps",
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
    """A sequential certificate and what it cost, after the last step or after any step so far.

    Attributes:
        certificate: the :class:`Certificate` (``n`` = estimation draws, ``bound`` = the lower
            confidence bound on the selected class's smoothed score; ``prediction = -1`` and
            ``radius = 0.0`` when it abstains).
        method: the certificate's method: ``soft_smoothing_sequential`` or
            ``randomized_smoothing_sequential``; with ``bound="fixed"`` ``randomized_smoothing``
            (Cohen's CERTIFY over the budget).
        forward_passes: network evaluations spent (selection draws + estimation draws).
        stop_reason: one of ``target``, ``saturated``, ``futile``, ``budget`` (``futile`` or ``budget``
            with ``bound="fixed"``); None while sampling goes on.
        upper_bound: an upper confidence bound on the same score, used only to decide when to
            stop; it is not part of the guarantee.
        point_estimate: the running mean of the estimation draws.
        done: False for the steps before the last of :func:`sequential_certify_steps`.
        budget: the most estimation draws (``max_n``).
        votes: estimation draws whose top class was the selected class.
        vote_lower_bound: with probability at least ``1 - alpha``, ``P_xi[argmax f(x + xi) = c]`` is at
            least this for the certified class ``c``: the share of random Gaussian noise at ``sigma``
            that leaves the answer unchanged (docs/design.md, "The answer at once and a certificate
            that grows"). For hard votes it is the certificate's own bound (Clopper-Pearson [CP34] over
            the budget with ``bound="fixed"``, the confidence sequence otherwise); for soft scores a
            confidence sequence [WSR23] on the votes, valid at every step. 0.0 while nothing is
            certified.
        selected: the class the selection draws chose (None before them).
    """

    certificate: Certificate
    method: str
    forward_passes: int
    stop_reason: str | None
    upper_bound: float
    point_estimate: float
    done: bool = True
    budget: int = 0
    votes: int = 0
    vote_lower_bound: float = 0.0
    selected: int | None = None

    @property
    def outcome(self) -> CertificationOutcome:
        """This step as :func:`painwatch.robust.certify` reports a certification."""
        return CertificationOutcome(self.certificate, self.stop_reason, done=self.done, budget=self.budget,
                                    vote_lower_bound=self.vote_lower_bound)


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


class SequentialSampler:
    """One sequential certification of one image, a step at a time, with the caller running the model.

    :func:`sequential_certify_steps` drives it with a model; a caller that batches noisy copies of
    several images through one forward pass (or runs the model elsewhere) drives it itself::

        sampler = SequentialSampler(x, sigma=0.25, max_n=1000, scores="hard", generator=g)
        while not sampler.done:
            logits = torch.cat([model(chunk) for chunk in sampler.noisy_chunks()])
            step = sampler.step(logits)  # the certificate so far (a SequentialCertificate)

    The first step is the ``n0`` selection draws; then estimation steps of ``first_batch`` draws,
    doubling up to ``max_batch``, each drawn in chunks of at most ``batch_size`` rows from
    ``generator`` in a fixed order. Driven with the same model and generator, the last step equals
    what :func:`sequential_certify` returns. Arguments are those of :func:`sequential_certify`
    (checked here, naming the bad value).
    """

    def __init__(
        self,
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
    ) -> None:
        if scores not in SCORE_KINDS:
            raise ValueError(f"scores must be one of {SCORE_KINDS}, got {scores!r}")
        if bound not in SEQUENTIAL_BOUNDS:
            raise ValueError(f"bound must be one of {SEQUENTIAL_BOUNDS}, got {bound!r}")
        if bound == "fixed" and scores != "hard":
            raise ValueError("bound='fixed' (Clopper-Pearson) needs scores='hard'; soft scores need "
                             "'anytime'")
        check_image(x)
        check_generator(generator)
        self.x = x
        self.sigma = check_sigma(sigma)
        self.alpha = check_alpha(alpha)
        self.n0 = check_count(n0, "n0")
        self.max_n = check_count(max_n, "max_n", minimum=2)
        first_batch = check_count(first_batch, "first_batch")
        self.max_batch = check_count(max_batch, "max_batch")
        self.batch_size = check_count(batch_size, "batch_size")
        self.rel_tol = _check_fraction(rel_tol, "rel_tol")
        self.score_temperature = check_sigma(score_temperature, "score_temperature")
        if isinstance(min_radius, bool) or not isinstance(min_radius, (int, float)) or not min_radius >= 0.0:
            raise ValueError(f"min_radius must be a number >= 0, got {min_radius!r}")
        self.min_radius = float(min_radius)
        self.target_radius = None if target_radius is None else check_sigma(target_radius, "target_radius")
        if logits_callback is not None and not callable(logits_callback):
            raise TypeError(f"logits_callback must be callable or None, got {type(logits_callback).__name__}")
        self.logits_callback = logits_callback
        if generator is None:
            # One generator for the selection and every batch (each draw continues the same stream).
            generator = torch.Generator(device="cpu")
            generator.seed()
        self.generator = generator
        self.scores, self.bound = scores, bound
        self.fixed = bound == "fixed"
        self.predicted: int | None = None  # chosen by the selection draws
        self.lower_bound = BettingLowerBound(self.alpha, probit_min=0.0)
        # An upper bound on the same score (a lower bound on 1 - score); it only steers stopping.
        self.upper_tracker = BettingLowerBound(self.alpha, probit_step=0.02)
        # Soft scores bound E softmax; the votes for the class get their own time-uniform bound.
        self.vote_tracker = BettingLowerBound(self.alpha, probit_min=0.0) if scores == "soft" else None
        self.attainable = self.sigma * norm.ppf(
            self.alpha ** (1.0 / self.max_n) if self.fixed
            else best_attainable_lower_bound(self.alpha, self.max_n, self.lower_bound.max_bet)
        )
        self.votes = 0  # estimation draws whose top class is the selected class
        self.used = 0  # estimation draws taken
        self.radius = 0.0
        self._batch = min(first_batch, self.max_batch)
        self._pending = 0  # draws handed out by noisy_chunks and not yet observed
        self._stop_reason: str | None = None
        self._last: SequentialCertificate | None = None

    # ------------------------------------------------------------------------------------ state

    @property
    def done(self) -> bool:
        """True once sampling has stopped (a stopping rule fired or the budget is spent)."""
        return self._stop_reason is not None

    @property
    def next_draws(self) -> int:
        """How many noisy copies the next step takes (0 when done)."""
        if self.done:
            return 0
        if self.predicted is None:
            return self.n0
        return min(self._batch, self.max_n - self.used)

    @property
    def last(self) -> SequentialCertificate:
        """The certificate after the latest step (an abstention before the first estimation step)."""
        return self._last if self._last is not None else self._certificate()

    def noisy_chunks(self) -> Iterator[Tensor]:
        """The next step's noisy copies ``x + sigma * Z``, in chunks of at most ``batch_size`` rows drawn
        from the generator as they are taken (one chunk in memory at a time); feed all their logits,
        concatenated in the same order, to :meth:`step`."""
        if self.done:
            raise RuntimeError("the sampler is done: no more draws")
        if self._pending:
            raise RuntimeError(f"the previous {self._pending} draws were not observed yet")
        self._pending = self.next_draws
        return noisy_copies(self.x, sigma=self.sigma, num=self._pending, batch_size=self.batch_size,
                            generator=self.generator)

    def step(self, logits: Tensor) -> SequentialCertificate:
        """Take the logits ``(b, K)`` of the noisy copies :meth:`noisy_chunks` gave, in order; return the
        certificate so far (``done`` and ``stop_reason`` set once sampling stops)."""
        if not self._pending:
            raise RuntimeError("call noisy_chunks() before step()")
        logits = check_logits(logits, self._pending).detach().to(torch.float64)
        self._pending = 0
        if self.logits_callback is not None:
            self.logits_callback(logits)
        if self.predicted is None:
            self.predicted = _selection_class(logits, self.scores, self.score_temperature)
        else:
            self._estimate(logits)
        self._last = self._certificate()
        return self._last

    def outcome(self) -> CertificationOutcome:
        """The latest step as the registry reports it (:class:`CertificationOutcome`)."""
        return self.last.outcome

    def observe(self, logits: Tensor) -> CertificationOutcome:
        """:meth:`step`, reported as the registry reports it (see
        :class:`painwatch.robust.certificate.CertificationSampler`)."""
        return self.step(logits).outcome

    # -------------------------------------------------------------------------------- the rules

    def _estimate(self, logits: Tensor) -> None:
        draws = logits.shape[0]
        predicted = int(self.predicted)  # type: ignore[arg-type]
        values = _class_scores(logits, predicted, self.scores, self.score_temperature)
        if self.vote_tracker is not None:
            votes = (logits.argmax(dim=1) == predicted).to(torch.float64).cpu().numpy()
            self.vote_tracker.update(votes)
        else:
            votes = values
        upper = 1.0 - self.upper_tracker.update(1.0 - values)
        self.used += draws
        self._batch = min(2 * self._batch, self.max_batch)
        best = min(self.attainable, self.sigma * float(norm.ppf(upper))) if upper > 0.5 else 0.0
        self.votes += int(votes.sum())
        if self.fixed:
            if self.used < self.max_n and (best <= 0.0 or best < self.min_radius):
                self._stop_reason = "futile"
            elif self.used == self.max_n:
                self._stop_reason = "budget"
            return
        lower = self.lower_bound.update(values)
        self.radius = self.sigma * float(norm.ppf(lower)) if lower > 0.5 else 0.0
        if self.target_radius is not None and self.radius >= self.target_radius:
            self._stop_reason = "target"
        elif best <= 0.0 or best < self.min_radius:
            self._stop_reason = "futile"
        elif self.radius > 0.0 and best - self.radius <= max(self.rel_tol * best, self.min_radius):
            self._stop_reason = "saturated"
        elif self.used >= self.max_n:
            self._stop_reason = "budget"

    def _certificate(self) -> SequentialCertificate:
        if self.fixed:
            # Clopper-Pearson of the whole budget; before it is spent, or after an early stop (futile),
            # nothing is certified.
            spent = self.used == self.max_n
            lower = clopper_pearson_lower(self.votes, self.max_n, self.alpha) if spent else 0.0
            radius = self.sigma * float(norm.ppf(lower)) if lower > 0.5 else 0.0
        else:
            lower, radius = self.lower_bound.lower, self.radius
        certified = lower > 0.5 and radius > 0.0
        # The fixed bound is Cohen's CERTIFY over the whole budget: the base method's certificate.
        method = _SEQUENTIAL_SPECS[self.scores].base if self.fixed else _SEQUENTIAL_SPECS[self.scores].name
        certificate = Certificate(
            prediction=int(self.predicted) if certified else ABSTAIN,  # type: ignore[arg-type]
            radius=radius if certified else 0.0,
            method=method,
            sigma=self.sigma,
            n=self.used,
            alpha=self.alpha,
            bound=lower,
            forward_passes=self.n0 + self.used,
        )
        if self.fixed:
            estimate = self.votes / self.used if self.used else math.nan
        else:
            estimate = self.lower_bound.mean
        vote_lower = self.vote_tracker.lower if self.vote_tracker is not None else lower
        return SequentialCertificate(
            certificate=certificate,
            method=method,
            forward_passes=self.n0 + self.used,
            stop_reason=self._stop_reason,
            upper_bound=1.0 - self.upper_tracker.lower,
            point_estimate=estimate,
            done=self.done,
            budget=self.max_n,
            votes=self.votes,
            vote_lower_bound=vote_lower if certified else 0.0,
            selected=self.predicted,
        )


def sequential_certify_steps(
    model: Callable[[Tensor], Tensor],
    x: Tensor,
    **options: Any,
) -> Iterator[SequentialCertificate]:
    """Certify ``x`` step by step: the certificate after the selection draws and after every estimation
    batch, until sampling stops (the last one has ``done=True``).

    ``options`` are the keyword arguments of :func:`sequential_certify`, checked before the first draw.
    With ``bound="anytime"`` every step's certificate holds on its own (the confidence sequence is valid
    at every stopping time, so also when whoever watches stops looking); with ``bound="fixed"`` every
    step before the last abstains (Clopper-Pearson needs the whole budget) and only shows progress. The
    last step equals :func:`sequential_certify`'s result for the same model and generator.
    """
    check_model(model)
    sampler = SequentialSampler(x, **options)
    check_same_device(model, x)
    return _drive(model, sampler)


def _drive(model: Callable[[Tensor], Tensor], sampler: SequentialSampler) -> Iterator[SequentialCertificate]:
    with evaluation_mode(model), torch.no_grad():
        while not sampler.done:
            chunks = sampler.noisy_chunks()
            yield sampler.step(torch.cat([model(chunk) for chunk in chunks], dim=0))


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
        a :class:`SequentialCertificate` (the last step of :func:`sequential_certify_steps`).
        Guarantee: with probability at least ``1 - alpha`` over the noise, whenever the certificate
        does not abstain, the smoothed classifier (``argmax_k E softmax(f(x + xi))_k`` for soft scores,
        the majority vote for hard ones) returns the certificate's class at every ``x'`` with
        ``||x' - x||_2 <= radius``.
    """
    steps = sequential_certify_steps(
        model, x, sigma=sigma, alpha=alpha, n0=n0, max_n=max_n, first_batch=first_batch,
        max_batch=max_batch, batch_size=batch_size, target_radius=target_radius, rel_tol=rel_tol,
        min_radius=min_radius, scores=scores, score_temperature=score_temperature, bound=bound,
        generator=generator, logits_callback=logits_callback,
    )
    last = None
    for last in steps:  # noqa: B007 - the last step is the certificate
        pass
    assert last is not None and last.done  # the budget is at least two draws
    return last


def _sequential_runner(scores: str) -> Callable[[Model, Tensor, CertificationSettings], CertificationOutcome]:
    def run(model: Model, x: Tensor, settings: CertificationSettings) -> CertificationOutcome:
        result = sequential_certify(
            model, x, sigma=settings.sigma, alpha=settings.alpha, n0=settings.n0, max_n=settings.n,
            batch_size=settings.batch_size, rel_tol=settings.rel_tol, min_radius=settings.min_radius,
            scores=scores, score_temperature=settings.score_temperature if scores == "soft" else 1.0,
            bound="anytime", generator=settings.generator, logits_callback=settings.logits_callback,
        )
        return result.outcome

    return run


def _sequential_sampler(scores: str) -> Callable[[Tensor, CertificationSettings], SequentialSampler]:
    def sampler(x: Tensor, settings: CertificationSettings) -> SequentialSampler:
        return SequentialSampler(
            x, sigma=settings.sigma, alpha=settings.alpha, n0=settings.n0, max_n=settings.n,
            batch_size=settings.batch_size, rel_tol=settings.rel_tol, min_radius=settings.min_radius,
            scores=scores, score_temperature=settings.score_temperature if scores == "soft" else 1.0,
            bound="anytime", generator=settings.generator, logits_callback=settings.logits_callback,
        )

    return sampler


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
        sampler=_sequential_sampler("hard"),
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
        sampler=_sequential_sampler("soft"),
    )),
}

SEQUENTIAL_METHODS: MappingProxyType[str, str] = MappingProxyType(
    {scores: spec.name for scores, spec in _SEQUENTIAL_SPECS.items()}
)
"""The registered name of the sequential certificate of each score kind."""
