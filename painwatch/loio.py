"""Leave-one-individual-out (LOIO) evaluation: ``painwatch loio DATA --out RUN``.

Each individual is left out once (scikit-learn's ``LeaveOneGroupOut``): a model is trained on the
others and predicts every frame of the left-out one. Inside each fold, a few training individuals are
held out as an inner validation split (``GroupShuffleSplit``: whole individuals, never frames) for
early stopping and temperature scaling. No individual is ever on two sides of a split, so the pooled
metrics answer "how well does the classifier work on a macaque it has never seen?".

Guarantees:
- Deterministic: fold ``k`` draws every random number from seeds derived from ``(seed, k)`` only, so
  a fold gives the same predictions whether it runs in one go or after ``--resume``.
- Resumable: each finished fold writes its checkpoint and then, atomically, ``result.json``; a fold
  with a ``result.json`` is done. ``--resume`` skips done folds and refuses to continue when the
  settings or the data differ from the saved ``config.json`` (it names the differences).
- ``--cache-features``: the backbone is frozen; features of all frames are computed once (eval
  transform) into ``RUN/features.safetensors`` and every fold trains only the linear head on them.
- Outputs in RUN: ``predictions.csv`` (one row per frame), ``metrics.json``, ``report.md`` +
  ``report.html`` + PNGs, ``config.json``, ``folds/fold_XX/`` (checkpoint + ``result.json``).
  Everything is written atomically (temporary file + ``os.replace``).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from painwatch import CLASS_NAMES
from painwatch.data.hashing import records_digest
from painwatch.data.splits import Fold, fold_seed, loio_folds
from painwatch.io import atomic_write_json, atomic_write_text
from painwatch.train import TrainConfig, add_training_arguments, train_config_from_args

CONFIG_FILE = "config.json"
FEATURES_FILE = "features.safetensors"
PREDICTIONS_FILE = "predictions.csv"
METRICS_FILE = "metrics.json"
FOLDS_DIR = "folds"
RESULT_FILE = "result.json"
HEAD_FILE = "head.safetensors"
RUN_FORMAT = "painwatch-loio-1"

#: Settings that may change between a run and its ``--resume``: they do not change what a fold computes
#: (the device can change float rounding only; the bootstrap and bins only change the pooled summary).
RESUME_FREE_SETTINGS = frozenset(
    {"device", "max_folds", "progress", "num_workers", "bootstrap_reps", "num_bins"}
)

#: Settings that runs saved before they existed were trained with (``painwatch loio`` then had no option
#: for them): ``--resume`` compares a saved ``config.json`` that lacks one of them as if it held this value.
IMPLIED_BY_OLDER_RUNS: dict[str, Any] = {
    "schedule": "cosine",
    "warmup_epochs": 1.0,
    "monitor": "val_loss",
    "margin": 1.0,
    "num_draws": 4,
    "margin_weight": 1.0,
    "label_smoothing": 0.0,
    "augment": 1.0,
    "validate_under_noise": True,
    "max_grad_norm": 5.0,
    "drop_rate": 0.0,
    "amp": True,
}

_TRAIN = TrainConfig()  # the defaults of the training fields


class LoioError(RuntimeError):
    """A LOIO run cannot start or continue (bad settings, a mismatching run folder, ...)."""


# ----------------------------------------------------------------------------------------------
# Settings and the run folder
# ----------------------------------------------------------------------------------------------
@dataclass
class LoioSettings:
    """Everything that defines a LOIO run; saved in ``config.json`` and checked on ``--resume``.

    Every field that :class:`painwatch.train.TrainConfig` also has (see :data:`TRAINING_FIELDS`) has its
    meaning, units and default and is handed to each fold's training; ``weights`` is TrainConfig's
    ``weights_path``, and fold ``k`` trains with ``fold_seed(seed, k)``. ``patience=None`` trains every
    epoch. With ``cache_features`` the backbone is frozen and only the head is trained (``head_epochs``
    L-BFGS rounds, L2 penalty ``head_l2``, ``label_smoothing``, ``class_balance``, ``monitor`` and
    ``patience`` apply); ``loss`` must then be ``"ce"`` and ``noise_sigma`` 0 (pixel noise cannot be
    applied to cached features), and the fine-tuning fields have no effect.
    """

    data: str
    out: str
    arch: str = _TRAIN.arch
    pretrained: bool = _TRAIN.pretrained
    weights: str | None = _TRAIN.weights_path
    input_size: int = _TRAIN.input_size
    epochs: int = _TRAIN.epochs
    batch_size: int = _TRAIN.batch_size
    lr: float = _TRAIN.lr
    weight_decay: float = _TRAIN.weight_decay
    schedule: str = _TRAIN.schedule
    warmup_epochs: float = _TRAIN.warmup_epochs
    patience: int | None = _TRAIN.patience
    monitor: str = _TRAIN.monitor
    class_balance: str = _TRAIN.class_balance
    loss: str = _TRAIN.loss
    noise_sigma: float = _TRAIN.noise_sigma
    margin: float = _TRAIN.margin
    num_draws: int = _TRAIN.num_draws
    margin_weight: float = _TRAIN.margin_weight
    label_smoothing: float = _TRAIN.label_smoothing
    augment: float = _TRAIN.augment
    validate_under_noise: bool = _TRAIN.validate_under_noise
    max_grad_norm: float | None = _TRAIN.max_grad_norm
    drop_rate: float = _TRAIN.drop_rate
    amp: bool = _TRAIN.amp
    head_epochs: int = _TRAIN.head_epochs
    head_l2: float = _TRAIN.head_l2
    seed: int = _TRAIN.seed
    cache_features: bool = False
    inner_val_individuals: int | None = None
    inner_val_fraction: float = 0.2
    bootstrap_reps: int = 1000
    num_bins: int = 15
    device: str = _TRAIN.device
    max_folds: int | None = None
    num_workers: int = _TRAIN.num_workers
    progress: bool = True

    def validate(self) -> LoioSettings:
        """Check the LOIO-specific settings (training ones are checked by ``TrainConfig``)."""
        if self.max_folds is not None and (isinstance(self.max_folds, bool) or self.max_folds < 1):
            raise ValueError(f"max_folds must be None or an integer >= 1; got {self.max_folds!r}")
        if isinstance(self.bootstrap_reps, bool) or self.bootstrap_reps < 1:
            raise ValueError(f"bootstrap_reps must be an integer >= 1; got {self.bootstrap_reps!r}")
        if isinstance(self.num_bins, bool) or self.num_bins < 1:
            raise ValueError(f"num_bins must be an integer >= 1; got {self.num_bins!r}")
        if self.cache_features and (self.loss != "ce" or self.noise_sigma > 0):
            raise ValueError(
                f"--cache-features trains a head on fixed features, where pixel noise cannot be applied: "
                f"it needs --loss ce and --noise-sigma 0 (got loss={self.loss!r}, "
                f"noise_sigma={self.noise_sigma})"
            )
        if self.loss != "ce" and self.noise_sigma <= 0:
            raise ValueError(f"loss {self.loss!r} maximises the margin under noise: it needs noise_sigma > 0")
        self.train_config(self.seed)  # validates the training fields, naming any bad one
        return self

    def train_config(self, seed: int, device: str | None = None) -> TrainConfig:
        """The :class:`painwatch.train.TrainConfig` of a fold trained with ``seed``: every field in
        :data:`TRAINING_FIELDS` as set here, ``weights_path=weights``, ``device`` when given."""
        values = {name: getattr(self, name) for name in TRAINING_FIELDS}
        values.update(seed=int(seed), device=device or self.device, weights_path=self.weights)
        return TrainConfig(**values)

    def checked(self) -> dict[str, Any]:
        """The settings that must match for ``--resume`` (everything that can change a fold)."""
        values = dataclasses.asdict(self)
        for key in (*RESUME_FREE_SETTINGS, "out", "data"):
            values.pop(key)
        return values


#: The :class:`LoioSettings` fields that are :class:`painwatch.train.TrainConfig` fields of the same name.
TRAINING_FIELDS: tuple[str, ...] = tuple(
    f.name
    for f in dataclasses.fields(LoioSettings)
    if f.name in {g.name for g in dataclasses.fields(TrainConfig)}
)


def _differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    keys = sorted(set(saved) | set(current))
    return [
        f"{key}: the run has {saved.get(key, '<unset>')!r}, now {current.get(key, '<unset>')!r}"
        for key in keys
        if saved.get(key) != current.get(key)
    ]


def prepare_run_folder(run_dir: Path, config: dict[str, Any], resume: bool) -> None:
    """Create ``run_dir`` with ``config.json``, or check the saved one when resuming.

    A run folder in which no fold has finished yet is simply restarted with the new settings. Raises
    :class:`LoioError` when ``run_dir`` holds finished folds and ``resume`` is false, when it holds
    anything else, or when resuming with settings or data that differ from the saved run (listing
    every difference).
    """
    config_path = run_dir / CONFIG_FILE
    finished = sorted((run_dir / FOLDS_DIR).glob(f"fold_*/{RESULT_FILE}"))
    if config_path.is_file() and not finished:
        # A run that stopped before finishing any fold (e.g. a bad setting): nothing to protect, so it
        # starts afresh with the new settings; cached features of other settings are dropped.
        try:
            saved = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            saved = None
        if saved != config:
            (run_dir / FEATURES_FILE).unlink(missing_ok=True)
            atomic_write_json(config_path, config)
        return
    if config_path.is_file():
        if not resume:
            raise LoioError(
                f"{run_dir} already holds a LOIO run ({CONFIG_FILE}); pass --resume to continue it or "
                f"choose another --out"
            )
        try:
            saved = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            raise LoioError(f"cannot read {config_path}: {error}") from error
        problems = _differences({**IMPLIED_BY_OLDER_RUNS, **saved.get("settings", {})}, config["settings"])
        for key in ("format", "data_hash", "records_digest", "num_frames", "individuals"):
            if saved.get(key) != config.get(key):
                what = "the data differ" if key != "format" else "another run format"
                problems.append(f"{key} ({what}): the run has {saved.get(key)!r}, now {config.get(key)!r}")
        if problems:
            raise LoioError(
                f"refusing to resume {run_dir}: it was started with different settings or data:\n  - "
                + "\n  - ".join(problems)
            )
        return
    if run_dir.exists() and not run_dir.is_dir():
        raise LoioError(f"--out {run_dir} exists and is not a folder")
    if run_dir.is_dir() and any(run_dir.iterdir()):
        if resume:
            raise LoioError(
                f"cannot resume {run_dir}: it has no {CONFIG_FILE}, so it is not a LOIO run folder"
            )
        raise LoioError(f"--out {run_dir} exists and is not empty; choose a new folder")
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(config_path, config)


def fold_dir(run_dir: Path, index: int) -> Path:
    """The folder of fold ``index`` inside a run."""
    return run_dir / FOLDS_DIR / f"fold_{index:02d}"


def load_fold_result(run_dir: Path, fold: Fold) -> dict[str, Any] | None:
    """The saved result of ``fold``, or ``None`` when it has not finished. Checks it is that fold."""
    path = fold_dir(run_dir, fold.index) / RESULT_FILE
    if not path.is_file():
        return None
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise LoioError(
            f"fold result {path} is unreadable ({error}); delete its fold folder to rerun it"
        ) from error
    if (
        result.get("test_individual") != fold.test_individual
        or result.get("test_indices") != fold.test.tolist()
    ):
        raise LoioError(
            f"fold result {path} belongs to a different split; delete its fold folder to rerun it"
        )
    return result


# ----------------------------------------------------------------------------------------------
# Feature cache
# ----------------------------------------------------------------------------------------------
def _feature_cache_metadata(settings: LoioSettings, records_digest: str, data_hash: str) -> dict[str, str]:
    return {
        "format": "painwatch-loio-features-1",
        "arch": settings.arch,
        "input_size": str(settings.input_size),
        "pretrained": str(settings.pretrained),
        "weights": str(settings.weights),
        "seed": str(settings.seed),
        "records_digest": records_digest,
        "data_hash": data_hash,
    }


def cached_features(
    settings: LoioSettings, records: Sequence[Any], run_dir: Path, device: str, metadata: dict[str, str]
) -> tuple[np.ndarray, float, bool]:
    """Features ``(N, F)`` of every frame (eval transform, frozen backbone), computed once per run.

    Reads ``RUN/features.safetensors`` when it exists and was made from the same backbone and frames;
    otherwise extracts them with the model built from ``settings.seed`` and writes the file atomically.
    Returns ``(features, seconds spent extracting, whether they were read from the cache)``.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    from painwatch.runtime import seed_everything
    from painwatch.train import extract_features

    path = run_dir / FEATURES_FILE
    if path.is_file():
        with safe_open(str(path), framework="pt") as handle:
            saved = handle.metadata() or {}
            if saved != metadata:
                different = sorted(k for k in set(saved) | set(metadata) if saved.get(k) != metadata.get(k))
                raise LoioError(
                    f"{path} was computed with different settings or frames ({', '.join(different)}); "
                    f"delete it to recompute"
                )
            features = handle.get_tensor("features").numpy()
        if features.shape[0] != len(records):
            raise LoioError(f"{path} holds {features.shape[0]} rows for {len(records)} frames; delete it")
        return features, 0.0, True
    started = time.perf_counter()
    seed_everything(settings.seed)
    model = _create_model(settings, settings.seed)
    features, _ = extract_features(
        model,
        records,
        batch_size=settings.batch_size,
        device=device,
        num_workers=settings.num_workers,
        progress=settings.progress,
    )
    seconds = time.perf_counter() - started
    # safetensors writes in place: write a sibling temporary file and move it into place.
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file({"features": features.contiguous()}, str(temporary), metadata=metadata)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return features.numpy(), seconds, False


