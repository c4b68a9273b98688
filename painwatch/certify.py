"""``painwatch certify BUNDLE DATA --out REPORT [--gate gate.toml]``: the pre-deployment gate.

It measures a model bundle on individuals it was not trained on, writes a report (HTML, Markdown,
JSON and PNG plots) and exits

- 0 when every threshold of the gate file holds,
- 1 when at least one fails (the report and the message name each failing check),
- 2 for a usage error (missing or malformed bundle, data, gate file or setting; the message names it).

What is measured (units: radii and sigma are L2 norms in [0, 1] pixel space at the model's input size):

- the *network* (clean frames, temperature-calibrated): accuracy, pain precision / recall, ROC AUC, ECE
  and the reliability diagram, with 95% cluster-bootstrap intervals that resample individuals;
- the *deployed answers* (what the app shows: the classifier the certificate is about, abstentions
  counted as errors, and as misses for pain recall): accuracy, pain precision / recall, abstention rate,
  also with individual-level bootstrap intervals;
- certified accuracy against radius (correct and certified at least that radius) for each
  certification method that applies to the network;
- accuracy of the network under Gaussian noise at several sigma (``--noise-draws`` draws per frame)
  and under common corruptions (Gaussian blur, motion blur, JPEG, brightness, contrast; albumentations,
  applied to the uint8 face crop);
- the smoothed-robustness surface over (eps, sigma): the mean over frames of a lower confidence bound
  on ``P_xi[f(x + delta + xi) = y]`` for every ``||delta|| <= eps``, from the randomized-smoothing
  special case of the thesis's framework, ``Phi(PhiInv(p_low) - eps / sigma)`` (Cohen et al. 2019),
  with ``p_low`` the Clopper-Pearson bound of the correct-class frequency under noise sigma;
- a per-individual table and the model card.

Overlap between DATA's individuals and the bundle's training individuals is an error unless
``--allow-overlap`` (the report is then marked as not a held-out evaluation).
The verdict, thresholds, results and settings are written into the bundle's ``model.json``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

EXIT_PASSED = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

DEFAULT_GATE = Path(__file__).resolve().parent / "gates" / "default.toml"
"""The gate used when ``--gate`` is not given (shipped with the package)."""

DEFAULT_NOISE_SIGMAS: tuple[float, ...] = (0.05, 0.1, 0.25, 0.5)
CORRUPTIONS: tuple[str, ...] = ("gaussian_blur", "motion_blur", "jpeg", "brightness", "contrast")

_SCALAR_THRESHOLDS: dict[str, tuple[str, str]] = {
    # gate key: (measured quantity, direction)
    "min_accuracy": ("accuracy", "min"),
    "min_pain_recall": ("pain_recall", "min"),
    "min_pain_precision": ("pain_precision", "min"),
    "min_balanced_accuracy": ("balanced_accuracy", "min"),
    "max_ece": ("ece", "max"),
    "max_abstention": ("abstention_rate", "max"),
}
_LIST_THRESHOLDS = ("min_certified_accuracy",)
_GATE_OPTIONS = ("use_lower_confidence_bound",)


class UsageError(ValueError):
    """A problem with what the user gave (paths, gate file, settings): exit code 2."""


# ------------------------------------------------------------------------------------------- gate


@dataclass(frozen=True)
class Gate:
    """Thresholds of a gate file.

    ``scalars`` maps gate keys (``min_accuracy``, ``min_pain_recall``, ``min_pain_precision``,
    ``min_balanced_accuracy``, ``max_ece``, ``max_abstention``) to fractions in [0, 1];
    ``certified`` lists ``(radius_l2 or None, grey_levels or None, value)`` requirements of certified
    accuracy; with ``use_lower_confidence_bound`` the accuracy-type checks compare the lower end of the
    95% bootstrap interval (upper end for ``max_*``) instead of the point estimate.
    """

    path: Path
    scalars: dict[str, float]
    certified: list[dict[str, float]] = field(default_factory=list)
    use_lower_confidence_bound: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": str(self.path),
            **self.scalars,
            "min_certified_accuracy": list(self.certified),
            "use_lower_confidence_bound": self.use_lower_confidence_bound,
        }


def _fraction(path: Path, key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise UsageError(f"gate file {path}: {key} must be a number in [0, 1], got {value!r}")
    return float(value)


def load_gate(path: str | Path) -> Gate:
    """Read and check a gate TOML file. Raises :class:`UsageError` naming the file, key and value.

    Format (every key optional, at least one threshold)::

        min_accuracy = 0.6
        min_pain_recall = 0.6
        max_ece = 0.15
        max_abstention = 0.3
        use_lower_confidence_bound = false
        [[min_certified_accuracy]]
        grey_levels = 0.5      # or: radius = 0.25  (L2 in [0, 1] pixels at the model's input size)
        value = 0.5
    """
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"gate file {path} does not exist")
    try:
        content = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise UsageError(f"gate file {path} is not valid TOML: {error}") from error
    content = content.get("gate", content) if isinstance(content.get("gate"), Mapping) else content
    known = set(_SCALAR_THRESHOLDS) | set(_LIST_THRESHOLDS) | set(_GATE_OPTIONS)
    unknown = sorted(set(content) - known)
    if unknown:
        raise UsageError(
            f"gate file {path}: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(sorted(known))}"
        )
    scalars = {key: _fraction(path, key, content[key]) for key in _SCALAR_THRESHOLDS if key in content}
    certified = []
    entries = content.get("min_certified_accuracy", [])
    if isinstance(entries, Mapping):
        entries = [entries]
    if not isinstance(entries, list):
        raise UsageError(
            f"gate file {path}: min_certified_accuracy must be a table or an array of tables "
            f"with radius (or grey_levels) and value, got {entries!r}"
        )
    for index, entry in enumerate(entries):
        where = f"min_certified_accuracy[{index}]"
        one_size = isinstance(entry, Mapping) and (("radius" in entry) != ("grey_levels" in entry))
        if not one_size or "value" not in entry:
            raise UsageError(
                f"gate file {path}: {where} needs value and exactly one of radius (L2) or "
                f"grey_levels, got {entry!r}"
            )
        extra = sorted(set(entry) - {"radius", "grey_levels", "value"})
        if extra:
            raise UsageError(f"gate file {path}: {where} has unknown key(s) {', '.join(extra)}")
        size_key = "radius" if "radius" in entry else "grey_levels"
        size = entry[size_key]
        if (
            isinstance(size, bool)
            or not isinstance(size, (int, float))
            or not (math.isfinite(size) and size >= 0)
        ):
            raise UsageError(f"gate file {path}: {where}.{size_key} must be a number >= 0, got {size!r}")
        certified.append({size_key: float(size), "value": _fraction(path, f"{where}.value", entry["value"])})
    option = content.get("use_lower_confidence_bound", False)
    if not isinstance(option, bool):
        raise UsageError(
            f"gate file {path}: use_lower_confidence_bound must be true or false, got {option!r}"
        )
    if not scalars and not certified:
        raise UsageError(f"gate file {path} sets no threshold; known keys: {', '.join(sorted(known))}")
    return Gate(path=path, scalars=scalars, certified=certified, use_lower_confidence_bound=option)


def evaluate_gate(gate: Gate, measured: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Check every threshold against ``measured`` (see :func:`run_certification`'s ``gate_inputs``).

    Returns one record per check: ``{name, value, threshold, passed, detail}``. A quantity that could
    not be measured (e.g. pain precision with no frame predicted pain) fails its check.
    """
    from painwatch.robust import certified_accuracy_at

    results = []
    for key, threshold in gate.scalars.items():
        quantity, direction = _SCALAR_THRESHOLDS[key]
        entry = measured[quantity]
        value = entry["estimate"]
        compared, basis = value, "point estimate"
        if gate.use_lower_confidence_bound and entry.get("low") is not None:
            compared = entry["low"] if direction == "min" else entry["high"]
            basis = "95% bootstrap " + ("lower" if direction == "min" else "upper") + " bound"
        ok = compared is not None and (compared >= threshold if direction == "min" else compared <= threshold)
        results.append(
            {
                "name": key,
                "value": compared,
                "threshold": threshold,
                "passed": bool(ok),
                "detail": f"{quantity} ({basis}) {'>=' if direction == 'min' else '<='} {threshold:g}",
            }
        )
    input_numel = measured["input_numel"]
    for entry in gate.certified:
        radius = entry.get("radius")
        if radius is None:
            radius = entry["grey_levels"] / 255.0 * math.sqrt(input_numel)
        correct, radii = _correct_and_radii(measured["main_certified"])
        value = certified_accuracy_at(correct, radii, radius)
        size = (
            f"radius {radius:.4g} L2"
            if "radius" in entry
            else f"{entry['grey_levels']:g} grey levels (L2 {radius:.4g})"
        )
        results.append(
            {
                "name": "min_certified_accuracy",
                "value": value,
                "threshold": entry["value"],
                "passed": bool(value >= entry["value"]),
                "detail": f"certified accuracy of {measured['main_method']} at {size} >= {entry['value']:g}",
            }
        )
    return results


