"""What the Predictor returns for one frame: its :class:`FrameResult`, its certification's progress
(:class:`CertificationProgress`), the reasons for refusing a frame, and the frame's noise seed.

Units (docs/design.md, "Units and conventions"): radii are L2 norms in [0, 1] pixels at the model's
input size; ``radius_rms = radius / sqrt(C*H*W)`` and ``radius_grey_levels = 255 * radius_rms``.
"""

from __future__ import annotations

import hashlib
import math
import secrets
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

__all__ = ["ABSTAIN_LABEL", "ABSTAIN_REASONS", "NOISE_SEED_BITS", "CertificationProgress", "FrameResult",
           "frame_seed", "random_noise_seed"]

ABSTAIN_LABEL = "abstain"

ABSTAIN_REASONS: dict[str, str] = {
    "unclear_under_noise": (
        "no clear answer: the answer changes too often when the picture is slightly disturbed "
        "(no clear majority under noise)"
    ),
    "not_like_training_frames": (
        "this picture does not look like the macaque face crops the model was trained on"
    ),
}
"""Why a frame was refused, by code, in words a veterinarian can act on."""

NOISE_SEED_BITS = 63


@dataclass(frozen=True)
class FrameResult:
    """The answer for one frame.

    Attributes:
        name: the frame's name (file name, or ``frame-<i>``).
        label: ``"pain"``, ``"no_pain"`` or ``"abstain"``.
        class_index: 1 (pain), 0 (no_pain) or -1 (abstain).
        confidence: the temperature-calibrated probability of ``label`` (of the most probable class
            when abstaining), in [0, 1].
        probabilities: calibrated probability per class name. For sequential smoothing these are the
            mean of ``softmax(f(x + xi) / T)`` over the noise draws, i.e. of the smoothed classifier
            that answers; otherwise ``softmax(f(x) / T)`` of the clean frame.
        radius: certified L2 radius in [0, 1] pixel units at the model's input size (0 on abstain).
        radius_rms: ``radius / sqrt(C * H * W)``, the per-pixel RMS change, pixels in [0, 1].
        radius_grey_levels: ``255 * radius_rms``, the same in 8-bit grey levels.
        method: the certification method (``soft_smoothing_sequential``, ``soft_smoothing``,
            ``randomized_smoothing_sequential``, ``randomized_smoothing``, ...).
        sigma, n, alpha: the noise level, the estimation draws actually used, the error probability.
        forward_passes: network evaluations spent on this frame (certificate and probabilities).
        time_s: the frame's time in its clip (None for still images).
        bound: the statistic the radius came from (lower confidence bound or margin).
        classifier: in words, the classifier that produced ``label`` and that the radius is about.
        stop_reason: why a sequential certificate stopped sampling (None for fixed-n methods).
        noise_seed: the seed of this frame's noise draws (None for methods without noise):
            ``predict(..., noise_seeds=[noise_seed])`` gives this result again.
        abstain_code: why the frame was refused, a key of :data:`ABSTAIN_REASONS` (None unless it was).
        abstain_reason: the same in words (None unless the frame was refused).
        runtime, precision: what computed the answer and every noise draw (``openvino``/``torch``,
            ``bf16``/``fp32``): the certificate is about that model.
        noise_survival: with probability at least ``1 - alpha``, at least this share of random Gaussian
            pixel noise at ``sigma`` (``255 sigma`` grey levels per pixel) leaves the answer unchanged
            (a Clopper-Pearson bound [CP34] on the votes, or the confidence sequence's [WSR23] when
            sampling may stop at any time); None when nothing is certified or there is no noise.
        answer_label, answer_confidence: the first answer, from one clean pass of the network (see
            :class:`~painwatch.inference.certifying.Answer`), before any certificate.
        in_distribution_score: the in-distribution check's score of the frame (larger: less like the
            training frames); None when the bundle has no check.
        in_distribution_threshold: the check's threshold; the frame is refused when its score is above.
    """

    name: str
    label: str
    class_index: int
    confidence: float
    probabilities: dict[str, float]
    radius: float
    radius_rms: float
    radius_grey_levels: float
    method: str
    sigma: float
    n: int
    alpha: float
    forward_passes: int
    time_s: float | None = None
    bound: float = math.nan
    classifier: str = ""
    stop_reason: str | None = field(default=None)
    noise_seed: int | None = None
    abstain_code: str | None = None
    abstain_reason: str | None = None
    runtime: str = "torch"
    precision: str = "fp32"
    noise_survival: float | None = None
    answer_label: str | None = None
    answer_confidence: float | None = None
    in_distribution_score: float | None = None
    in_distribution_threshold: float | None = None

    @property
    def abstained(self) -> bool:
        return self.class_index < 0

    @property
    def noise_grey_levels(self) -> float:
        """The certification noise in 8-bit grey levels per pixel, ``255 * sigma``."""
        return 255.0 * self.sigma

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (NaN becomes None)."""
        record = asdict(self)
        for key, value in record.items():
            if isinstance(value, float) and not math.isfinite(value):
                record[key] = None
        return record


@dataclass(frozen=True)
class CertificationProgress:
    """Where one frame's certification stands (see :meth:`Predictor.certify_steps`).

    ``index`` is the frame's position; ``draws`` the noisy copies evaluated so far of at most ``budget``;
    ``radius`` and ``noise_survival`` the certificate so far: with an anytime-valid bound
    (``interim_valid``) they hold at every moment, with the fixed bound they are 0 / None until the
    budget is spent; ``result`` is the frame's :class:`FrameResult` once ``done``.
    """

    index: int
    name: str
    draws: int
    budget: int
    radius: float
    noise_survival: float | None
    interim_valid: bool
    done: bool
    result: FrameResult | None = None

    @property
    def fraction(self) -> float:
        """Share of the budget drawn so far, in [0, 1] (1 once done, also after an early stop)."""
        return 1.0 if self.done else min(1.0, self.draws / max(self.budget, 1))


def random_noise_seed() -> int:
    """A 63-bit noise seed from the operating system's entropy: nobody can predict it."""
    return secrets.randbits(NOISE_SEED_BITS)


def frame_seed(seed: int, x: torch.Tensor) -> int:
    """The noise seed of one preprocessed frame: a 63-bit hash of ``seed`` and the frame's pixels.

    Same seed and same pixels give the same seed (hence the same certificate), independent of the
    frame's position in a batch.
    """
    digest = hashlib.sha256()
    digest.update(int(seed).to_bytes(16, "little", signed=True))
    digest.update(str(tuple(x.shape)).encode())
    digest.update(x.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return int.from_bytes(digest.digest()[:8], "little") & ((1 << 63) - 1)
