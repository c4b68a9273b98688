"""The single entry point of the app: classify frames and certify each answer.

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
- ``randomized_smoothing`` (the default of new bundles): Cohen et al.'s vote classifier ``g``. With
  ``model.json``'s ``bound: "fixed"`` it is Cohen's CERTIFY over the whole budget (Clopper-Pearson),
  stopping early only to abstain; with ``"anytime"`` the sequential hard-vote bound, which may also stop
  early once the radius is decided; ``sequential=False`` runs the plain fixed-``n`` CERTIFY of
  :class:`painwatch.robust.SmoothedClassifier`. At the default budget of 1 000 forward passes the fixed
  bound certifies the largest radii (``scripts/bench_certify_clinical.py``).
- ``smoothed_margin`` / ``lipschitz``: need a sound Lipschitz bound of the network; loading refuses
  them with a clear message for networks whose bound painwatch cannot compute (e.g. ResNets).

Abstention is an answer: ``label == "abstain"``, ``class_index == -1``, ``radius == 0.0``.
Every noise draw is seeded from ``(seed, frame content)``: the same frame with the same settings gets
the same certificate, whatever else is in the batch.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from painwatch import CLASS_NAMES

__all__ = [
    "ABSTAIN_LABEL",
    "INTENDED_USE",
    "FrameResult",
    "Predictor",
    "PredictorSettings",
    "SettingsError",
    "frame_seed",
]

ABSTAIN_LABEL = "abstain"

INTENDED_USE = (
    "Supports, and never replaces, a veterinarian's judgement of pain in Japanese macaques "
    "(Macaca fuscata) from facial frames. A certified radius is a statement about pixel noise of a "
    "given L2 size only, not about other changes of the image (pose, lighting, another animal)."
)

KNOWN_LIMITS: tuple[str, ...] = (
    "Single frames only: no temporal context, no behaviour, no body posture.",
    "Trained on a small number of individuals; individuals unlike them may be classified worse.",
    "Face crops matter: the published study found contour crops without background did better "
    "(64% vs 48-54% accuracy).",
    "Certificates are probabilistic (error probability alpha per frame) and hold for the smoothed "
    "classifier the app reports, at the model's input resolution.",
)


def _sequential_variant(method: str) -> str | None:
    """The registered method that may stop sampling early and shares ``method``'s classifier."""
    from painwatch.robust import METHODS

    return next((spec.name for spec in METHODS.values() if spec.sequential and spec.base == method), None)


class SettingsError(ValueError):
    """A certification setting is unknown, malformed, or outside the bundle's allowed range."""


@dataclass(frozen=True)
class PredictorSettings:
    """The certification settings in force (after overrides), as used for every frame.

    ``n`` is the number of estimation draws for fixed-``n`` methods and the most estimation draws
    (the budget) for sequential ones; ``n0`` selection draws come on top. Units: ``sigma`` is the
    L2 noise std in [0, 1] pixel space at the model's input size. ``score_temperature`` ``T`` divides
    the logits inside the soft smoothing scores ``softmax(f / T)`` (soft_smoothing only). ``bound`` is
    ``"fixed"`` (Clopper-Pearson over the budget, early stops only to abstain) or ``"anytime"``; only
    sequential randomized_smoothing can be ``"fixed"``.
    """

    method: str
    sigma: float
    alpha: float
    n: int
    n0: int
    batch_size: int
    sequential: bool
    min_radius: float = 0.0
    rel_tol: float = 0.05
    score_temperature: float = 1.0
    bound: str = "anytime"

    @property
    def method_name(self) -> str:
        """The certificate's name in results and reports: the method, ``_sequential`` when sampling may
        stop as soon as the radius is decided (a fixed bound that only stops to abstain keeps the
        fixed-``n`` name: it is that certificate)."""
        if self.sequential and self.bound == "anytime":
            return self.method + "_sequential"
        return self.method

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise SettingsError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise SettingsError(f"{name} must be finite, got {value!r}")
    return value


def _within(name: str, value: float, bounds: Mapping[str, Any], source: str) -> None:
    if name not in bounds:
        return
    low, high = (float(v) for v in bounds[name])
    if not low <= value <= high:
        raise SettingsError(
            f"{name}={value:g} is outside the range this bundle allows, [{low:g}, {high:g}] "
            f"({source}: certification.bounds.{name})"
        )


