"""The pre-deployment gate: measure a bundle on held-out individuals, summarise, judge.

:func:`run_certification` runs three steps. :func:`measure` certifies every chosen frame with every
method that applies and measures the network under noise and corruptions; :func:`summarise` turns the
measurements into the report's figures; the gate (:mod:`painwatch.evaluation.gate`) judges them, and
the verdict is written into the bundle, one verdict per gate file. Units: radii and sigma are L2
norms in [0, 1] pixel space at the model's input size (docs/design.md, "Units and conventions").

What is measured:

- the *network* (clean frames, temperature-calibrated): accuracy, pain precision / recall, ROC AUC, ECE
  and the reliability diagram, with 95% cluster-bootstrap intervals that resample individuals;
- the *deployed answers* (what the page shows: the classifier the certificate is about, abstentions
  counted as errors, and as misses for pain recall): accuracy, pain precision / recall, abstention rate,
  also with individual-level bootstrap intervals;
- certified accuracy against radius (correct and certified at least that radius) for each
  certification method that applies to the network;
- accuracy of the network under Gaussian noise at several sigma and under common corruptions
  (Gaussian blur, motion blur, JPEG, brightness, contrast; albumentations, on the uint8 face crop);
- the smoothed-robustness surface over (eps, sigma): the mean over frames of a lower confidence bound
  on ``P_xi[f(x + delta + xi) = y]`` for every ``||delta|| <= eps``, the randomized-smoothing case
  ``Phi(PhiInv(p_low) - eps / sigma)`` [Cohen19; RC, Ch. 2] with ``p_low`` the Clopper-Pearson bound
  of the correct-class frequency under noise sigma;
- the share of the held-out individuals' face crops the in-distribution check refuses (docs/design.md,
  "The in-distribution check"); a refused frame is an abstention of the deployed answers;
- a per-individual table and the model card.

Overlap between the data's individuals and the bundle's training individuals is an error unless
``allow_overlap`` (the report is then marked as not a held-out evaluation).
"""

from __future__ import annotations

import hashlib
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import albumentations as A
import numpy as np
import torch
from scipy.stats import norm
from tqdm.auto import tqdm

from painwatch.data import FrameRecord, dataset_hash, is_synthetic, load_frame, load_records
from painwatch.evaluation.certify_report import write_report
from painwatch.evaluation.distributed import measure_on_cluster
from painwatch.evaluation.gate import DEFAULT_GATE, Gate, UsageError, evaluate_gate, load_gate
from painwatch.evaluation.metrics import bootstrap_group_statistics, evaluate
from painwatch.evaluation.refusals import missing_check_summary, refusal_summary
from painwatch.evaluation.settings import CertifySettings
from painwatch.inference import (
    Predictor,
    PredictorSettings,
    model_card_dict,
    random_noise_seed,
    resolve_settings,
    sound_lipschitz_constant,
    usable_methods,
)
from painwatch.inference.bulk_settings import DistributedSettings, EngineSettings
from painwatch.models import Bundle, GateVerdict, load_bundle, record_gate_verdict
from painwatch.robust import (
    certified_accuracy_curve,
    clopper_pearson_lower,
    method_spec,
    noisy_logits,
)
from painwatch.runtime import resolve_device

CORRUPTIONS: tuple[str, ...] = ("gaussian_blur", "motion_blur", "jpeg", "brightness", "contrast")


@dataclass
class CertificationRun:
    """What :func:`run_certification` did (``report`` is the JSON written to disk)."""

    report: dict[str, Any]
    gate_results: list[dict[str, Any]]
    passed: bool
    files: dict[str, Path]
    verdict: GateVerdict


def corruption_transforms(seed: int) -> dict[str, A.Compose]:
    """Fixed-strength corruptions of a uint8 RGB face crop (albumentations, seeded)."""
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


def select_frames(records: Sequence[FrameRecord], max_frames: int | None, seed: int) -> list[FrameRecord]:
    """All records, or ``max_frames`` of them spread evenly over (individual, class) groups.

    Deterministic for a seed; the order of the result follows the input order.
    """
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