# ----------------------------------------------------------------------------------------------
# Training one fold
# ----------------------------------------------------------------------------------------------
def _create_model(settings: LoioSettings, seed: int):
    from painwatch.models import create_model

    return create_model(
        settings.arch,
        num_classes=len(CLASS_NAMES),
        pretrained=settings.pretrained,
        weights_path=settings.weights,
        input_size=settings.input_size,
        drop_rate=settings.drop_rate,
        seed=seed,
    )


def _to_numpy(values: Any) -> np.ndarray:
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=np.float64)


def _train_fold_finetune(
    settings: LoioSettings, records: Sequence[Any], fold: Fold, seed: int, device: str, directory: Path
) -> tuple[np.ndarray, np.ndarray, Any, str]:
    """Fine-tune a whole model; returns (validation logits, test logits, FitResult, checkpoint path)."""
    from painwatch.models import save_bundle
    from painwatch.runtime import seed_everything
    from painwatch.train import fit, predict_logits

    seed_everything(seed)
    model = _create_model(settings, seed)
    config = settings.train_config(seed, device)
    val_records = [records[i] for i in fold.validation]
    # fit reads the training records with the train transform of strength config.augment, seeded with
    # the fold's seed (augment 0: the eval transform).
    result = fit(model, [records[i] for i in fold.train], val_records, config, progress=settings.progress)
    # predict_logits reads records with the deterministic eval transform at the model's input size.
    test_logits = predict_logits(
        model,
        [records[i] for i in fold.test],
        batch_size=settings.batch_size,
        device=device,
        num_workers=settings.num_workers,
    )
    if result.val_logits is not None and (settings.noise_sigma == 0 or not settings.validate_under_noise):
        val_logits = result.val_logits
    else:
        # LOIO scores the network on clean frames, so its temperature is fitted on clean validation
        # logits too (fit validates a noise-trained model under its training noise, for early stopping).
        val_logits = predict_logits(
            model,
            val_records,
            batch_size=settings.batch_size,
            device=device,
            num_workers=settings.num_workers,
        )
    model.to("cpu")
    checkpoint = directory / "model"
    save_bundle(
        checkpoint,
        model,
        {
            "training": {
                "individuals": fold.individuals([r.individual for r in records], "train"),
                "validation_individuals": fold.individuals([r.individual for r in records], "validation"),
                "left_out_individual": fold.test_individual,
                "num_frames": len(fold.train),
                "loss": settings.loss,
                "noise_sigma": settings.noise_sigma,
                "margin": settings.margin,
                "num_draws": settings.num_draws,
                "epochs": settings.epochs,
                "epochs_run": result.epochs_run,
                "best_epoch": result.best_epoch,
                "lr": settings.lr,
                "schedule": settings.schedule,
                "class_balance": settings.class_balance,
                "augment": settings.augment,
                "seed": seed,
                "purpose": f"LOIO fold {fold.index} (evaluation only)",
            }
        },
    )
    return _to_numpy(val_logits), _to_numpy(test_logits), result, checkpoint.name


