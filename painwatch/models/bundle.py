"""Model bundles: a folder with ``weights.safetensors``, ``model.json`` and, for bundles that carry an
in-distribution check, ``in_distribution.safetensors``.

``model.json`` (typed in :mod:`painwatch.models.schema`) holds everything needed to rebuild and use the
model without the training code; its ``in_distribution`` entry describes the check
(:mod:`painwatch.models.in_distribution`) and holds the SHA-256 of its file.

Guarantees:
- Writes are atomic: a bundle is written into a temporary sibling folder and moved into place with
  ``os.replace``; ``model.json`` updates go through a temporary file and ``os.replace``. A reader
  never sees a half-written bundle.
- :func:`load_bundle` never unpickles anything (safetensors only), checks the weights against
  ``weights_sha256`` and the check's file against ``in_distribution.sha256``, and checks the schema;
  every error names the file and the offending key.
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

import numpy
import safetensors
import timm
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from painwatch import CLASS_NAMES
from painwatch import __version__ as painwatch_version
from painwatch.io import atomic_write_json, sha256_file
from painwatch.models.in_distribution import InDistributionError, InDistributionStatistic, check_layers
from painwatch.models.network import PainNet, create_model
from painwatch.models.schema import (
    FORMAT_VERSION,
    IN_DISTRIBUTION_FILE,
    BundleError,
    BundleMetadata,
    GateVerdict,
    InDistributionCheck,
    default_certification,
    default_certification_method,
)

WEIGHTS_FILE = "weights.safetensors"
METADATA_FILE = "model.json"
BUNDLE_FILES = (WEIGHTS_FILE, METADATA_FILE, IN_DISTRIBUTION_FILE)

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
    "in_distribution",
)


@dataclass(frozen=True)
class Bundle:
    """A loaded bundle: the model (eval mode), its checked ``model.json``, its folder, and its
    in-distribution check (None for a bundle without one; ``metadata.in_distribution_note`` says why)."""

    model: PainNet
    metadata: BundleMetadata
    path: Path
    in_distribution: InDistributionStatistic | None = None

    @property
    def temperature(self) -> float:
        """The calibration temperature of the logits [Guo17]."""
        return self.metadata.temperature

    @property
    def classes(self) -> list[str]:
        return list(self.metadata.classes)


def library_versions() -> dict[str, str]:
    """Versions of the libraries that define the model's numerics (recorded in every bundle)."""
    return {
        "painwatch": painwatch_version,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "safetensors": safetensors.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
    }


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
        certification = default_certification(noise_sigma, method=default_certification_method(model.arch))
    content: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        **derived,
        "classes": list(given.pop("classes")),
        "temperature": float(given.pop("temperature", 1.0)),
        "certification": certification,
        "training": training,
        "versions": {**library_versions(), **given.pop("versions", {})},
        "created": given.pop("created", datetime.now(UTC).isoformat(timespec="seconds")),
        "gates": given.pop("gates", {}),
    }
    if given.get("in_distribution") is not None:
        raise BundleError("metadata key 'in_distribution' describes a check file: pass the check itself "
                          "(save_bundle(..., in_distribution=CHECK))")
    for key in ("format_version", "weights_sha256", "gate", "in_distribution"):
        given.pop(key, None)
    content.update(given)
    return content


def _write_check(path: Path, check: InDistributionStatistic) -> dict[str, Any]:
    tensors, strings = check.to_tensors()
    save_file(tensors, str(path), metadata=strings)
    _fsync_file(path)
    return InDistributionCheck(
        file=path.name, sha256=sha256_file(path), score=check.spec.name, layers=check.spec.layers,
        threshold=check.threshold, level=check.spec.level, calibration_frames=check.calibration_frames,
        fit_frames=check.fit_frames, guarantee=check.guarantee,
    ).to_dict()


def save_bundle(
    directory: str | Path,
    model: PainNet,
    metadata: Mapping[str, Any] | None = None,
    *,
    in_distribution: InDistributionStatistic | None = None,
) -> Path:
    """Write ``model`` and its ``model.json`` into the bundle folder ``directory``, atomically, with
    the in-distribution check ``in_distribution`` in ``in_distribution.safetensors`` when given
    (``metadata["in_distribution_absent"]`` then says why there is none, when known).

    ``metadata`` supplies ``temperature`` (default 1.0), ``certification`` (default
    :func:`painwatch.models.schema.default_certification` at ``training.noise_sigma``), ``training``,
    ``classes`` (default ``painwatch.CLASS_NAMES`` for 2 classes), ``gates`` (default none) and any extra
    keys; the architecture, sizes, normalisation, versions and weights hash are taken from the model.
    An existing bundle at ``directory`` is replaced; a non-bundle folder is never overwritten.
    Returns the bundle path.
    """
    if not isinstance(model, PainNet):
        raise TypeError(f"save_bundle expects a PainNet (from create_model), got {type(model).__name__}")
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
        if in_distribution is not None:
            content["in_distribution"] = _write_check(staging / IN_DISTRIBUTION_FILE, in_distribution)
            content.pop("in_distribution_absent", None)
        checked = BundleMetadata.from_dict(content, source=str(target / METADATA_FILE))
        atomic_write_json(staging / METADATA_FILE, checked.to_dict())
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


def read_metadata(directory: str | Path) -> BundleMetadata:
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
    return BundleMetadata.from_dict(content, source=str(path))


