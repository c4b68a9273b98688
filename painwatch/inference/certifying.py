"""Certify frames through one :class:`~painwatch.inference.engine.Engine`, chunk by chunk, several frames
per forward pass, reporting every frame's progress as its draws come in.

Every frame draws its noise from its own generator, in chunks of ``batch_size`` noisy copies (the
chunks :func:`painwatch.robust.certification_sampler` gives, in its fixed order); a round of forward
passes takes the next chunk of up to ``frames_per_pass`` frames at once. The engine computes each row
on its own (fixed pass shapes), so a frame's certificate never depends on which frames shared its
passes: it is the certificate :func:`painwatch.robust.certify` gives for that frame, that engine and that
generator. Methods that do not draw in steps (fixed-n smoothing, the Lipschitz margin) run through
:func:`painwatch.robust.certify` in one go.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from painwatch.inference.engine import Engine
from painwatch.inference.settings import PredictorSettings
from painwatch.robust import (
    CertificationOutcome,
    CertificationSampler,
    certification_sampler,
    certify,
    certify_logits,
    clopper_pearson_lower,
    method_spec,
)

__all__ = ["Answer", "FrameCertification", "certify_frames"]


@dataclass(frozen=True)
class Answer:
    """The first answer for one frame: one clean forward pass of the network, before any certificate.

    ``label`` / ``class_index`` are the network's most probable class, ``confidence`` its
    temperature-calibrated probability, ``probabilities`` the calibrated probability per class; the
    network is the engine's (``runtime``, ``precision``) that also certifies. The certified answer may
    still differ: it is the smoothed classifier's (:attr:`FrameResult.label`). With an in-distribution
    check, ``in_distribution_score`` is the frame's score (from the descriptors the engine read in that
    same pass: ``forward_passes`` stays 1) and ``abstain_code`` is ``"not_like_training_frames"`` when
    the frame is refused: it is then not certified (docs/design.md, "The in-distribution check").
    """

    name: str
    label: str
    class_index: int
    confidence: float
    probabilities: dict[str, float]
    runtime: str
    precision: str
    forward_passes: int = 1
    in_distribution_score: float | None = None
    abstain_code: str | None = None
    logits: torch.Tensor | None = field(default=None, repr=False, compare=False)
    """The raw clean logits ``(K,)`` of the pass that answered (float64): a method that certifies from
    clean logits alone (``lipschitz``) takes its certificate from them, with no pass of its own."""

    @property
    def refused(self) -> bool:
        """Whether the in-distribution check refused the frame (no certificate is drawn for it)."""
        return self.abstain_code is not None


@dataclass(frozen=True)
class FrameCertification:
    """Where the certification of frame ``index`` stands.

    ``draws`` noisy copies of it went through the network so far (selection draws included) of at most
    ``budget`` (``n0 + n``); ``outcome`` is the certificate after the last complete step (None before
    one; with an anytime-valid bound it holds at every step, with the fixed bound only once ``done``);
    ``probabilities`` are the mean calibrated softmax over the draws so far (sequential methods; None
    otherwise); ``passes`` the forward passes spent on the certificate; ``noise_survival`` a level
    ``1 - alpha`` lower bound on the share of noise draws at sigma that keep the certified class (None
    while nothing is certified, or for methods without noise).
    """

    index: int
    draws: int
    budget: int
    outcome: CertificationOutcome | None
    probabilities: np.ndarray | None
    passes: int
    done: bool
    noise_survival: float | None = None


@dataclass
class _Frame:
    """One frame's certification in flight."""

    index: int
    x: torch.Tensor
    sampler: CertificationSampler
    totals: torch.Tensor
    step_draws: int = 0
    step_logits: list[torch.Tensor] = field(default_factory=list)
    chunks: Iterator[torch.Tensor] | None = None
    draws: int = 0
    outcome: CertificationOutcome | None = None

    def next_chunk(self) -> torch.Tensor | None:
        """The next chunk of noisy copies of this frame (opening its next step when needed)."""
        if self.chunks is None:
            self.step_draws = self.sampler.next_draws
            self.chunks = self.sampler.noisy_chunks()
        return next(self.chunks, None)

    def take(self, logits: torch.Tensor) -> None:
        """The logits of the chunk :meth:`next_chunk` gave; a complete step goes to the sampler."""
        self.step_logits.append(logits)
        self.draws += logits.shape[0]
        if sum(part.shape[0] for part in self.step_logits) == self.step_draws:
            self.outcome = self.sampler.observe(torch.cat(self.step_logits))
            self.step_logits, self.chunks = [], None


def _survival(outcome: CertificationOutcome | None) -> float | None:
    if outcome is None or outcome.certificate.abstained or not math.isfinite(outcome.vote_lower_bound):
        return None
    return float(outcome.vote_lower_bound)


def _probabilities(totals: torch.Tensor) -> np.ndarray | None:
    total = float(totals.sum())
    return (totals / total).numpy() if total > 0 else None


