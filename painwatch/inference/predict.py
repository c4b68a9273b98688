"""The single entry point of the page: classify frames and certify each answer.

:class:`Predictor` wraps a model bundle (``weights.safetensors`` + ``model.json``). For every frame
(an ``H x W x 3`` uint8 RGB array, already face-cropped or a whole frame) it

1. applies the deterministic evaluation transform (``painwatch.data.eval_transform`` at the model's
   input size: shorter side resized, centre square kept, pixels in [0, 1]);
2. certifies the frame with the bundle's method (``model.json`` -> ``certification``), optionally
   overridden within the bundle's bounds;
3. returns a :class:`FrameResult`: the class *of the classifier the certificate is about*, its
   temperature-calibrated probability, the certified L2 radius (pixels in [0, 1], at the model's
   input size) with its per-pixel RMS and 8-bit grey-level equivalents, and the forward passes spent.

Which classifier answers (``FrameResult.classifier`` says it in words):

- ``soft_smoothing``: the soft smoothed classifier ``argmax_k E_xi softmax(f(x + xi) / T)_k``,
  ``xi ~ N(0, sigma^2 I)``, with the score temperature ``T`` of ``model.json`` (``score_temperature``;
  0.1 for new bundles, which sharpens the scores towards votes; 1 when absent). Certified with the
  anytime-valid sequential bound of :mod:`painwatch.robust.sequential`, which stops sampling once the
  answer is decided (``n`` is then the budget); ``sequential=False`` uses the fixed-``n``
  :func:`painwatch.robust.soft_smoothing_certify`.
- ``randomized_smoothing`` (the default of new bundles): the vote classifier ``g`` of [Cohen19]. With
  ``model.json``'s ``bound: "fixed"`` it is Cohen's CERTIFY over the whole budget (Clopper-Pearson),
  stopping early only to abstain; with ``"anytime"`` the sequential hard-vote bound, which may also stop
  early once the radius is decided; ``sequential=False`` runs the plain fixed-``n`` CERTIFY of
  :class:`painwatch.robust.SmoothedClassifier`. At the default budget of 1 000 forward passes the fixed
  bound certifies the largest radii (``scripts/bench_certify_clinical.py``).
- ``smoothed_margin`` / ``lipschitz``: need a sound Lipschitz bound of the network; loading refuses
  them with a clear message for networks whose bound painwatch cannot compute (e.g. ResNets). The
  Lipschitz networks (``lip-*`` architectures) certify with ``lipschitz`` by default: the bare
  network's answer, deterministic (alpha 0), from one forward pass that also gives the probabilities.

Abstention is an answer: ``label == "abstain"``, ``class_index == -1``, ``radius == 0.0``, with the
reason in words (``abstain_reason``, from :data:`ABSTAIN_REASONS`).

Frames unlike the training frames are refused (docs/design.md, "The in-distribution check"): when the
bundle carries an in-distribution check, the frame's clean forward pass also gives the check's score
(one pass); a frame scoring above the check's threshold is refused (``abstain_code
"not_like_training_frames"``, radius 0) before any noise is drawn for it; a ``lipschitz`` certificate
is read from that same pass (:func:`painwatch.robust.certify_logits`), so a Lipschitz network still
answers, refuses and certifies in one forward pass. Every :class:`FrameResult`
records the score and the threshold. A bundle without a check still answers;
:attr:`Predictor.in_distribution_note` then says why it cannot refuse such frames.

Noise that nobody can predict (docs/design.md, "Noise seeds"): in deployment (``seed=None``, the
default) every frame's noise seed comes from the operating system's entropy (:mod:`secrets`), so
whoever sends a frame cannot search offline for a frame whose draws give a wrong certificate. Every
:class:`FrameResult` records its ``noise_seed``; ``predict(images, noise_seeds=[...])`` reproduces the
results exactly, so anyone can re-check a certificate later. Experiments fix ``seed``: each frame's
seed is then a hash of ``(seed, frame pixels)``, the same whatever else is in the batch.
"""

from __future__ import annotations