def load_bundle(directory: str | Path, device: str | torch.device = "cpu") -> Bundle:
    """Load a bundle: schema-checked metadata, hash-checked weights, the model in eval mode on ``device``.

    Raises :class:`BundleError` naming the file and key on any problem (missing files, bad JSON,
    schema violations, weights whose SHA-256 differs from ``weights_sha256``, weights that do not fit
    the architecture). Never unpickles: weights are read with safetensors.
    """
    folder = Path(directory)
    metadata = read_metadata(folder)
    weights_path = folder / WEIGHTS_FILE
    if not weights_path.is_file():
        raise BundleError(f"{str(weights_path)!r} is missing from the bundle")
    digest = sha256_file(weights_path)
    if digest != metadata.weights_sha256:
        raise BundleError(
            f"{weights_path}: SHA-256 {digest[:16]}... does not match weights_sha256 "
            f"{metadata.weights_sha256[:16]}... in {folder / METADATA_FILE} (the weights were changed or "
            f"corrupted)"
        )
    try:
        state = load_file(str(weights_path), device="cpu")
    except (SafetensorError, OSError, ValueError) as error:
        raise BundleError(f"{weights_path}: not a readable safetensors file ({error})") from error
    try:
        model = create_model(
            metadata.architecture,
            num_classes=metadata.num_classes,
            input_size=metadata.input_size,
            mean=metadata.mean,
            std=metadata.std,
        )
    except ValueError as error:
        raise BundleError(f"{folder / METADATA_FILE}: cannot build the model: {error}") from error
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mis_shaped = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or mis_shaped:
        raise BundleError(
            f"{weights_path}: does not fit architecture {metadata.architecture!r} with "
            f"{metadata.num_classes} classes (missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"wrong shape {mis_shaped[:5]})"
        )
    model.load_state_dict(state, strict=True)
    for key in ("mean", "std"):
        # The buffers come from the hash-checked weights; model.json must describe the same normalisation.
        stored = getattr(model.normalize, key).flatten().tolist()
        pairs = zip(stored, getattr(metadata, key), strict=True)
        if not all(math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-7) for a, b in pairs):
            raise BundleError(
                f"{folder / METADATA_FILE}: key {key!r} = {list(getattr(metadata, key))} disagrees with the "
                f"normalisation stored in the weights ({[round(v, 6) for v in stored]})"
            )
    check = _load_check(folder, metadata, model)
    model.eval()
    model.to_device(device)
    return Bundle(model=model, metadata=metadata, path=folder, in_distribution=check)


def _load_check(folder: Path, metadata: BundleMetadata, model: PainNet) -> InDistributionStatistic | None:
    """The bundle's in-distribution check, hash-checked and consistent with ``model.json`` and the model."""
    described = metadata.in_distribution
    if described is None:
        return None
    path = folder / described.file
    if not path.is_file():
        raise BundleError(f"{str(path)!r} is missing from the bundle ({folder / METADATA_FILE} describes an "
                          f"in-distribution check in it)")
    digest = sha256_file(path)
    if digest != described.sha256:
        raise BundleError(
            f"{path}: SHA-256 {digest[:16]}... does not match in_distribution.sha256 "
            f"{described.sha256[:16]}... in {folder / METADATA_FILE} (the in-distribution check was changed "
            f"or corrupted)"
        )
    try:
        with safe_open(str(path), framework="pt") as handle:
            strings = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
        check = InDistributionStatistic.from_tensors(tensors, strings, source=str(path))
        check_layers(model, check.spec.descriptors)
    except (SafetensorError, OSError, InDistributionError) as error:
        raise BundleError(f"{path}: not a usable in-distribution check ({error})") from error
    stored = {"score": check.spec.name, "layers": check.spec.layers, "threshold": check.threshold,
              "level": check.spec.level, "calibration_frames": check.calibration_frames}
    for key, value in stored.items():
        if getattr(described, key) != value:
            raise BundleError(f"{folder / METADATA_FILE}: key 'in_distribution.{key}' = "
                              f"{getattr(described, key)!r} disagrees with {path.name} ({value!r})")
    return check


def _deep_merge(base: dict[str, Any], updates: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in updates.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _deep_merge(dict(merged[key]), value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _write_metadata(folder: Path, metadata: BundleMetadata) -> BundleMetadata:
    checked = BundleMetadata.from_dict(metadata.to_dict(), source=str(folder / METADATA_FILE))
    atomic_write_json(folder / METADATA_FILE, checked.to_dict())
    return checked


def update_bundle_metadata(directory: str | Path, updates: Mapping[str, Any]) -> BundleMetadata:
    """Merge ``updates`` into the bundle's ``model.json`` (nested objects merged key by key) atomically.

    Keys describing the weights (:data:`IDENTITY_KEYS`) may not change. The result is schema-checked
    before it replaces the file. Returns the new metadata.
    """
    if not isinstance(updates, Mapping):
        raise TypeError(f"updates must be a mapping, got {type(updates).__name__}")
    folder = Path(directory)
    current = read_metadata(folder).to_dict()
    for key in IDENTITY_KEYS:
        if key in updates and updates[key] != current.get(key):
            raise BundleError(
                f"{folder / METADATA_FILE}: key {key!r} describes the weights and cannot be updated"
            )
    merged = BundleMetadata.from_dict(_deep_merge(current, updates), source=str(folder / METADATA_FILE))
    return _write_metadata(folder, merged)


def record_gate_verdict(directory: str | Path, verdict: GateVerdict) -> BundleMetadata:
    """Store ``verdict`` in the bundle as the verdict of its gate file, atomically; the verdicts of
    other gate files are kept (a later run with another gate never replaces them)."""
    folder = Path(directory)
    return _write_metadata(folder, read_metadata(folder).with_gate(verdict))
