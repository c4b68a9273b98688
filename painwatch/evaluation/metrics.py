"""Classification metrics for pooled LOIO predictions, with confidence intervals by individual.

Conventions:
- ``labels``: ``(N,)`` integer true classes in ``[0, K)``; ``probabilities``: ``(N, K)`` rows that sum
  to 1, or ``(N,)`` for the binary task (the probability of class 1, ``pain``).
- The predicted class is the arg-max of the probabilities (ties go to the lower index, i.e. to
  ``no_pain`` in the binary task) unless explicit ``predictions`` are given.
- Pain (class 1) is the safety-critical class: its precision, recall (sensitivity) and F1 are reported
  on their own and bootstrapped.
- Metrics that are undefined on the data (ROC AUC with a single class present, precision with no
  predicted frame of that class, ...) are ``None`` in the results (``NaN`` inside the computation),
  never an exception and never a silent 0.

Point estimates come from scikit-learn. The cluster bootstrap (frames of one individual are not
independent: they share a face, a camera and a day) resamples *individuals* with replacement and
evaluates each replicate from per-individual sufficient statistics (confusion counts, calibration-bin
sums) that add up exactly to those of the concatenated resample; ROC AUC uses scikit-learn with the
individuals' multiplicities as sample weights, which equals the AUC of the concatenated resample.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    roc_auc_score,
    roc_curve,
)

from painwatch import CLASS_NAMES
from painwatch.validation import check_labels

#: Default number of equal-width confidence bins for ECE and the reliability diagram.
DEFAULT_NUM_BINS = 15
#: Default number of cluster-bootstrap replicates.
DEFAULT_BOOTSTRAP_REPS = 1000


# ----------------------------------------------------------------------------------------------
# Input validation
# ----------------------------------------------------------------------------------------------
def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def check_probabilities(probabilities: Any, num_samples: int | None = None) -> np.ndarray:
    """Return ``(N, K)`` float64 probabilities; a 1-D input is read as the binary P(class 1).

    Raises ``ValueError`` for wrong shapes, values outside ``[0, 1]``, non-finite values or rows that
    do not sum to 1 (tolerance 1e-4), naming the row.
    """
    array = _to_numpy(probabilities).astype(np.float64)
    if array.ndim == 1:
        bad = ~np.isfinite(array) | (array < 0.0) | (array > 1.0)
        if np.any(bad):
            index = int(np.flatnonzero(bad)[0])
            raise ValueError(
                f"probabilities of class 1 must be finite and in [0, 1]; found {array[index]} at row {index}"
            )
        array = np.stack([1.0 - array, array], axis=1)
    if array.ndim != 2 or array.shape[1] < 2:
        raise ValueError(f"probabilities must have shape (N,) or (N, K) with K >= 2; got {array.shape}")
    if num_samples is not None and array.shape[0] != num_samples:
        raise ValueError(f"probabilities have {array.shape[0]} rows but there are {num_samples} labels")
    bad_value = ~np.isfinite(array) | (array < 0.0) | (array > 1.0)
    if np.any(bad_value):
        row, column = (int(i) for i in np.argwhere(bad_value)[0])
        raise ValueError(
            f"probabilities must be finite and in [0, 1]; found {array[row, column]} at row {row}, "
            f"column {column}"
        )
    sums = array.sum(axis=1)
    bad_sum = np.abs(sums - 1.0) > 1e-4
    if np.any(bad_sum):
        row = int(np.flatnonzero(bad_sum)[0])
        raise ValueError(f"probabilities must sum to 1 per row; row {row} sums to {sums[row]:.6f}")
    return array


def check_groups(groups: Any, num_samples: int) -> np.ndarray:
    """Return the individual of each sample as a ``(N,)`` array of ``str``."""
    array = _to_numpy(groups)
    if array.ndim != 1 or array.shape[0] != num_samples:
        raise ValueError(f"groups must have shape ({num_samples},) to match the labels; got {array.shape}")
    return array.astype(str)


def predicted_classes(probabilities: np.ndarray) -> np.ndarray:
    """Arg-max class per row (ties to the lowest index) as int64."""
    return np.argmax(probabilities, axis=1).astype(np.int64)


def _prepare(
    labels: Any, probabilities: Any, predictions: Any | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    probs = check_probabilities(probabilities)
    num_classes = probs.shape[1]
    y = check_labels(labels, num_classes=num_classes)
    if y.shape[0] != probs.shape[0]:
        raise ValueError(f"labels have {y.shape[0]} entries but probabilities have {probs.shape[0]} rows")
    if y.shape[0] == 0:
        raise ValueError("no samples: labels and probabilities are empty")
    if predictions is None:
        pred = predicted_classes(probs)
    else:
        pred = check_labels(predictions, num_classes=num_classes, name="predictions")
        if pred.shape != y.shape:
            raise ValueError(f"predictions have shape {pred.shape}; expected {y.shape}")
    return y, probs, pred, num_classes


def _json_float(value: float) -> float | None:
    value = float(value)
    return None if math.isnan(value) else value


# ----------------------------------------------------------------------------------------------
# Calibration
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ReliabilityDiagram:
    """Per-bin calibration statistics of the top-label confidence.

    ``bin_edges`` has ``num_bins + 1`` entries from 0 to 1; bin ``b`` holds confidences in
    ``(edges[b], edges[b+1]]`` (the first bin also holds 0). ``mean_confidence`` and ``accuracy`` are
    NaN for empty bins. ``ece`` is ``sum_b counts[b] / N * |accuracy[b] - mean_confidence[b]|``.
    """

    bin_edges: np.ndarray
    counts: np.ndarray
    mean_confidence: np.ndarray
    accuracy: np.ndarray
    ece: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "bin_edges": [float(v) for v in self.bin_edges],
            "counts": [int(v) for v in self.counts],
            "mean_confidence": [_json_float(v) for v in self.mean_confidence],
            "accuracy": [_json_float(v) for v in self.accuracy],
            "ece": float(self.ece),
        }


def _bin_index(confidences: np.ndarray, num_bins: int) -> np.ndarray:
    # Bin b = (b/M, (b+1)/M]; confidence 0 goes to bin 0 (Guo et al. 2017, eq. 3).
    return np.clip(np.ceil(confidences * num_bins).astype(np.int64) - 1, 0, num_bins - 1)


def _check_num_bins(num_bins: int) -> int:
    if isinstance(num_bins, bool) or not isinstance(num_bins, (int, np.integer)) or num_bins < 1:
        raise ValueError(f"num_bins must be a positive integer; got {num_bins!r}")
    return int(num_bins)


def _bin_sums(confidences: np.ndarray, correct: np.ndarray, num_bins: int) -> np.ndarray:
    """``(3, num_bins)``: count, sum of confidences, sum of correct indicators per bin."""
    index = _bin_index(confidences, num_bins)
    return np.stack(
        [
            np.bincount(index, minlength=num_bins).astype(np.float64),
            np.bincount(index, weights=confidences, minlength=num_bins),
            np.bincount(index, weights=correct.astype(np.float64), minlength=num_bins),
        ]
    )


def _ece_from_bin_sums(sums: np.ndarray) -> np.ndarray:
    """ECE from bin sums of shape ``(..., 3, num_bins)``; NaN when the total count is 0."""
    counts, confidence_sum, correct_sum = sums[..., 0, :], sums[..., 1, :], sums[..., 2, :]
    total = counts.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.abs(correct_sum - confidence_sum).sum(axis=-1) / total


def reliability_diagram(
    labels: Any, probabilities: Any, *, num_bins: int = DEFAULT_NUM_BINS, predictions: Any | None = None
) -> ReliabilityDiagram:
    """Top-label reliability diagram and expected calibration error with equal-width bins.

    The confidence of a frame is the probability of its predicted class; it is "correct" when the
    predicted class is the true one. With ``M = num_bins`` equal-width bins over ``[0, 1]``,
    ``ECE = sum_b |B_b| / N * |acc(B_b) - conf(B_b)|`` (Guo et al. 2017). ECE lies in ``[0, 1]``.
    """
    num_bins = _check_num_bins(num_bins)
    y, probs, pred, _ = _prepare(labels, probabilities, predictions)
    confidences = probs[np.arange(len(pred)), pred]
    sums = _bin_sums(confidences, pred == y, num_bins)
    counts = sums[0]
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_confidence = np.where(counts > 0, sums[1] / counts, np.nan)
        accuracy = np.where(counts > 0, sums[2] / counts, np.nan)
    return ReliabilityDiagram(
        bin_edges=np.linspace(0.0, 1.0, num_bins + 1),
        counts=counts.astype(np.int64),
        mean_confidence=mean_confidence,
        accuracy=accuracy,
        ece=float(_ece_from_bin_sums(sums)),
    )


def expected_calibration_error(
    labels: Any, probabilities: Any, *, num_bins: int = DEFAULT_NUM_BINS, predictions: Any | None = None
) -> float:
    """Top-label ECE with ``num_bins`` equal-width bins (see :func:`reliability_diagram`)."""
    return reliability_diagram(labels, probabilities, num_bins=num_bins, predictions=predictions).ece


# ----------------------------------------------------------------------------------------------
# Point estimates (scikit-learn)
# ----------------------------------------------------------------------------------------------
def _class_names(num_classes: int, class_names: Sequence[str] | None) -> list[str]:
    if class_names is None:
        return list(CLASS_NAMES) if num_classes == len(CLASS_NAMES) else [str(k) for k in range(num_classes)]
    names = [str(name) for name in class_names]
    if len(names) != num_classes:
        raise ValueError(
            f"class_names has {len(names)} names but the probabilities have {num_classes} classes"
        )
    return names


def roc_auc(labels: Any, probabilities: Any) -> float | None:
    """ROC AUC; ``None`` when a class is missing from ``labels``.

    Binary: AUC of P(class 1). ``K > 2``: one-vs-rest macro average (scikit-learn).
    """
    y, probs, _, num_classes = _prepare(labels, probabilities, None)
    if len(np.unique(y)) < num_classes:
        return None
    if num_classes == 2:
        return float(roc_auc_score(y, probs[:, 1]))
    return float(roc_auc_score(y, probs, multi_class="ovr", average="macro", labels=list(range(num_classes))))


def roc_curve_points(
    labels: Any, probabilities: Any, positive_class: int = 1
) -> dict[str, list[float]] | None:
    """False/true positive rates of class ``positive_class`` vs the rest; ``None`` if a side is empty."""
    y, probs, _, num_classes = _prepare(labels, probabilities, None)
    if not 0 <= positive_class < num_classes:
        raise ValueError(f"positive_class must be in [0, {num_classes - 1}]; got {positive_class}")
    positive = y == positive_class
    if positive.all() or not positive.any():
        return None
    fpr, tpr, thresholds = roc_curve(positive.astype(int), probs[:, positive_class])
    return {"fpr": fpr.tolist(), "tpr": tpr.tolist(), "thresholds": np.minimum(thresholds, 1.0).tolist()}


def classification_metrics(
    labels: Any,
    probabilities: Any,
    *,
    predictions: Any | None = None,
    class_names: Sequence[str] | None = None,
    num_bins: int = DEFAULT_NUM_BINS,
) -> dict[str, Any]:
    """Pooled metrics as a JSON-ready dict.

    Keys: ``num_samples``, ``accuracy``, ``balanced_accuracy`` (mean recall over the classes present
    in ``labels``), ``macro_f1``, ``per_class`` (name -> precision, recall, f1, support),
    ``confusion_matrix`` (rows = true class, columns = predicted class, in class order),
    ``roc_auc`` (None with a single class), ``ece`` (top-label, ``num_bins`` equal-width bins).
    Undefined values are ``None``.
    """
    y, probs, pred, num_classes = _prepare(labels, probabilities, predictions)
    names = _class_names(num_classes, class_names)
    class_indices = list(range(num_classes))
    precision, recall, f1, support = precision_recall_fscore_support(
        y, pred, labels=class_indices, zero_division=np.nan
    )
    present = [k for k in class_indices if support[k] > 0]
    return {
        "num_samples": len(y),
        "accuracy": float(accuracy_score(y, pred)),
        # Mean recall over the classes present in the labels: balanced_accuracy_score's definition.
        "balanced_accuracy": float(np.mean(recall[present])) if present else None,
        "macro_f1": _json_float(f1_score(y, pred, labels=present, average="macro", zero_division=np.nan)),
        "per_class": {
            names[k]: {
                "precision": _json_float(precision[k]),
                "recall": _json_float(recall[k]),
                "f1": _json_float(f1[k]),
                "support": int(support[k]),
            }
            for k in class_indices
        },
        "confusion_matrix": confusion_matrix(y, pred, labels=class_indices).tolist(),
        "roc_auc": roc_auc(y, probs),
        "ece": reliability_diagram(y, probs, num_bins=num_bins, predictions=pred).ece,
    }


# ----------------------------------------------------------------------------------------------
# Scalar metrics from confusion counts (used by the bootstrap; tested equal to scikit-learn)
# ----------------------------------------------------------------------------------------------
def scalar_metric_names(class_names: Sequence[str]) -> list[str]:
    """Names of the bootstrapped scalar metrics, in a fixed order."""
    names = ["accuracy", "balanced_accuracy", "macro_f1"]
    for name in class_names:
        names += [f"precision_{name}", f"recall_{name}", f"f1_{name}"]
    return [*names, "roc_auc", "ece"]


def _metrics_from_confusion(confusion: np.ndarray) -> np.ndarray:
    """Scalar metrics from confusion matrices ``(..., K, K)`` (rows true, columns predicted).

    Returns ``(..., 3 + 3K)``: accuracy, balanced accuracy, macro F1, then precision, recall, F1 per
    class; NaN where undefined. Balanced accuracy and macro F1 average over the classes present in the
    true labels, as scikit-learn does for ``balanced_accuracy_score``.
    """
    confusion = confusion.astype(np.float64)
    true_positive = np.diagonal(confusion, axis1=-2, axis2=-1)
    support = confusion.sum(axis=-1)
    predicted = confusion.sum(axis=-2)
    total = support.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = true_positive.sum(axis=-1) / total
        precision = np.where(predicted > 0, true_positive / predicted, np.nan)
        recall = np.where(support > 0, true_positive / support, np.nan)
        f1 = np.where(support + predicted > 0, 2 * true_positive / (support + predicted), np.nan)
        present = support > 0
        num_present = present.sum(axis=-1)
        balanced = np.where(present, recall, 0.0).sum(axis=-1) / num_present
        macro_f1 = np.where(present, f1, 0.0).sum(axis=-1) / num_present
    per_class = np.stack([precision, recall, f1], axis=-1).reshape(*confusion.shape[:-2], -1)
    return np.concatenate([np.stack([accuracy, balanced, macro_f1], axis=-1), per_class], axis=-1)


# ----------------------------------------------------------------------------------------------
# Cluster bootstrap by individual
# ----------------------------------------------------------------------------------------------
def cluster_bootstrap_counts(num_groups: int, reps: int, rng: np.random.Generator) -> np.ndarray:
    """``(reps, num_groups)`` multiplicities: each replicate draws ``num_groups`` groups with replacement."""
    draws = rng.integers(0, num_groups, size=(reps, num_groups))
    counts = np.zeros((reps, num_groups), dtype=np.int64)
    np.add.at(counts, (np.arange(reps)[:, None], draws), 1)
    return counts


def percentile_interval(
    estimate: float, replicates: np.ndarray, confidence_level: float
) -> dict[str, float | int | None]:
    """``{estimate, low, high, valid_reps}``: the percentile interval of the finite replicates (undefined
    replicates, e.g. a precision with no predicted positive, are left out; None when none is left)."""
    values = np.asarray(replicates, dtype=np.float64)
    values = values[np.isfinite(values)]
    tail = (1.0 - float(confidence_level)) / 2.0
    low, high = np.quantile(values, [tail, 1.0 - tail]) if values.size else (np.nan, np.nan)
    return {"estimate": _json_float(estimate), "low": _json_float(low), "high": _json_float(high),
            "valid_reps": int(values.size)}


def bootstrap_group_statistics(
    per_group: np.ndarray,
    summarise: Callable[[np.ndarray], Mapping[str, np.ndarray]],
    *,
    reps: int,
    seed: int | np.random.Generator,
    confidence_level: float = 0.95,
) -> dict[str, dict[str, float | int | None]]:
    """The cluster bootstrap (by individual) of quantities that are functions of per-individual sums.

    ``per_group`` is ``(G, S)``: S sufficient statistics (counts) of each of G individuals;
    ``summarise(totals)`` maps totals ``(..., S)`` to named quantities of shape ``(...)``. Each replicate
    draws G individuals with replacement and sums their statistics, which equals the statistics of the
    concatenated resample. Returns ``{name: {estimate, low, high, valid_reps}}``; with fewer than two
    individuals no interval exists (``low`` and ``high`` are None).
    """
    stats = np.asarray(per_group, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        point = summarise(stats.sum(axis=0))
        if stats.shape[0] < 2:
            return {name: {"estimate": _json_float(value), "low": None, "high": None, "valid_reps": 0}
                    for name, value in point.items()}
        rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        replicates = summarise(cluster_bootstrap_counts(stats.shape[0], int(reps), rng) @ stats)
    return {name: percentile_interval(value, replicates[name], confidence_level)
            for name, value in point.items()}


def bootstrap_confidence_intervals(
    labels: Any,
    probabilities: Any,
    groups: Any,
    *,
    predictions: Any | None = None,
    class_names: Sequence[str] | None = None,
    reps: int = DEFAULT_BOOTSTRAP_REPS,
    confidence_level: float = 0.95,
    seed: int | np.random.Generator = 0,
    num_bins: int = DEFAULT_NUM_BINS,
    return_replicates: bool = False,
) -> dict[str, Any]:
    """Percentile confidence intervals from a cluster bootstrap that resamples individuals.

    Each replicate draws as many individuals as there are, with replacement, and pools all frames
    of every drawn individual (an individual drawn twice counts twice). The interval of a metric is
    the ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of its replicate values; replicates in
    which the metric is undefined (e.g. pain precision with no predicted pain) are left out and
    ``valid_reps`` says how many remained. With fewer than 2 individuals no interval exists and
    ``low``/``high`` are ``None``.

    Returns ``{"method", "reps", "confidence_level", "seed", "num_groups", "metrics": {name:
    {"estimate", "low", "high", "valid_reps"}}}`` (plus ``"replicates"``: ``(reps, M)`` array and
    ``"names"`` when ``return_replicates``). ``seed`` is an int or a ``numpy.random.Generator``.
    """
    y, probs, pred, num_classes = _prepare(labels, probabilities, predictions)
    names = _class_names(num_classes, class_names)
    individuals = check_groups(groups, len(y))
    if isinstance(reps, bool) or not isinstance(reps, (int, np.integer)) or reps < 1:
        raise ValueError(f"reps must be a positive integer; got {reps!r}")
    if not 0.0 < float(confidence_level) < 1.0:
        raise ValueError(f"confidence_level must be in (0, 1); got {confidence_level!r}")
    num_bins = _check_num_bins(num_bins)
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)

    unique_groups, group_index = np.unique(individuals, return_inverse=True)
    num_groups = len(unique_groups)
    # Per-individual sufficient statistics: confusion counts and calibration-bin sums.
    confusion_per_group = np.zeros((num_groups, num_classes, num_classes), dtype=np.float64)
    np.add.at(confusion_per_group, (group_index, y, pred), 1.0)
    confidences = probs[np.arange(len(y)), pred]
    bins = _bin_index(confidences, num_bins)
    bin_sums_per_group = np.zeros((num_groups, 3, num_bins), dtype=np.float64)
    np.add.at(bin_sums_per_group, (group_index, 0, bins), 1.0)
    np.add.at(bin_sums_per_group, (group_index, 1, bins), confidences)
    np.add.at(bin_sums_per_group, (group_index, 2, bins), (pred == y).astype(np.float64))

    metric_names = scalar_metric_names(names)
    point = classification_metrics(y, probs, predictions=pred, class_names=names, num_bins=num_bins)
    estimates = _flatten_point(point, names)

    result: dict[str, Any] = {
        "method": "cluster bootstrap over individuals, percentile intervals",
        "reps": int(reps),
        "confidence_level": float(confidence_level),
        "seed": int(seed) if isinstance(seed, (int, np.integer)) else None,
        "num_groups": int(num_groups),
        "metrics": {},
    }
    if num_groups < 2:
        result["metrics"] = {
            name: {"estimate": estimates[name], "low": None, "high": None, "valid_reps": 0}
            for name in metric_names
        }
        return result

    multiplicity = cluster_bootstrap_counts(num_groups, int(reps), rng).astype(np.float64)
    confusion = np.einsum("rg,gij->rij", multiplicity, confusion_per_group)
    from_confusion = _metrics_from_confusion(confusion)
    ece = _ece_from_bin_sums(np.einsum("rg,gcb->rcb", multiplicity, bin_sums_per_group))
    auc = np.full(int(reps), np.nan)
    for r in range(int(reps)):
        weights = multiplicity[r, group_index]
        kept = weights > 0
        if len(np.unique(y[kept])) == num_classes:
            if num_classes == 2:
                auc[r] = roc_auc_score(y[kept], probs[kept, 1], sample_weight=weights[kept])
            else:
                auc[r] = roc_auc_score(
                    y[kept],
                    probs[kept],
                    sample_weight=weights[kept],
                    multi_class="ovr",
                    labels=list(range(num_classes)),
                )
    replicates = np.concatenate([from_confusion, auc[:, None], ece[:, None]], axis=1)

    for column, name in enumerate(metric_names):
        result["metrics"][name] = percentile_interval(
            np.nan if estimates[name] is None else estimates[name], replicates[:, column], confidence_level
        )
    if return_replicates:
        result["replicates"] = replicates
        result["names"] = metric_names
    return result


def _flatten_point(point: dict[str, Any], names: Sequence[str]) -> dict[str, float | None]:
    flat: dict[str, float | None] = {
        "accuracy": point["accuracy"],
        "balanced_accuracy": point["balanced_accuracy"],
        "macro_f1": point["macro_f1"],
    }
    for name in names:
        for key in ("precision", "recall", "f1"):
            flat[f"{key}_{name}"] = point["per_class"][name][key]
    flat["roc_auc"] = point["roc_auc"]
    flat["ece"] = point["ece"]
    return flat


# ----------------------------------------------------------------------------------------------
# Per-individual table and the full evaluation
# ----------------------------------------------------------------------------------------------
def per_individual_table(
    labels: Any,
    probabilities: Any,
    groups: Any,
    *,
    predictions: Any | None = None,
    class_names: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """One row per individual (sorted by name): frames, frames per class, accuracy, recall per class,
    balanced accuracy, ROC AUC (``None`` unless all classes present) and mean probability of the last
    class (``mean_prob_pain`` in the binary task)."""
    y, probs, pred, num_classes = _prepare(labels, probabilities, predictions)
    names = _class_names(num_classes, class_names)
    individuals = check_groups(groups, len(y))
    rows = []
    for individual in sorted(np.unique(individuals).tolist()):
        mask = individuals == individual
        metrics = classification_metrics(y[mask], probs[mask], predictions=pred[mask], class_names=names)
        row: dict[str, Any] = {"individual": individual, "frames": int(mask.sum())}
        for name in names:
            row[f"frames_{name}"] = metrics["per_class"][name]["support"]
        row["accuracy"] = metrics["accuracy"]
        row["balanced_accuracy"] = metrics["balanced_accuracy"]
        for name in names:
            row[f"recall_{name}"] = metrics["per_class"][name]["recall"]
        row["roc_auc"] = metrics["roc_auc"]
        row[f"mean_prob_{names[-1]}"] = float(probs[mask, -1].mean())
        rows.append(row)
    return rows


def evaluate(
    labels: Any,
    probabilities: Any,
    groups: Any,
    *,
    predictions: Any | None = None,
    class_names: Sequence[str] | None = None,
    num_bins: int = DEFAULT_NUM_BINS,
    bootstrap_reps: int = DEFAULT_BOOTSTRAP_REPS,
    confidence_level: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """Everything a LOIO report needs, JSON-ready.

    ``{"num_frames", "num_individuals", "pooled": classification_metrics(...), "confidence_intervals":
    bootstrap_confidence_intervals(...), "per_individual": per_individual_table(...), "reliability":
    ReliabilityDiagram.to_dict(), "roc": roc_curve_points(...) (binary, positive = last class) or None}``.
    """
    y, probs, pred, num_classes = _prepare(labels, probabilities, predictions)
    names = _class_names(num_classes, class_names)
    individuals = check_groups(groups, len(y))
    return {
        "num_frames": len(y),
        "num_individuals": len(np.unique(individuals)),
        "class_names": names,
        "pooled": classification_metrics(y, probs, predictions=pred, class_names=names, num_bins=num_bins),
        "confidence_intervals": bootstrap_confidence_intervals(
            y,
            probs,
            individuals,
            predictions=pred,
            class_names=names,
            reps=bootstrap_reps,
            confidence_level=confidence_level,
            seed=seed,
            num_bins=num_bins,
        ),
        "per_individual": per_individual_table(y, probs, individuals, predictions=pred, class_names=names),
        "reliability": reliability_diagram(y, probs, num_bins=num_bins, predictions=pred).to_dict(),
        "roc": roc_curve_points(y, probs, num_classes - 1) if num_classes == 2 else None,
    }
