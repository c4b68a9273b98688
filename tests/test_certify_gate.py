"""``painwatch certify``: gate files, exit codes, held-out check, report files, verdict in the bundle."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from painwatch.cli import main
from painwatch.data import load_records, make_demo_dataset
from painwatch.evaluation.certify import select_frames
from painwatch.evaluation.gate import DEFAULT_GATE, UsageError, evaluate_gate, load_gate
from painwatch.evaluation.settings import DemoSettings
from painwatch.models import read_metadata
from painwatch.robust import certified_accuracy_at

TRAINED_ON = ["syn-m01", "syn-m02"]
FAST = ["--n", "100", "--noise-sigmas", "0.1", "--noise-draws", "2", "--bootstrap-reps", "20", "--quiet"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("certify")
    return make_demo_dataset(root / "demo", individuals=4, frames_per_class=2, image_size=48).parent


@pytest.fixture
def bundle(tmp_path: Path, bundle_factory) -> Path:
    training = {"individuals": TRAINED_ON, "num_frames": 8, "loss": "ce", "noise_sigma": 0.25, "epochs": 1}
    return bundle_factory(tmp_path / "bundle", training=training)


def _gate(tmp_path: Path, text: str, name: str = "gate.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _held_out() -> list[str]:
    return ["--individuals", "syn-m03,syn-m04"]


def test_passing_gate_exits_0_writes_report_and_verdict(
    demo: Path, bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    gate = _gate(
        tmp_path,
        "max_ece = 1.0\nmax_abstention = 1.0\n[[min_certified_accuracy]]\nradius = 0.0\nvalue = 0.0\n",
    )
    out = tmp_path / "report"
    code = main(
        ["certify", str(bundle), str(demo), "--out", str(out), "--gate", str(gate), *_held_out(), *FAST]
    )
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "gate gate.toml PASSED" in printed
    for name in (
        "report.html",
        "report.md",
        "report.json",
        "certified_accuracy.png",
        "noise_and_corruptions.png",
        "robustness_surface.png",
        "reliability.png",
        "per_individual.png",
    ):
        assert (out / name).stat().st_size > 0, name
    report = json.loads((out / "report.json").read_text())
    for key in (
        "network",
        "deployed",
        "certified_accuracy",
        "noise",
        "corruptions",
        "surface",
        "per_individual",
        "model_card",
        "gate",
        "data",
        "settings",
    ):
        assert key in report, key
    assert report["held_out"] is True and report["passed"] is True
    assert report["data"]["frames_used"] == 8 and report["data"]["individuals"] == ["syn-m03", "syn-m04"]
    assert set(report["certified_accuracy"]) == {"soft_smoothing", "randomized_smoothing"}
    # beside the worst-case radius, the share of random noise that keeps the answer (typical case)
    assert all(0.0 <= c["median_noise_survival"] <= 1.0 for c in report["certified_accuracy"].values())
    assert "median noise kept (at least)" in (out / "report.md").read_text()
    assert set(report["corruptions"]) == {"gaussian_blur", "motion_blur", "jpeg", "brightness", "contrast"}
    assert {"estimate", "low", "high"} <= set(report["deployed"]["pain_recall"])
    assert "never replaces" in report["model_card"]["intended_use"]
    surface = report["surface"]["probability_lower_bound"]
    assert len(surface) == len(report["surface"]["sigma"]) and all(
        0 <= v <= 1 for row in surface for v in row
    )
    html = (out / "report.html").read_text()
    assert "Gate verdict: PASSED" in html and "certified_accuracy.png" in html
    # This bundle carries no in-distribution check: the report says so instead of a refusal rate.
    note = read_metadata(bundle).in_distribution_note
    assert report["in_distribution"] == {"available": False, "note": note}
    assert "No in-distribution check" in (out / "report.md").read_text()
    verdict = read_metadata(bundle).gates["gate.toml"]
    assert verdict.passed is True and verdict.held_out is True
    assert verdict.details["settings"]["method"] == "randomized_smoothing"
    assert verdict.details["num_frames"] == 8
    assert verdict.details["settings"]["bound"] == "fixed"


def test_failing_gate_exits_1_and_names_the_failed_checks(
    demo: Path, bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    gate = _gate(tmp_path, "max_ece = 1.0\n[[min_certified_accuracy]]\nradius = 1000.0\nvalue = 0.5\n")
    out = tmp_path / "report"
    argv = ["certify", str(bundle), str(demo), "--out", str(out), "--gate", str(gate), "--max-frames", "2",
            "--runtime", "torch", "--precision", "fp32"]
    code = main(argv + _held_out() + FAST)
    printed = capsys.readouterr().out
    assert code == 1
    engine = json.loads((out / "report.json").read_text())["settings"]["engine"]
    assert engine == {"runtime": "torch", "precision": "fp32"}  # what the certificates are about
    assert "FAIL  certified accuracy of randomized_smoothing at radius 1000 L2" in printed
    assert "PASS  ece" in printed and "gate gate.toml FAILED" in printed
    results = json.loads((out / "report.json").read_text())["gate"]["results"]
    assert [r["passed"] for r in results] == [True, False]
    assert read_metadata(bundle).gates["gate.toml"].passed is False


def test_overlap_is_refused_unless_allowed(
    demo: Path, bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "report"
    code = main(["certify", str(bundle), str(demo), "--out", str(out), *FAST])
    assert code == 2
    error = capsys.readouterr().err
    assert "syn-m01, syn-m02" in error and "--allow-overlap" in error
    assert not out.exists() and read_metadata(bundle).gates == {}
    gate = _gate(tmp_path, "max_ece = 1.0\n")
    code = main(
        [
            "certify",
            str(bundle),
            str(demo),
            "--out",
            str(out),
            "--gate",
            str(gate),
            "--allow-overlap",
            "--individuals",
            "syn-m01,syn-m03",
            "--max-frames",
            "4",
            *FAST,
        ]
    )
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["held_out"] is False and report["overlap_individuals"] == ["syn-m01"]
    assert report["data"]["frames_used"] == 4 and report["data"]["frames_available"] == 8
    assert "NOT A HELD-OUT EVALUATION" in (out / "report.html").read_text()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("min_accuracy = 'high'\n", "min_accuracy must be a number in [0, 1], got 'high'"),
        ("min_accuracy = 1.5\n", "min_accuracy must be a number in [0, 1], got 1.5"),
        ("min_acuracy = 0.5\n", "unknown key(s) min_acuracy"),
        ("min_accuracy = \n", "is not valid TOML"),
        ("use_lower_confidence_bound = true\n", "sets no threshold"),
        ("[[min_certified_accuracy]]\nvalue = 0.5\n", "exactly one of radius (L2) or grey_levels"),
        (
            "[[min_certified_accuracy]]\nradius = -1\nvalue = 0.5\n",
            "min_certified_accuracy[0].radius must be",
        ),
    ],
)
def test_bad_gate_files_are_usage_errors(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(UsageError) as error:
        load_gate(_gate(tmp_path, text))
    assert message in str(error.value) and "gate.toml" in str(error.value)


def test_usage_errors_exit_2_and_name_the_problem(
    demo: Path, bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = str(tmp_path / "report")
    cases = [
        (["certify", str(tmp_path / "nope"), str(demo), "--out", out], "bundle folder"),
        (["certify", str(bundle), str(tmp_path / "nodata"), "--out", out], "nodata does not exist"),
        (
            ["certify", str(bundle), str(demo), "--out", out, "--gate", str(tmp_path / "missing.toml")],
            "missing.toml does not exist",
        ),
        (
            [
                "certify",
                str(bundle),
                str(demo),
                "--out",
                out,
                "--gate",
                str(_gate(tmp_path, "max_ece = 2\n")),
            ],
            "max_ece must be a number in [0, 1]",
        ),
        (
            ["certify", str(bundle), str(demo), "--out", out, "--sigma", "7", *_held_out()],
            "sigma=7 is outside",
        ),
        (["certify", str(bundle), str(demo), "--out", out, "--individuals", "syn-m99"], "syn-m99 are not in"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        assert message in capsys.readouterr().err, argv
    assert read_metadata(bundle).gates == {}


def test_default_gate_is_valid_and_gate_logic() -> None:
    gate = load_gate(DEFAULT_GATE)
    assert {"min_accuracy", "min_pain_recall", "max_ece", "max_abstention"} <= set(gate.scalars)
    measured = {
        "accuracy": {"estimate": 0.7, "low": 0.55, "high": 0.8},
        "pain_recall": {"estimate": 0.65, "low": 0.5, "high": 0.8},
        "pain_precision": {"estimate": None, "low": None, "high": None},
        "balanced_accuracy": {"estimate": 0.7, "low": 0.6, "high": 0.8},
        "abstention_rate": {"estimate": 0.1, "low": 0.0, "high": 0.35},
        "ece": {"estimate": 0.05, "low": 0.02, "high": 0.1},
        "main_certified": [(True, 1.0), (True, 0.2), (False, 2.0), (True, 0.0)],
        "main_method": "soft_smoothing_sequential",
        "input_numel": 3 * 32 * 32,
    }
    results = {r["name"]: r for r in evaluate_gate(gate, measured)}
    assert results["min_accuracy"]["passed"] and results["min_pain_recall"]["passed"]
    assert not results["min_pain_precision"]["passed"]  # not measurable fails, never passes silently
    strict = type(gate)(
        path=gate.path,
        scalars={"min_accuracy": 0.6, "max_abstention": 0.3},
        certified=[{"grey_levels": 255 / (32 * 3**0.5), "value": 0.25}],
        use_lower_confidence_bound=True,
    )
    checks = evaluate_gate(strict, measured)
    assert [c["passed"] for c in checks] == [False, False, True]  # 0.55 < 0.6; 0.35 > 0.3; radius 0.5 -> 1/4
    assert checks[2]["value"] == pytest.approx(0.25)
    correct, radii = zip(*measured["main_certified"], strict=True)
    assert certified_accuracy_at(correct, radii, 0.0) == pytest.approx(0.75)
    assert certified_accuracy_at(correct, radii, 0.5) == pytest.approx(0.25)


def test_packaged_strict_gate_judges_interval_ends() -> None:
    default, strict = load_gate(DEFAULT_GATE), load_gate(DEFAULT_GATE.with_name("strict.toml"))
    assert strict.use_lower_confidence_bound and not default.use_lower_confidence_bound
    assert strict.scalars == default.scalars and strict.certified == default.certified
    measured = {
        "accuracy": {"estimate": 0.78, "low": 0.62, "high": 0.88},
        "pain_recall": {"estimate": 0.65, "low": 0.3, "high": 0.9},
        "pain_precision": {"estimate": 0.87, "low": 0.77, "high": 1.0},
        "abstention_rate": {"estimate": 0.03, "low": 0.0, "high": 0.08},
        "ece": {"estimate": 0.17, "low": 0.1, "high": 0.2001},
        "main_certified": [(True, 1.0)] * 7 + [(False, 0.0)] * 3,
        "main_method": "soft_smoothing_sequential",
        "input_numel": 3 * 64 * 64,
    }
    assert all(r["passed"] for r in evaluate_gate(default, measured))
    failed = sorted(r["name"] for r in evaluate_gate(strict, measured) if not r["passed"])
    assert failed == ["max_ece", "min_pain_recall"]


def test_select_frames_spreads_over_individuals_and_classes(demo: Path) -> None:
    records = load_records(demo)
    chosen = select_frames(records, 8, seed=0)
    assert len(chosen) == 8 and chosen == select_frames(records, 8, seed=0)
    assert {(r.individual, r.label) for r in chosen} == {(r.individual, r.label) for r in records}
    assert select_frames(records, None, seed=0) == records


def test_demo_bundle_trains_certifies_and_records_the_verdict(
    demo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from painwatch.data import held_out_individuals

    out = tmp_path / "demo-bundle"
    code = main(
        [
            "demo-bundle",
            "--data",
            str(demo),
            "--out",
            str(out),
            "--held-out",
            "1",
            "--arch",
            "test_resnet",
            "--input-size",
            "32",
            "--epochs",
            "1",
            "--max-frames",
            "2",
            "--n",
            "100",
            "--quiet",
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert "demo bundle" in capsys.readouterr().out
    metadata = read_metadata(out)
    held_out = held_out_individuals([f"syn-m0{i}" for i in range(1, 5)], 1, seed=0)
    verdict = metadata.gates["default.toml"]
    assert verdict.details["individuals"] == held_out and verdict.held_out is True
    assert set(metadata.training["individuals"]).isdisjoint(held_out)
    assert metadata.training["noise_sigma"] == pytest.approx(DemoSettings.noise_sigma)
    assert (tmp_path / "demo-bundle-report" / "report.html").is_file()
    with pytest.raises(ValueError, match="--held-out must be between 1 and 2"):
        held_out_individuals(["a", "b", "c", "d"], 3, seed=0)


def test_certify_measures_the_share_of_held_out_face_crops_refused(
    demo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import numpy as np
    import torch

    from painwatch.data import eval_transform, load_frame
    from painwatch.models import (
        InDistributionSpec,
        create_model,
        descriptor_pass,
        fit_in_distribution,
        save_bundle,
    )
    from painwatch.models.in_distribution import default_layers

    # A check fitted on the training individuals' crops: the held-out crops are refused at some rate,
    # and a frame refused counts as an abstention of the deployed answers.
    model = create_model("test_resnet", num_classes=2, input_size=32, seed=0).eval()
    spec = InDistributionSpec(layers=default_layers(model))
    trained = [r for r in load_records(demo) if r.individual in TRAINED_ON]
    transform = eval_transform(32)
    crops = torch.stack([transform(load_frame(r)) for r in trained])
    # Mirror images stand in for more frames of the training individuals (a threshold needs 19).
    _, fit = descriptor_pass(model, torch.cat([crops, crops.flip(3)]), spec.layers)
    _, validation = descriptor_pass(model, torch.cat([crops, crops.flip(3), crops.flip(2)])[:20], spec.layers)
    check = fit_in_distribution(fit, [r.individual for r in trained] * 2, validation, spec=spec)
    folder = save_bundle(tmp_path / "checked", model, {"training": {"individuals": TRAINED_ON}},
                         in_distribution=check)
    gate = _gate(tmp_path, "max_ece = 1.0\nmax_abstention = 1.0\n")
    out = tmp_path / "report"
    argv = ["certify", str(folder), str(demo), "--out", str(out), "--gate", str(gate), "--main-method-only"]
    assert main(argv + _held_out() + FAST) == 0, capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    summary = report["in_distribution"]
    assert summary["available"] and summary["threshold"] == check.threshold and summary["frames"] == 8
    refused = [frame["refused_not_like_training_frames"] for frame in report["frames"]]
    assert summary["refused"] == sum(refused) and summary["share"] == pytest.approx(np.mean(refused))
    assert [row["individual"] for row in summary["per_individual"]] == ["syn-m03", "syn-m04"]
    assert report["deployed"]["abstention_rate"]["estimate"] >= summary["share"]
    assert all(row["refused_share"] is not None for row in report["per_individual"])
    assert "In-distribution check" in (out / "report.md").read_text()
