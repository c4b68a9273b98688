"""Metrics against scikit-learn, ECE on hand cases, and the cluster bootstrap by individual."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

from painwatch.evaluation.metrics import (
    _metrics_from_confusion,
    bootstrap_confidence_intervals,
    classification_metrics,
    cluster_bootstrap_counts,
    evaluate,
    expected_calibration_error,
    per_individual_table,
    reliability_diagram,
    scalar_metric_names,
)


def _binary_case(seed: int = 0, individuals: int = 8, frames: int = 30):
    rng = np.random.default_rng(seed)
    groups = np.repeat([f"m{i:02d}" for i in range(individuals)], frames)
    labels = rng.integers(0, 2, size=groups.shape[0])
    # Informative but noisy scores, with an individual-level offset (frames of one face correlate).
    offset = rng.normal(0, 1.0, size=individuals).repeat(frames)
    score = 1.2 * (labels - 0.5) + offset + rng.normal(0, 1.0, size=labels.shape[0])
    prob_pain = 1.0 / (1.0 + np.exp(-score))
    return labels, prob_pain, groups


def test_pooled_metrics_match_scikit_learn() -> None:
    labels, prob_pain, _ = _binary_case()
    predictions = (prob_pain > 0.5).astype(int)
    metrics = classification_metrics(labels, prob_pain)
    assert metrics["num_samples"] == len(labels)
    assert metrics["accuracy"] == pytest.approx(accuracy_score(labels, predictions))
    assert metrics["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(labels, predictions))
    assert metrics["macro_f1"] == pytest.approx(f1_score(labels, predictions, average="macro"))
    pain = metrics["per_class"]["pain"]
    assert pain["precision"] == pytest.approx(precision_score(labels, predictions))
    assert pain["recall"] == pytest.approx(recall_score(labels, predictions))
    assert pain["f1"] == pytest.approx(f1_score(labels, predictions))
    assert pain["support"] == int(labels.sum())
    no_pain = metrics["per_class"]["no_pain"]
    assert no_pain["recall"] == pytest.approx(recall_score(labels, predictions, pos_label=0))
    assert metrics["confusion_matrix"] == confusion_matrix(labels, predictions).tolist()
    assert metrics["roc_auc"] == pytest.approx(roc_auc_score(labels, prob_pain))
    json.dumps(metrics)  # JSON-ready


def test_confusion_based_metrics_match_scikit_learn_multiclass() -> None:
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, size=200)
    predictions = np.where(rng.random(200) < 0.6, labels, rng.integers(0, 4, size=200))
    predictions[predictions == 3] = 2  # class 3 never predicted: its precision is undefined
    values = _metrics_from_confusion(confusion_matrix(labels, predictions, labels=[0, 1, 2, 3]))
    names = scalar_metric_names(["a", "b", "c", "d"])[:-2]
    got = dict(zip(names, values, strict=True))
    assert got["accuracy"] == pytest.approx(accuracy_score(labels, predictions))
    assert got["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(labels, predictions))
    assert got["macro_f1"] == pytest.approx(f1_score(labels, predictions, average="macro"))
    precision = precision_score(labels, predictions, average=None, labels=[0, 1, 2, 3], zero_division=np.nan)
    for k, name in enumerate("abcd"):
        if np.isnan(precision[k]):
            assert np.isnan(got[f"precision_{name}"])
        else:
            assert got[f"precision_{name}"] == pytest.approx(precision[k])
        assert got[f"recall_{name}"] == pytest.approx(recall_score(labels, predictions, average=None)[k])
        assert got[f"f1_{name}"] == pytest.approx(f1_score(labels, predictions, average=None)[k])
    assert np.isnan(got["precision_d"])


def test_undefined_metrics_are_none_not_errors() -> None:
    labels = np.array([0, 0, 0])
    metrics = classification_metrics(labels, np.array([0.1, 0.2, 0.3]))
    assert metrics["roc_auc"] is None
    assert metrics["per_class"]["pain"]["precision"] is None  # nothing predicted as pain
    assert metrics["per_class"]["pain"]["recall"] is None  # no pain frame
    assert metrics["accuracy"] == 1.0


def test_ece_hand_cases() -> None:
    # Perfectly calibrated bins: 4 frames at confidence 0.75, three of them right -> ECE 0.
    labels = np.array([1, 1, 1, 0])
    assert expected_calibration_error(labels, np.full(4, 0.75), num_bins=10) == pytest.approx(0.0)
    # All at confidence 0.9 and all right: |1 - 0.9| = 0.1.
    assert expected_calibration_error(np.ones(5, int), np.full(5, 0.9), num_bins=10) == pytest.approx(0.1)
    # Two bins, half the frames each: bin (0.6] conf 0.6 acc 0 -> 0.6; bin (0.9] conf 0.9 acc 1 -> 0.1.
    labels = np.array([0, 0, 1, 1])
    prob_pain = np.array([0.6, 0.6, 0.9, 0.9])
    ece = expected_calibration_error(labels, prob_pain, num_bins=10)
    assert ece == pytest.approx(0.5 * 0.6 + 0.5 * 0.1)
    diagram = reliability_diagram(labels, prob_pain, num_bins=10)
    assert diagram.counts.tolist() == [0, 0, 0, 0, 0, 2, 0, 0, 2, 0]  # 0.6 falls in (0.5, 0.6]
    assert diagram.accuracy[5] == 0.0 and diagram.accuracy[8] == 1.0
    assert np.isnan(diagram.mean_confidence[0])
    # Top-label confidence: a predicted no_pain frame at P(pain) = 0.2 has confidence 0.8.
    assert expected_calibration_error([0], [0.2], num_bins=5) == pytest.approx(0.2)


def test_ece_bins_are_right_closed() -> None:
    diagram = reliability_diagram([1, 1], [1.0, 0.8], num_bins=5)
    assert diagram.counts.tolist() == [0, 0, 0, 1, 1]  # 0.8 in (0.6, 0.8], 1.0 in (0.8, 1.0]


def test_bootstrap_ci_contains_point_estimate_and_is_seeded() -> None:
    labels, prob_pain, groups = _binary_case(seed=2, individuals=12)
    first = bootstrap_confidence_intervals(labels, prob_pain, groups, reps=300, seed=7)
    second = bootstrap_confidence_intervals(labels, prob_pain, groups, reps=300, seed=7)
    assert first == second
    other = bootstrap_confidence_intervals(labels, prob_pain, groups, reps=300, seed=8)
    assert other["metrics"]["accuracy"] != first["metrics"]["accuracy"]
    assert first["num_groups"] == 12
    names = ("accuracy", "balanced_accuracy", "precision_pain", "recall_pain", "f1_pain", "roc_auc", "ece")
    for name in names:
        entry = first["metrics"][name]
        assert entry["low"] <= entry["estimate"] <= entry["high"], name
        assert entry["high"] > entry["low"], name
        assert entry["valid_reps"] == 300
    json.dumps(first)


def test_bootstrap_resamples_individuals_as_units() -> None:
    # Individual a: 100 frames all right; b: 100 frames all wrong. Resampling individuals can only give
    # accuracy 0, 0.5 or 1; resampling frames would give values near 0.5 with a narrow spread.
    groups = np.repeat(["a", "b"], 100)
    labels = np.tile([0, 1], 100)
    prob_pain = np.where(groups == "a", labels * 0.8 + 0.1, 0.9 - labels * 0.8)
    result = bootstrap_confidence_intervals(
        labels, prob_pain, groups, reps=400, seed=0, return_replicates=True
    )
    accuracy = result["replicates"][:, result["names"].index("accuracy")]
    assert set(np.round(accuracy, 12).tolist()) == {0.0, 0.5, 1.0}
    assert result["metrics"]["accuracy"]["low"] == 0.0 and result["metrics"]["accuracy"]["high"] == 1.0


def test_bootstrap_replicate_equals_metrics_of_concatenated_resample() -> None:
    labels, prob_pain, groups = _binary_case(seed=3, individuals=6, frames=20)
    result = bootstrap_confidence_intervals(
        labels, prob_pain, groups, reps=5, seed=np.random.default_rng(11), return_replicates=True
    )
    multiplicity = cluster_bootstrap_counts(6, 5, np.random.default_rng(11))
    unique = np.unique(groups)
    for r in range(5):
        index = np.concatenate(
            [np.flatnonzero(groups == unique[g]) for g in range(6) for _ in range(multiplicity[r, g])]
        )
        expected = classification_metrics(labels[index], prob_pain[index])
        row = dict(zip(result["names"], result["replicates"][r], strict=True))
        assert row["accuracy"] == pytest.approx(expected["accuracy"])
        assert row["recall_pain"] == pytest.approx(expected["per_class"]["pain"]["recall"])
        assert row["f1_no_pain"] == pytest.approx(expected["per_class"]["no_pain"]["f1"])
        assert row["ece"] == pytest.approx(expected["ece"])
        if expected["roc_auc"] is None:
            assert np.isnan(row["roc_auc"])
        else:
            assert row["roc_auc"] == pytest.approx(expected["roc_auc"])
    assert multiplicity.sum(axis=1).tolist() == [6] * 5


def test_bootstrap_with_one_individual_has_no_interval() -> None:
    result = bootstrap_confidence_intervals([0, 1, 1], [0.2, 0.7, 0.4], ["x", "x", "x"], reps=10)
    assert result["metrics"]["accuracy"]["low"] is None
    assert result["metrics"]["accuracy"]["estimate"] == pytest.approx(2 / 3)


def test_per_individual_table_and_evaluate() -> None:
    labels, prob_pain, groups = _binary_case(seed=4, individuals=5, frames=10)
    rows = per_individual_table(labels, prob_pain, groups)
    assert [row["individual"] for row in rows] == sorted(set(groups.tolist()))
    for row in rows:
        mask = groups == row["individual"]
        assert row["frames"] == 10
        assert row["frames_pain"] == int(labels[mask].sum())
        assert row["accuracy"] == pytest.approx(accuracy_score(labels[mask], prob_pain[mask] > 0.5))
        assert row["mean_prob_pain"] == pytest.approx(prob_pain[mask].mean())
    report = evaluate(labels, prob_pain, groups, bootstrap_reps=50, seed=1)
    assert report["num_frames"] == 50 and report["num_individuals"] == 5
    assert report["roc"]["fpr"][0] == 0.0 and report["roc"]["tpr"][-1] == 1.0
    assert sum(report["reliability"]["counts"]) == 50
    json.dumps(report)


@pytest.mark.parametrize(
    ("labels", "probabilities", "message"),
    [
        ([0, 1], [0.2], "2 entries but probabilities have 1 rows"),
        ([0, 2], [0.2, 0.4], r"found 2 at index 1"),
        ([0, 1], [0.2, 1.5], r"found 1.5 at row 1"),
        ([0, 1], [[0.2, 0.2], [0.5, 0.5]], "row 0 sums to 0.4"),
        ([0, 1], [0.2, float("nan")], "finite"),
        ([], [], "no samples"),
        (["a", "b"], [0.2, 0.3], "integer"),
    ],
)
def test_bad_input_names_the_problem(labels, probabilities, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        classification_metrics(labels, probabilities)


def test_bad_bootstrap_settings_are_rejected() -> None:
    with pytest.raises(ValueError, match="reps"):
        bootstrap_confidence_intervals([0, 1], [0.2, 0.8], ["a", "b"], reps=0)
    with pytest.raises(ValueError, match="confidence_level"):
        bootstrap_confidence_intervals([0, 1], [0.2, 0.8], ["a", "b"], confidence_level=95)
    with pytest.raises(ValueError, match="groups"):
        bootstrap_confidence_intervals([0, 1], [0.2, 0.8], ["a"])
    with pytest.raises(ValueError, match="num_bins"):
        reliability_diagram([0, 1], [0.2, 0.8], num_bins=0)
