"""The typed content of a bundle's ``model.json``: :class:`BundleMetadata` and its parts.

``model.json`` holds everything needed to use a model without the training code (docs/design.md,
"The clinical pipeline"): architecture, classes, input size, normalisation, temperature, the
certification defaults and the bounds within which a user may override them, the training record,
library versions, the SHA-256 of the weights, and one certification-gate verdict per gate file.

:meth:`BundleMetadata.from_dict` is the one schema check: every error names the file and the offending
key. Format 2 keeps a verdict per gate file (``gates``); format-1 files (one ``gate`` entry) are read
and upgraded. Keys this version does not know are kept as they are (``extra``).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from painwatch.models.lipschitz_nets import is_lipschitz_architecture
from painwatch.robust.certificate import BASE_METHODS, SEQUENTIAL_BOUNDS
from painwatch.validation import is_integer, is_number

FORMAT_VERSION = 2
"""The format this version writes; it reads formats 1 and 2."""
READABLE_FORMATS = (1, 2)

DEFAULT_CERTIFICATION_SIGMA = 0.12
"""L2 noise level per pixel in [0, 1] pixel space used when the model was not trained with noise."""

DEFAULT_CERTIFICATION_BOUNDS: dict[str, tuple[float, float]] = {
    "sigma": (0.01, 1.0),
    "alpha": (1e-6, 0.05),
    "n0": (16, 10_000),
    "n": (100, 100_000),
    "score_temperature": (0.01, 1.0),
}
"""Ranges within which a user may override the bundle's certification settings."""

DEFAULT_SCORE_TEMPERATURE = 0.1
"""Soft smoothing certifies ``argmax E softmax(f(x + xi) / T)``; T = 0.1 sharpens the scores towards
votes. On frames the network is sure of, T = 1 scores sit below 1 and certify about half the radius
that votes or sharpened scores do from the same 1 000 draws (``scripts/bench_certify_clinical.py``).
Where the noisy logit margins are small, even T = 0.1 scores stay well below 1 and votes certify more."""

IN_DISTRIBUTION_FILE = "in_distribution.safetensors"
"""The file next to the weights that holds a bundle's in-distribution check (no pickle)."""
DEFAULT_METHOD = "randomized_smoothing"
"""The certificate of a new bundle: randomized smoothing [Cohen19] with the fixed-budget bound (see
:func:`default_certification`)."""

DEFAULT_GATE_FILE = "default.toml"
"""The name under which a format-1 verdict that does not say its gate file is kept."""


class BundleError(ValueError):
    """A bundle folder, its ``model.json`` or its weights are missing, malformed or inconsistent."""


def _fail(source: str, key: str, requirement: str, value: Any) -> BundleError:
    shown = repr(value)
    if len(shown) > 120:
        shown = shown[:117] + "..."
    return BundleError(f"{source}: key {key!r} {requirement}, got {shown}")