def _correct_and_radii(records: Sequence[tuple[bool, float]]) -> tuple[list[bool], list[float]]:
    """Split ``(correct, radius)`` records (correct is False for abstentions) into two lists."""
    return [bool(correct) for correct, _ in records], [float(radius) for _, radius in records]


# --------------------------------------------------------------------------------------- measuring


def _corruption_transforms(seed: int) -> dict[str, Any]:
    """Fixed-strength corruptions of a uint8 RGB face crop (albumentations, seeded)."""
    import albumentations as A

    transforms = {
        "gaussian_blur": A.GaussianBlur(blur_limit=(5, 5), sigma_limit=(1.5, 1.5), p=1.0),
        "motion_blur": A.MotionBlur(blur_limit=(7, 7), p=1.0),
        "jpeg": A.ImageCompression(quality_range=(20, 20), p=1.0),
        "brightness": A.RandomBrightnessContrast(
            brightness_limit=(-0.3, -0.3), contrast_limit=(0.0, 0.0), p=1.0
        ),
        "contrast": A.RandomBrightnessContrast(
            brightness_limit=(0.0, 0.0), contrast_limit=(-0.5, -0.5), p=1.0
        ),
    }
    composed = {}
    for name, transform in transforms.items():
        compose = A.Compose([transform])
        compose.set_random_seed(seed)
        composed[name] = compose
    return composed


