"""Training a deployable model: :func:`train_bundle` (records in, model bundle out; no command line).

An inner validation split by individual (:func:`painwatch.data.split_by_individual`) drives early
stopping and temperature scaling [Guo17] and sets the threshold of the in-distribution check, whose
statistics are fitted on the fit individuals (:mod:`painwatch.training.in_distribution`; docs/design.md,
"The in-distribution check"); the bundle (``weights.safetensors``, ``in_distribution.safetensors`` and
``model.json``) records the training individuals, the data hash, every training setting and the
certification defaults (docs/design.md, "The clinical pipeline"): a Lipschitz network (``lip-*``)
certifies with the deterministic Lipschitz margin and its bundle records the sound bound ``L`` it was
saved with; any other network with randomized smoothing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from painwatch import CLASS_NAMES
from painwatch.calibration import fit_temperature
from painwatch.data import FrameRecord, dataset_hash, split_by_individual
from painwatch.models import (
    PainNet,
    create_model,
    default_certification,
    default_certification_method,
    save_bundle,
)
from painwatch.models.in_distribution import InDistributionStatistic
from painwatch.robust import lipschitz_upper_bound
from painwatch.training.config import TrainConfig
from painwatch.training.in_distribution import fit_check
from painwatch.training.loops import FitResult, fit


@dataclass(frozen=True)
class TrainedBundle:
    """What :func:`train_bundle` wrote: the bundle folder, the fit, the calibration temperature, the
    in-distribution check (None, with the reason in ``in_distribution_absent``, when there is none)."""

    path: Path
    fit: FitResult
    temperature: float
    training: dict[str, Any]
    in_distribution: InDistributionStatistic | None = None
    in_distribution_absent: str | None = None


def initial_weights(config: TrainConfig) -> str:
    """Where the backbone's first weights came from, in words (recorded in the bundle)."""
    if config.weights_path:
        return f"file:{Path(config.weights_path).name}"
    return "imagenet-hub" if config.pretrained else "none (random init)"


def new_model(config: TrainConfig, *, seed: int | None = None) -> PainNet:
    """The untrained network of ``config`` (2 classes, normalisation inside), initialised from ``seed``
    (``config.seed`` when omitted)."""
    return create_model(
        config.arch,
        num_classes=len(CLASS_NAMES),
        pretrained=config.pretrained,
        weights_path=config.weights_path,
        input_size=config.input_size,
        drop_rate=config.drop_rate,
        seed=config.seed if seed is None else seed,
    )


def bundle_certification(model: PainNet, config: TrainConfig) -> dict[str, Any]:
    """The certification defaults of a bundle of ``model`` trained with ``config``: the method of its
    architecture (:func:`painwatch.models.default_certification_method`), smoothing at the training
    noise (or the default sigma), and for a Lipschitz network its sound bound ``L`` on inputs of
    ``config.input_size`` pixels."""
    method = default_certification_method(config.arch)
    certification = default_certification(config.noise_sigma if config.noise_sigma > 0 else None,
                                          method=method)
    if model.is_lipschitz:
        shape = (model.in_chans, model.input_size, model.input_size)
        certification["lipschitz_constant"] = lipschitz_upper_bound(model.eval(), shape)
    return certification


