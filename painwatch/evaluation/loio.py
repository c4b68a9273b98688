"""Leave-one-individual-out (LOIO) evaluation: :func:`run_loio`.

Each individual is left out once (scikit-learn's ``LeaveOneGroupOut``): a model is trained on the
others and predicts every frame of the left-out one. Inside each fold, a few training individuals are
held out as an inner validation split (``GroupShuffleSplit``: whole individuals, never frames) for
early stopping and temperature scaling [Guo17]. No individual is ever on two sides of a split, so the
pooled metrics answer "how well does the classifier work on a macaque it has never seen?"

Guarantees:
- Deterministic: fold ``k`` draws every random number from seeds derived from ``(seed, k)`` only, so
  a fold gives the same predictions whether it runs in one go or after ``--resume``.
- Resumable: each finished fold writes its checkpoint and then, atomically, ``result.json``; a fold
  with a ``result.json`` is done. ``--resume`` skips done folds and refuses to continue when the
  settings or the data differ from the saved ``config.json`` (it names the differences).
- A Lipschitz architecture (``lip-...``) is also certified per fold: each left-out frame gets its
  Lipschitz-margin radius from the logits already computed (one forward pass,
  :mod:`painwatch.evaluation.lipschitz_folds`).
- ``cache_features``: the backbone is frozen; features of all frames are computed once (eval
  transform) into ``RUN/features.safetensors`` and every fold trains only the linear head on them.
- In-distribution check (:mod:`painwatch.evaluation.loio_checks`): each fold fits one on its training
  individuals, sets its threshold on its inner-validation individuals and records which of the
  left-out individual's frames it refuses (``result.json``'s ``in_distribution``).
- Outputs in RUN (:mod:`painwatch.evaluation.outputs`): ``predictions.csv`` (one row per frame),
  ``metrics.json``, ``report.md`` + ``report.html`` + PNGs, ``config.json``, ``folds/fold_XX/``
  (checkpoint + ``result.json``). Everything is written atomically (temporary file + ``os.replace``).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes
from tqdm.auto import tqdm

from painwatch import CLASS_NAMES
from painwatch.calibration import fit_temperature, negative_log_likelihood
from painwatch.data import FrameRecord, dataset_hash, load_records
from painwatch.data.hashing import records_digest
from painwatch.data.splits import Fold, fold_seed, loio_folds
from painwatch.evaluation.distributed import fold_results
from painwatch.evaluation.lipschitz_folds import fold_lipschitz_certificates
from painwatch.evaluation.loio_checks import cached_descriptors, cached_fold_check, finetuned_fold_check
from painwatch.evaluation.outputs import write_outputs
from painwatch.evaluation.settings import LoioSettings, saved_settings_as_checked
from painwatch.inference.bulk_settings import DistributedSettings
from painwatch.io import atomic_write_bytes, atomic_write_json
from painwatch.models import is_lipschitz_architecture, save_bundle
from painwatch.runtime import resolve_device, seed_everything
from painwatch.training.batches import extract_features, predict_logits
from painwatch.training.bundle import new_model, training_record
from painwatch.training.head import fit_head
from painwatch.training.loops import FitResult, fit

CONFIG_FILE = "config.json"
FEATURES_FILE = "features.safetensors"
FOLDS_DIR = "folds"
RESULT_FILE = "result.json"
HEAD_FILE = "head.safetensors"
RUN_FORMAT = "painwatch-loio-1"


class LoioError(RuntimeError):
    """A LOIO run cannot start or continue (bad settings, a mismatching run folder, ...)."""


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
        problems = _differences(saved_settings_as_checked(saved.get("settings", {})), config["settings"])
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


def _feature_cache_metadata(settings: LoioSettings, digest: str, data_hash: str) -> dict[str, str]:
    train = settings.train
    return {
        "format": "painwatch-loio-features-1",
        "arch": train.arch,
        "input_size": str(train.input_size),
        "pretrained": str(train.pretrained),
        "weights": str(train.weights_path),
        "seed": str(train.seed),
        "records_digest": digest,
        "data_hash": data_hash,
    }


def _save_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    # safetensors writes in place; its bytes go through the atomic writer instead.
    contiguous = {key: value.detach().to("cpu").contiguous() for key, value in tensors.items()}
    atomic_write_bytes(path, safetensors_bytes(contiguous, metadata=metadata))


def cached_features(
    settings: LoioSettings,
    records: Sequence[FrameRecord],
    run_dir: Path,
    *,
    device: str,
    metadata: dict[str, str],
) -> tuple[np.ndarray, float, bool]:
    """Features ``(N, F)`` of every frame (eval transform, frozen backbone), computed once per run.

    Reads ``RUN/features.safetensors`` when it exists and was made from the same backbone and frames;
    otherwise extracts them with the model built from ``train.seed`` and writes the file atomically.
    Returns ``(features, seconds spent extracting, whether they were read from the cache)``.
    """
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
    seed_everything(settings.train.seed)
    model = new_model(settings.train)
    features, _ = extract_features(
        model,
        records,
        batch_size=settings.train.batch_size,
        device=device,
        num_workers=settings.train.num_workers,
        progress=settings.progress,
    )
    seconds = time.perf_counter() - started
    _save_safetensors(path, {"features": features}, metadata)
    return features.numpy(), seconds, False


def _to_numpy(values: Any) -> np.ndarray:
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=np.float64)


def _train_fold_finetune(
    settings: LoioSettings,
    records: Sequence[FrameRecord],
    fold: Fold,
    seed: int,
    device: str,
    directory: Path,
) -> tuple[np.ndarray, np.ndarray, FitResult, str, dict[str, Any]]:
    """Fine-tune a whole model; returns (validation logits, test logits, FitResult, checkpoint name, the
    in-distribution check's result entry)."""
    config = settings.fold_config(seed, device)
    seed_everything(seed)
    model = new_model(config)
    fit_records = [records[i] for i in fold.train]
    val_records = [records[i] for i in fold.validation]
    # fit reads the training records with the train transform of strength config.augment, seeded with
    # the fold's seed (augment 0: the eval transform).
    result = fit(model, fit_records, val_records, config=config, progress=settings.progress)
    evaluate = {"batch_size": config.batch_size, "device": device, "num_workers": config.num_workers}
    test_logits = predict_logits(model, [records[i] for i in fold.test], **evaluate)
    if result.val_logits is not None and (config.noise_sigma == 0 or not config.validate_under_noise):
        val_logits = result.val_logits
    else:
        # LOIO scores the network on clean frames, so its temperature is fitted on clean validation
        # logits too (fit validates a noise-trained model under its training noise, for early stopping).
        val_logits = predict_logits(model, val_records, **evaluate)
    check, check_entry = finetuned_fold_check(model, records, fold, config=config, device=device)
    model.to("cpu")
    checkpoint = directory / "model"
    training = training_record(
        config,
        result,
        fit_records=fit_records,
        validation_records=val_records,
        left_out_individual=fold.test_individual,
        purpose=f"LOIO fold {fold.index} (evaluation only)",
    )
    save_bundle(checkpoint, model, {"training": training}, in_distribution=check)
    return _to_numpy(val_logits), _to_numpy(test_logits), result, checkpoint.name, check_entry


def _train_fold_head(
    settings: LoioSettings, features: np.ndarray, labels: np.ndarray, fold: Fold, seed: int, directory: Path
) -> tuple[np.ndarray, np.ndarray, FitResult, str]:
    """Train the linear head on cached features; returns (validation logits, test logits, FitResult,
    checkpoint file name)."""
    seed_everything(seed)
    config = settings.fold_config(seed, "cpu")
    result = fit_head(
        features[fold.train],
        labels[fold.train],
        val_features=features[fold.validation],
        val_labels=labels[fold.validation],
        config=config,
        num_classes=len(CLASS_NAMES),
    )
    head = result.model
    with torch.no_grad():
        test_logits = head(torch.as_tensor(features[fold.test], dtype=torch.float32))
        val_logits = head(torch.as_tensor(features[fold.validation], dtype=torch.float32))
    path = directory / HEAD_FILE
    metadata = {"left_out_individual": fold.test_individual, "seed": str(seed)}
    _save_safetensors(path, head.state_dict(), metadata)
    return _to_numpy(val_logits), _to_numpy(test_logits), result, path.name


def run_fold(
    settings: LoioSettings,
    records: Sequence[FrameRecord],
    fold: Fold,
    *,
    run_dir: Path,
    device: str,
    features: np.ndarray | None = None,
    descriptors: tuple[Any, dict[str, np.ndarray]] | None = None,
) -> dict[str, Any]:
    """Train, calibrate and evaluate one fold; write its checkpoint and ``result.json`` (last, atomically).

    ``descriptors`` (the frozen backbone and its descriptors of every frame, with ``features``) give the
    fold's in-distribution check on cached features.

    The temperature is fitted on the inner-validation individuals' logits; the test logits of the
    left-out individual are stored raw (float64 JSON round-trips exactly) with that temperature.
    """
    started = time.perf_counter()
    seed = fold_seed(settings.train.seed, fold.index)
    directory = fold_dir(run_dir, fold.index)
    directory.mkdir(parents=True, exist_ok=True)
    labels = np.asarray([r.label for r in records], dtype=np.int64)
    groups = [r.individual for r in records]
    if features is not None:
        val_logits, test_logits, fit_result, checkpoint = _train_fold_head(
            settings, features, labels, fold, seed, directory
        )
        check_entry = (cached_fold_check(descriptors[1], groups, fold, model=descriptors[0])
                       if descriptors is not None
                       else {"available": False, "note": "no descriptors of the frozen backbone"})
    else:
        val_logits, test_logits, fit_result, checkpoint, check_entry = _train_fold_finetune(
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
        "in_distribution": check_entry,
    }
    if features is None and is_lipschitz_architecture(settings.train.arch):
        result["lipschitz"] = fold_lipschitz_certificates(directory / checkpoint, test_logits, test_labels)
    result["seconds"] = time.perf_counter() - started
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
    outputs: dict[str, Path] = field(default_factory=dict)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_loio(
    settings: LoioSettings,
    *,
    resume: bool = False,
    on_fold_done: Callable[[dict[str, Any]], None] | None = None,
    log: Callable[[str], None] = _log,
    cluster: DistributedSettings | None = None,
) -> LoioOutcome:
    """Run (or continue) a LOIO evaluation; write every output into ``settings.out``.

    ``on_fold_done`` is called with each fold's result right after its ``result.json`` is written
    (tests use it to simulate a crash). With ``settings.max_folds`` at most that many unfinished
    folds run in this call; the metrics and the report are written once every fold is done. With
    ``cluster`` on Ray, every fold is a Ray task (:func:`painwatch.evaluation.distributed.fold_results`)
    and the run ends with the predictions and metrics of a local run.

    Raises:
        painwatch.data.DataValidationError: the data have problems (every one is listed).
        LoioError: the run folder cannot be used (see :func:`prepare_run_folder`).
        ValueError: a bad setting, naming it.
    """
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
        seed=settings.train.seed,
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
    device = str(resolve_device(settings.train.device))
    log(
        f"LOIO on {len(records)} frames of {len(individuals)} individuals "
        f"({', '.join(f'{n} {c}' for c, n in zip(CLASS_NAMES, class_counts, strict=True))}); "
        f"{len(folds)} folds, {'head on cached features' if settings.cache_features else 'fine-tuning'}, "
        f"{settings.train.arch} at {settings.train.input_size}px on {device}"
    )

    results: dict[int, dict[str, Any]] = {}
    for fold in folds:
        saved = load_fold_result(run_dir, fold)
        if saved is not None:
            results[fold.index] = saved
    if results:
        log(f"resuming: {len(results)} of {len(folds)} folds already done")

    features = descriptors = None
    feature_seconds = 0.0
    pending = [fold for fold in folds if fold.index not in results]
    if settings.cache_features and pending:
        metadata = _feature_cache_metadata(settings, digest, data_hash)
        features, feature_seconds, from_cache = cached_features(settings, records, run_dir, device=device,
                                                                metadata=metadata)
        log(
            f"features {features.shape} "
            + ("read from the cache" if from_cache else f"extracted once in {feature_seconds:.1f} s")
        )
        descriptors = cached_descriptors(settings.train, records, run_dir, device=device, metadata=metadata)
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
    # Here one fold after the other; on Ray every fold at once, the results as they finish.
    now = pending[: settings.max_folds or len(pending)]
    finished = fold_results(run_fold, records, now, settings=settings, run_dir=run_dir, device=device,
                            features=features, descriptors=descriptors, cluster=cluster, log=log)
    try:
        for result in finished:
            fold = next(f for f in pending if f.index == result["fold"])
            if not (fold_dir(run_dir, fold.index) / RESULT_FILE).is_file():  # written on a worker's own disk
                atomic_write_json(fold_dir(run_dir, fold.index) / RESULT_FILE, result)
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
        finished.close()  # stops Ray's remaining folds at once when a fold (or the caller) fails
        bar.close()

    outcome = LoioOutcome(run_dir, len(folds), len(results), run_now, len(results) == len(folds))
    if not outcome.complete:
        log(
            f"{len(results)} of {len(folds)} folds done; run again with --resume to continue "
            f"(the report is written when every fold is done)"
        )
        return outcome
    metrics, outputs = write_outputs(settings, records, folds, results=results, config=config,
                                     run_dir=run_dir, device=device)
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