def select_frames(records: Sequence[Any], max_frames: int | None, seed: int) -> list[Any]:
    """All records, or ``max_frames`` of them spread evenly over (individual, class) groups.

    Deterministic for a seed; the order of the result follows the input order.
    """
    import numpy as np

    if max_frames is None or max_frames >= len(records):
        return list(records)
    rng = np.random.default_rng(seed)
    groups: dict[tuple[str, int], list[int]] = {}
    for index, record in enumerate(records):
        groups.setdefault((record.individual, record.label), []).append(index)
    queues = [list(rng.permutation(indices)) for _, indices in sorted(groups.items())]
    chosen: list[int] = []
    while len(chosen) < max_frames:
        for queue in queues:
            if queue and len(chosen) < max_frames:
                chosen.append(int(queue.pop()))
    return [records[i] for i in sorted(chosen)]


def _bootstrap_deployed(labels: Any, predictions: Any, groups: Any, reps: int, seed: int) -> dict[str, Any]:
    """Point estimates and 95% cluster-bootstrap intervals (individuals resampled) of the deployed answers.

    Abstentions (prediction -1) count as errors for accuracy and as misses for pain recall.
    """
    import numpy as np

    from painwatch.metrics import cluster_bootstrap_counts

    y, pred = np.asarray(labels), np.asarray(predictions)
    names, inverse = np.unique(np.asarray(groups), return_inverse=True)
    # Per individual sufficient statistics: frames, correct, pain frames, pain hits, predicted pain,
    # abstentions, and per-class correct counts (for balanced accuracy).
    stats = np.zeros((len(names), 8))
    np.add.at(stats[:, 0], inverse, 1)
    np.add.at(stats[:, 1], inverse, pred == y)
    np.add.at(stats[:, 2], inverse, y == 1)
    np.add.at(stats[:, 3], inverse, (pred == 1) & (y == 1))
    np.add.at(stats[:, 4], inverse, pred == 1)
    np.add.at(stats[:, 5], inverse, pred < 0)
    np.add.at(stats[:, 6], inverse, (pred == 0) & (y == 0))
    np.add.at(stats[:, 7], inverse, y == 0)

    def summarise(totals: np.ndarray) -> dict[str, float]:
        with np.errstate(invalid="ignore", divide="ignore"):
            recall_pain = totals[..., 3] / totals[..., 2]
            recall_no_pain = totals[..., 6] / totals[..., 7]
            return {
                "accuracy": totals[..., 1] / totals[..., 0],
                "pain_recall": recall_pain,
                "pain_precision": totals[..., 3] / totals[..., 4],
                "abstention_rate": totals[..., 5] / totals[..., 0],
                "balanced_accuracy": (recall_pain + recall_no_pain) / 2,
            }

    point = summarise(stats.sum(axis=0))
    result: dict[str, Any] = {}
    if len(names) >= 2:
        weights = cluster_bootstrap_counts(len(names), reps, np.random.default_rng(seed))
        replicates = summarise(weights @ stats)
    for key, estimate in point.items():
        entry = {
            "estimate": None if not np.isfinite(estimate) else float(estimate),
            "low": None,
            "high": None,
        }
        if len(names) >= 2:
            values = replicates[key][np.isfinite(replicates[key])]
            if values.size:
                entry["low"], entry["high"] = (float(v) for v in np.quantile(values, [0.025, 0.975]))
        result[key] = entry
    return result


@dataclass
class CertificationRun:
    """Everything measured by :func:`run_certification` (``report`` is the JSON written to disk)."""

    report: dict[str, Any]
    gate_results: list[dict[str, Any]]
    passed: bool
    files: dict[str, Path]


def _methods_for(model: Any, metadata: Mapping[str, Any], main_method: str) -> list[str]:
    """The certification methods that apply to this network: every base method whose needs can be met
    (a method that needs a Lipschitz constant only when a sound bound can be computed)."""
    from painwatch.predict import SettingsError, _sound_lipschitz_constant
    from painwatch.robust import BASE_METHODS, method_spec

    methods = [main_method]
    for method in BASE_METHODS:
        if method in methods:
            continue
        if method_spec(method).needs_lipschitz_constant:
            try:
                _sound_lipschitz_constant(model, metadata, method)
            except SettingsError:
                continue
        methods.append(method)
    return methods


