"""Model bundles: a folder with ``weights.safetensors`` and ``model.json``.

``model.json`` (format_version 1) holds everything needed to rebuild and use the model without the
training code: architecture, classes, input size, normalisation, temperature, certification settings
and the bounds within which a user may override them, what it was trained on, library versions, the
SHA-256 of the weights file, and the certification gate's verdict (``null`` until certified).

Guarantees:
- Writes are atomic: a bundle is written into a temporary sibling folder and moved into place with
  ``os.replace``; ``model.json`` updates go through a temporary file and ``os.replace``. A reader
  never sees a half-written bundle.
- :func:`load_bundle` never unpickles anything (safetensors only), checks the weights against
  ``weights_sha256`` and checks the schema; every error names the file and the offending key.
"""

from __future__ import annotations

import copy
import json
import math
import os
import platform
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from painwatch import CLASS_NAMES
from painwatch import __version__ as painwatch_version
from painwatch.io import atomic_write_json, sha256_file
from painwatch.models.network import PainNet, create_model
from painwatch.robust.certificate import BASE_METHODS
from painwatch.robust.sequential import SEQUENTIAL_BOUNDS

FORMAT_VERSION = 1
WEIGHTS_FILE = "weights.safetensors"
METADATA_FILE = "model.json"
BUNDLE_FILES = (WEIGHTS_FILE, METADATA_FILE)

CERTIFICATION_METHODS = BASE_METHODS
"""The methods a bundle may configure (an alias of :data:`painwatch.robust.BASE_METHODS`)."""
DEFAULT_CERTIFICATION_SIGMA = 0.12
"""L2 noise level per pixel in [0, 1] pixel space used when the model was not trained with noise."""

DEFAULT_CERTIFICATION_BOUNDS: dict[str, list[float]] = {
    "sigma": [0.01, 1.0],
    "alpha": [1e-6, 0.05],
    "n0": [16, 10_000],
    "n": [100, 100_000],
    "score_temperature": [0.01, 1.0],
}
"""Ranges within which a user may override the bundle's certification settings."""

DEFAULT_SCORE_TEMPERATURE = 0.1
"""Soft smoothing certifies ``argmax E softmax(f(x + xi) / T)``; T = 0.1 sharpens the scores towards
votes. On frames the network is sure of, T = 1 scores sit below 1 and certify about half the radius
that votes or sharpened scores do from the same 1 000 draws (``scripts/bench_certify_clinical.py``).
Where the noisy logit margins are small, even T = 0.1 scores stay well below 1 and votes certify more."""

# Keys that describe the weights themselves: update_bundle_metadata may not change them.
IDENTITY_KEYS = (
    "format_version",
    "architecture",
    "num_classes",
    "classes",
    "input_size",
    "mean",
    "std",
    "weights_sha256",
)


class BundleError(ValueError):
    """A bundle folder, its ``model.json`` or its weights are missing, malformed or inconsistent."""


@dataclass(frozen=True)
class Bundle:
    """A loaded bundle: the model (eval mode), its ``model.json`` content, and its folder."""

    model: PainNet
    metadata: dict[str, Any]
    path: Path

    @property
    def temperature(self) -> float:
        return float(self.metadata["temperature"])

    @property
    def classes(self) -> list[str]:
        return list(self.metadata["classes"])

    @property
    def certification(self) -> dict[str, Any]:
        return copy.deepcopy(self.metadata["certification"])