def resolve_settings(
    certification: Mapping[str, Any],
    *,
    method: str | None = None,
    sigma: float | None = None,
    alpha: float | None = None,
    n: int | None = None,
    sequential: bool | None = None,
    score_temperature: float | None = None,
    source: str = "model.json",
) -> PredictorSettings:
    """The bundle's certification settings with the given overrides, each checked against the bounds.

    Raises :class:`SettingsError` naming the setting, the value and the allowed range.
    """
    from painwatch.models import CERTIFICATION_METHODS
    from painwatch.robust import method_spec

    bounds = certification.get("bounds", {}) or {}
    chosen_method = certification["method"] if method is None else method
    if chosen_method not in CERTIFICATION_METHODS:
        raise SettingsError(f"method={chosen_method!r} is not a certification method; "
                            f"choose one of {', '.join(CERTIFICATION_METHODS)}")
    chosen_sigma = _number(certification["sigma"] if sigma is None else sigma, "sigma")
    chosen_alpha = _number(certification["alpha"] if alpha is None else alpha, "alpha")
    raw_n = certification["n"] if n is None else n
    if isinstance(raw_n, bool) or not isinstance(raw_n, (int, np.integer)):
        raise SettingsError(f"n must be a whole number of noise draws, got {raw_n!r}")
    chosen_n = int(raw_n)
    chosen_temperature = _number(
        certification.get("score_temperature", 1.0) if score_temperature is None else score_temperature,
        "score_temperature",
    )
    for name, value in (("sigma", chosen_sigma), ("alpha", chosen_alpha), ("n", chosen_n),
                        ("score_temperature", chosen_temperature)):
        _within(name, value, bounds, source)
    if chosen_temperature <= 0:
        raise SettingsError(f"score_temperature must be > 0, got {chosen_temperature:g}")
    if method_spec(chosen_method).needs_noise and chosen_sigma <= 0:
        raise SettingsError(f"sigma must be > 0 for {chosen_method}, got {chosen_sigma:g}")
    if not 0 < chosen_alpha < 1:
        raise SettingsError(f"alpha must be strictly between 0 and 1, got {chosen_alpha:g}")
    if chosen_n < 2:
        raise SettingsError(f"n must be at least 2, got {chosen_n}")
    if sequential is None:
        sequential = _sequential_variant(chosen_method) is not None
    if sequential and _sequential_variant(chosen_method) is None:
        applicable = [name for name in CERTIFICATION_METHODS if _sequential_variant(name) is not None]
        raise SettingsError(f"sequential certification applies to {' and '.join(applicable)}, "
                            f"not to {chosen_method}")
    from painwatch.robust import SEQUENTIAL_BOUNDS

    bound = certification.get("bound", "anytime")
    if bound not in SEQUENTIAL_BOUNDS:
        raise SettingsError(f"bound={bound!r} is not a bound; choose one of {SEQUENTIAL_BOUNDS} ({source})")
    if chosen_method != "randomized_smoothing" or not sequential:
        bound = "anytime"  # the fixed Clopper-Pearson bound is about votes, in the sequential sampler
    n0 = int(certification.get("n0", 64))
    batch_size = int(certification.get("batch_size", 64))
    return PredictorSettings(
        method=chosen_method,
        sigma=chosen_sigma,
        alpha=chosen_alpha,
        n=chosen_n,
        n0=n0,
        batch_size=batch_size,
        sequential=bool(sequential),
        # Radii below 1% of sigma are not worth extra draws (well under one grey level).
        min_radius=0.01 * chosen_sigma,
        score_temperature=chosen_temperature,
        bound=bound,
    )


