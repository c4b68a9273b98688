"""The single entry point of the page: classify frames at once, then certify each answer.

:class:`Predictor` wraps a model bundle (``weights.safetensors`` + ``model.json``). For every frame
(an ``H x W x 3`` uint8 RGB array, already face-cropped or a whole frame) it

1. applies the deterministic evaluation transform (``painwatch.data.eval_transform`` at the model's
   input size: shorter side resized, centre square kept, pixels in [0, 1]);
2. answers from one clean forward pass (:meth:`Predictor.answer`: class and temperature-calibrated
   confidence, an :class:`Answer`, in well under a second for a ResNet50 at 224 px on a CPU);
3. certifies the frame with the bundle's method (``model.json`` -> ``certification``), optionally
   overridden within the bundle's bounds, reporting its progress as the draws come in
   (:meth:`Predictor.certify_steps`);
4. returns a :class:`FrameResult`: the class *of the classifier the certificate is about*, its
   temperature-calibrated probability, the certified L2 radius (pixels in [0, 1], at the model's
   input size) with its per-pixel RMS and 8-bit grey-level equivalents, the share of random noise that
   leaves the answer unchanged, and the forward passes spent. :meth:`Predictor.predict` does 2-4.

The answer and every noise draw go through one :class:`~painwatch.inference.engine.Engine` (runtime and
precision: OpenVINO in bfloat16 on CPUs that have it, by default), so the certificate is about the
exact model that answered; every result records which (``runtime``, ``precision``). Methods that need a
sound Lipschitz bound run in PyTorch at fp32 only (the bound is about the fp32 network).

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
  them with a clear message for networks whose bound painwatch cannot compute (e.g. ResNets).

Abstention is an answer: ``label == "abstain"``, ``class_index == -1``, ``radius == 0.0``, with the
reason in words (``abstain_reason``, from :data:`ABSTAIN_REASONS`).

Frames unlike the training frames are refused (docs/design.md, "The in-distribution check"): when the
bundle carries an in-distribution check, the frame's answer also scores it, from the descriptors read in
the answer's own clean pass of the engine (:meth:`~painwatch.inference.engine.Engine.answer_described`:
one pass, about the network that answers; the threshold was set on fp32 descriptors, and how often
the bf16 engine's refusal differs from fp32's is measured in the model card); a frame scoring above
the threshold is refused (:attr:`Answer.abstain_code` ``"not_like_training_frames"``, radius 0) and no
noise is drawn for it. Every :class:`FrameResult` records the score and the threshold. A bundle without
a check still answers; :attr:`Predictor.in_distribution_note` then says why it cannot refuse such frames.

Noise that nobody can predict (docs/design.md, "Noise seeds"): in deployment (``seed=None``, the
default) every frame's noise seed comes from the operating system's entropy (:mod:`secrets`), so
whoever sends a frame cannot search offline for a frame whose draws give a wrong certificate. Every
:class:`FrameResult` records its ``noise_seed``; ``predict(images, noise_seeds=[...])`` reproduces the
results exactly, so anyone can re-check a certificate later. Experiments fix ``seed``: each frame's
seed is then a hash of ``(seed, frame pixels)``, the same whatever else is in the batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from painwatch.calibration import calibrated_probabilities
from painwatch.data import eval_transform
from painwatch.inference.certifying import Answer, FrameCertification, certify_frames
from painwatch.inference.engine import Engine, EngineError, make_engine
from painwatch.inference.model_card import model_card_dict, model_card_markdown
from painwatch.inference.results import (
    ABSTAIN_LABEL,
    ABSTAIN_REASONS,
    CertificationProgress,
    FrameResult,
    frame_seed,
    random_noise_seed,
)
from painwatch.inference.saliency import gradcam
from painwatch.inference.settings import (
    PredictorSettings,
    SettingsError,
    resolve_settings,
    sound_lipschitz_constant,
)
from painwatch.models import BundleMetadata, GateVerdict, load_bundle
from painwatch.models.in_distribution import InDistributionStatistic, descriptor_pass
from painwatch.robust import method_spec

__all__ = ["ABSTAIN_LABEL", "ABSTAIN_REASONS", "Answer", "CertificationProgress", "FrameResult", "Predictor",
           "frame_seed", "random_noise_seed"]

class Predictor:
    """Classify and certify frames with a model bundle (see the module docstring).

    Use :meth:`load`. Attributes: ``model`` (the bundle's network, eval mode, fp32: Grad-CAM explains
    it), ``engine`` (the :class:`~painwatch.inference.engine.Engine` that answers and certifies),
    ``metadata`` (the bundle's checked ``model.json``), ``bundle_path``, ``settings``
    (:class:`PredictorSettings`), ``classes``, ``input_shape`` ``(C, H, W)``, ``temperature``, ``seed``,
    ``frames_per_pass`` (frames whose noise draws share a forward pass), ``in_distribution`` (the
    bundle's check, or None).
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
        runtime: str = "auto",
        precision: str = "auto",
        engine: Engine | None = None,
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
        if engine is None:
            if method_spec(settings.method).needs_lipschitz_constant:
                # The Lipschitz bound is about the fp32 network: no other arithmetic may answer.
                if (runtime, precision) not in (("auto", "auto"), ("torch", "fp32"), ("auto", "fp32"),
                                                ("torch", "auto")):
                    raise SettingsError(f"method={settings.method!r} certifies the fp32 network with its "
                                        f"Lipschitz bound: it runs with runtime torch at fp32 only, not "
                                        f"{runtime}/{precision}")
                runtime, precision = "torch", "fp32"
            try:
                engine = make_engine(model, self.input_shape, runtime=runtime, precision=precision,
                                     descriptors=() if in_distribution is None
                                     else in_distribution.spec.descriptors)
            except EngineError as error:
                raise SettingsError(str(error)) from error
        self.engine = engine
        self.frames_per_pass = max(1, engine.pass_rows // settings.batch_size)

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
        runtime: str = "auto",
        precision: str = "auto",
    ) -> Predictor:
        """Load a bundle; ``method``/``sigma``/``alpha``/``n`` override ``model.json`` within its bounds.

        ``sequential`` (default: True for the smoothing methods) picks the sampler that stops early (with
        the bundle's ``bound``: only to abstain when ``"fixed"``); ``score_temperature`` overrides the
        soft scores' temperature (within the bounds). ``seed`` None (deployment) draws every frame's
        noise seed from the operating system's entropy; an integer makes experiments reproducible
        (each frame's seed is then a hash of the seed and its pixels). ``runtime`` (``torch``,
        ``openvino``) and ``precision`` (``fp32``, ``bf16``) choose the engine; ``"auto"`` the fastest
        this machine has (:func:`painwatch.inference.engine.choose_engine`).

        Raises:
            painwatch.models.BundleError: the folder is not a valid bundle.
            SettingsError: an override is unknown or out of bounds, the method cannot be used with this
                network, or the runtime or precision cannot run here.
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
                   lipschitz_constant=lipschitz_constant, runtime=runtime, precision=precision,
                   in_distribution=bundle.in_distribution)

    def with_budget(self, n: int) -> Predictor:
        """The same predictor (same network, engine and seed policy) with a draw budget of ``n``
        estimation draws per frame, checked against the bundle's bounds (a :class:`SettingsError`
        names the value and the range)."""
        if int(n) == self.settings.n:
            return self
        s = self.settings
        resolved = resolve_settings(self.metadata.certification, method=s.method, sigma=s.sigma,
                                    alpha=s.alpha, n=n, sequential=s.sequential,
                                    score_temperature=s.score_temperature,
                                    source=str(self.bundle_path / "model.json"))
        return Predictor(self.model, self.metadata, self.bundle_path, resolved, seed=self.seed,
                         lipschitz_constant=self.lipschitz_constant, engine=self.engine,
                         in_distribution=self.in_distribution)

    def draw_budget(self, seconds: float) -> int:
        """The most estimation draws per frame that fit in ``seconds`` at the engine's measured rate of
        certification rounds (:attr:`~painwatch.inference.engine.Engine.draws_per_s`; its warm-up
        passes when nothing was timed yet), after the ``n0`` selection draws and the answer pass; at
        least 0."""
        if not (isinstance(seconds, int | float) and math.isfinite(seconds) and seconds > 0):
            raise ValueError(f"seconds must be a positive number, got {seconds!r}")
        rate = self.engine.draws_per_s
        if not math.isfinite(rate):
            rate = self.warm_up()
        return max(0, int(rate * float(seconds)) - self.settings.n0 - 1)

    def warm_up(self) -> float:
        """Make the engine's first passes now (noise, answer, and the answer with the in-distribution
        check's descriptors when the bundle has one), so that the first frame does not pay for them;
        returns the measured noise passes per second."""
        layers = self.in_distribution.spec.descriptors if self.in_distribution is not None else ()
        return self.engine.warm_up(layers)

    # ---------------------------------------------------------------------------------- properties

    @property
    def runtime(self) -> str:
        """What runs the network: ``torch`` or ``openvino``."""
        return self.engine.runtime

    @property
    def precision(self) -> str:
        """The arithmetic of the network that answers and certifies: ``fp32`` or ``bf16``."""
        return self.engine.precision

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

    @property
    def interim_valid(self) -> bool:
        """Whether a certificate holds at every moment of its sampling (the anytime-valid bound), or only
        once the budget is spent (the fixed bound, and methods that certify in one go)."""
        return self.settings.method_name != self.settings.method

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

    def clean_pass(self, x: torch.Tensor) -> tuple[np.ndarray, float | None]:
        """One clean pass of the fp32 network over a preprocessed frame ``(C, H, W)``: its
        temperature-calibrated probabilities and its in-distribution score (None without a check)."""
        batch = x.unsqueeze(0).to(self.device)
        if self.in_distribution is None:
            with torch.no_grad():
                logits = self.model(batch)
            score = None
        else:
            logits, descriptors = descriptor_pass(self.model, batch, self.in_distribution.spec.descriptors)
            score = float(self.in_distribution.scores(descriptors)[0])
        probabilities = calibrated_probabilities(logits.detach().to("cpu", torch.float64).numpy(),
                                                 self.temperature)[0]
        return probabilities, score

    def refuses(self, score: float | None) -> bool:
        """Whether a frame of in-distribution ``score`` is refused (never without a check)."""
        check = self.in_distribution
        return score is not None and check is not None and score > check.threshold

    def _threshold(self) -> float | None:
        return None if self.in_distribution is None else float(self.in_distribution.threshold)

    def answer_tensor(self, x: torch.Tensor, name: str = "image") -> Answer:
        """The :class:`Answer` of one preprocessed frame ``(C, H, W)`` from one clean pass of the engine;
        when the bundle has an in-distribution check, that same pass gives the check's descriptors and
        the answer carries the refusal of a frame unlike the training frames."""
        batch = x.unsqueeze(0).to(self.device)
        score = None
        if self.in_distribution is None:
            logits = self.engine.answer(batch)
        else:
            logits, descriptors = self.engine.answer_described(batch, self.in_distribution.spec.descriptors)
            score = float(self.in_distribution.scores(descriptors)[0])
        logits = logits.detach().to("cpu", torch.float64)
        probabilities = calibrated_probabilities(logits.numpy(), self.temperature)[0]
        index = int(np.argmax(probabilities))
        return Answer(name=name, label=self.classes[index], class_index=index,
                      confidence=float(probabilities[index]),
                      probabilities={c: float(p) for c, p in zip(self.classes, probabilities, strict=True)},
                      runtime=self.runtime, precision=self.precision, forward_passes=1,
                      in_distribution_score=score, logits=logits[0],
                      abstain_code="not_like_training_frames" if self.refuses(score) else None)

    def _refused(self, answer: Answer) -> FrameResult:
        """A frame the in-distribution check refused: an abstention after its answer, without noise."""
        s = self.settings
        code = "not_like_training_frames"
        return FrameResult(
            name=answer.name, label=ABSTAIN_LABEL, class_index=-1, confidence=answer.confidence,
            probabilities=dict(answer.probabilities), radius=0.0, radius_rms=0.0, radius_grey_levels=0.0,
            method=s.method_name, sigma=float(s.sigma) if method_spec(s.method).needs_noise else 0.0, n=0,
            alpha=float(s.alpha), forward_passes=answer.forward_passes,
            classifier=self.classifier_description, abstain_code=code, abstain_reason=ABSTAIN_REASONS[code],
            runtime=self.runtime, precision=self.precision, answer_label=answer.label,
            answer_confidence=answer.confidence,
            in_distribution_score=answer.in_distribution_score, in_distribution_threshold=self._threshold(),
        )

    def answer(self, images: Sequence[np.ndarray], names: Sequence[str] | None = None) -> list[Answer]:
        """The first answer of every frame (``H x W x 3`` uint8 RGB), in order: class and calibrated
        confidence from one clean forward pass each, no certificate. Raises ``ValueError`` naming the
        frame when an image is not an RGB uint8 array."""
        names = self._names(images, names)
        return [self.answer_tensor(self.preprocess(image, name), name)
                for image, name in zip(images, names, strict=True)]

    def _names(self, images: Sequence[np.ndarray], names: Sequence[str] | None) -> list[str]:
        names = [f"frame-{i}" for i in range(len(images))] if names is None else list(names)
        if len(names) != len(images):
            raise ValueError(f"got {len(images)} images but {len(names)} names")
        return names

    def certify_steps(
        self,
        images: Sequence[np.ndarray],
        names: Sequence[str] | None = None,
        *,
        noise_seeds: Sequence[int | None] | None = None,
        answers: Sequence[Answer] | None = None,
    ) -> Iterator[CertificationProgress]:
        """Certify frames, reporting each frame's :class:`CertificationProgress` after every chunk of its
        noise draws; the last report of a frame carries its :class:`FrameResult` (``done``).

        ``noise_seeds`` (one per frame, None for a fresh one) reproduce earlier results exactly;
        ``answers`` (from :meth:`answer`, same order) save the clean passes when the page already made
        them. Frames are preprocessed (and checked, ``ValueError`` naming the frame) before any draw.
        """
        images = list(images)
        names = self._names(images, names)
        seeds = [None] * len(images) if noise_seeds is None else list(noise_seeds)
        if len(seeds) != len(images):
            raise ValueError(f"got {len(images)} images but {len(seeds)} noise seeds")
        xs = [self.preprocess(image, name).to(self.device) for image, name in zip(images, names, strict=True)]
        return self._certify_tensors(xs, names, seeds, answers)

    def _certify_tensors(
        self, xs: Sequence[torch.Tensor], names: Sequence[str], seeds: Sequence[int | None],
        answers: Sequence[Answer] | None,
    ) -> Iterator[CertificationProgress]:
        if answers is not None and len(answers) != len(xs):
            raise ValueError(f"got {len(xs)} frames but {len(answers)} answers")
        # The answers first: they carry the in-distribution check's refusals, decided before any noise.
        given = list(answers) if answers is not None else [self.answer_tensor(x, name)
                                                           for x, name in zip(xs, names, strict=True)]
        budget = self.settings.n0 + self.settings.n
        kept = []
        for index, answer in enumerate(given):
            if answer.abstain_code == "not_like_training_frames":
                yield CertificationProgress(
                    index=index, name=names[index], draws=0, budget=budget, radius=0.0, noise_survival=None,
                    interim_valid=self.interim_valid, done=True,
                    result=self._refused(replace(answer, name=names[index])))
            else:
                kept.append(index)
        noise_seeds = {index: self.noise_seed_for(xs[index]) if seeds[index] is None else int(seeds[index])
                       for index in kept}
        generators = [torch.Generator().manual_seed(noise_seeds[index]) for index in kept]
        for step in certify_frames(self.engine, [xs[index] for index in kept], generators,
                                   settings=self.settings, num_classes=len(self.classes),
                                   temperature=self.temperature, lipschitz_constant=self.lipschitz_constant,
                                   frames_per_pass=self.frames_per_pass,
                                   clean_logits=[given[index].logits for index in kept]):
            index = kept[step.index]
            certificate = step.outcome.certificate if step.outcome is not None else None
            result = None
            if step.done:
                result = self._result(names[index], step, given[index], noise_seeds[index])
            yield CertificationProgress(
                index=index, name=names[index], draws=step.draws, budget=step.budget,
                radius=float(certificate.radius) if certificate is not None else 0.0,
                noise_survival=step.noise_survival, interim_valid=self.interim_valid, done=step.done,
                result=result,
            )

    def certify_frame(self, x: torch.Tensor, *, noise_seed: int | None = None) -> FrameCertification:
        """The finished :class:`~painwatch.inference.certifying.FrameCertification` of one preprocessed
        frame ``(C, H, W)`` with the noise of ``noise_seed`` (by default :meth:`noise_seed_for` the
        frame): its certificate, the share of noise that keeps the answer, and the passes it took (no
        clean pass)."""
        seed = self.noise_seed_for(x) if noise_seed is None else int(noise_seed)
        generator = torch.Generator().manual_seed(seed)
        steps = certify_frames(self.engine, [x.to(self.device)], [generator], settings=self.settings,
                               num_classes=len(self.classes), temperature=self.temperature,
                               lipschitz_constant=self.lipschitz_constant)
        (step,) = [step for step in steps if step.done]
        return step

    def certify_tensor(
        self,
        x: torch.Tensor,
        *,
        noise_seed: int | None = None,
        clean_probabilities: np.ndarray | None = None,
    ) -> tuple[Any, np.ndarray, int, str | None]:
        """Certify one preprocessed frame ``(C, H, W)`` in [0, 1] with the noise of ``noise_seed``
        (by default :meth:`noise_seed_for` the frame). ``clean_probabilities`` of a clean pass already
        made (:meth:`clean_pass`) are used instead of another one where the clean frame's
        probabilities are reported (that pass is then not counted in ``forward_passes``).

        Returns ``(certificate, probabilities, forward_passes, stop_reason)``; the certificate is the
        one :func:`painwatch.robust.certify` returns for these settings, this predictor's engine and
        that generator. Probabilities are the smoothed ones (sequential methods) or those of the clean
        pass, which then counts in ``forward_passes``.
        """
        step = self.certify_frame(x, noise_seed=noise_seed)
        assert step.outcome is not None
        if step.probabilities is not None:
            return step.outcome.certificate, step.probabilities, step.passes, step.outcome.stop_reason
        if clean_probabilities is not None:
            return step.outcome.certificate, clean_probabilities, step.passes, step.outcome.stop_reason
        answer = self.answer_tensor(x)
        probabilities = np.array([answer.probabilities[c] for c in self.classes])
        return (step.outcome.certificate, probabilities, step.passes + answer.forward_passes,
                step.outcome.stop_reason)

    def _result(self, name: str, step: FrameCertification, answer: Answer,
                noise_seed: int | None) -> FrameResult:
        s = self.settings
        assert step.outcome is not None
        certificate = step.outcome.certificate
        probabilities = step.probabilities
        if probabilities is None:  # fixed-n methods: the clean pass's calibrated probabilities
            probabilities = np.array([answer.probabilities[c] for c in self.classes])
        needs_noise = method_spec(s.method).needs_noise
        abstain_code = "unclear_under_noise" if certificate.abstained else None
        numel = math.prod(self.input_shape)
        index = int(certificate.prediction)
        shown = index if index >= 0 else int(np.argmax(probabilities))
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
            method=s.method_name,
            sigma=float(s.sigma) if needs_noise else 0.0,
            n=int(certificate.n),
            alpha=float(certificate.alpha),
            forward_passes=int(step.passes) + answer.forward_passes,
            bound=float(certificate.bound),
            classifier=self.classifier_description,
            stop_reason=step.outcome.stop_reason,
            noise_seed=noise_seed if needs_noise else None,
            abstain_code=abstain_code,
            abstain_reason=ABSTAIN_REASONS[abstain_code] if abstain_code else None,
            runtime=self.runtime,
            precision=self.precision,
            noise_survival=step.noise_survival,
            answer_label=answer.label,
            answer_confidence=answer.confidence,
            in_distribution_score=answer.in_distribution_score,
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
        """Answer, then classify and certify frames (``H x W x 3`` uint8 RGB arrays), in order.

        ``noise_seeds`` (one per frame, e.g. the ``noise_seed`` of earlier results) reproduce those
        results exactly; by default each frame gets :meth:`noise_seed_for` it. ``progress(done, total)``
        is called after each frame. Raises ``ValueError`` naming the frame when an image is not an RGB
        uint8 array (the page decodes and checks files before this), or when the lengths differ.
        """
        images = list(images)
        results: list[FrameResult | None] = [None] * len(images)
        finished = 0
        for step in self.certify_steps(images, names, noise_seeds=noise_seeds):
            if step.done:
                results[step.index] = step.result
                finished += 1
                if progress is not None:
                    progress(finished, len(images))
        return [result for result in results if result is not None]

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
        return model_card_dict(self.metadata, self.settings, self.engine.describe())

    def model_card(self) -> str:
        """The model card as Markdown (for the page and the certification report)."""
        return model_card_markdown(self.model_card_dict())