def run_certification(
    bundle_dir: str | Path,
    data: str | Path,
    out_dir: str | Path,
    *,
    gate_path: str | Path | None = None,
    allow_overlap: bool = False,
    max_frames: int | None = None,
    individuals: Sequence[str] | None = None,
    method: str | None = None,
    sigma: float | None = None,
    alpha: float | None = None,
    n: int | None = None,
    noise_sigmas: Sequence[float] = DEFAULT_NOISE_SIGMAS,
    noise_draws: int = 32,
    bootstrap_reps: int = 1000,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
    write_bundle: bool = True,
    main_method_only: bool = False,
) -> CertificationRun:
    """Measure a bundle on held-out data, write the report into ``out_dir`` and the verdict into the bundle.

    Raises :class:`UsageError` (or ``BundleError`` / ``DataValidationError`` / ``SettingsError``, all
    ``ValueError``) for bad inputs, before any long computation starts.
    """
    import numpy as np
    import torch
    from scipy.stats import norm
    from tqdm.auto import tqdm

    from painwatch.calibration import calibrated_probabilities
    from painwatch.data import dataset_hash, is_synthetic, load_frame, load_records
    from painwatch.metrics import evaluate
    from painwatch.models import load_bundle, update_bundle_metadata
    from painwatch.predict import Predictor, model_card_dict, resolve_settings
    from painwatch.robust import certified_accuracy_curve, clopper_pearson_lower, noisy_logits

    started = time.monotonic()
    bundle_dir, data, out_dir = Path(bundle_dir), Path(data), Path(out_dir)
    if not bundle_dir.exists():
        raise UsageError(f"bundle folder {bundle_dir} does not exist")
    if not data.exists():
        raise UsageError(
            f"data {data} does not exist (a folder DATA/<individual>/<label>/ or a manifest CSV)"
        )
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--out {out_dir} exists and is not a folder")
    if noise_draws < 2:
        raise UsageError(f"--noise-draws must be >= 2, got {noise_draws}")
    if max_frames is not None and max_frames < 1:
        raise UsageError(f"--max-frames must be >= 1, got {max_frames}")
    for value in noise_sigmas:
        if not (math.isfinite(value) and value > 0):
            raise UsageError(f"--noise-sigmas must be numbers > 0, got {value!r}")
    gate = load_gate(gate_path if gate_path is not None else DEFAULT_GATE)

    bundle = load_bundle(bundle_dir, device=device)
    metadata = bundle.metadata
    main = resolve_settings(
        metadata["certification"],
        method=method,
        sigma=sigma,
        alpha=alpha,
        n=n,
        source=str(bundle_dir / "model.json"),
    )
    records = load_records(data)
    if individuals is not None:
        wanted = {str(name) for name in individuals}
        unknown = sorted(wanted - {r.individual for r in records})
        if unknown:
            raise UsageError(f"individual(s) {', '.join(unknown)} are not in {data}")
        records = [r for r in records if r.individual in wanted]
    training_individuals = set((metadata.get("training") or {}).get("individuals") or [])
    data_individuals = sorted({r.individual for r in records})
    overlap = sorted(training_individuals.intersection(data_individuals))
    if overlap and not allow_overlap:
        raise UsageError(
            f"{len(overlap)} individual(s) of {data} were used to train the bundle: "
            f"{', '.join(overlap[:10])}{', ...' if len(overlap) > 10 else ''}. "
            f"Certify on held-out individuals, or pass --allow-overlap "
            f"(the report is then marked as not a held-out evaluation)"
        )
    if not training_individuals:
        print(
            f"warning: {bundle_dir} does not record its training individuals; overlap cannot be checked",
            file=sys.stderr,
        )

    chosen = select_frames(records, max_frames, seed)
    model = bundle.model
    methods = [main.method] if main_method_only else _methods_for(model, metadata, main.method)
    predictors = {}
    for name in methods:
        settings = resolve_settings(
            metadata["certification"],
            method=name,
            sigma=main.sigma,
            alpha=main.alpha,
            n=main.n,
            source=str(bundle_dir / "model.json"),
        )
        predictors[name] = Predictor(
            model,
            metadata,
            bundle.path,
            settings,
            seed=seed,
            lipschitz_constant=_lipschitz_or_none(model, metadata, name),
        )
    main_predictor = predictors[main.method]
    input_shape = main_predictor.input_shape
    input_numel = math.prod(input_shape)
    corruptions = _corruption_transforms(seed)
    sigmas = sorted({float(s) for s in noise_sigmas} | {float(main.sigma)})
    noise_generator = torch.Generator().manual_seed(seed)
    temperature = float(metadata.get("temperature", 1.0))
    classes = list(metadata["classes"])

    labels, groups, clean_probs = [], [], []
    per_method: dict[str, list[dict[str, Any]]] = {name: [] for name in methods}
    noise_correct = np.zeros((len(chosen), len(sigmas)), dtype=np.int64)
    corruption_correct = np.zeros((len(chosen), len(CORRUPTIONS)), dtype=bool)
    frames = []
    passes = 0
    iterator = tqdm(chosen, desc="certifying", unit="frame", disable=not progress, file=sys.stderr)
    for index, record in enumerate(iterator):
        image = load_frame(record)
        x = main_predictor.preprocess(image, str(record.path))
        labels.append(record.label)
        groups.append(record.individual)
        with torch.no_grad():
            logits = model(x.unsqueeze(0).to(main_predictor.device)).detach().cpu().double().numpy()
        clean_probs.append(calibrated_probabilities(logits, temperature)[0])
        passes += 1
        frame_entry: dict[str, Any] = {
            "file": str(record.path),
            "individual": record.individual,
            "label": classes[record.label],
        }
        for name, predictor in predictors.items():
            certificate, _, spent, stop = predictor.certify_tensor(x)
            passes += spent
            entry = {
                "prediction": int(certificate.prediction),
                "radius": float(certificate.radius),
                "correct": int(certificate.prediction) == record.label,
                "forward_passes": int(spent),
                "stop_reason": stop,
                "bound": float(certificate.bound),
            }
            per_method[name].append(entry)
            frame_entry[name] = entry
        for column, noise_sigma in enumerate(sigmas):
            noisy = noisy_logits(
                model,
                x.to(main_predictor.device),
                sigma=noise_sigma,
                num=noise_draws,
                batch_size=main.batch_size,
                generator=noise_generator,
            )
            noise_correct[index, column] = int((noisy.argmax(dim=1) == record.label).sum())
            passes += noise_draws
        for column, corruption in enumerate(CORRUPTIONS):
            corrupted = corruptions[corruption](image=image)["image"]
            xc = main_predictor.preprocess(corrupted, f"{record.path} ({corruption})").unsqueeze(0)
            with torch.no_grad():
                corruption_correct[index, column] = (
                    int(model(xc.to(main_predictor.device)).argmax()) == record.label
                )
            passes += 1
        frames.append(frame_entry)

    y = np.asarray(labels)
    probs = np.asarray(clean_probs)
    network = evaluate(y, probs, groups, class_names=classes, bootstrap_reps=bootstrap_reps, seed=seed)
    deployed_predictions = np.array([e["prediction"] for e in per_method[main.method]])
    deployed = _bootstrap_deployed(y, deployed_predictions, groups, bootstrap_reps, seed)
    ci = network["confidence_intervals"]["metrics"]
    ece_entry = {"estimate": network["pooled"]["ece"], "low": ci["ece"]["low"], "high": ci["ece"]["high"]}

    # Certified accuracy against radius, per method.
    max_radius = max([e["radius"] for entries in per_method.values() for e in entries] + [main.sigma])
    radius_grid = np.linspace(0.0, max_radius * 1.05, 60)
    certified_curves = {}
    for name, entries in per_method.items():
        pairs = [(e["correct"], e["radius"]) for e in entries]
        curve = certified_accuracy_curve(*_correct_and_radii(pairs), radius_grid).tolist()
        passes_used = [e["forward_passes"] for e in entries]
        certified_curves[name] = {
            "radius": radius_grid.tolist(),
            "grey_levels": (255.0 * radius_grid / math.sqrt(input_numel)).tolist(),
            "certified_accuracy": curve,
            "abstention_rate": float(np.mean([e["prediction"] < 0 for e in entries])),
            "accuracy": float(np.mean([e["correct"] for e in entries])),
            "median_radius": float(np.median([e["radius"] for e in entries])),
            "median_forward_passes": float(np.median(passes_used)),
            "settings": predictors[name].settings.to_dict(),
        }

    # Noise, corruptions and the (eps, sigma) surface.
    noise_accuracy = (noise_correct / noise_draws).mean(axis=0)
    eps_grid = np.linspace(0.0, 2.0 * max(sigmas), 25)
    surface = np.zeros((len(sigmas), len(eps_grid)))
    for row, noise_sigma in enumerate(sigmas):
        lows = np.array(
            [clopper_pearson_lower(int(k), noise_draws, main.alpha) for k in noise_correct[:, row]]
        )
        with np.errstate(divide="ignore"):
            z = norm.ppf(np.clip(lows, 0.0, 1.0))
        surface[row] = norm.cdf(z[:, None] - eps_grid[None, :] / noise_sigma).mean(axis=0)
    corruption_accuracy = corruption_correct.mean(axis=0)

    # Per individual: the network's table plus the deployed answers.
    per_individual = network["per_individual"]
    for row in per_individual:
        mask = np.asarray(groups) == row["individual"]
        row["deployed_accuracy"] = float(np.mean(deployed_predictions[mask] == y[mask]))
        row["abstention_rate"] = float(np.mean(deployed_predictions[mask] < 0))
        row["median_radius"] = float(
            np.median(np.array([e["radius"] for e in per_method[main.method]])[mask])
        )

    measured = {
        "accuracy": deployed["accuracy"],
        "pain_recall": deployed["pain_recall"],
        "pain_precision": deployed["pain_precision"],
        "balanced_accuracy": deployed["balanced_accuracy"],
        "abstention_rate": deployed["abstention_rate"],
        "ece": ece_entry,
        "main_certified": [(e["correct"], e["radius"]) for e in per_method[main.method]],
        "main_method": main.method_name,
        "input_numel": input_numel,
    }
    gate_results = evaluate_gate(gate, measured)
    passed = all(r["passed"] for r in gate_results)
    date = datetime.now(UTC).isoformat(timespec="seconds")

    report = {
        "title": "painwatch certification report",
        "date": date,
        "passed": passed,
        "held_out": not overlap,
        "overlap_individuals": overlap,
        "bundle": {
            "path": str(bundle.path),
            "architecture": metadata["architecture"],
            "weights_sha256": metadata["weights_sha256"],
            "input_shape": list(input_shape),
        },
        "data": {
            "source": str(data),
            "frames_available": len(records),
            "frames_used": len(chosen),
            "individuals": sorted(set(groups)),
            "data_hash": dataset_hash(chosen),
            "synthetic": is_synthetic(data),
        },
        "settings": {
            "main": main.to_dict(),
            "methods": methods,
            "noise_sigmas": sigmas,
            "noise_draws": noise_draws,
            "bootstrap_reps": bootstrap_reps,
            "seed": seed,
            "corruptions": list(CORRUPTIONS),
        },
        "network": {
            "pooled": network["pooled"],
            "confidence_intervals": network["confidence_intervals"],
            "reliability": network["reliability"],
            "roc": network["roc"],
        },
        "deployed": deployed,
        "certified_accuracy": certified_curves,
        "noise": {"sigma": sigmas, "accuracy": noise_accuracy.tolist(), "draws_per_frame": noise_draws},
        "corruptions": {name: float(v) for name, v in zip(CORRUPTIONS, corruption_accuracy, strict=True)},
        "surface": {
            "eps": eps_grid.tolist(),
            "sigma": sigmas,
            "probability_lower_bound": surface.tolist(),
            "alpha": main.alpha,
            "method": "randomized-smoothing special case, Clopper-Pearson p_low",
        },
        "per_individual": per_individual,
        "model_card": model_card_dict(metadata, main),
        "gate": {
            "file": str(gate.path),
            "thresholds": gate.to_dict(),
            "results": gate_results,
            "passed": passed,
        },
        "forward_passes": passes,
        "elapsed_s": time.monotonic() - started,
        "frames": frames,
    }
    files = write_report(report, out_dir)
    if write_bundle:
        update_bundle_metadata(
            bundle_dir,
            {
                "gate": {
                    "passed": passed,
                    "thresholds": gate.to_dict(),
                    "results": gate_results,
                    "report": str(files["html"].resolve()),
                    "date": date,
                    "settings": main.to_dict(),
                    "data_hash": report["data"]["data_hash"],
                    "num_frames": len(chosen),
                    "individuals": report["data"]["individuals"],
                    "held_out": not overlap,
                }
            },
        )
    return CertificationRun(report=report, gate_results=gate_results, passed=passed, files=files)