import hashlib
import math
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from painwatch.calibration import calibrated_probabilities
from painwatch.data import eval_transform
from painwatch.inference.model_card import model_card_dict, model_card_markdown
from painwatch.inference.saliency import gradcam
from painwatch.inference.settings import PredictorSettings, resolve_settings, sound_lipschitz_constant
from painwatch.models import BundleMetadata, GateVerdict, load_bundle
from painwatch.models.in_distribution import InDistributionStatistic, descriptor_pass
from painwatch.robust import certify, certify_logits, method_spec

__all__ = ["ABSTAIN_LABEL", "ABSTAIN_REASONS", "FrameResult", "Predictor", "frame_seed", "random_noise_seed"]

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
    in_distribution_score: float | None = None
    in_distribution_threshold: float | None = None

    @property
    def abstained(self) -> bool:
        return self.class_index < 0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (NaN becomes None)."""
        record = asdict(self)
        for key, value in record.items():
            if isinstance(value, float) and not math.isfinite(value):
                record[key] = None
        return record


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


class Predictor:
    """Classify and certify frames with a model bundle (see the module docstring).

    Use :meth:`load`. Attributes: ``model`` (eval mode), ``metadata`` (the bundle's checked
    ``model.json``), ``bundle_path``, ``settings`` (:class:`PredictorSettings`), ``classes``,
    ``input_shape`` ``(C, H, W)``, ``temperature``, ``seed``, ``in_distribution`` (the bundle's check,
    or None).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        metadata: BundleMetadata,
        bundle_path: str | Path,
        settings: PredictorSettings,
        *,
        seed: int | None = None,
        lipschitz_constant: float | None = None,
        in_distribution: InDistributionStatistic | None = None,
    ) -> None:
        self.model = model.eval()
        self.metadata = metadata
        self.bundle_path = Path(bundle_path)
        self.settings = settings
        self.seed = seed
        self.classes: tuple[str, ...] = tuple(metadata.classes)
        self.input_shape: tuple[int, int, int] = metadata.input_shape
        self.temperature = float(metadata.temperature)
        self.transform = eval_transform(metadata.input_size)
        self.lipschitz_constant = lipschitz_constant
        self.in_distribution = in_distribution
        self.device = next(model.parameters()).device

    # ------------------------------------------------------------------------------------- loading

    @classmethod
    def load(
        cls,
        bundle_dir: str | Path,
        *,
        method: str | None = None,
        sigma: float | None = None,
        alpha: float | None = None,
        n: int | None = None,
        sequential: bool | None = None,
        score_temperature: float | None = None,
        seed: int | None = None,
        device: str | torch.device = "cpu",
    ) -> Predictor:
        """Load a bundle; ``method``/``sigma``/``alpha``/``n`` override ``model.json`` within its bounds.

        ``sequential`` (default: True for the smoothing methods) picks the sampler that stops early (with
        the bundle's ``bound``: only to abstain when ``"fixed"``); ``score_temperature`` overrides the
        soft scores' temperature (within the bounds). ``seed`` None (deployment) draws every frame's
        noise seed from the operating system's entropy; an integer makes experiments reproducible
        (each frame's seed is then a hash of the seed and its pixels).

        Raises:
            painwatch.models.BundleError: the folder is not a valid bundle.
            SettingsError: an override is unknown or out of bounds, or the method cannot be used
                with this network.
        """
        bundle = load_bundle(bundle_dir, device=device)
        settings = resolve_settings(bundle.metadata.certification, method=method, sigma=sigma, alpha=alpha,
                                    n=n, sequential=sequential, score_temperature=score_temperature,
                                    source=str(Path(bundle_dir) / "model.json"))
        lipschitz_constant = None
        if method_spec(settings.method).needs_lipschitz_constant:
            lipschitz_constant = sound_lipschitz_constant(
                bundle.model, bundle.metadata.input_shape, method=settings.method,
                architecture=bundle.metadata.architecture,
            )
        return cls(bundle.model, bundle.metadata, bundle.path, settings, seed=seed,
                   lipschitz_constant=lipschitz_constant, in_distribution=bundle.in_distribution)

    # ---------------------------------------------------------------------------------- properties

    @property
    def gates(self) -> Mapping[str, GateVerdict]:
        """The certification-gate verdicts recorded in the bundle, by gate file (empty when never run)."""
        return self.metadata.gates

    @property
    def gate(self) -> GateVerdict | None:
        """The most recent gate verdict (None when the bundle was never certified)."""
        return self.metadata.latest_gate

    @property
    def in_distribution_note(self) -> str | None:
        """Why this predictor cannot refuse frames unlike the training frames (None when it can)."""
        if self.in_distribution is not None:
            return None
        return self.metadata.in_distribution_note or "the bundle's in-distribution check was not loaded"

    @property
    def classifier_description(self) -> str:
        """The classifier whose answer is reported and certified, in words."""
        s = self.settings
        spec = method_spec(s.method)
        if not spec.needs_noise:
            return f"{spec.certifies} (worst-case Lipschitz margin)"
        details = f"sigma={s.sigma:g} per pixel, L2 in [0, 1] pixels"
        if spec.uses_score_temperature and s.score_temperature != 1.0:
            details += f", scores softmax(logits / {s.score_temperature:g})"
        return f"smoothed classifier: {spec.certifies} ({details})"

    # ---------------------------------------------------------------------------------- prediction

    def preprocess(self, image: np.ndarray, name: str = "image") -> torch.Tensor:
        """The evaluation transform of one uint8 RGB frame: a float tensor ``input_shape`` in [0, 1]."""
        if not isinstance(image, np.ndarray):
            raise ValueError(f"{name}: expected an (H, W, 3) uint8 RGB array, got {type(image).__name__}")
        try:
            return self.transform(image)
        except ValueError as error:
            raise ValueError(f"{name}: {error}") from error

    def noise_seed_for(self, x: torch.Tensor) -> int:
        """The noise seed of one preprocessed frame: unpredictable (:func:`random_noise_seed`) when the
        predictor has no ``seed``, else :func:`frame_seed` of the seed and the frame's pixels."""
        return random_noise_seed() if self.seed is None else frame_seed(self.seed, x)

    def generator_for(self, x: torch.Tensor, noise_seed: int | None = None) -> torch.Generator:
        """The noise generator of one preprocessed frame, seeded with ``noise_seed`` (by default
        :meth:`noise_seed_for` the frame)."""
        seed = self.noise_seed_for(x) if noise_seed is None else int(noise_seed)
        return torch.Generator().manual_seed(seed)

    def _clean_probabilities(self, x: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            logits = self.model(x.unsqueeze(0).to(self.device)).detach().to("cpu", torch.float64)
        return calibrated_probabilities(logits.numpy(), self.temperature)[0]

    def clean_pass(self, x: torch.Tensor) -> tuple[np.ndarray, float | None]:
        """One clean forward pass of a preprocessed frame ``(C, H, W)``: its temperature-calibrated
        probabilities and its in-distribution score (None without a check)."""
        _, probabilities, score = self._clean_pass(x)
        return probabilities, score

    def _clean_pass(self, x: torch.Tensor) -> tuple[torch.Tensor, np.ndarray, float | None]:
        """:meth:`clean_pass` with the raw logits ``(1, K)`` of that pass first."""
        batch = x.unsqueeze(0).to(self.device)
        if self.in_distribution is None:
            with torch.no_grad():
                logits = self.model(batch)
            score = None
        else:
            logits, descriptors = descriptor_pass(self.model, batch, self.in_distribution.spec.descriptors)
            score = float(self.in_distribution.scores(descriptors)[0])
        logits = logits.detach().to("cpu", torch.float64)
        return logits, calibrated_probabilities(logits.numpy(), self.temperature)[0], score

    def refuses(self, score: float | None) -> bool:
        """Whether a frame of in-distribution ``score`` is refused (never without a check)."""
        check = self.in_distribution
        return score is not None and check is not None and score > check.threshold

    def certify_tensor(
        self,
        x: torch.Tensor,
        *,
        noise_seed: int | None = None,
        clean_probabilities: np.ndarray | None = None,
        clean_logits: torch.Tensor | None = None,
    ) -> tuple[Any, np.ndarray, int, str | None]:
        """Certify one preprocessed frame ``(C, H, W)`` in [0, 1] with the noise of ``noise_seed``
        (by default :meth:`noise_seed_for` the frame). ``clean_probabilities`` of a clean pass already
        made (:meth:`clean_pass`) are used instead of another one where the clean frame's
        probabilities are reported (that pass is then not counted in ``forward_passes``). With that
        pass's ``clean_logits`` too, a method that certifies from clean logits alone (``lipschitz``,
        :func:`painwatch.robust.certify_logits`) makes no pass of its own (``forward_passes`` 0).

        Returns ``(certificate, probabilities, forward_passes, stop_reason)``; the certificate is the
        one :func:`painwatch.robust.certify` returns for these settings and that generator.
        """
        s = self.settings
        if (clean_logits is not None and clean_probabilities is not None
                and method_spec(s.method_name).from_logits is not None):
            outcome = certify_logits(s.method_name, clean_logits, lipschitz_constant=self.lipschitz_constant)
            return outcome.certificate, clean_probabilities, 0, outcome.stop_reason
        x = x.to(self.device)
        totals = torch.zeros(len(self.classes), dtype=torch.float64)

        def collect(logits: torch.Tensor) -> None:
            totals.add_(torch.softmax(logits.cpu() / self.temperature, dim=1).sum(dim=0))

        # A sequential certificate's noisy logits, or the deterministic certificate's one clean pass, also
        # give the probabilities.
        reuse_logits = s.sequential or method_spec(s.method_name).deterministic
        outcome = certify(
            s.method_name, self.model, x, sigma=s.sigma, alpha=s.alpha, n0=s.n0, n=s.n,
            batch_size=s.batch_size, generator=self.generator_for(x, noise_seed),
            lipschitz_constant=self.lipschitz_constant, score_temperature=s.score_temperature,
            stop_early=s.sequential, rel_tol=s.rel_tol,
            min_radius=s.min_radius, logits_callback=collect if reuse_logits else None,
        )
        certificate = outcome.certificate
        if reuse_logits:
            # The probabilities come from the logits already computed: no extra forward pass.
            return certificate, (totals / totals.sum()).numpy(), outcome.forward_passes, outcome.stop_reason
        if clean_probabilities is not None:
            return certificate, clean_probabilities, int(certificate.forward_passes), None
        passes = int(certificate.forward_passes) + 1  # + the clean pass for the probabilities
        return certificate, self._clean_probabilities(x), passes, None

    def _threshold(self) -> float | None:
        return None if self.in_distribution is None else float(self.in_distribution.threshold)

    def _refused(self, name: str, probabilities: np.ndarray, score: float) -> FrameResult:
        """A frame refused by the in-distribution check: an abstention after one clean pass."""
        s = self.settings
        shown = int(np.argmax(probabilities))
        code = "not_like_training_frames"
        return FrameResult(
            name=name, label=ABSTAIN_LABEL, class_index=-1, confidence=float(probabilities[shown]),
            probabilities={c: float(p) for c, p in zip(self.classes, probabilities, strict=True)},
            radius=0.0, radius_rms=0.0, radius_grey_levels=0.0, method=s.method_name,
            sigma=float(s.sigma) if method_spec(s.method).needs_noise else 0.0, n=0, alpha=float(s.alpha),
            forward_passes=1, classifier=self.classifier_description, abstain_code=code,
            abstain_reason=ABSTAIN_REASONS[code], in_distribution_score=score,
            in_distribution_threshold=self._threshold(),
        )

    def _result(self, name: str, certificate: Any, probabilities: np.ndarray, passes: int,
                stop_reason: str | None, noise_seed: int | None) -> FrameResult:
        s = self.settings
        needs_noise = method_spec(s.method).needs_noise
        abstain_code = "unclear_under_noise" if certificate.abstained else None
        numel = math.prod(self.input_shape)
        index = int(certificate.prediction)
        shown = index if index >= 0 else int(np.argmax(probabilities))
        method = s.method_name
        radius = float(certificate.radius)
        return FrameResult(
            name=name,
            label=self.classes[index] if index >= 0 else ABSTAIN_LABEL,
            class_index=index,
            confidence=float(probabilities[shown]),
            probabilities={c: float(p) for c, p in zip(self.classes, probabilities, strict=True)},
            radius=radius,
            radius_rms=radius / math.sqrt(numel),
            radius_grey_levels=255.0 * radius / math.sqrt(numel),
            method=method,
            sigma=float(s.sigma) if needs_noise else 0.0,
            n=int(certificate.n),
            alpha=float(certificate.alpha),
            forward_passes=int(passes),
            bound=float(certificate.bound),
            classifier=self.classifier_description,
            stop_reason=stop_reason,
            noise_seed=noise_seed if needs_noise else None,
            abstain_code=abstain_code,
            abstain_reason=ABSTAIN_REASONS[abstain_code] if abstain_code else None,
            in_distribution_threshold=self._threshold(),
        )

    def predict(
        self,
        images: Sequence[np.ndarray],
        names: Sequence[str] | None = None,
        *,
        noise_seeds: Sequence[int] | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> list[FrameResult]:
        """Classify and certify frames (``H x W x 3`` uint8 RGB arrays), in order.

        A frame the in-distribution check refuses is answered after its clean pass, without noise
        draws. ``noise_seeds`` (one per frame, e.g. the ``noise_seed`` of earlier results; None for a
        refused frame) reproduce those results exactly; by default each frame gets
        :meth:`noise_seed_for` it. ``progress(done, total)``
        is called after each frame. Raises ``ValueError`` naming the frame when an image is not an RGB
        uint8 array (the page decodes and checks files before this), or when the lengths differ.
        """
        images = list(images)
        names = [f"frame-{i}" for i in range(len(images))] if names is None else list(names)
        if len(names) != len(images):
            raise ValueError(f"got {len(images)} images but {len(names)} names")
        seeds = [None] * len(images) if noise_seeds is None else [
            None if seed is None else int(seed) for seed in noise_seeds]
        if len(seeds) != len(images):
            raise ValueError(f"got {len(images)} images but {len(seeds)} noise seeds")
        results = []
        for done, (image, name, seed) in enumerate(zip(images, names, seeds, strict=True), start=1):
            x = self.preprocess(image, name)
            clean = clean_logits = None
            if self.in_distribution is not None:
                clean_logits, clean, score = self._clean_pass(x)
            if clean is not None and self.refuses(score):
                results.append(self._refused(name, clean, score))
            else:
                noise_seed = self.noise_seed_for(x) if seed is None else seed
                outcome = self.certify_tensor(x, noise_seed=noise_seed, clean_probabilities=clean,
                                              clean_logits=clean_logits)
                result = self._result(name, *outcome, noise_seed)
                if clean is not None:
                    # + the clean pass that gave the score (and the clean probabilities, where shown).
                    result = replace(result, in_distribution_score=score,
                                     forward_passes=result.forward_passes + 1)
                results.append(result)
            if progress is not None:
                progress(done, len(images))
        return results

    # ----------------------------------------------------------------------------------- saliency

    def saliency(self, image: np.ndarray, class_index: int | None = None) -> np.ndarray:
        """Grad-CAM of the network for one frame, as an ``H x W`` map in [0, 1] over the frame (see
        :func:`painwatch.inference.saliency.gradcam`)."""
        x = self.preprocess(image)
        return gradcam(self.model, x, frame_shape=image.shape[:2], class_index=class_index)

    # --------------------------------------------------------------------------------- model card

    def model_card_dict(self) -> dict[str, Any]:
        """The model card as a dict: intended use, model, training data, calibration, certification,
        gate verdicts, limits."""
        return model_card_dict(self.metadata, self.settings)

    def model_card(self) -> str:
        """The model card as Markdown (for the page and the certification report)."""
        return model_card_markdown(self.model_card_dict())