def default_certification(sigma: float | None = None, method: str = "randomized_smoothing") -> dict[str, Any]:
    """Certification settings for a new bundle (DESIGN.md item 4, randomized smoothing, by default).

    ``sigma`` is the training noise level when the model was trained with noise (certify at the
    noise it was made robust to), else :data:`DEFAULT_CERTIFICATION_SIGMA`. The sigma bound is
    widened to include ``sigma`` when needed. ``n0 + n`` = 1 000 forward passes per frame at most.

    The default is Cohen's randomized smoothing with the ``"fixed"`` bound: Clopper-Pearson over the whole
    budget, sampling stopped early only to abstain. From 1 000 draws it certified the largest radii of
    every certificate painwatch has (``scripts/bench_certify_clinical.py``, ``results/README.md``): the
    anytime bound pays for stopping whenever it likes, and soft scores sit below 1 on frames the network
    is sure of. Soft scores, when chosen, are sharpened with :data:`DEFAULT_SCORE_TEMPERATURE`.
    """
    sigma = DEFAULT_CERTIFICATION_SIGMA if sigma is None or sigma <= 0 else float(sigma)
    bounds = copy.deepcopy(DEFAULT_CERTIFICATION_BOUNDS)
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


def library_versions() -> dict[str, str]:
    """Versions of the libraries that define the model's numerics (recorded in every bundle)."""
    import numpy
    import safetensors
    import timm

    return {
        "painwatch": painwatch_version,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "safetensors": safetensors.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
    }


# --------------------------------------------------------------------------------------------- schema