def frame_study_seed(seed: int, position: int) -> int:
    """The seed of the noise study and the corruptions of the frame at ``position``: a 63-bit hash of
    ``(seed, position)``, so a frame's draws do not depend on the frames measured before it."""
    digest = hashlib.sha256(f"painwatch-certify-study:{int(seed)}:{int(position)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _deployed_summary(totals: np.ndarray) -> dict[str, np.ndarray]:
    recall_pain = totals[..., 3] / totals[..., 2]
    recall_no_pain = totals[..., 6] / totals[..., 7]
    return {
        "accuracy": totals[..., 1] / totals[..., 0],
        "pain_recall": recall_pain,
        "pain_precision": totals[..., 3] / totals[..., 4],
        "abstention_rate": totals[..., 5] / totals[..., 0],
        "balanced_accuracy": (recall_pain + recall_no_pain) / 2,
    }


def deployed_metrics(
    labels: Sequence[int], predictions: Sequence[int], groups: Sequence[str], *, reps: int, seed: int
) -> dict[str, dict[str, Any]]:
    """Point estimates and 95% cluster-bootstrap intervals (individuals resampled) of the deployed
    answers. Abstentions (prediction -1) count as errors for accuracy and as misses for pain recall."""
    y, pred = np.asarray(labels), np.asarray(predictions)
    names, inverse = np.unique(np.asarray(groups), return_inverse=True)
    # Per individual: frames, correct, pain frames, pain hits, predicted pain, abstentions, no-pain hits,
    # no-pain frames (the sums every deployed quantity is a function of).
    stats = np.zeros((len(names), 8))
    for column, values in enumerate((np.ones_like(y), pred == y, y == 1, (pred == 1) & (y == 1), pred == 1,
                                     pred < 0, (pred == 0) & (y == 0), y == 0)):
        np.add.at(stats[:, column], inverse, values)
    return bootstrap_group_statistics(stats, _deployed_summary, reps=reps, seed=seed)


def applicable_methods(bundle: Bundle, main_method: str) -> list[str]:
    """The main method, then every other base method this network can be certified with
    (:func:`painwatch.inference.usable_methods`)."""
    return [main_method, *(m for m in usable_methods(bundle.model, bundle.metadata) if m != main_method)]


def _lipschitz_constant(bundle: Bundle, method: str) -> float | None:
    if not method_spec(method).needs_lipschitz_constant:
        return None
    return sound_lipschitz_constant(bundle.model, bundle.metadata.input_shape, method=method,
                                    architecture=bundle.metadata.architecture)


@dataclass
class Measurements:
    """Per-frame measurements of :func:`measure`, in the order of the frames."""

    records: list[FrameRecord]
    sigmas: list[float]
    noise_draws: int
    clean_probabilities: list[np.ndarray] = field(default_factory=list)
    per_method: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    noise_correct: np.ndarray | None = None
    corruption_correct: np.ndarray | None = None
    frames: list[dict[str, Any]] = field(default_factory=list)
    forward_passes: int = 0
    refused: list[bool] = field(default_factory=list)

    @property
    def labels(self) -> np.ndarray:
        return np.asarray([r.label for r in self.records])

    @property
    def groups(self) -> list[str]:
        return [r.individual for r in self.records]


def measure(
    predictors: Mapping[str, Predictor],
    records: Sequence[FrameRecord],
    *,
    main_method: str,
    sigmas: Sequence[float],
    noise_draws: int,
    seed: int,
    progress: bool = True,
    start: int = 0,
) -> Measurements:
    """Certify every frame with every predictor and measure the network under noise and corruptions.

    Every draw is seeded: ``seed`` and the frame's position (``start + i`` for ``records[i]``) for the
    noise study and the corruptions, each predictor's seed policy for the certificates (its ``seed``,
    or unpredictable per-frame seeds from the operating system when it has none; every frame's noise
    seed is recorded), so fixed seeds give the same measurements, whether the frames are measured in
    one go or in shards that start at their position
    (:func:`painwatch.evaluation.distributed.measure_on_cluster`).
    """
    main = predictors[main_method]
    model, device = main.model, main.device
    result = Measurements(records=list(records), sigmas=list(sigmas), noise_draws=noise_draws,
                          per_method={name: [] for name in predictors},
                          noise_correct=np.zeros((len(records), len(sigmas)), dtype=np.int64),
                          corruption_correct=np.zeros((len(records), len(CORRUPTIONS)), dtype=bool))
    for index, record in enumerate(tqdm(records, desc="certifying", unit="frame", disable=not progress,
                                        file=sys.stderr)):
        study_seed = frame_study_seed(seed, start + index)
        corruptions = corruption_transforms(study_seed)
        noise_generator = torch.Generator().manual_seed(study_seed)
        image = load_frame(record)
        x = main.preprocess(image, str(record.path))
        probabilities, score = main.clean_pass(x)  # with the in-distribution score, in one pass
        result.clean_probabilities.append(probabilities)
        result.refused.append(main.refuses(score))
        result.forward_passes += 1
        frame: dict[str, Any] = {"file": str(record.path), "individual": record.individual,
                                 "label": main.classes[record.label], "in_distribution_score": score,
                                 "refused_not_like_training_frames": result.refused[-1]}
        for name, predictor in predictors.items():
            noise_seed = predictor.noise_seed_for(x)
            step = predictor.certify_frame(x, noise_seed=noise_seed)  # the clean pass is counted above
            certificate, spent, stop = step.outcome.certificate, step.passes, step.outcome.stop_reason
            result.forward_passes += spent
            entry = {"prediction": int(certificate.prediction), "radius": float(certificate.radius),
                     "correct": int(certificate.prediction) == record.label, "forward_passes": int(spent),
                     "stop_reason": stop, "bound": float(certificate.bound), "noise_seed": noise_seed,
                     "noise_survival": step.noise_survival}
            result.per_method[name].append(entry)
            frame[name] = entry
        for column, noise_sigma in enumerate(sigmas):
            noisy = noisy_logits(model, x.to(device), sigma=noise_sigma, num=noise_draws,
                                 batch_size=main.settings.batch_size, generator=noise_generator)
            result.noise_correct[index, column] = int((noisy.argmax(dim=1) == record.label).sum())
            result.forward_passes += noise_draws
        for column, corruption in enumerate(CORRUPTIONS):
            corrupted = corruptions[corruption](image=image)["image"]
            xc = main.preprocess(corrupted, f"{record.path} ({corruption})").unsqueeze(0)
            with torch.no_grad():
                result.corruption_correct[index, column] = int(model(xc.to(device)).argmax()) == record.label
            result.forward_passes += 1
        result.frames.append(frame)
    return result


def _certified_curves(
    measurements: Measurements, predictors: Mapping[str, Predictor], input_numel: int, main_sigma: float
) -> dict[str, dict[str, Any]]:
    per_method = measurements.per_method
    max_radius = max([e["radius"] for entries in per_method.values() for e in entries] + [main_sigma])
    radius_grid = np.linspace(0.0, max_radius * 1.05, 60)
    curves = {}
    for name, entries in per_method.items():
        correct = [bool(e["correct"]) for e in entries]
        radii = [float(e["radius"]) for e in entries]
        curves[name] = {
            "radius": radius_grid.tolist(),
            "grey_levels": (255.0 * radius_grid / math.sqrt(input_numel)).tolist(),
            "certified_accuracy": certified_accuracy_curve(correct, radii, radius_grid).tolist(),
            "abstention_rate": float(np.mean([e["prediction"] < 0 for e in entries])),
            "accuracy": float(np.mean(correct)),
            "median_radius": float(np.median(radii)),
            "median_forward_passes": float(np.median([e["forward_passes"] for e in entries])),
            # The typical case beside the worst case: the share of random noise at sigma that keeps the
            # answer (a level 1 - alpha lower bound per frame; 0 where nothing is certified).
            "median_noise_survival": float(np.median([e.get("noise_survival") or 0.0 for e in entries])),
            "settings": predictors[name].settings.to_dict(),
        }
    return curves


def _robustness_surface(measurements: Measurements, alpha: float) -> dict[str, Any]:
    sigmas, draws = measurements.sigmas, measurements.noise_draws
    eps_grid = np.linspace(0.0, 2.0 * max(sigmas), 25)
    surface = np.zeros((len(sigmas), len(eps_grid)))
    for row, noise_sigma in enumerate(sigmas):
        counts = measurements.noise_correct[:, row]
        lows = np.array([clopper_pearson_lower(int(k), draws, alpha) for k in counts])
        with np.errstate(divide="ignore"):
            z = norm.ppf(np.clip(lows, 0.0, 1.0))
        surface[row] = norm.cdf(z[:, None] - eps_grid[None, :] / noise_sigma).mean(axis=0)
    return {"eps": eps_grid.tolist(), "sigma": list(sigmas), "probability_lower_bound": surface.tolist(),
            "alpha": alpha, "method": "randomized-smoothing special case, Clopper-Pearson p_low"}


def summarise(
    measurements: Measurements,
    predictors: Mapping[str, Predictor],
    *,
    main_method: str,
    bootstrap_reps: int,
    seed: int,
) -> dict[str, Any]:
    """The report's figures from :func:`measure`'s measurements (see the module docstring), and the
    ``measured`` quantities the gate judges."""
    main = predictors[main_method]
    y, groups = measurements.labels, measurements.groups
    network = evaluate(y, np.asarray(measurements.clean_probabilities), groups,
                       class_names=list(main.classes), bootstrap_reps=bootstrap_reps, seed=seed)
    deployed_predictions = np.array([e["prediction"] for e in measurements.per_method[main_method]])
    deployed_predictions[np.asarray(measurements.refused, dtype=bool)] = -1  # refused: an abstention
    deployed = deployed_metrics(y, deployed_predictions, groups, reps=bootstrap_reps, seed=seed)
    input_numel = math.prod(main.input_shape)
    per_individual = network["per_individual"]
    main_radii = np.array([e["radius"] for e in measurements.per_method[main_method]])
    for row in per_individual:
        mask = np.asarray(groups) == row["individual"]
        row["deployed_accuracy"] = float(np.mean(deployed_predictions[mask] == y[mask]))
        row["abstention_rate"] = float(np.mean(deployed_predictions[mask] < 0))
        row["median_radius"] = float(np.median(main_radii[mask]))
        row["refused_share"] = float(np.mean(np.asarray(measurements.refused, dtype=bool)[mask]))
    ci = network["confidence_intervals"]["metrics"]
    measured = {
        **{key: deployed[key] for key in ("accuracy", "pain_recall", "pain_precision", "balanced_accuracy",
                                          "abstention_rate")},
        "ece": {"estimate": network["pooled"]["ece"], "low": ci["ece"]["low"], "high": ci["ece"]["high"]},
        "main_certified": [(e["correct"], e["radius"]) for e in measurements.per_method[main_method]],
        "main_method": main.settings.method_name,
        "input_numel": input_numel,
    }
    noise_accuracy = (measurements.noise_correct / measurements.noise_draws).mean(axis=0)
    return {
        "network": {key: network[key] for key in ("pooled", "confidence_intervals", "reliability", "roc")},
        "deployed": deployed,
        "certified_accuracy": _certified_curves(measurements, predictors, input_numel, main.settings.sigma),
        "noise": {"sigma": measurements.sigmas, "accuracy": noise_accuracy.tolist(),
                  "draws_per_frame": measurements.noise_draws},
        "corruptions": {name: float(v) for name, v in
                        zip(CORRUPTIONS, measurements.corruption_correct.mean(axis=0), strict=True)},
        "surface": _robustness_surface(measurements, main.settings.alpha),
        "per_individual": per_individual,
        "in_distribution": _refusals(main, measurements),
        "measured": measured,
    }


def _refusals(main: Predictor, measurements: Measurements) -> dict[str, Any]:
    check = main.in_distribution
    if check is None:
        return missing_check_summary(main.in_distribution_note or "none")
    return refusal_summary(measurements.refused, measurements.groups, score=check.spec.name,
                           threshold=check.threshold, level=check.spec.level)


def _held_out_records(
    settings: CertifySettings, bundle: Bundle, warn: Callable[[str], None]
) -> tuple[list[FrameRecord], list[str]]:
    records = load_records(settings.data)
    if settings.individuals is not None:
        wanted = set(settings.individuals)
        unknown = sorted(wanted - {r.individual for r in records})
        if unknown:
            raise UsageError(f"individual(s) {', '.join(unknown)} are not in {settings.data}")
        records = [r for r in records if r.individual in wanted]
    training_individuals = set(bundle.metadata.training.get("individuals") or [])
    overlap = sorted(training_individuals.intersection({r.individual for r in records}))
    if overlap and not settings.allow_overlap:
        raise UsageError(
            f"{len(overlap)} individual(s) of {settings.data} were used to train the bundle: "
            f"{', '.join(overlap[:10])}{', ...' if len(overlap) > 10 else ''}. "
            f"Certify on held-out individuals, or pass --allow-overlap "
            f"(the report is then marked as not a held-out evaluation)"
        )
    if not training_individuals:
        warn(f"warning: {settings.bundle} does not record its training individuals; overlap cannot be "
             f"checked")
    return records, overlap


def _check_paths(settings: CertifySettings) -> None:
    if not settings.bundle.exists():
        raise UsageError(f"bundle folder {settings.bundle} does not exist")
    if not settings.data.exists():
        raise UsageError(f"data {settings.data} does not exist (a folder DATA/<individual>/<label>/ or a "
                         f"manifest CSV)")
    if settings.out.exists() and not settings.out.is_dir():
        raise UsageError(f"--out {settings.out} exists and is not a folder")


def _predictors(
    bundle: Bundle, main: PredictorSettings, methods: Sequence[str], seed: int | None,
    engine: EngineSettings | None = None,
) -> dict[str, Predictor]:
    engine = engine or EngineSettings()
    predictors = {}
    for name in methods:
        settings = resolve_settings(bundle.metadata.certification, method=name, sigma=main.sigma,
                                    alpha=main.alpha, n=main.n, source=str(bundle.path / "model.json"))
        predictors[name] = Predictor(bundle.model, bundle.metadata, bundle.path, settings, seed=seed,
                                     lipschitz_constant=_lipschitz_constant(bundle, name),
                                     in_distribution=bundle.in_distribution, runtime=engine.runtime,
                                     precision=engine.precision)
    return predictors


def shard_predictors(
    bundle_path: Path, *, device: str, main: PredictorSettings, methods: Sequence[str], seed: int | None,
    engine: EngineSettings | None = None,
) -> dict[str, Predictor]:
    """The predictors of a certification, built where they run (a Ray actor: on its GPU, if any)."""
    bundle = load_bundle(bundle_path, device=str(resolve_device(device)))
    return _predictors(bundle, main, methods, seed, engine)


def run_certification(
    settings: CertifySettings,
    *,
    warn: Callable[[str], None] | None = None,
    cluster: DistributedSettings | None = None,
    engine: EngineSettings | None = None,
) -> CertificationRun:
    """Measure a bundle on held-out data, write the report into ``settings.out`` and the verdict of the
    gate file into the bundle (verdicts of other gate files are kept). ``engine`` says what computes the
    answers and noise draws (default: auto); the report records it.

    Raises :class:`UsageError` (or ``BundleError`` / ``DataValidationError`` / ``SettingsError``, all
    ``ValueError``) for bad inputs, before any long computation starts. With ``cluster`` on Ray the
    frames are shared by Ray actors that each load the bundle once, with the same per-frame results for
    the same seeds.
    """
    started = time.monotonic()
    warn = warn or (lambda message: print(message, file=sys.stderr))
    _check_paths(settings)
    gate: Gate = load_gate(settings.gate if settings.gate is not None else DEFAULT_GATE)
    bundle = load_bundle(settings.bundle, device=str(resolve_device(settings.device)))
    main = resolve_settings(bundle.metadata.certification, method=settings.method, sigma=settings.sigma,
                            alpha=settings.alpha, n=settings.n, source=str(settings.bundle / "model.json"))
    records, overlap = _held_out_records(settings, bundle, warn)
    # Without a seed the certificates draw unpredictable noise, as deployed; the analysis (frame choice,
    # noise study, bootstrap) still needs one seed, drawn here and recorded in the report.
    analysis_seed = random_noise_seed() % 2**32 if settings.seed is None else settings.seed
    chosen = select_frames(records, settings.max_frames, analysis_seed)
    methods = [main.method] if settings.main_method_only else applicable_methods(bundle, main.method)
    predictors = _predictors(bundle, main, methods, settings.seed, engine)
    sigmas = sorted({float(s) for s in settings.noise_sigmas} | {float(main.sigma)})
    options = {"main_method": main.method, "sigmas": sigmas, "noise_draws": settings.noise_draws,
               "seed": analysis_seed}
    if cluster is not None and cluster.enabled:
        make = partial(shard_predictors, settings.bundle, device=settings.device, main=main, methods=methods,
                       seed=settings.seed, engine=engine)
        measurements = measure_on_cluster(measure, make, chosen, cluster=cluster, progress=settings.progress,
                                          log=warn, **options)
    else:
        measurements = measure(predictors, chosen, progress=settings.progress, **options)
    summary = summarise(measurements, predictors, main_method=main.method,
                        bootstrap_reps=settings.bootstrap_reps, seed=analysis_seed)
    measured = summary.pop("measured")
    gate_results = evaluate_gate(gate, measured)
    passed = all(r["passed"] for r in gate_results)
    date = datetime.now(UTC).isoformat(timespec="seconds")
    report = {
        "title": "painwatch certification report",
        "date": date,
        "passed": passed,
        "held_out": not overlap,
        "overlap_individuals": overlap,
        "bundle": {"path": str(bundle.path), "architecture": bundle.metadata.architecture,
                   "weights_sha256": bundle.metadata.weights_sha256,
                   "input_shape": list(predictors[main.method].input_shape),
                   "synthetic_training_data": bundle.metadata.synthetic},
        "data": {"source": str(settings.data), "frames_available": len(records), "frames_used": len(chosen),
                 "individuals": sorted({r.individual for r in chosen}), "data_hash": dataset_hash(chosen),
                 "synthetic": is_synthetic(settings.data)},
        "settings": {"main": main.to_dict(), "methods": methods, "noise_sigmas": sigmas,
                     "noise_draws": settings.noise_draws, "bootstrap_reps": settings.bootstrap_reps,
                     "seed": settings.seed, "analysis_seed": analysis_seed,
                     "certificate_noise": "from --seed" if settings.seed is not None else
                     "unpredictable (operating-system entropy), one recorded noise_seed per frame",
                     "corruptions": list(CORRUPTIONS),
                     "engine": {"runtime": predictors[main.method].runtime,
                                "precision": predictors[main.method].precision}},
        **summary,
        "model_card": model_card_dict(bundle.metadata, main),
        "gate": {"file": str(gate.path), "thresholds": gate.to_dict(), "results": gate_results,
                 "passed": passed},
        "forward_passes": measurements.forward_passes,
        "elapsed_s": time.monotonic() - started,
        "frames": measurements.frames,
    }
    files = write_report(report, settings.out)
    verdict = GateVerdict(
        gate_file=gate.path.name, passed=passed, date=date, results=tuple(gate_results),
        details={"thresholds": gate.to_dict(), "report": str(files["html"].resolve()),
                 "settings": main.to_dict(), "data_hash": report["data"]["data_hash"],
                 "num_frames": len(chosen), "individuals": report["data"]["individuals"],
                 "held_out": not overlap},
    )
    if settings.write_bundle:
        record_gate_verdict(settings.bundle, verdict)
    return CertificationRun(report=report, gate_results=gate_results, passed=passed, files=files,
                            verdict=verdict)