def _train_fold_head(
    settings: LoioSettings,
    features: np.ndarray,
    labels: np.ndarray,
    fold: Fold,
    seed: int,
    directory: Path,
) -> tuple[np.ndarray, np.ndarray, Any, str]:
    """Train the linear head on cached features; returns (validation logits, test logits, FitResult,
    checkpoint file name)."""
    import torch
    from safetensors.torch import save_file

    from painwatch.runtime import seed_everything
    from painwatch.train import fit_head

    seed_everything(seed)
    config = settings.train_config(seed, "cpu")
    result = fit_head(
        features[fold.train],
        labels[fold.train],
        features[fold.validation],
        labels[fold.validation],
        config,
        num_classes=len(CLASS_NAMES),
    )
    head = result.model
    with torch.no_grad():
        test_logits = head(torch.as_tensor(features[fold.test], dtype=torch.float32))
        val_logits = head(torch.as_tensor(features[fold.validation], dtype=torch.float32))
    path = directory / HEAD_FILE
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        state = {key: value.detach().contiguous() for key, value in head.state_dict().items()}
        save_file(
            state, str(temporary), metadata={"left_out_individual": fold.test_individual, "seed": str(seed)}
        )
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return _to_numpy(val_logits), _to_numpy(test_logits), result, path.name