def _lipschitz_or_none(model: Any, metadata: Mapping[str, Any], method: str) -> float | None:
    from painwatch.predict import _sound_lipschitz_constant
    from painwatch.robust import method_spec

    if method_spec(method).needs_lipschitz_constant:
        return _sound_lipschitz_constant(model, metadata, method)
    return None


# ---------------------------------------------------------------------------------------- writing


def _plots(report: Mapping[str, Any], out_dir: Path) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from painwatch.report import plot_per_individual, plot_reliability, save_figure

    files = {}
    figure, axis = plt.subplots(figsize=(5.6, 3.8))
    for name, curve in report["certified_accuracy"].items():
        axis.plot(curve["radius"], curve["certified_accuracy"], label=name)
    axis.set_xlabel("L2 radius (pixels in [0, 1])")
    axis.set_ylabel("certified accuracy")
    axis.set_ylim(0, 1.02)
    numel = math.prod(report["bundle"]["input_shape"])
    top = axis.secondary_xaxis(
        "top", functions=(lambda r: 255 * r / math.sqrt(numel), lambda g: g * math.sqrt(numel) / 255)
    )
    top.set_xlabel("RMS change in 8-bit grey levels")
    axis.legend(fontsize=8)
    files["certified"] = save_figure(figure, out_dir / "certified_accuracy.png")

    figure, (left, right) = plt.subplots(1, 2, figsize=(8.4, 3.4))
    left.plot(report["noise"]["sigma"], report["noise"]["accuracy"], marker="o")
    left.set_xlabel("Gaussian noise sigma (L2 per image, pixels in [0, 1])")
    left.set_ylabel("accuracy of the network")
    left.set_ylim(0, 1.02)
    left.set_title("Under Gaussian noise")
    names = list(report["corruptions"])
    right.bar(names, [report["corruptions"][k] for k in names], color="tab:orange")
    right.axhline(report["network"]["pooled"]["accuracy"], color="black", ls="--", lw=1, label="clean")
    right.set_ylim(0, 1.02)
    right.set_title("Under corruptions")
    right.tick_params(axis="x", rotation=30)
    right.legend(fontsize=8)
    files["noise"] = save_figure(figure, out_dir / "noise_and_corruptions.png")

    surface = report["surface"]
    figure, axis = plt.subplots(figsize=(5.6, 3.6))
    image = axis.imshow(
        np.asarray(surface["probability_lower_bound"], dtype=float),
        aspect="auto",
        origin="lower",
        vmin=0,
        vmax=1,
        cmap="viridis",
        extent=(surface["eps"][0], surface["eps"][-1], -0.5, len(surface["sigma"]) - 0.5),
    )
    axis.set_yticks(range(len(surface["sigma"])), [f"{s:g}" for s in surface["sigma"]])
    axis.set_xlabel("adversary budget eps (L2)")
    axis.set_ylabel("noise sigma")
    axis.set_title("Guaranteed P(correct under noise), mean over frames")
    figure.colorbar(image, ax=axis)
    files["surface"] = save_figure(figure, out_dir / "robustness_surface.png")

    files["reliability"] = plot_reliability(report["network"]["reliability"], out_dir / "reliability.png")
    files["per_individual"] = plot_per_individual(
        report["per_individual"],
        out_dir / "per_individual.png",
        metrics=("accuracy", "deployed_accuracy", "recall_pain"),
    )
    return files


