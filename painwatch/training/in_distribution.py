"""Fitting a model's in-distribution check on frame records (docs/design.md, "The in-distribution check").

:func:`record_descriptors` runs the network once over records (the deterministic eval transform, as the
Predictor sees frames) and keeps the descriptors of :func:`painwatch.models.in_distribution.descriptor_pass`;
:func:`fit_check` fits the statistics on the fit individuals' frames and sets the conformal threshold
on the inner-validation individuals' frames.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from painwatch.data import FrameRecord
from painwatch.models import PainNet
from painwatch.models.in_distribution import (
    InDistributionError,
    InDistributionSpec,
    InDistributionStatistic,
    default_layers,
    descriptor_pass,
    fit_in_distribution,
    minimum_calibration_frames,
)
from painwatch.runtime import resolve_device
from painwatch.training.batches import as_loader


def default_spec(model: PainNet) -> InDistributionSpec:
    """The check new bundles carry: :func:`painwatch.models.in_distribution.default_layers` of the
    network, principal-subspace residuals, combined by the largest z score, refusal level 0.05."""
    return InDistributionSpec(layers=default_layers(model))


def record_descriptors(
    model: PainNet,
    records: Any,
    *,
    layers: Sequence[str],
    batch_size: int = 64,
    device: str | torch.device | None = None,
    num_workers: int = 0,
) -> dict[str, np.ndarray]:
    """The descriptors ``layers`` of every record (rows in record order, float64) from one eval-mode pass
    of ``model`` per batch; records are read with the eval transform at the model's input size (a ready
    dataset or loader is used as it is). The model's train/eval mode is restored afterwards."""
    loader = as_loader(records, input_size=model.input_size, batch_size=batch_size, num_workers=num_workers)
    target = resolve_device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    model.to(target)
    parts: dict[str, list[np.ndarray]] = {layer: [] for layer in layers}
    try:
        for images, _ in loader:
            _, descriptors = descriptor_pass(model, images.to(target), layers)
            for layer in layers:
                parts[layer].append(descriptors[layer])
    finally:
        model.train(was_training)
    return {layer: np.concatenate(chunks) if chunks else np.zeros((0, 0)) for layer, chunks in parts.items()}


def why_no_check(num_validation_frames: int, spec: InDistributionSpec) -> str | None:
    """Why no check can be calibrated on that many validation frames (None when it can)."""
    needed = minimum_calibration_frames(spec.level)
    if num_validation_frames == 0:
        return ("no in-distribution check: the model was trained without inner-validation individuals "
                "(val_fraction 0), so there were no frames to set its threshold on")
    if num_validation_frames < needed:
        return (f"no in-distribution check: {num_validation_frames} inner-validation frames are too few "
                f"for a refusal level of {spec.level:g} (at least {needed} are needed)")
    return None


def fit_check(
    model: PainNet,
    fit_records: Sequence[FrameRecord],
    validation_records: Sequence[FrameRecord],
    *,
    spec: InDistributionSpec | None = None,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    num_workers: int = 0,
) -> tuple[InDistributionStatistic | None, str | None]:
    """Fit ``model``'s check (``spec``, by default :func:`default_spec`) on ``fit_records`` and calibrate
    it on ``validation_records``. Returns ``(check, None)``, or ``(None, reason)`` when there are too few
    validation frames (e.g. none: ``val_fraction`` 0)."""
    spec = spec or default_spec(model)
    reason = why_no_check(len(validation_records), spec)
    if reason is not None:
        return None, reason
    options = {"layers": spec.descriptors, "batch_size": batch_size, "device": device,
               "num_workers": num_workers}
    fit = record_descriptors(model, list(fit_records), **options)
    validation = record_descriptors(model, list(validation_records), **options)
    try:
        check = fit_in_distribution(fit, [r.individual for r in fit_records], validation, spec=spec)
    except InDistributionError as error:
        return None, f"no in-distribution check: {error}"
    return check, None