def run_fold(
    settings: LoioSettings,
    records: Sequence[Any],
    fold: Fold,
    run_dir: Path,
    device: str,
    features: np.ndarray | None = None,
) -> dict[str, Any]:
    """Train, calibrate and evaluate one fold; write its checkpoint and ``result.json`` (last, atomically).

    The temperature is fitted on the inner-validation individuals' logits; the test logits of the
    left-out individual are stored raw (float64 JSON round-trips exactly) with that temperature.
    """
    from painwatch.calibration import fit_temperature, negative_log_likelihood

    started = time.perf_counter()
    seed = fold_seed(settings.seed, fold.index)
    directory = fold_dir(run_dir, fold.index)
    directory.mkdir(parents=True, exist_ok=True)
    labels = np.asarray([r.label for r in records], dtype=np.int64)
    groups = [r.individual for r in records]
    if features is not None:
        val_logits, test_logits, fit_result, checkpoint = _train_fold_head(
            settings, features, labels, fold, seed, directory
        )
    else:
        val_logits, test_logits, fit_result, checkpoint = _train_fold_finetune(
            settings, records, fold, seed, device, directory
        )
    val_labels = labels[fold.validation]
    temperature = fit_temperature(val_logits, val_labels)
    test_labels = labels[fold.test]
    result = {
        "fold": fold.index,
        "test_individual": fold.test_individual,
        "seed": seed,
        "mode": "head on cached features" if features is not None else "fine-tune",
        "train_individuals": fold.individuals(groups, "train"),
        "validation_individuals": fold.individuals(groups, "validation"),
        "num_train_frames": len(fold.train),
        "num_validation_frames": len(fold.validation),
        "test_indices": fold.test.tolist(),
        "test_paths": [str(records[i].path) for i in fold.test],
        "test_logits": test_logits.tolist(),
        "temperature": temperature,
        "validation": {
            "accuracy": float(np.mean(np.argmax(val_logits, axis=1) == val_labels)),
            "nll_before_scaling": negative_log_likelihood(val_logits, val_labels, 1.0),
            "nll_after_scaling": negative_log_likelihood(val_logits, val_labels, temperature),
            "classes_present": sorted({CLASS_NAMES[int(v)] for v in val_labels}),
        },
        "test_accuracy": float(np.mean(np.argmax(test_logits, axis=1) == test_labels)),
        "best_epoch": int(fit_result.best_epoch),
        "epochs_run": int(fit_result.epochs_run),
        "stopped_early": bool(fit_result.stopped_early),
        "history": fit_result.history,
        "checkpoint": checkpoint,
        "seconds": time.perf_counter() - started,
    }
    atomic_write_json(directory / RESULT_FILE, result)
    return result


