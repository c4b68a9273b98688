"""The in-distribution check of each LOIO fold (docs/design.md, "The in-distribution check").

Each fold fits its check on its training individuals' frames and sets the threshold on its
inner-validation individuals' frames, exactly as :func:`painwatch.training.bundle.train_bundle` does for
a deployed model, then scores the left-out individual's frames: the share refused is what the check
costs on a macaque it has never seen. Fine-tuned folds read the descriptors with the fold's network;
runs on cached features read them once, with the frozen backbone, into ``RUN/in_distribution_features
.safetensors`` (written atomically, checked against the backbone and the frames like the feature cache).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from painwatch.data import FrameRecord
from painwatch.data.splits import Fold
from painwatch.evaluation.refusals import missing_check_summary, refusal_summary
from painwatch.io import atomic_write_bytes
from painwatch.models import PainNet
from painwatch.models.in_distribution import InDistributionError, InDistributionStatistic, fit_in_distribution
from painwatch.runtime import seed_everything
from painwatch.training.bundle import new_model
from painwatch.training.config import TrainConfig
from painwatch.training.in_distribution import default_spec, record_descriptors, why_no_check

DESCRIPTORS_FILE = "in_distribution_features.safetensors"


def check_result(check: InDistributionStatistic | None, reason: str | None,
                 test: Mapping[str, np.ndarray] | None) -> dict[str, Any]:
    """The fold's ``result.json`` entry: the check's score, threshold and the left-out individual's
    scores and refusals, or why the fold has no check."""
    if check is None or test is None:
        return {"available": False, "note": reason or "no in-distribution check"}
    scores = check.scores(test)
    return {"available": True, "score": check.spec.name, "layers": list(check.spec.layers),
            "threshold": check.threshold, "level": check.spec.level,
            "calibration_frames": check.calibration_frames,
            "validation_refused": check.validation_refused,
            "test_scores": [float(v) if np.isfinite(v) else None for v in scores],
            "test_refused": check.refuses(scores).tolist()}


def _fit_fold_check(
    fit: Mapping[str, np.ndarray],
    fit_groups: Sequence[str],
    validation: Mapping[str, np.ndarray],
    test: Mapping[str, np.ndarray],
    *,
    model: PainNet,
) -> tuple[InDistributionStatistic | None, dict[str, Any]]:
    """Fit and calibrate one fold's check of ``model`` on descriptors; returns the check (None when
    there is none) and its ``result.json`` entry."""
    spec = default_spec(model)
    reason = why_no_check(len(next(iter(validation.values()), [])), spec)
    check = None
    if reason is None:
        try:
            check = fit_in_distribution(fit, fit_groups, validation, spec=spec)
        except InDistributionError as error:
            reason = f"no in-distribution check: {error}"
    return check, check_result(check, reason, test)


def finetuned_fold_check(
    model: PainNet,
    records: Sequence[FrameRecord],
    fold: Fold,
    *,
    config: TrainConfig,
    device: str,
) -> tuple[InDistributionStatistic | None, dict[str, Any]]:
    """The check of a fine-tuned fold's network: one eval pass over the fold's frames."""
    layers = default_spec(model).descriptors
    options = {"layers": layers, "batch_size": config.eval_batch_size, "device": device,
               "num_workers": config.num_workers}
    parts = {name: record_descriptors(model, [records[i] for i in getattr(fold, name)], **options)
             for name in ("train", "validation", "test")}
    return _fit_fold_check(parts["train"], [records[i].individual for i in fold.train], parts["validation"],
                          parts["test"], model=model)


def cached_descriptors(
    config: TrainConfig,
    records: Sequence[FrameRecord],
    run_dir: Path,
    *,
    device: str,
    metadata: dict[str, str],
) -> tuple[PainNet, dict[str, np.ndarray]]:
    """The frozen backbone (built from ``config.seed``, as the feature cache's) and the descriptors of
    every frame, read from ``RUN/in_distribution_features.safetensors`` when it was made from the same
    backbone and frames (``metadata``), else computed once and written atomically."""
    seed_everything(config.seed)
    model = new_model(config)
    layers = default_spec(model).descriptors
    path = run_dir / DESCRIPTORS_FILE
    expected = {**metadata, "layers": ",".join(layers)}
    if path.is_file():
        with safe_open(str(path), framework="np") as handle:
            if (handle.metadata() or {}) == expected:
                descriptors = {layer: handle.get_tensor(layer) for layer in layers}
                if all(len(v) == len(records) for v in descriptors.values()):
                    return model, descriptors
    descriptors = record_descriptors(model, records, layers=layers, batch_size=config.batch_size,
                                     device=device, num_workers=config.num_workers)
    # float32 on disk (the descriptors of a ResNet50 are about 100 kB per frame).
    tensors = {layer: np.ascontiguousarray(value, dtype=np.float32) for layer, value in descriptors.items()}
    atomic_write_bytes(path, safetensors_bytes({k: torch.from_numpy(v) for k, v in tensors.items()},
                                               metadata=expected))
    return model, {layer: value.astype(np.float64) for layer, value in tensors.items()}


def cached_fold_check(
    descriptors: Mapping[str, np.ndarray], groups: Sequence[str], fold: Fold, *, model: PainNet
) -> dict[str, Any]:
    """The ``result.json`` entry of a cached-features fold's check (the frozen backbone's descriptors)."""
    take = {name: {layer: value[getattr(fold, name)] for layer, value in descriptors.items()}
            for name in ("train", "validation", "test")}
    _, entry = _fit_fold_check(take["train"], [groups[i] for i in fold.train], take["validation"],
                              take["test"], model=model)
    return entry


def loio_refusals(results: Mapping[int, Mapping[str, Any]], records: Sequence[FrameRecord]) -> dict[str, Any]:
    """The pooled and per-individual share of left-out frames the folds' checks refused (``metrics.json``'s
    ``in_distribution``); folds without a check (or from runs before it existed) are left out and named."""
    refused, groups, missing, score, level = [], [], [], None, None
    for result in results.values():
        entry = result.get("in_distribution") or {}
        if not entry.get("available"):
            missing.append(str(result["test_individual"]))
            continue
        score, level = entry["score"], entry["level"]
        refused.extend(bool(v) for v in entry["test_refused"])
        groups.extend(records[i].individual for i in result["test_indices"])
    if not refused:
        return missing_check_summary("no fold had an in-distribution check (too few inner-validation frames, "
                                     "or folds run before painwatch fitted one)")
    summary = refusal_summary(refused, groups, score=str(score), threshold=None, level=float(level))
    summary["folds_without_check"] = sorted(missing)
    return summary


def frame_scores(results: Mapping[int, Mapping[str, Any]], num_frames: int) -> tuple[list[Any], list[Any]]:
    """Per frame (record order): its fold's in-distribution score and whether it was refused (None for
    frames of a fold without a check)."""
    scores: list[Any] = [None] * num_frames
    refused: list[Any] = [None] * num_frames
    for result in results.values():
        entry = result.get("in_distribution") or {}
        if entry.get("available"):
            for index, score, flag in zip(result["test_indices"], entry["test_scores"], entry["test_refused"],
                                          strict=True):
                scores[index], refused[index] = score, bool(flag)
    return scores, refused