def _fail(source: str, key: str, requirement: str, value: Any) -> BundleError:
    shown = repr(value)
    if len(shown) > 120:
        shown = shown[:117] + "..."
    return BundleError(f"{source}: key {key!r} {requirement}, got {shown}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(value)


def _check_bounds(source: str, certification: Mapping[str, Any]) -> None:
    bounds = certification.get("bounds")
    if not isinstance(bounds, Mapping):
        raise _fail(source, "certification.bounds", "must be an object of [low, high] pairs", bounds)
    for name in ("sigma", "alpha", "n"):
        if name not in bounds:
            raise _fail(source, f"certification.bounds.{name}", "is required", None)
    for name, pair in bounds.items():
        key = f"certification.bounds.{name}"
        if (
            not isinstance(pair, list)
            or len(pair) != 2
            or not all(_is_number(v) for v in pair)
            or pair[0] > pair[1]
        ):
            raise _fail(source, key, "must be a list [low, high] of numbers with low <= high", pair)
        if name in certification and _is_number(certification[name]):
            value = certification[name]
            if not pair[0] <= value <= pair[1]:
                raise _fail(source, f"certification.{name}", f"must lie within its bounds {pair}", value)


def _check_certification(source: str, certification: Any) -> None:
    if not isinstance(certification, Mapping):
        raise _fail(source, "certification", "must be an object", certification)
    method = certification.get("method")
    if method not in CERTIFICATION_METHODS:
        raise _fail(source, "certification.method", f"must be one of {list(CERTIFICATION_METHODS)}", method)
    sigma = certification.get("sigma")
    if not _is_number(sigma) or sigma <= 0:
        raise _fail(
            source, "certification.sigma", "must be a number > 0 (L2 noise per pixel in [0, 1] units)", sigma
        )
    alpha = certification.get("alpha")
    if not _is_number(alpha) or not 0 < alpha < 1:
        raise _fail(source, "certification.alpha", "must be a number in (0, 1)", alpha)
    for name in ("n0", "n", "batch_size"):
        value = certification.get(name)
        if not _is_int(value) or value < 1:
            raise _fail(source, f"certification.{name}", "must be an integer >= 1", value)
    bound = certification.get("bound", "anytime")
    if bound not in SEQUENTIAL_BOUNDS:
        raise _fail(source, "certification.bound", f"must be one of {list(SEQUENTIAL_BOUNDS)}", bound)
    # Optional: bundles written before it existed certify plain soft scores (T = 1).
    temperature = certification.get("score_temperature", 1.0)
    if not _is_number(temperature) or temperature <= 0:
        raise _fail(source, "certification.score_temperature", "must be a number > 0", temperature)
    _check_bounds(source, certification)


def _check_training(source: str, training: Any) -> None:
    if not isinstance(training, Mapping):
        raise _fail(source, "training", "must be an object", training)
    individuals = training.get("individuals")
    if individuals is not None and (
        not isinstance(individuals, list) or not all(isinstance(v, str) for v in individuals)
    ):
        raise _fail(
            source, "training.individuals", "must be a list of individual names (strings)", individuals
        )
    data_hash = training.get("data_hash")
    if data_hash is not None and not isinstance(data_hash, str):
        raise _fail(source, "training.data_hash", "must be a string", data_hash)
    num_frames = training.get("num_frames")
    if num_frames is not None and (not _is_int(num_frames) or num_frames < 0):
        raise _fail(source, "training.num_frames", "must be an integer >= 0", num_frames)
    noise_sigma = training.get("noise_sigma")
    if noise_sigma is not None and (not _is_number(noise_sigma) or noise_sigma < 0):
        raise _fail(source, "training.noise_sigma", "must be a number >= 0", noise_sigma)
    loss = training.get("loss")
    if loss is not None and not isinstance(loss, str):
        raise _fail(source, "training.loss", "must be a string", loss)


def _check_gate(source: str, gate: Any) -> None:
    if gate is None:
        return
    if not isinstance(gate, Mapping):
        raise _fail(
            source, "gate", "must be null or an object {passed, thresholds, results, report, date}", gate
        )
    if not isinstance(gate.get("passed"), bool):
        raise _fail(source, "gate.passed", "must be true or false", gate.get("passed"))


def validate_metadata(metadata: Any, source: str = METADATA_FILE) -> dict[str, Any]:
    """Check a ``model.json`` object against the schema; returns it unchanged.

    Raises :class:`BundleError` whose message names ``source`` and the first offending key.
    Extra keys are allowed (kept as they are).
    """
    if not isinstance(metadata, Mapping):
        raise BundleError(f"{source}: must hold a JSON object, got {type(metadata).__name__}")
    version = metadata.get("format_version")
    if version != FORMAT_VERSION:
        raise _fail(
            source, "format_version", f"must be {FORMAT_VERSION} (this painwatch reads only that)", version
        )
    architecture = metadata.get("architecture")
    if not isinstance(architecture, str) or not architecture:
        raise _fail(source, "architecture", "must be a timm model name", architecture)
    num_classes = metadata.get("num_classes")
    if not _is_int(num_classes) or num_classes < 2:
        raise _fail(source, "num_classes", "must be an integer >= 2", num_classes)
    classes = metadata.get("classes")
    if (
        not isinstance(classes, list)
        or len(classes) != num_classes
        or not all(isinstance(c, str) and c for c in classes)
        or len(set(classes)) != len(classes)
    ):
        raise _fail(source, "classes", f"must be a list of {num_classes} distinct class names", classes)
    input_size = metadata.get("input_size")
    if not _is_int(input_size) or not 16 <= input_size <= 4096:
        raise _fail(source, "input_size", "must be an integer number of pixels in [16, 4096]", input_size)
    for key in ("mean", "std"):
        value = metadata.get(key)
        if not isinstance(value, list) or not value or not all(_is_number(v) for v in value):
            raise _fail(source, key, "must be a non-empty list of numbers (one per channel)", value)
    if len(metadata["mean"]) != len(metadata["std"]):
        raise _fail(
            source, "std", f"must have as many entries as mean ({len(metadata['mean'])})", metadata["std"]
        )
    if any(v <= 0 for v in metadata["std"]):
        raise _fail(source, "std", "must hold numbers > 0", metadata["std"])
    temperature = metadata.get("temperature")
    if not _is_number(temperature) or temperature <= 0:
        raise _fail(source, "temperature", "must be a number > 0", temperature)
    _check_certification(source, metadata.get("certification"))
    _check_training(source, metadata.get("training"))
    versions = metadata.get("versions")
    if not isinstance(versions, Mapping):
        raise _fail(source, "versions", "must be an object", versions)
    digest = metadata.get("weights_sha256")
    if not isinstance(digest, str) or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise _fail(source, "weights_sha256", "must be a 64-character lower-case hex SHA-256", digest)
    if "gate" not in metadata:
        raise _fail(source, "gate", "is required (null until the model is certified)", None)
    _check_gate(source, metadata.get("gate"))
    return dict(metadata)


# ------------------------------------------------------------------------------------------- writing


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _state_dict_for_file(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # safetensors needs contiguous, non-shared CPU tensors; channels_last weights are made contiguous.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}


def _build_metadata(model: PainNet, metadata: Mapping[str, Any] | None) -> dict[str, Any]:
    given = copy.deepcopy(dict(metadata or {}))
    derived = {
        "architecture": model.arch,
        "num_classes": model.num_classes,
        "input_size": model.input_size,
        "mean": list(model.mean),
        "std": list(model.std),
    }
    for key, value in derived.items():
        if key in given and given[key] != value:
            raise BundleError(f"metadata key {key!r} = {given[key]!r} contradicts the model ({value!r})")
    if "classes" not in given:
        if model.num_classes != len(CLASS_NAMES):
            raise BundleError(f"metadata key 'classes' is required for a {model.num_classes}-class model")
        given["classes"] = list(CLASS_NAMES)
    training = given.pop("training", {}) or {}
    certification = given.pop("certification", None)
    if certification is None:
        noise_sigma = training.get("noise_sigma") if isinstance(training, Mapping) else None
        certification = default_certification(noise_sigma)
    content: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        **derived,
        "classes": list(given.pop("classes")),
        "temperature": float(given.pop("temperature", 1.0)),
        "certification": certification,
        "training": training,
        "versions": {**library_versions(), **given.pop("versions", {})},
        "created": given.pop("created", datetime.now(UTC).isoformat(timespec="seconds")),
        "gate": given.pop("gate", None),
    }
    given.pop("format_version", None)
    given.pop("weights_sha256", None)
    content.update(given)
    return content


def save_bundle(directory: str | Path, model: PainNet, metadata: Mapping[str, Any] | None = None) -> Path:
    """Write ``model`` and its ``model.json`` into the bundle folder ``directory``, atomically.

    ``metadata`` supplies ``temperature`` (default 1.0), ``certification`` (default
    :func:`default_certification` at ``training.noise_sigma``), ``training``, ``classes`` (default
    ``painwatch.CLASS_NAMES`` for 2 classes), ``gate`` (default null) and any extra keys; the
    architecture, sizes, normalisation, versions and weights hash are taken from the model.
    An existing bundle at ``directory`` is replaced; a non-bundle folder is never overwritten.
    Returns the bundle path.
    """
    if not isinstance(model, PainNet):
        raise TypeError(f"save_bundle expects a PainNet (from create_model), got {type(model).__name__}")
    from safetensors.torch import save_file

    target = Path(directory)
    if target.exists():
        if not target.is_dir():
            raise BundleError(f"bundle path {str(target)!r} exists and is not a folder")
        foreign = sorted(p.name for p in target.iterdir() if p.name not in BUNDLE_FILES)
        if foreign:
            raise BundleError(
                f"refusing to overwrite {str(target)!r}: it holds files that are not part of a bundle "
                f"({', '.join(foreign[:5])})"
            )
    content = _build_metadata(model, metadata)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        weights_path = staging / WEIGHTS_FILE
        save_file(_state_dict_for_file(model), str(weights_path), metadata={"format": "pt"})
        _fsync_file(weights_path)
        content["weights_sha256"] = sha256_file(weights_path)
        validate_metadata(content, source=str(target / METADATA_FILE))
        atomic_write_json(staging / METADATA_FILE, content)
        if target.exists():
            retired = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
            os.replace(target, retired / "bundle")
            os.replace(staging, target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


# ------------------------------------------------------------------------------------------- reading


def read_metadata(directory: str | Path) -> dict[str, Any]:
    """Read and schema-check ``model.json`` of the bundle at ``directory`` (weights not loaded)."""
    folder = Path(directory)
    if not folder.is_dir():
        raise BundleError(f"bundle folder {str(folder)!r} does not exist or is not a folder")
    path = folder / METADATA_FILE
    if not path.is_file():
        raise BundleError(f"{str(path)!r} is missing: {str(folder)!r} is not a painwatch model bundle")
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise BundleError(f"{path}: is not UTF-8 text ({error})") from error
    except json.JSONDecodeError as error:
        raise BundleError(
            f"{path}: is not valid JSON (line {error.lineno}, column {error.colno}: {error.msg})"
        ) from error
    return validate_metadata(content, source=str(path))


def load_bundle(directory: str | Path, device: str | torch.device = "cpu") -> Bundle:
    """Load a bundle: schema-checked metadata, hash-checked weights, the model in eval mode on ``device``.

    Raises :class:`BundleError` naming the file and key on any problem (missing files, bad JSON,
    schema violations, weights whose SHA-256 differs from ``weights_sha256``, weights that do not fit
    the architecture). Never unpickles: weights are read with safetensors.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(directory)
    metadata = read_metadata(folder)
    weights_path = folder / WEIGHTS_FILE
    if not weights_path.is_file():
        raise BundleError(f"{str(weights_path)!r} is missing from the bundle")
    digest = sha256_file(weights_path)
    if digest != metadata["weights_sha256"]:
        raise BundleError(
            f"{weights_path}: SHA-256 {digest[:16]}... does not match weights_sha256 "
            f"{metadata['weights_sha256'][:16]}... in {folder / METADATA_FILE} (the weights were changed or "
            f"corrupted)"
        )
    try:
        state = load_file(str(weights_path), device="cpu")
    except (SafetensorError, OSError, ValueError) as error:
        raise BundleError(f"{weights_path}: not a readable safetensors file ({error})") from error
    try:
        model = create_model(
            metadata["architecture"],
            num_classes=metadata["num_classes"],
            input_size=metadata["input_size"],
            mean=metadata["mean"],
            std=metadata["std"],
        )
    except ValueError as error:
        raise BundleError(f"{folder / METADATA_FILE}: cannot build the model: {error}") from error
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mis_shaped = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or mis_shaped:
        raise BundleError(
            f"{weights_path}: does not fit architecture {metadata['architecture']!r} with "
            f"{metadata['num_classes']} classes (missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"wrong shape {mis_shaped[:5]})"
        )
    model.load_state_dict(state, strict=True)
    for key in ("mean", "std"):
        # The buffers come from the hash-checked weights; model.json must describe the same normalisation.
        stored = getattr(model.normalize, key).flatten().tolist()
        pairs = zip(stored, metadata[key], strict=True)
        if not all(math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-7) for a, b in pairs):
            raise BundleError(
                f"{folder / METADATA_FILE}: key {key!r} = {metadata[key]} disagrees with the normalisation "
                f"stored in the weights ({[round(v, 6) for v in stored]})"
            )
    model.eval()
    model.to_device(device)
    return Bundle(model=model, metadata=metadata, path=folder)


def _deep_merge(base: dict[str, Any], updates: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in updates.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _deep_merge(dict(merged[key]), value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def update_bundle_metadata(directory: str | Path, updates: Mapping[str, Any]) -> dict[str, Any]:
    """Merge ``updates`` into the bundle's ``model.json`` (nested objects merged key by key) atomically.

    Keys describing the weights (:data:`IDENTITY_KEYS`) may not change. The result is schema-checked
    before it replaces the file. Returns the new metadata.
    """
    if not isinstance(updates, Mapping):
        raise TypeError(f"updates must be a mapping, got {type(updates).__name__}")
    folder = Path(directory)
    current = read_metadata(folder)
    for key in IDENTITY_KEYS:
        if key in updates and updates[key] != current.get(key):
            raise BundleError(
                f"{folder / METADATA_FILE}: key {key!r} describes the weights and cannot be updated"
            )
    merged = _deep_merge(current, updates)
    validate_metadata(merged, source=str(folder / METADATA_FILE))
    atomic_write_json(folder / METADATA_FILE, merged)
    return merged