def _is_sha256(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


@dataclass(frozen=True, kw_only=True)
class CertificationDefaults:
    """How the bundle's answers are certified unless a user overrides it (within ``bounds``).

    ``method`` is a base method of :data:`painwatch.robust.BASE_METHODS`; ``sigma`` the L2 noise std per
    pixel in [0, 1] units; ``n0`` selection draws and ``n`` estimation draws (the budget of the
    sequential certificates); ``bound`` ``"fixed"`` or ``"anytime"``; ``score_temperature`` T of soft
    scores ``softmax(f / T)``; ``bounds`` maps a setting to its allowed ``(low, high)``.
    ``lipschitz_constant`` is the sound L2 bound of the logit map that training computed (Lipschitz
    networks; None otherwise), kept for the record: whoever certifies recomputes it from the weights.
    """

    method: str
    sigma: float
    alpha: float
    n0: int
    n: int
    batch_size: int
    bound: str = "anytime"
    score_temperature: float = 1.0
    bounds: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    lipschitz_constant: float | None = None

    @classmethod
    def from_dict(cls, value: Any, source: str) -> CertificationDefaults:
        """Check a ``certification`` object; absent ``bound`` / ``score_temperature`` (bundles written
        before they existed) read as ``"anytime"`` / 1."""
        if not isinstance(value, Mapping):
            raise _fail(source, "certification", "must be an object", value)
        method = value.get("method")
        if method not in BASE_METHODS:
            raise _fail(source, "certification.method", f"must be one of {list(BASE_METHODS)}", method)
        sigma = value.get("sigma")
        if not is_number(sigma) or sigma <= 0:
            raise _fail(source, "certification.sigma",
                        "must be a number > 0 (L2 noise per pixel in [0, 1] units)", sigma)
        alpha = value.get("alpha")
        if not is_number(alpha) or not 0 < alpha < 1:
            raise _fail(source, "certification.alpha", "must be a number in (0, 1)", alpha)
        counts = {}
        for name in ("n0", "n", "batch_size"):
            counts[name] = value.get(name)
            if not is_integer(counts[name]) or counts[name] < 1:
                raise _fail(source, f"certification.{name}", "must be an integer >= 1", counts[name])
        bound = value.get("bound", "anytime")
        if bound not in SEQUENTIAL_BOUNDS:
            raise _fail(source, "certification.bound", f"must be one of {list(SEQUENTIAL_BOUNDS)}", bound)
        temperature = value.get("score_temperature", 1.0)
        if not is_number(temperature) or temperature <= 0:
            raise _fail(source, "certification.score_temperature", "must be a number > 0", temperature)
        lipschitz_constant = value.get("lipschitz_constant")
        if lipschitz_constant is not None and (not is_number(lipschitz_constant) or lipschitz_constant <= 0):
            raise _fail(source, "certification.lipschitz_constant",
                        "must be a number > 0 (a sound L2 bound of the logit map) or null",
                        lipschitz_constant)
        bounds = value.get("bounds")
        if not isinstance(bounds, Mapping):
            raise _fail(source, "certification.bounds", "must be an object of [low, high] pairs", bounds)
        for name in ("sigma", "alpha", "n"):
            if name not in bounds:
                raise _fail(source, f"certification.bounds.{name}", "is required", None)
        checked_bounds: dict[str, tuple[float, float]] = {}
        for name, pair in bounds.items():
            if (not isinstance(pair, (list, tuple)) or len(pair) != 2 or not all(is_number(v) for v in pair)
                    or pair[0] > pair[1]):
                raise _fail(source, f"certification.bounds.{name}",
                            "must be a list [low, high] of numbers with low <= high", pair)
            setting = value.get(name)
            if is_number(setting) and not pair[0] <= setting <= pair[1]:
                raise _fail(source, f"certification.{name}", f"must lie within its bounds {list(pair)}",
                            setting)
            checked_bounds[name] = (pair[0], pair[1])
        return cls(method=method, sigma=float(sigma), alpha=float(alpha), bound=bound,
                   score_temperature=float(temperature), bounds=checked_bounds,
                   lipschitz_constant=None if lipschitz_constant is None else float(lipschitz_constant),
                   **counts)

    def to_dict(self) -> dict[str, Any]:
        record = dataclasses.asdict(self)
        record["bounds"] = {name: list(pair) for name, pair in self.bounds.items()}
        if record["lipschitz_constant"] is None:
            del record["lipschitz_constant"]  # bundles of other networks keep the form they always had
        return record


def default_certification_method(architecture: str) -> str:
    """The certificate a new bundle of ``architecture`` answers with: ``"lipschitz"`` for the Lipschitz
    networks (the bare network, deterministic, one forward pass [Tsuzuku18]), ``"randomized_smoothing"``
    for every other network (whose Lipschitz bound painwatch cannot compute)."""
    return "lipschitz" if is_lipschitz_architecture(architecture) else DEFAULT_METHOD


def default_certification(sigma: float | None = None, method: str = DEFAULT_METHOD) -> dict[str, Any]:
    """Certification defaults for a new bundle, as ``model.json`` stores them (``method``: see
    :func:`default_certification_method`; the noise settings are kept for a user who switches to a
    smoothing method).

    ``sigma`` is the training noise level when the model was trained with noise (certify at the
    noise it was made robust to), else :data:`DEFAULT_CERTIFICATION_SIGMA`; the sigma bound is
    widened to include it. ``n0 + n`` = 1 000 forward passes per frame at most.

    The default is randomized smoothing [Cohen19] with the ``"fixed"`` bound: Clopper-Pearson over the
    whole budget, sampling stopped early only to abstain. From 1 000 draws it certified the largest
    radii of every certificate painwatch has (``scripts/bench_certify_clinical.py``,
    ``results/README.md``): the anytime bound pays for stopping whenever it likes, and soft scores sit
    below 1 on frames the network is sure of. Soft scores, when chosen, are sharpened with
    :data:`DEFAULT_SCORE_TEMPERATURE`.
    """
    sigma = DEFAULT_CERTIFICATION_SIGMA if sigma is None or sigma <= 0 else float(sigma)
    bounds = {name: list(pair) for name, pair in DEFAULT_CERTIFICATION_BOUNDS.items()}
    bounds["sigma"] = [min(bounds["sigma"][0], sigma), max(bounds["sigma"][1], sigma)]
    return {
        "method": method,
        "sigma": sigma,
        "n0": 64,
        "n": 936,
        "alpha": 0.001,
        "score_temperature": DEFAULT_SCORE_TEMPERATURE,
        "bound": "fixed",
        "batch_size": 64,
        "bounds": bounds,
    }


@dataclass(frozen=True, kw_only=True)
class GateVerdict:
    """The verdict of one certification gate file on this bundle (written by ``painwatch certify``).

    ``gate_file`` names the gate (its file name, e.g. ``default.toml``); ``results`` holds one record
    per check (``name, value, threshold, passed, detail``); ``details`` everything else the certify run
    recorded (thresholds, report path, settings, data hash, frames, individuals, held_out).
    """

    gate_file: str
    passed: bool
    date: str | None = None
    results: tuple[Mapping[str, Any], ...] = ()
    details: Mapping[str, Any] = field(default_factory=dict)

    @property
    def held_out(self) -> bool:
        return bool(self.details.get("held_out", False))

    @classmethod
    def from_dict(cls, value: Any, source: str, key: str) -> GateVerdict:
        if not isinstance(value, Mapping):
            raise _fail(source, key, "must be an object {passed, thresholds, results, report, date}", value)
        if not isinstance(value.get("passed"), bool):
            raise _fail(source, f"{key}.passed", "must be true or false", value.get("passed"))
        results = value.get("results") or []
        if not isinstance(results, list) or not all(isinstance(r, Mapping) for r in results):
            raise _fail(source, f"{key}.results", "must be a list of check records", results)
        thresholds_file = str((value.get("thresholds") or {}).get("file") or "")
        gate_file = value.get("gate_file") or Path(thresholds_file).name
        details = {k: v for k, v in value.items() if k not in ("gate_file", "passed", "date", "results")}
        return cls(gate_file=gate_file or DEFAULT_GATE_FILE, passed=value["passed"], date=value.get("date"),
                   results=tuple(dict(r) for r in results), details=copy.deepcopy(details))

    def to_dict(self) -> dict[str, Any]:
        return {"gate_file": self.gate_file, "passed": self.passed, "date": self.date,
                "results": [dict(r) for r in self.results], **copy.deepcopy(dict(self.details))}


@dataclass(frozen=True, kw_only=True)
class InDistributionCheck:
    """``model.json``'s ``in_distribution``: the bundle's check of whether a frame looks like its
    training frames (docs/design.md, "The in-distribution check"); the statistics are in ``file``
    (safetensors, next to the weights, hash-checked against ``sha256``).

    ``score`` names the statistic (e.g. ``max-z pca_residual``) and ``layers`` the descriptors it reads;
    a frame whose score exceeds ``threshold`` is refused. ``threshold`` is the split-conformal quantile of
    ``calibration_frames`` inner-validation frames at ``level``; ``fit_frames`` fitted the statistics;
    ``guarantee`` says in words what that promises.
    """

    file: str
    sha256: str
    score: str
    layers: tuple[str, ...]
    threshold: float
    level: float
    calibration_frames: int
    fit_frames: int
    guarantee: str

    @classmethod
    def from_dict(cls, value: Any, source: str) -> InDistributionCheck:
        key = "in_distribution"
        if not isinstance(value, Mapping):
            raise _fail(source, key, "must be an object describing the check, or null", value)
        for name in ("file", "score", "guarantee"):
            if not isinstance(value.get(name), str) or not value.get(name):
                raise _fail(source, f"{key}.{name}", "must be a non-empty string", value.get(name))
        if Path(value["file"]).name != value["file"]:
            raise _fail(source, f"{key}.file", "must be a file name inside the bundle folder", value["file"])
        digest = value.get("sha256")
        if not _is_sha256(digest):
            raise _fail(source, f"{key}.sha256", "must be a 64-character lower-case hex SHA-256", digest)
        layers = value.get("layers")
        if not isinstance(layers, list) or not all(isinstance(v, str) and v for v in layers):
            raise _fail(source, f"{key}.layers", "must be a list of descriptor names", layers)
        threshold = value.get("threshold")
        if not is_number(threshold) or not math.isfinite(threshold):
            raise _fail(source, f"{key}.threshold", "must be a finite number", threshold)
        level = value.get("level")
        if not is_number(level) or not 0 < level < 1:
            raise _fail(source, f"{key}.level", "must be a number in (0, 1)", level)
        counts = {}
        for name, least in (("calibration_frames", 1), ("fit_frames", 0)):
            counts[name] = value.get(name)
            if not is_integer(counts[name]) or counts[name] < least:
                raise _fail(source, f"{key}.{name}", f"must be an integer >= {least}", counts[name])
        return cls(file=value["file"], sha256=digest, score=value["score"], layers=tuple(layers),
                   threshold=float(threshold), level=float(level), guarantee=value["guarantee"], **counts)

    def to_dict(self) -> dict[str, Any]:
        record = dataclasses.asdict(self)
        record["layers"] = list(self.layers)
        return record


def _check_training(source: str, training: Any) -> dict[str, Any]:
    if not isinstance(training, Mapping):
        raise _fail(source, "training", "must be an object", training)
    individuals = training.get("individuals")
    if individuals is not None and (
        not isinstance(individuals, list) or not all(isinstance(v, str) for v in individuals)
    ):
        raise _fail(source, "training.individuals", "must be a list of individual names (strings)",
                    individuals)
    data_hash = training.get("data_hash")
    if data_hash is not None and not isinstance(data_hash, str):
        raise _fail(source, "training.data_hash", "must be a string", data_hash)
    num_frames = training.get("num_frames")
    if num_frames is not None and (not is_integer(num_frames) or num_frames < 0):
        raise _fail(source, "training.num_frames", "must be an integer >= 0", num_frames)
    noise_sigma = training.get("noise_sigma")
    if noise_sigma is not None and (not is_number(noise_sigma) or noise_sigma < 0):
        raise _fail(source, "training.noise_sigma", "must be a number >= 0", noise_sigma)
    loss = training.get("loss")
    if loss is not None and not isinstance(loss, str):
        raise _fail(source, "training.loss", "must be a string", loss)
    return copy.deepcopy(dict(training))


_KNOWN_KEYS = frozenset({
    "format_version", "architecture", "num_classes", "classes", "input_size", "mean", "std", "temperature",
    "certification", "training", "versions", "weights_sha256", "created", "gate", "gates",
    "in_distribution", "in_distribution_absent",
})


@dataclass(frozen=True, kw_only=True)
class BundleMetadata:
    """The content of ``model.json``, checked. Units: ``input_size`` in pixels (square inputs);
    ``mean``/``std`` per channel of the normalisation inside the model (pixels in [0, 1])."""

    architecture: str
    num_classes: int
    classes: tuple[str, ...]
    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    temperature: float
    certification: CertificationDefaults
    training: Mapping[str, Any]
    versions: Mapping[str, str]
    weights_sha256: str
    created: str | None = None
    gates: Mapping[str, GateVerdict] = field(default_factory=dict)
    in_distribution: InDistributionCheck | None = None
    in_distribution_absent: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one model input."""
        return (len(self.mean), self.input_size, self.input_size)

    @property
    def synthetic(self) -> bool:
        """True when the model was trained on frames drawn by a program (the demo set)."""
        return bool(self.training.get("synthetic_data") or self.training.get("synthetic"))

    @property
    def in_distribution_note(self) -> str | None:
        """Why the bundle has no in-distribution check, in words (None when it has one)."""
        if self.in_distribution is not None:
            return None
        return self.in_distribution_absent or (
            "this bundle was made before painwatch fitted an in-distribution check"
        )

    @property
    def latest_gate(self) -> GateVerdict | None:
        """The most recent gate verdict (by date), or None when the bundle was never certified."""
        if not self.gates:
            return None
        return max(self.gates.values(), key=lambda verdict: verdict.date or "")

    @classmethod
    def from_dict(cls, content: Any, source: str = "model.json") -> BundleMetadata:
        """Check a ``model.json`` object; raises :class:`BundleError` naming ``source`` and the first
        offending key. Keys this version does not know are kept in ``extra``."""
        if not isinstance(content, Mapping):
            raise BundleError(f"{source}: must hold a JSON object, got {type(content).__name__}")
        version = content.get("format_version")
        if version not in READABLE_FORMATS:
            raise _fail(source, "format_version",
                        f"must be one of {list(READABLE_FORMATS)} (this painwatch reads only those)", version)
        architecture = content.get("architecture")
        if not isinstance(architecture, str) or not architecture:
            raise _fail(source, "architecture", "must be a timm model name", architecture)
        num_classes = content.get("num_classes")
        if not is_integer(num_classes) or num_classes < 2:
            raise _fail(source, "num_classes", "must be an integer >= 2", num_classes)
        classes = content.get("classes")
        if (not isinstance(classes, list) or len(classes) != num_classes
                or not all(isinstance(c, str) and c for c in classes) or len(set(classes)) != len(classes)):
            raise _fail(source, "classes", f"must be a list of {num_classes} distinct class names", classes)
        input_size = content.get("input_size")
        if not is_integer(input_size) or not 16 <= input_size <= 4096:
            raise _fail(source, "input_size", "must be an integer number of pixels in [16, 4096]", input_size)
        for key in ("mean", "std"):
            value = content.get(key)
            if not isinstance(value, list) or not value or not all(is_number(v) for v in value):
                raise _fail(source, key, "must be a non-empty list of numbers (one per channel)", value)
        if len(content["mean"]) != len(content["std"]):
            raise _fail(source, "std", f"must have as many entries as mean ({len(content['mean'])})",
                        content["std"])
        if any(v <= 0 for v in content["std"]):
            raise _fail(source, "std", "must hold numbers > 0", content["std"])
        temperature = content.get("temperature")
        if not is_number(temperature) or temperature <= 0:
            raise _fail(source, "temperature", "must be a number > 0", temperature)
        certification = CertificationDefaults.from_dict(content.get("certification"), source)
        training = _check_training(source, content.get("training"))
        versions = content.get("versions")
        if not isinstance(versions, Mapping):
            raise _fail(source, "versions", "must be an object", versions)
        digest = content.get("weights_sha256")
        if not _is_sha256(digest):
            raise _fail(source, "weights_sha256", "must be a 64-character lower-case hex SHA-256",
                        digest)
        gates = _read_gates(content, source, version)
        check = content.get("in_distribution")
        in_distribution = None if check is None else InDistributionCheck.from_dict(check, source)
        absent = content.get("in_distribution_absent")
        if absent is not None and not isinstance(absent, str):
            raise _fail(source, "in_distribution_absent", "must be a string (why there is no check)", absent)
        return cls(
            architecture=architecture, num_classes=int(num_classes), classes=tuple(classes),
            input_size=int(input_size), mean=tuple(float(v) for v in content["mean"]),
            std=tuple(float(v) for v in content["std"]), temperature=float(temperature),
            certification=certification, training=training, versions=dict(versions), weights_sha256=digest,
            created=content.get("created"), gates=gates, in_distribution=in_distribution,
            in_distribution_absent=absent if in_distribution is None else None,
            extra={k: copy.deepcopy(v) for k, v in content.items() if k not in _KNOWN_KEYS},
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON object ``model.json`` holds (always written in :data:`FORMAT_VERSION`)."""
        return {
            "format_version": FORMAT_VERSION,
            "architecture": self.architecture,
            "num_classes": self.num_classes,
            "classes": list(self.classes),
            "input_size": self.input_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "temperature": self.temperature,
            "certification": self.certification.to_dict(),
            "training": copy.deepcopy(dict(self.training)),
            "versions": dict(self.versions),
            "weights_sha256": self.weights_sha256,
            "created": self.created,
            "gates": {name: verdict.to_dict() for name, verdict in self.gates.items()},
            **({"in_distribution": self.in_distribution.to_dict()} if self.in_distribution else {}),
            **({"in_distribution_absent": self.in_distribution_absent}
               if self.in_distribution_absent else {}),
            **copy.deepcopy(dict(self.extra)),
        }

    def with_gate(self, verdict: GateVerdict) -> BundleMetadata:
        """A copy holding ``verdict`` as the verdict of its gate file (other gates' verdicts are kept)."""
        return dataclasses.replace(self, gates={**self.gates, verdict.gate_file: verdict})


def _read_gates(content: Mapping[str, Any], source: str, version: int) -> dict[str, GateVerdict]:
    if version == 1:
        if "gate" not in content:
            raise _fail(source, "gate", "is required (null until the model is certified)", None)
        old = content["gate"]
        if old is None:
            return {}
        verdict = GateVerdict.from_dict(old, source, "gate")
        return {verdict.gate_file: verdict}
    if "gate" in content:
        raise _fail(source, "gate", f"is the single verdict of format 1; format {version} keeps one verdict "
                    "per gate file under 'gates'", content["gate"])
    gates = content.get("gates", {})
    if not isinstance(gates, Mapping):
        raise _fail(source, "gates", "must be an object mapping gate files to verdicts", gates)
    return {name: dataclasses.replace(GateVerdict.from_dict(value, source, f"gates.{name}"), gate_file=name)
            for name, value in gates.items()}