def _percent(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}%"


def _interval(entry: Mapping[str, Any]) -> str:
    if entry.get("low") is None:
        return "—"
    return f"{_percent(entry['low'])} – {_percent(entry['high'])}"


def write_report(report: Mapping[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write report.json, report.html, report.md and the PNG plots into ``out_dir``, atomically."""
    from painwatch.io import atomic_write_json
    from painwatch.predict import model_card_markdown
    from painwatch.report import SYNTHETIC_NOTE, Report

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = _plots(report, out_dir)
    doc = Report(title="painwatch certification report")
    verdict = "PASSED" if report["passed"] else "FAILED"
    doc.paragraph(f"Gate verdict: {verdict} ({report['gate']['file']}), {report['date']}.")
    if not report["held_out"]:
        doc.paragraph(
            f"NOT A HELD-OUT EVALUATION: {len(report['overlap_individuals'])} individual(s) were also "
            f"used for training ({', '.join(report['overlap_individuals'])}); --allow-overlap was "
            f"given. These numbers overstate how the model does on new animals.",
            note=True,
        )
    data = report["data"]
    if data.get("synthetic"):
        doc.paragraph(SYNTHETIC_NOTE, note=True)
    doc.paragraph(
        f"Bundle {report['bundle']['path']} ({report['bundle']['architecture']}, input "
        f"{'x'.join(map(str, report['bundle']['input_shape']))}); data {data['source']}: "
        f"{data['frames_used']} of {data['frames_available']} frames used, "
        f"{len(data['individuals'])} individuals; {report['forward_passes']} forward passes in "
        f"{report['elapsed_s']:.0f} s."
    )
    doc.heading("Gate")
    doc.table(
        [
            {
                "check": r["name"],
                "rule": r["detail"],
                "measured": r["value"],
                "passed": "yes" if r["passed"] else "NO",
            }
            for r in report["gate"]["results"]
        ],
        columns=["check", "rule", "measured", "passed"],
    )
    doc.heading("Answers as deployed")
    main = report["settings"]["main"]
    doc.paragraph(
        f"The app answers with the classifier the certificate is about ({main['method']}, "
        f"sigma {main['sigma']:g}, alpha {main['alpha']:g}, budget n {main['n']}). Abstentions count as "
        f"errors, and as misses for pain recall."
    )
    deployed = report["deployed"]
    doc.table(
        [
            {
                "metric": key.replace("_", " "),
                "estimate": _percent(entry["estimate"]),
                "95% CI (by individual)": _interval(entry),
            }
            for key, entry in deployed.items()
        ]
    )
    doc.heading("Network on clean frames (calibrated)")
    ci = report["network"]["confidence_intervals"]["metrics"]
    rows = []
    for key in ("accuracy", "balanced_accuracy", "precision_pain", "recall_pain", "roc_auc", "ece"):
        entry = ci.get(key)
        if entry is not None:
            rows.append(
                {
                    "metric": key.replace("_", " "),
                    "estimate": _percent(entry["estimate"]),
                    "95% CI (by individual)": _interval(entry),
                }
            )
    doc.table(rows)
    doc.image(plots["reliability"].name, "Reliability of the calibrated network")
    doc.heading("Certified accuracy against radius")
    doc.table(
        [
            {
                "method": name,
                "accuracy": _percent(c["accuracy"]),
                "abstention": _percent(c["abstention_rate"]),
                "median radius (L2)": c["median_radius"],
                "median forward passes": c["median_forward_passes"],
            }
            for name, c in report["certified_accuracy"].items()
        ]
    )
    doc.image(
        plots["certified"].name, "Fraction of frames that are correct and certified at least that radius"
    )
    doc.heading("Noise and corruptions")
    doc.table(
        [
            {"sigma": s, "accuracy": _percent(a)}
            for s, a in zip(report["noise"]["sigma"], report["noise"]["accuracy"], strict=True)
        ],
        caption=f"Accuracy of the network under Gaussian noise ({report['noise']['draws_per_frame']} draws "
        f"per frame)",
    )
    doc.table([{"corruption": k, "accuracy": _percent(v)} for k, v in report["corruptions"].items()])
    doc.image(plots["noise"].name, "Accuracy under Gaussian noise and common corruptions")
    doc.heading("Smoothed robustness over (eps, sigma)")
    doc.paragraph(
        "For each frame and noise level sigma, with probability at least 1 - alpha, every perturbation "
        "of L2 size at most eps leaves the network correct on at least the shown fraction of noisy "
        "copies: Phi(PhiInv(p_low) - eps / sigma), p_low the Clopper-Pearson bound of the correct-class "
        "frequency under noise (the randomized-smoothing case of the smoothed-robustness framework)."
    )
    doc.image(plots["surface"].name, "Mean guaranteed probability of a correct answer under noise and attack")
    doc.heading("Per individual")
    doc.table(
        report["per_individual"],
        columns=[
            "individual",
            "frames",
            "accuracy",
            "deployed_accuracy",
            "recall_pain",
            "recall_no_pain",
            "abstention_rate",
            "median_radius",
        ],
    )
    doc.image(plots["per_individual"].name, "Per individual")
    doc.heading("Model card")
    for paragraph in model_card_markdown(report["model_card"]).split("\n\n"):
        lines = paragraph.splitlines()
        if lines and all(line.startswith("- ") for line in lines[1:]) and len(lines) > 1:
            doc.paragraph(lines[0].replace("**", ""))
            doc.bullets([line[2:] for line in lines[1:]])
        else:
            doc.paragraph(paragraph.replace("**", "").replace("`", ""))
    files = doc.write(out_dir, stem="report")
    files["json"] = atomic_write_json(out_dir / "report.json", report)
    files.update(plots)
    return files


# -------------------------------------------------------------------------------------------- CLI


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``painwatch certify``."""
    parser = subparsers.add_parser(
        "certify",
        help="measure a model bundle on held-out individuals, write a report, pass/fail a gate",
        description=__doc__.split("\n\n")[0] + " Exit codes: 0 passed, 1 a threshold failed, 2 usage error.",
    )
    parser.add_argument("bundle", type=Path, help="model bundle folder (model.json + weights.safetensors)")
    parser.add_argument(
        "data", type=Path, help="held-out frames: DATA/<individual>/<label>/* or a manifest CSV"
    )
    parser.add_argument("--out", type=Path, required=True, help="report folder (HTML, Markdown, JSON, PNG)")
    parser.add_argument(
        "--gate", type=Path, default=None, help=f"gate TOML file (default: {DEFAULT_GATE.name})"
    )
    parser.add_argument(
        "--allow-overlap",
        action="store_true",
        help="allow individuals the bundle was trained on (the report is marked)",
    )
    parser.add_argument(
        "--max-frames",
        type=int,
        default=None,
        help="certify at most this many frames, spread over individuals and classes",
    )
    parser.add_argument(
        "--individuals", default=None, help="comma-separated individuals of DATA to certify on (default: all)"
    )
    parser.add_argument("--method", default=None, help="certification method (default: the bundle's)")
    parser.add_argument("--sigma", type=float, default=None, help="noise sigma (within the bundle's bounds)")
    parser.add_argument("--alpha", type=float, default=None, help="error probability (within bounds)")
    parser.add_argument(
        "--n", type=int, default=None, help="noise draws per frame (the budget for sequential)"
    )
    parser.add_argument(
        "--noise-sigmas",
        type=float,
        nargs="+",
        default=list(DEFAULT_NOISE_SIGMAS),
        help="sigmas for accuracy under noise and the robustness surface",
    )
    parser.add_argument("--noise-draws", type=int, default=32, help="noisy copies per frame per sigma")
    parser.add_argument("--bootstrap-reps", type=int, default=1000, help="bootstrap replicates for the CIs")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random draw")
    parser.add_argument("--device", default="auto", help="cpu, cuda, or auto (cuda when available)")
    parser.add_argument(
        "--main-method-only", action="store_true", help="certify with the bundle's method only (faster)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=_command)


def _split_names(text: str | None) -> list[str] | None:
    if not text:
        return None
    return [name.strip() for name in text.split(",") if name.strip()]


def _command(args: argparse.Namespace) -> int:
    from painwatch.runtime import resolve_device

    try:
        run = run_certification(
            args.bundle,
            args.data,
            args.out,
            gate_path=args.gate,
            allow_overlap=args.allow_overlap,
            max_frames=args.max_frames,
            individuals=_split_names(args.individuals),
            method=args.method,
            sigma=args.sigma,
            alpha=args.alpha,
            n=args.n,
            noise_sigmas=args.noise_sigmas,
            noise_draws=args.noise_draws,
            bootstrap_reps=args.bootstrap_reps,
            seed=args.seed,
            device=str(resolve_device(args.device)),
            progress=not args.quiet,
            main_method_only=args.main_method_only,
        )
    except (ValueError, FileNotFoundError) as error:  # UsageError, BundleError, DataValidationError, ...
        print(f"painwatch certify: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    for result in run.gate_results:
        value = "not measurable" if result["value"] is None else f"{result['value']:.4g}"
        print(f"{'PASS' if result['passed'] else 'FAIL'}  {result['detail']}: {value}")
    print(f"report: {run.files['html']}")
    print(f"gate {'PASSED' if run.passed else 'FAILED'}; verdict written into {args.bundle / 'model.json'}")
    return EXIT_PASSED if run.passed else EXIT_FAILED