class Predictor:
    """Classify and certify frames with a model bundle (see the module docstring).

    Use :meth:`load`. Attributes: ``model`` (eval mode), ``metadata`` (``model.json``), ``bundle_path``,
    ``settings`` (:class:`PredictorSettings`), ``classes``, ``input_shape`` ``(C, H, W)``,
    ``temperature``, ``seed``.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        metadata: Mapping[str, Any],
        bundle_path: str | Path,
        settings: PredictorSettings,
        *,
        seed: int | None = 0,
        lipschitz_constant: float | None = None,
    ) -> None:
        from painwatch.data import eval_transform

        self.model = model.eval()
        self.metadata = dict(metadata)
        self.bundle_path = Path(bundle_path)
        self.settings = settings
        self.seed = seed
        self.classes: tuple[str, ...] = tuple(metadata.get("classes", CLASS_NAMES))
        size = int(metadata["input_size"])
        channels = len(metadata.get("mean", (0, 0, 0)))
        self.input_shape: tuple[int, int, int] = (channels, size, size)
        self.temperature = float(metadata.get("temperature", 1.0))
        self.transform = eval_transform(size)
        self.lipschitz_constant = lipschitz_constant
        self.device = next(model.parameters()).device

    # ------------------------------------------------------------------------------------- loading

    @classmethod
    def load(
        cls,
        bundle_dir: str | Path,
        method: str | None = None,
        sigma: float | None = None,
        alpha: float | None = None,
        n: int | None = None,
        *,
        sequential: bool | None = None,
        score_temperature: float | None = None,
        seed: int | None = 0,
        device: str | torch.device = "cpu",
    ) -> Predictor:
        """Load a bundle; ``method``/``sigma``/``alpha``/``n`` override ``model.json`` within its bounds.

        ``sequential`` (default: True for the smoothing methods) picks the sampler that stops early (with
        the bundle's ``bound``: only to abstain when ``"fixed"``); ``score_temperature`` overrides the
        soft scores' temperature (within the bounds); ``seed`` seeds every noise draw (None: fresh
        randomness each call).

        Raises:
            painwatch.models.BundleError: the folder is not a valid bundle.
            SettingsError: an override is unknown or out of bounds, or the method cannot be used
                with this network.
        """
        from painwatch.models import load_bundle

        bundle = load_bundle(bundle_dir, device=device)
        source = str(Path(bundle_dir) / "model.json")
        settings = resolve_settings(bundle.metadata["certification"], method=method, sigma=sigma, alpha=alpha,
                                    n=n, sequential=sequential, score_temperature=score_temperature,
                                    source=source)
        from painwatch.robust import method_spec

        lipschitz_constant = None
        if method_spec(settings.method).needs_lipschitz_constant:
            lipschitz_constant = _sound_lipschitz_constant(bundle.model, bundle.metadata, settings.method)
        return cls(bundle.model, bundle.metadata, bundle.path, settings, seed=seed,
                   lipschitz_constant=lipschitz_constant)

    # ---------------------------------------------------------------------------------- properties

    @property
    def gate(self) -> dict[str, Any] | None:
        """The certification gate's verdict recorded in the bundle (None when never certified)."""
        return self.metadata.get("gate")

    @property
    def classifier_description(self) -> str:
        s = self.settings
        if s.method == "soft_smoothing":
            scores = "softmax" if s.score_temperature == 1.0 else f"softmax(logits / {s.score_temperature:g})"
            return (f"smoothed classifier: argmax of the mean {scores} over Gaussian noise "
                    f"(sigma={s.sigma:g}, L2 in [0, 1] pixels)")
        if s.method == "randomized_smoothing":
            return f"smoothed classifier: majority vote over Gaussian noise (sigma={s.sigma:g})"
        if s.method == "smoothed_margin":
            return (f"expected-logit classifier: argmax of the mean logits over Gaussian noise "
                    f"(sigma={s.sigma:g})")
        return "the network itself (worst-case Lipschitz margin)"

    # ---------------------------------------------------------------------------------- prediction

    def preprocess(self, image: np.ndarray, name: str = "image") -> torch.Tensor:
        """The evaluation transform of one uint8 RGB frame: a float tensor ``input_shape`` in [0, 1]."""
        if not isinstance(image, np.ndarray):
            raise ValueError(f"{name}: expected an (H, W, 3) uint8 RGB array, got {type(image).__name__}")
        try:
            return self.transform(image)
        except ValueError as error:
            raise ValueError(f"{name}: {error}") from error

    def generator_for(self, x: torch.Tensor) -> torch.Generator | None:
        """The noise generator of one preprocessed frame (None when the predictor is unseeded)."""
        if self.seed is None:
            return None
        return torch.Generator().manual_seed(frame_seed(self.seed, x))

    def _clean_probabilities(self, x: torch.Tensor) -> np.ndarray:
        from painwatch.calibration import calibrated_probabilities

        with torch.no_grad():
            logits = self.model(x.unsqueeze(0).to(self.device)).detach().to("cpu", torch.float64)
        return calibrated_probabilities(logits.numpy(), self.temperature)[0]

    def certify_tensor(self, x: torch.Tensor) -> tuple[Any, np.ndarray, int, str | None]:
        """Certify one preprocessed frame ``(C, H, W)`` in [0, 1].

        Returns ``(certificate, probabilities, forward_passes, stop_reason)``; the certificate is the
        one :mod:`painwatch.robust` returns for these settings and this frame's generator.
        """
        from painwatch import robust

        s = self.settings
        x = x.to(self.device)
        totals = torch.zeros(len(self.classes), dtype=torch.float64)

        def collect(logits: torch.Tensor) -> None:
            totals.add_(torch.softmax(logits.cpu() / self.temperature, dim=1).sum(dim=0))

        # A sequential run with the anytime bound is its own registered method; the fixed bound is the
        # base method's certificate, sampled with early stops (to abstain only).
        method = s.method
        if s.sequential and s.bound == "anytime":
            method = _sequential_variant(s.method) or s.method
        outcome = robust.certify(
            method, self.model, x, sigma=s.sigma, alpha=s.alpha, n0=s.n0, n=s.n, batch_size=s.batch_size,
            generator=self.generator_for(x), lipschitz_constant=self.lipschitz_constant,
            score_temperature=s.score_temperature, stop_early=s.sequential, rel_tol=s.rel_tol,
            min_radius=s.min_radius, logits_callback=collect if s.sequential else None,
        )
        certificate = outcome.certificate
        if s.sequential:
            # The probabilities come from the noisy logits already drawn: no extra forward pass.
            return certificate, (totals / totals.sum()).numpy(), outcome.forward_passes, outcome.stop_reason
        passes = int(certificate.forward_passes) + 1  # + the clean pass for the probabilities
        return certificate, self._clean_probabilities(x), passes, None

    def _result(self, name: str, certificate: Any, probabilities: np.ndarray, passes: int,
                stop_reason: str | None) -> FrameResult:
        s = self.settings
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
            sigma=float(s.sigma) if s.method != "lipschitz" else 0.0,
            n=int(certificate.n),
            alpha=float(certificate.alpha),
            forward_passes=int(passes),
            bound=float(certificate.bound),
            classifier=self.classifier_description,
            stop_reason=stop_reason,
        )

    def predict(
        self,
        images: Sequence[np.ndarray],
        names: Sequence[str] | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> list[FrameResult]:
        """Classify and certify frames (``H x W x 3`` uint8 RGB arrays), in order.

        ``progress(done, total)`` is called after each frame. Raises ``ValueError`` naming the frame
        when an image is not an RGB uint8 array (the app decodes and checks files before this).
        """
        images = list(images)
        if names is None:
            names = [f"frame-{i}" for i in range(len(images))]
        names = list(names)
        if len(names) != len(images):
            raise ValueError(f"got {len(images)} images but {len(names)} names")
        results = []
        for done, (image, name) in enumerate(zip(images, names, strict=True), start=1):
            x = self.preprocess(image, name)
            results.append(self._result(name, *self.certify_tensor(x)))
            if progress is not None:
                progress(done, len(images))
        return results

    # ----------------------------------------------------------------------------------- saliency

    def saliency(self, image: np.ndarray, class_index: int | None = None) -> np.ndarray:
        """Grad-CAM of the network on ``model.gradcam_layer`` for one frame, as an ``H x W`` map in [0, 1].

        ``class_index`` defaults to the network's top class on the clean frame. The map is computed at
        the model's input size and placed back on the frame's centre square (the region the
        evaluation transform keeps; the rest is 0), so it overlays the uploaded image directly.
        A map that is zero everywhere means no positive evidence was found.
        """
        from painwatch.data import centre_square

        x = self.preprocess(image).unsqueeze(0).to(self.device).requires_grad_(True)
        layer = self.model.gradcam_layer
        captured: dict[str, torch.Tensor] = {}

        def hook(_module: torch.nn.Module, _inputs: Any, output: torch.Tensor) -> None:
            output.retain_grad()
            captured["activation"] = output

        handle = layer.register_forward_hook(hook)
        try:
            with torch.enable_grad():
                logits = self.model(x)
                target = int(logits.argmax(dim=1)) if class_index is None else int(class_index)
                if not 0 <= target < logits.shape[1]:
                    raise ValueError(f"class_index must be in [0, {logits.shape[1] - 1}], got {class_index}")
                logits[0, target].backward()
        finally:
            handle.remove()
        activation = captured["activation"]
        weights = activation.grad.mean(dim=(2, 3), keepdim=True)
        cam = torch.relu((weights * activation).sum(dim=1, keepdim=True)).detach()
        height, width = image.shape[:2]
        top, left, side = centre_square(height, width)
        cam = torch.nn.functional.interpolate(cam, size=(side, side), mode="bilinear", align_corners=False)
        cam = cam[0, 0]
        peak = float(cam.max())
        cam = cam / peak if peak > 0 else torch.zeros_like(cam)
        full = np.zeros((height, width), dtype=np.float32)
        full[top : top + side, left : left + side] = cam.cpu().numpy().clip(0.0, 1.0)
        return full

    # --------------------------------------------------------------------------------- model card

    def model_card_dict(self) -> dict[str, Any]:
        """The model card as a dict: intended use, model, training data, calibration, certification,
        gate, limits."""
        return model_card_dict(self.metadata, self.settings)

    def model_card(self) -> str:
        """The model card as Markdown (for the app and the certification report)."""
        return model_card_markdown(self.model_card_dict())


def _sound_lipschitz_constant(model: torch.nn.Module, metadata: Mapping[str, Any], method: str) -> float:
    from painwatch.robust.lipschitz import UnsupportedLayerError, lipschitz_upper_bound

    shape = (len(metadata.get("mean", (0, 0, 0))), int(metadata["input_size"]), int(metadata["input_size"]))
    try:
        return float(lipschitz_upper_bound(model, shape))
    except (UnsupportedLayerError, TypeError, ValueError) as error:
        raise SettingsError(
            f"method={method!r} needs a sound Lipschitz bound of the network, which painwatch cannot "
            f"compute for architecture {metadata.get('architecture')!r} ({error}); use soft_smoothing or "
            f"randomized_smoothing"
        ) from error


def model_card_dict(metadata: Mapping[str, Any], settings: PredictorSettings | None = None) -> dict[str, Any]:
    """A model card from a bundle's ``model.json`` (and the settings in force, when given)."""
    training = dict(metadata.get("training") or {})
    individuals = training.get("individuals") or []
    return {
        "intended_use": INTENDED_USE,
        "model": {
            "architecture": metadata.get("architecture"),
            "classes": list(metadata.get("classes", CLASS_NAMES)),
            "input_size": metadata.get("input_size"),
            "weights_sha256": metadata.get("weights_sha256"),
        },
        "training_data": {
            "individuals": list(individuals),
            "num_individuals": len(individuals),
            "num_frames": training.get("num_frames"),
            "data_hash": training.get("data_hash"),
            "loss": training.get("loss"),
            "noise_sigma": training.get("noise_sigma"),
            "epochs": training.get("epochs"),
            "synthetic": bool(training.get("synthetic", False)),
        },
        "calibration": {"temperature": metadata.get("temperature")},
        "certification": (settings.to_dict() if settings is not None
                          else dict(metadata.get("certification", {}))),
        "gate": metadata.get("gate"),
        "limits": list(KNOWN_LIMITS),
    }


def model_card_markdown(card: Mapping[str, Any]) -> str:
    """Render :func:`model_card_dict` as Markdown."""
    model, data, cert = card["model"], card["training_data"], card["certification"]
    gate = card.get("gate")
    lines = [
        "**Intended use.** " + card["intended_use"],
        "",
        f"**Model.** `{model['architecture']}`, input {model['input_size']} x {model['input_size']} pixels, "
        f"classes {', '.join(model['classes'])}; weights SHA-256 `{str(model['weights_sha256'])[:16]}...`.",
        "",
        f"**Training data.** {data['num_individuals']} individuals"
        + (f" ({', '.join(data['individuals'][:12])}{', ...' if data['num_individuals'] > 12 else ''})"
           if data["individuals"] else "")
        + f", {data['num_frames'] if data['num_frames'] is not None else 'unknown number of'} frames"
        + (" (SYNTHETIC demo data)" if data.get("synthetic") else "")
        + f"; loss {data['loss']}, training noise sigma {data['noise_sigma']}, {data['epochs']} epochs; "
        f"data hash `{str(data['data_hash'])[:16]}...`.",
        "",
        f"**Calibration.** Temperature {card['calibration']['temperature']}.",
        "",
        f"**Certification.** {cert.get('method')}"
        + (" (sequential, stops early)" if cert.get("sequential") else "")
        + f", sigma {cert.get('sigma')}, alpha {cert.get('alpha')}, n {cert.get('n')}.",
        "",
    ]
    if gate is None:
        lines.append("**Certification gate.** Not run.")
    else:
        verdict = "PASSED" if gate.get("passed") else "FAILED"
        lines.append(f"**Certification gate.** {verdict} on {gate.get('date', '?')}.")
        for check in gate.get("results", []) or []:
            if isinstance(check, Mapping):
                mark = "pass" if check.get("passed") else "FAIL"
                lines.append(f"- {check.get('name')}: {check.get('value')} "
                             f"(threshold {check.get('threshold')}) {mark}")
    lines += ["", "**Limits.**"] + [f"- {limit}" for limit in card["limits"]]
    return "\n".join(lines)