def training_record(
    config: TrainConfig,
    result: FitResult,
    *,
    fit_records: Sequence[FrameRecord],
    validation_records: Sequence[FrameRecord],
    **facts: Any,
) -> dict[str, Any]:
    """The ``training`` entry of a bundle's ``model.json``: every :class:`TrainConfig` field, who the
    model was fitted and validated on, how the fit went, and ``facts`` (e.g. ``data_hash``,
    ``left_out_individual``, ``purpose``). ``device`` is the device the fit ran on."""
    best = result.history[result.best_epoch - 1] if result.history else {}
    everyone = [*fit_records, *validation_records]
    return {
        **config.to_dict(),
        "individuals": sorted({r.individual for r in everyone}),
        "fit_individuals": sorted({r.individual for r in fit_records}),
        "validation_individuals": sorted({r.individual for r in validation_records}),
        "num_frames": len(everyone),
        "epochs_run": result.epochs_run,
        "best_epoch": result.best_epoch,
        "validation_noise_sigma": best.get("val_noise_sigma"),
        "val_loss": best.get("val_loss"),
        "val_accuracy": best.get("val_accuracy"),
        "val_balanced_accuracy": best.get("val_balanced_accuracy"),
        "initial_weights": initial_weights(config),
        "device": result.device,
        "seconds": round(result.seconds, 1),
        **facts,
    }


def train_bundle(
    records: Sequence[FrameRecord],
    config: TrainConfig,
    out: str | Path,
    *,
    val_fraction: float = 0.2,
    data_source: str | None = None,
    synthetic: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = lambda message: None,
) -> TrainedBundle:
    """Fine-tune a new model of ``config`` on ``records`` and save it as a bundle at ``out``.

    ``val_fraction`` of the individuals (at least one) are held out for early stopping, the
    temperature and the threshold of the in-distribution check (fitted on the other individuals'
    frames); 0 trains on all, keeps temperature 1 and writes no check (``model.json`` says why).
    ``synthetic`` marks frames drawn by a program (the model card and the page then say so). Raises
    ``ValueError`` for empty records or a split that cannot be made, naming the problem.
    """
    records = list(records)
    if not records:
        raise ValueError(f"no frames to train on{f' in {data_source}' if data_source else ''}")
    fit_records, validation_records = split_by_individual(records, val_fraction, config.seed)
    counts = np.bincount([r.label for r in records], minlength=len(CLASS_NAMES)).tolist()
    individuals = sorted({r.individual for r in records})
    log(
        f"training on {len(records)} {'SYNTHETIC ' if synthetic else ''}frames from {len(individuals)} "
        f"individuals ({len(fit_records)} fit / {len(validation_records)} validation frames; class counts "
        f"{counts})"
    )
    model = new_model(config)
    result = fit(model, fit_records, validation_records, config=config, progress=progress)
    temperature = 1.0
    if result.val_logits is not None:
        temperature = float(fit_temperature(result.val_logits, result.val_labels))
    training = training_record(
        config,
        result,
        fit_records=fit_records,
        validation_records=validation_records,
        data_source=data_source,
        synthetic_data=synthetic,
        data_hash=dataset_hash(records),
        class_counts=counts,
    )
    check, absent = fit_check(model, fit_records, validation_records, batch_size=config.eval_batch_size,
                              num_workers=config.num_workers)
    if check is not None:
        log(f"in-distribution check: {check.spec.name} on {', '.join(check.spec.layers)}; threshold "
            f"{check.threshold:.3f} refuses {check.validation_refused} of {check.calibration_frames} "
            f"validation frames (level {check.spec.level:g})")
    else:
        log(absent or "no in-distribution check")
    model.to("cpu")
    certification = bundle_certification(model, config)
    metadata = {"temperature": temperature, "certification": certification, "training": training}
    if absent is not None:
        metadata["in_distribution_absent"] = absent
    path = save_bundle(out, model, metadata, in_distribution=check)
    summary = (
        f"saved bundle {path} ({config.arch}, best epoch {result.best_epoch}/{result.epochs_run}, "
        f"temperature {temperature:.3f}, certified by {certification['method']}"
    )
    if "lipschitz_constant" in certification:
        summary += f" with L = {certification['lipschitz_constant']:.4g}"
    if training["val_balanced_accuracy"] is not None:
        summary += f", validation balanced accuracy {training['val_balanced_accuracy']:.3f}"
    log(summary + ")")
    return TrainedBundle(path=path, fit=result, temperature=temperature, training=training,
                         in_distribution=check, in_distribution_absent=absent)