# ----------------------------------------------------------------------------------------------
# The whole run
# ----------------------------------------------------------------------------------------------
@dataclass
class LoioOutcome:
    """What :func:`run_loio` did: folds done (in total and by this call) and, when complete, the outputs."""

    run_dir: Path
    num_folds: int
    folds_done: int
    folds_run_now: int
    complete: bool
    metrics: dict[str, Any] | None = None
    outputs: dict[str, Path] = dataclasses.field(default_factory=dict)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_loio(
    settings: LoioSettings,
    resume: bool = False,
    on_fold_done: Callable[[dict[str, Any]], None] | None = None,
    log: Callable[[str], None] = _log,
) -> LoioOutcome:
    """Run (or continue) a LOIO evaluation; write every output into ``settings.out``.

    ``on_fold_done`` is called with each fold's result right after its ``result.json`` is written
    (tests use it to simulate a crash). With ``settings.max_folds`` at most that many unfinished
    folds run in this call; the metrics and the report are written once every fold is done.

    Raises:
        painwatch.data.DataValidationError: the data have problems (every one is listed).
        LoioError: the run folder cannot be used (see :func:`prepare_run_folder`).
        ValueError: a bad setting, naming it.
    """
    from tqdm.auto import tqdm

    from painwatch.data import dataset_hash, load_records
    from painwatch.runtime import resolve_device

    settings.validate()
    started = time.perf_counter()
    run_dir = Path(settings.out)
    records = load_records(settings.data)
    groups = [r.individual for r in records]
    labels = np.asarray([r.label for r in records], dtype=np.int64)
    individuals = sorted(set(groups))
    folds = loio_folds(
        groups,
        inner_val_individuals=settings.inner_val_individuals,
        inner_val_fraction=settings.inner_val_fraction,
        seed=settings.seed,
    )
    class_counts = np.bincount(labels, minlength=len(CLASS_NAMES)).tolist()
    data_hash = dataset_hash(records)
    digest = records_digest(records)
    config = {
        "format": RUN_FORMAT,
        "settings": settings.checked(),
        "data": str(settings.data),
        "data_hash": data_hash,
        "records_digest": digest,
        "num_frames": len(records),
        "individuals": individuals,
        "class_counts": dict(zip(CLASS_NAMES, class_counts, strict=True)),
    }
    prepare_run_folder(run_dir, config, resume)
    device = str(resolve_device(settings.device))
    log(
        f"LOIO on {len(records)} frames of {len(individuals)} individuals "
        f"({', '.join(f'{n} {c}' for c, n in zip(CLASS_NAMES, class_counts, strict=True))}); "
        f"{len(folds)} folds, {'head on cached features' if settings.cache_features else 'fine-tuning'}, "
        f"{settings.arch} at {settings.input_size}px on {device}"
    )

    results: dict[int, dict[str, Any]] = {}
    for fold in folds:
        saved = load_fold_result(run_dir, fold)
        if saved is not None:
            results[fold.index] = saved
    if results:
        log(f"resuming: {len(results)} of {len(folds)} folds already done")

    features = None
    feature_seconds = 0.0
    pending = [fold for fold in folds if fold.index not in results]
    if settings.cache_features and pending:
        metadata = _feature_cache_metadata(settings, digest, data_hash)
        features, feature_seconds, from_cache = cached_features(settings, records, run_dir, device, metadata)
        log(
            f"features {features.shape} "
            + ("read from the cache" if from_cache else f"extracted once in {feature_seconds:.1f} s")
        )
    run_now = 0
    bar = tqdm(
        total=len(folds),
        initial=len(results),
        desc="LOIO folds",
        unit="fold",
        file=sys.stderr,
        disable=not settings.progress,
        dynamic_ncols=True,
    )
    try:
        for fold in pending:
            if settings.max_folds is not None and run_now >= settings.max_folds:
                break
            bar.set_postfix(individual=fold.test_individual)
            result = run_fold(settings, records, fold, run_dir, device, features)
            results[fold.index] = result
            run_now += 1
            bar.update(1)
            log(
                f"fold {fold.index + 1}/{len(folds)} ({fold.test_individual}): test accuracy "
                f"{result['test_accuracy']:.3f} on {len(fold.test)} frames, temperature "
                f"{result['temperature']:.3f}, {result['seconds']:.1f} s"
            )
            if on_fold_done is not None:
                on_fold_done(result)
    finally:
        bar.close()

    outcome = LoioOutcome(run_dir, len(folds), len(results), run_now, len(results) == len(folds))
    if not outcome.complete:
        log(
            f"{len(results)} of {len(folds)} folds done; run again with --resume to continue "
            f"(the report is written when every fold is done)"
        )
        return outcome
    metrics, outputs = write_outputs(settings, records, folds, results, config, run_dir, device)
    metrics["timing"] = {
        "seconds_this_call": time.perf_counter() - started,
        "feature_extraction_seconds_this_call": feature_seconds,
        "fold_seconds_total": float(sum(r["seconds"] for r in results.values())),
    }
    atomic_write_json(outputs["metrics"], metrics)
    outcome.metrics, outcome.outputs = metrics, outputs
    pooled = metrics["evaluation"]["pooled"]
    log(
        f"done: accuracy {pooled['accuracy']:.3f}, balanced accuracy {pooled['balanced_accuracy']:.3f}, "
        f"pain precision {_fmt(pooled['per_class']['pain']['precision'])}, pain recall "
        f"{_fmt(pooled['per_class']['pain']['recall'])} over {len(records)} frames; report: {outputs['html']}"
    )
    return outcome


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def write_outputs(
    settings: LoioSettings,
    records: Sequence[Any],
    folds: Sequence[Fold],
    results: dict[int, dict[str, Any]],
    config: dict[str, Any],
    run_dir: Path,
    device: str,
) -> tuple[dict[str, Any], dict[str, Path]]:
    """Pool the fold results: ``predictions.csv``, ``metrics.json`` and the report. Deterministic in
    the fold results and the settings (the bootstrap is seeded with ``settings.seed``)."""
    from painwatch.calibration import calibrated_probabilities
    from painwatch.data import is_synthetic
    from painwatch.metrics import evaluate
    from painwatch.report import PUBLISHED_REFERENCE, write_loio_report

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
        raise LoioError(f"{int(np.sum(fold_of < 0))} frames have no prediction (e.g. {missing})")
    labels = np.asarray([r.label for r in records], dtype=np.int64)
    groups = np.asarray([r.individual for r in records])
    predictions = np.argmax(probabilities, axis=1)
    evaluation = evaluate(
        labels,
        probabilities,
        groups,
        predictions,
        CLASS_NAMES,
        settings.num_bins,
        settings.bootstrap_reps,
        0.95,
        settings.seed,
    )

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(
        ["path", "individual", "label", "label_name", "fold", "video", "time_s"]
        + [f"logit_{name}" for name in CLASS_NAMES]
        + ["temperature"]
        + [f"prob_{name}" for name in CLASS_NAMES]
        + ["predicted", "predicted_name", "correct"]
    )
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
                "best epoch": result["best_epoch"],
                "epochs run": result["epochs_run"],
                "seconds": result["seconds"],
            }
        )
    synthetic = is_synthetic(settings.data)
    metrics = {
        "format": RUN_FORMAT,
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
        "folds": fold_rows,
    }
    outputs["metrics"] = atomic_write_json(run_dir / METRICS_FILE, metrics)
    run_info = {
        "data": str(settings.data),
        "synthetic": synthetic,
        "data hash (SHA-256)": config["data_hash"][:16] + "…",
        "frames used": num_frames,
        "individuals": len(set(groups.tolist())),
        "frames per class": ", ".join(f"{k} {v}" for k, v in config["class_counts"].items()),
        "architecture": settings.arch,
        "initial weights": settings.weights or ("ImageNet (hub)" if settings.pretrained else "random init"),
        "mode": "linear head on cached frozen-backbone features"
        if settings.cache_features
        else "fine-tuning",
        "input size (px)": settings.input_size,
        **(
            {"head L-BFGS rounds (max)": settings.head_epochs, "head L2": settings.head_l2}
            if settings.cache_features
            else {
                "epochs (max)": settings.epochs,
                "patience": settings.patience,
                "loss": settings.loss
                + (
                    f" (margin d {settings.margin}, {settings.num_draws} noise draws"
                    + (f", weight {settings.margin_weight})" if settings.loss == "ce+mc_margin" else ")")
                    if settings.loss != "ce"
                    else ""
                ),
                "noise sigma": settings.noise_sigma,
                "learning rate": (
                    f"{settings.lr:g} ({settings.schedule}, warm-up {settings.warmup_epochs:g} epochs)"
                ),
                "augmentation strength": settings.augment,
            }
        ),
        "inner validation": (
            f"{settings.inner_val_individuals} individuals"
            if settings.inner_val_individuals is not None
            else f"{settings.inner_val_fraction:.0%} of the training individuals"
        ),
        "seed": settings.seed,
        "device": device,
    }
    notes = []
    if not settings.weights and not settings.pretrained:
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
    outputs.update(write_loio_report(run_dir, evaluation, run_info, fold_rows, notes=notes))
    return metrics, outputs


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``painwatch loio`` to the CLI: its own options plus every training option of ``painwatch
    train`` (:func:`painwatch.train.add_training_arguments`, with the cached-features head options)."""
    defaults = LoioSettings(data="", out="")
    parser = subparsers.add_parser(
        "loio",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="leave-one-individual-out evaluation with per-fold checkpoints, metrics and a report",
        description=(
            "Leave-one-individual-out evaluation on DATA (folder DATA/<individual>/<label>/* or a manifest "
            "CSV): one fold per individual, an inner validation split by individual for early stopping "
            "and temperature scaling. Writes predictions.csv, metrics.json and report.md/.html with PNGs "
            "into RUN. Resumable with --resume. Each fold trains with the training options below, the "
            "same as `painwatch train`'s."
        ),
    )
    parser.add_argument("data", help="data folder or manifest CSV")
    parser.add_argument(
        "--out", required=True, metavar="RUN", help="run folder (created; must be new or --resume)"
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in RUN, skipping finished folds; refused when a setting that can change a "
        "fold differs from the run's",
    )
    parser.add_argument(
        "--cache-features",
        action="store_true",
        help="freeze the backbone: extract features once, train only the linear head in every fold "
        "(needs --loss ce and --noise-sigma 0)",
    )
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--inner-val-individuals",
        type=int,
        default=defaults.inner_val_individuals,
        help="number of training individuals held out for validation in each fold",
    )
    group.add_argument(
        "--inner-val-fraction",
        type=float,
        default=defaults.inner_val_fraction,
        help="fraction of training individuals held out for validation (rounded up)",
    )
    parser.add_argument(
        "--bootstrap-reps",
        type=int,
        default=defaults.bootstrap_reps,
        help="cluster-bootstrap replicates for the 95%% intervals",
    )
    parser.add_argument(
        "--max-folds",
        type=int,
        default=defaults.max_folds,
        help="run at most this many unfinished folds now, then stop (continue later with --resume)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    add_training_arguments(parser, defaults.train_config(defaults.seed), head=True)
    parser.set_defaults(func=_loio_command)


def settings_from_args(args: argparse.Namespace) -> LoioSettings:
    """The :class:`LoioSettings` of parsed ``painwatch loio`` arguments (training options go through
    :func:`painwatch.train.train_config_from_args`, so they mean exactly what they mean for ``train``).

    Raises:
        ValueError: a bad training option, naming it.
    """
    config = train_config_from_args(args)
    return LoioSettings(
        data=str(args.data),
        out=str(args.out),
        **{name: getattr(config, name) for name in TRAINING_FIELDS},
        weights=config.weights_path,
        cache_features=bool(args.cache_features),
        inner_val_individuals=args.inner_val_individuals,
        inner_val_fraction=args.inner_val_fraction,
        bootstrap_reps=args.bootstrap_reps,
        max_folds=args.max_folds,
        progress=not args.quiet,
    )


def _loio_command(args: argparse.Namespace) -> int:
    from painwatch.data import DataValidationError
    from painwatch.models import ModelWeightsError

    try:
        outcome = run_loio(settings_from_args(args), resume=bool(args.resume))
    except DataValidationError as error:
        print(f"painwatch loio: the data have problems:\n{error}", file=sys.stderr)
        return 1
    except (LoioError, ModelWeightsError, ValueError, OSError, FloatingPointError) as error:
        print(f"painwatch loio: error: {error}", file=sys.stderr)
        return 2
    if outcome.complete:
        print(f"report: {outcome.outputs['html']}")
        print(f"metrics: {outcome.outputs['metrics']}")
        print(f"predictions: {outcome.outputs['predictions']}")
    return 0
