"""The pooled outputs of a finished LOIO run: ``predictions.csv``, ``metrics.json`` and the report.

Everything is a deterministic function of the fold results and the settings (the cluster bootstrap
is seeded with the run's seed) and is written atomically.
"""

from __future__ import annotations

import csv
import dataclasses
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from painwatch import CLASS_NAMES
from painwatch.calibration import calibrated_probabilities
from painwatch.data import FrameRecord, is_synthetic
from painwatch.data.splits import Fold
from painwatch.evaluation.lipschitz_folds import pooled_certified_accuracy
from painwatch.evaluation.loio_checks import frame_scores, loio_refusals
from painwatch.evaluation.metrics import evaluate
from painwatch.evaluation.refusals import add_refusal_section
from painwatch.evaluation.report import PUBLISHED_REFERENCE, write_loio_report
from painwatch.evaluation.settings import LoioSettings
from painwatch.io import atomic_write_json, atomic_write_text
from painwatch.models import is_lipschitz_architecture

PREDICTIONS_FILE = "predictions.csv"
METRICS_FILE = "metrics.json"


def write_outputs(
    settings: LoioSettings,
    records: Sequence[FrameRecord],
    folds: Sequence[Fold],
    *,
    results: dict[int, dict[str, Any]],
    config: dict[str, Any],
    run_dir: Path,
    device: str,
) -> tuple[dict[str, Any], dict[str, Path]]:
    """Pool the fold results: ``predictions.csv``, ``metrics.json`` and the report. Deterministic in
    the fold results and the settings (the bootstrap is seeded with the training seed).

    Raises ``ValueError`` when a frame has no prediction (a fold result is missing).
    """
    train = settings.train
    num_frames = len(records)
    num_classes = len(CLASS_NAMES)
    logits = np.full((num_frames, num_classes), np.nan)
    probabilities = np.full((num_frames, num_classes), np.nan)
    fold_of = np.full(num_frames, -1, dtype=np.int64)
    temperature_of = np.full(num_frames, np.nan)
    for fold in folds:
        result = results[fold.index]
        index = np.asarray(result["test_indices"], dtype=np.int64)
        fold_logits = np.asarray(result["test_logits"], dtype=np.float64)
        logits[index] = fold_logits
        probabilities[index] = calibrated_probabilities(fold_logits, result["temperature"])
        fold_of[index] = fold.index
        temperature_of[index] = result["temperature"]
    if np.any(fold_of < 0):
        missing = [str(records[i].path) for i in np.flatnonzero(fold_of < 0)[:5]]
        raise ValueError(f"{int(np.sum(fold_of < 0))} frames have no prediction (e.g. {missing})")
    labels = np.asarray([r.label for r in records], dtype=np.int64)
    groups = np.asarray([r.individual for r in records])
    predictions = np.argmax(probabilities, axis=1)
    evaluation = evaluate(
        labels,
        probabilities,
        groups,
        predictions=predictions,
        class_names=CLASS_NAMES,
        num_bins=settings.num_bins,
        bootstrap_reps=settings.bootstrap_reps,
        confidence_level=0.95,
        seed=train.seed,
    )

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(
        ["path", "individual", "label", "label_name", "fold", "video", "time_s"]
        + [f"logit_{name}" for name in CLASS_NAMES]
        + ["temperature"]
        + [f"prob_{name}" for name in CLASS_NAMES]
        + ["predicted", "predicted_name", "correct", "in_distribution_score", "refused_not_like_training"]
    )
    check_scores, check_refused = frame_scores(results, num_frames)
    for i, record in enumerate(records):
        writer.writerow(
            [
                str(record.path),
                record.individual,
                int(record.label),
                CLASS_NAMES[record.label],
                int(fold_of[i]),
                record.video or "",
                "" if record.time_s is None else repr(float(record.time_s)),
            ]
            + [repr(float(v)) for v in logits[i]]
            + [repr(float(temperature_of[i]))]
            + [f"{float(p):.6f}" for p in probabilities[i]]
            + [int(predictions[i]), CLASS_NAMES[predictions[i]], int(predictions[i] == labels[i])]
            + ["" if check_scores[i] is None else repr(float(check_scores[i])),
               "" if check_refused[i] is None else int(check_refused[i])]
        )
    outputs: dict[str, Path] = {
        "predictions": atomic_write_text(run_dir / PREDICTIONS_FILE, buffer.getvalue())
    }

    fold_rows = []
    for fold in folds:
        result = results[fold.index]
        fold_rows.append(
            {
                "fold": fold.index,
                "left out": fold.test_individual,
                "test frames": len(fold.test),
                "test accuracy": result["test_accuracy"],
                "validation individuals": ", ".join(result["validation_individuals"]),
                "temperature": result["temperature"],
                "val NLL before": result["validation"]["nll_before_scaling"],
                "val NLL after": result["validation"]["nll_after_scaling"],
                "refused (in-distribution)": _refused_share(result),
                "best epoch": result["best_epoch"],
                "epochs run": result["epochs_run"],
                "seconds": result["seconds"],
                **_fold_certificate_columns(result),
            }
        )
    synthetic = is_synthetic(settings.data)
    metrics = {
        "format": config["format"],
        "frames_used": num_frames,
        "statement": (
            f"{num_frames} frames of {len(set(groups.tolist()))} individuals were used; each was predicted "
            f"by the fold that left its individual out"
        ),
        "synthetic_data": synthetic,
        "data": str(settings.data),
        "data_hash": config["data_hash"],
        "class_counts": config["class_counts"],
        "settings": dataclasses.asdict(settings),
        "device": device,
        "published_reference": PUBLISHED_REFERENCE,
        "evaluation": evaluation,
        "in_distribution": loio_refusals(results, records),
        "folds": fold_rows,
    }
    certified = pooled_certified_accuracy(list(results.values()), labels)
    if certified is not None:
        metrics["lipschitz_certified_accuracy"] = certified
    outputs["metrics"] = atomic_write_json(run_dir / METRICS_FILE, metrics)
    run_info = {
        "data": str(settings.data),
        "synthetic": synthetic,
        "data hash (SHA-256)": config["data_hash"][:16] + "…",
        "frames used": num_frames,
        "individuals": len(set(groups.tolist())),
        "frames per class": ", ".join(f"{k} {v}" for k, v in config["class_counts"].items()),
        "architecture": train.arch,
        "initial weights": train.weights_path or ("ImageNet (hub)" if train.pretrained else "random init"),
        "mode": "linear head on cached frozen-backbone features"
        if settings.cache_features
        else "fine-tuning",
        "input size (px)": train.input_size,
        **(
            {"head L-BFGS rounds (max)": train.head_epochs, "head L2": train.head_l2}
            if settings.cache_features
            else {
                "epochs (max)": train.epochs,
                "patience": train.patience,
                "loss": train.loss
                + (
                    f" (margin d {train.margin}, {train.num_draws} noise draws"
                    + (f", weight {train.margin_weight})" if train.loss == "ce+mc_margin" else ")")
                    if train.loss != "ce"
                    else ""
                ),
                "noise sigma": train.noise_sigma,
                "learning rate": (
                    f"{train.lr:g} ({train.schedule}, warm-up {train.warmup_epochs:g} epochs)"
                ),
                "augmentation strength": train.augment,
            }
        ),
        "inner validation": (
            f"{settings.inner_val_individuals} individuals"
            if settings.inner_val_individuals is not None
            else f"{settings.inner_val_fraction:.0%} of the training individuals"
        ),
        "seed": train.seed,
        "device": device,
    }
    notes = []
    if not train.weights_path and not train.pretrained and not is_lipschitz_architecture(train.arch):
        notes.append(
            "The backbone started from random weights (no ImageNet weights were given: pass --weights PATH "
            "or --pretrained). "
            + (
                "With --cache-features its frozen features are random projections, so results near chance "
                "are expected."
                if settings.cache_features
                else "Training from scratch on few frames usually stays near chance."
            )
        )
    if certified is not None:
        notes.append(
            "Certified accuracy (Lipschitz margin, one forward pass per frame, exact): "
            + ", ".join(f"{value:.1%} at L2 radius {radius}" for radius, value in certified.items())
            + " over all frames, each certified by the fold that left its individual out."
        )
    refusals = metrics["in_distribution"]
    section = [lambda report: add_refusal_section(report, refusals, what="the left-out individuals' frames")]
    outputs.update(write_loio_report(run_dir, evaluation, run_info, fold_rows=fold_rows, notes=notes,
                                     sections=section))
    return metrics, outputs


def _refused_share(result: dict[str, Any]) -> float | None:
    entry = result.get("in_distribution") or {}
    flags = entry.get("test_refused") if entry.get("available") else None
    return float(np.mean(flags)) if flags else None


def _fold_certificate_columns(result: dict[str, Any]) -> dict[str, Any]:
    """The Lipschitz bound and certified accuracy of a fold, for its row (empty for other networks)."""
    certificates = result.get("lipschitz")
    if not certificates:
        return {}
    return {"Lipschitz L": certificates["lipschitz_constant"],
            **{f"certified acc. r={radius}": value
               for radius, value in certificates["certified_accuracy"].items()}}