def _in_one_go(
    engine: Engine, index: int, x: torch.Tensor, generator: torch.Generator, settings: PredictorSettings,
    options: dict[str, Any],
) -> FrameCertification:
    """A method that certifies in one go, with its votes counted for the share of noise that keeps it."""
    seen: list[torch.Tensor] = []
    outcome = certify(settings.method_name, engine, x, generator=generator, logits_callback=seen.append,
                      **options)
    certificate = outcome.certificate
    survival = None
    if seen and not certificate.abstained and method_spec(settings.method_name).needs_noise:
        estimation = torch.cat(seen)[settings.n0:]  # the selection draws come first
        votes = int((estimation.argmax(dim=1) == certificate.prediction).sum())
        survival = float(clopper_pearson_lower(votes, estimation.shape[0], settings.alpha))
    passes = int(certificate.forward_passes)
    return FrameCertification(index=index, draws=passes, budget=settings.n0 + settings.n, outcome=outcome,
                              probabilities=None, passes=passes, done=True, noise_survival=survival)


def _from_logits(index: int, logits: torch.Tensor, settings: PredictorSettings,
                 lipschitz_constant: float | None) -> FrameCertification:
    """A deterministic certificate read from the clean logits the answer already computed: no pass."""
    outcome = certify_logits(settings.method_name, logits, lipschitz_constant=lipschitz_constant)
    return FrameCertification(index=index, draws=0, budget=0, outcome=outcome, probabilities=None, passes=0,
                              done=True)


def certify_frames(
    engine: Engine,
    frames: Sequence[torch.Tensor],
    generators: Sequence[torch.Generator],
    *,
    settings: PredictorSettings,
    num_classes: int,
    temperature: float,
    lipschitz_constant: float | None = None,
    frames_per_pass: int = 1,
    clean_logits: Sequence[torch.Tensor | None] | None = None,
) -> Iterator[FrameCertification]:
    """Certify preprocessed frames ``(C, H, W)`` (pixels in [0, 1], on the engine's device), each with its
    generator, with ``settings``; yields each frame's :class:`FrameCertification` after every chunk of
    its draws, the last one of each frame with ``done=True`` (frames finish in order when
    ``frames_per_pass`` is 1). Probabilities are calibrated with ``temperature``. The final outcome of a
    frame is :func:`painwatch.robust.certify`'s for ``engine``, the frame and its generator. With a
    method that certifies from clean logits alone (``lipschitz``), a frame's ``clean_logits`` (of the
    engine's pass that answered) give its certificate at no further pass (:func:`certify_logits`).
    """
    if len(frames) != len(generators):
        raise ValueError(f"got {len(frames)} frames but {len(generators)} generators")
    if clean_logits is not None and len(clean_logits) != len(frames):
        raise ValueError(f"got {len(frames)} frames but {len(clean_logits)} clean logits")
    from_logits = method_spec(settings.method_name).from_logits is not None
    if not isinstance(frames_per_pass, int) or frames_per_pass < 1:
        raise ValueError(f"frames_per_pass must be a positive integer, got {frames_per_pass!r}")
    s = settings
    options = {"sigma": s.sigma, "alpha": s.alpha, "n0": s.n0, "n": s.n, "batch_size": s.batch_size,
               "lipschitz_constant": lipschitz_constant, "score_temperature": s.score_temperature,
               "stop_early": s.sequential, "rel_tol": s.rel_tol, "min_radius": s.min_radius}
    budget = s.n0 + s.n
    waiting = deque(range(len(frames)))
    active: list[_Frame] = []
    while waiting or active:
        while waiting and len(active) < frames_per_pass:
            index = waiting.popleft()
            if from_logits and clean_logits is not None and clean_logits[index] is not None:
                yield _from_logits(index, clean_logits[index], s, lipschitz_constant)
                continue
            totals = torch.zeros(num_classes, dtype=torch.float64)

            def collect(logits: torch.Tensor, totals: torch.Tensor = totals) -> None:
                # The calibrated smoothed probabilities come from the noisy logits: no extra pass.
                totals.add_(torch.softmax(logits.cpu() / temperature, dim=1).sum(dim=0))

            sampler = certification_sampler(s.method_name, frames[index], generator=generators[index],
                                            logits_callback=collect, **options)
            if sampler is None:
                yield _in_one_go(engine, index, frames[index], generators[index], s, options)
                continue
            active.append(_Frame(index, frames[index], sampler, totals))
        if not active:
            continue
        began = time.perf_counter()
        chunks = [(frame, frame.next_chunk()) for frame in active]
        drawn = [(frame, chunk) for frame, chunk in chunks if chunk is not None]
        logits = engine(torch.cat([chunk for _, chunk in drawn])) if drawn else None
        offset = 0
        for frame, chunk in drawn:
            assert logits is not None
            frame.take(logits[offset:offset + chunk.shape[0]])
            offset += chunk.shape[0]
        if offset:  # what a draw really costs: noise, pass and bookkeeping (the time budget's rate)
            engine.record_draws(offset, time.perf_counter() - began)
        for frame in list(active):
            done = frame.sampler.done
            yield FrameCertification(
                index=frame.index, draws=frame.draws, budget=budget, outcome=frame.outcome,
                probabilities=_probabilities(frame.totals), passes=frame.draws, done=done,
                noise_survival=_survival(frame.outcome),
            )
            if done:
                active.remove(frame)

