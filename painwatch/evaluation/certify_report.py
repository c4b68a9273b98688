"""The certification report: HTML, Markdown, JSON and PNG plots of a :func:`run_certification` run."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

from painwatch.evaluation.refusals import add_refusal_section
from painwatch.evaluation.report import (
    SYNTHETIC_NOTE,
    Report,
    plot_per_individual,
    plot_reliability,
    save_figure,
)
from painwatch.inference import SYNTHETIC_WARNING, model_card_markdown
from painwatch.io import atomic_write_json

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def _plots(report: Mapping[str, Any], out_dir: Path) -> dict[str, Path]:
    files = {}
    figure, axis = plt.subplots(figsize=(5.6, 3.8))
    for name, curve in report["certified_accuracy"].items():
        axis.plot(curve["radius"], curve["certified_accuracy"], label=name)
    axis.set_xlabel("L2 radius (pixels in [0, 1])")
    axis.set_ylabel("certified accuracy")
    axis.set_ylim(0, 1.02)
    numel = math.prod(report["bundle"]["input_shape"])
    top = axis.secondary_xaxis(
        "top", functions=(lambda r: 255 * r / math.sqrt(numel), lambda g: g * math.sqrt(numel) / 255)
    )
    top.set_xlabel("RMS change in 8-bit grey levels")
    axis.legend(fontsize=8)
    files["certified"] = save_figure(figure, out_dir / "certified_accuracy.png")

    figure, (left, right) = plt.subplots(1, 2, figsize=(8.4, 3.4))
    left.plot(report["noise"]["sigma"], report["noise"]["accuracy"], marker="o")
    left.set_xlabel("Gaussian noise sigma (L2 per image, pixels in [0, 1])")
    left.set_ylabel("accuracy of the network")
    left.set_ylim(0, 1.02)
    left.set_title("Under Gaussian noise")
    names = list(report["corruptions"])
    right.bar(names, [report["corruptions"][k] for k in names], color="tab:orange")
    right.axhline(report["network"]["pooled"]["accuracy"], color="black", ls="--", lw=1, label="clean")
    right.set_ylim(0, 1.02)
    right.set_title("Under corruptions")
    right.tick_params(axis="x", rotation=30)
    right.legend(fontsize=8)
    files["noise"] = save_figure(figure, out_dir / "noise_and_corruptions.png")

    surface = report["surface"]
    figure, axis = plt.subplots(figsize=(5.6, 3.6))
    image = axis.imshow(
        np.asarray(surface["probability_lower_bound"], dtype=float),
        aspect="auto",
        origin="lower",
        vmin=0,
        vmax=1,
        cmap="viridis",
        extent=(surface["eps"][0], surface["eps"][-1], -0.5, len(surface["sigma"]) - 0.5),
    )
    axis.set_yticks(range(len(surface["sigma"])), [f"{s:g}" for s in surface["sigma"]])
    axis.set_xlabel("adversary budget eps (L2)")
    axis.set_ylabel("noise sigma")
    axis.set_title("Guaranteed P(correct under noise), mean over frames")
    figure.colorbar(image, ax=axis)
    files["surface"] = save_figure(figure, out_dir / "robustness_surface.png")

    files["reliability"] = plot_reliability(report["network"]["reliability"], out_dir / "reliability.png")
    files["per_individual"] = plot_per_individual(
        report["per_individual"],
        out_dir / "per_individual.png",
        metrics=("accuracy", "deployed_accuracy", "recall_pain"),
    )
    return files


def _percent(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}%"


def _interval(entry: Mapping[str, Any]) -> str:
    if entry.get("low") is None:
        return "—"
    return f"{_percent(entry['low'])} – {_percent(entry['high'])}"


def write_report(report: Mapping[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write report.json, report.html, report.md and the PNG plots into ``out_dir``, atomically."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = _plots(report, out_dir)
    doc = Report(title="painwatch certification report")
    verdict = "PASSED" if report["passed"] else "FAILED"
    doc.paragraph(f"Gate verdict: {verdict} ({report['gate']['file']}), {report['date']}.")
    if not report["held_out"]:
        doc.paragraph(
            f"NOT A HELD-OUT EVALUATION: {len(report['overlap_individuals'])} individual(s) were also "
            f"used for training ({', '.join(report['overlap_individuals'])}); --allow-overlap was "
            f"given. These numbers overstate how the model does on new animals.",
            note=True,
        )
    data = report["data"]
    if data.get("synthetic"):
        doc.paragraph(SYNTHETIC_NOTE, note=True)
    if report["bundle"].get("synthetic_training_data"):
        doc.paragraph(SYNTHETIC_WARNING, note=True)
    doc.paragraph(
        f"Bundle {report['bundle']['path']} ({report['bundle']['architecture']}, input "
        f"{'x'.join(map(str, report['bundle']['input_shape']))}); data {data['source']}: "
        f"{data['frames_used']} of {data['frames_available']} frames used, "
        f"{len(data['individuals'])} individuals; {report['forward_passes']} forward passes in "
        f"{report['elapsed_s']:.0f} s."
    )
    doc.heading("Gate")
    doc.table(
        [
            {
                "check": r["name"],
                "rule": r["detail"],
                "measured": r["value"],
                "passed": "yes" if r["passed"] else "NO",
            }
            for r in report["gate"]["results"]
        ],
        columns=["check", "rule", "measured", "passed"],
    )
    doc.heading("Answers as deployed")
    main = report["settings"]["main"]
    doc.paragraph(
        f"The app answers with the classifier the certificate is about ({main['method']}, "
        f"sigma {main['sigma']:g}, alpha {main['alpha']:g}, budget n {main['n']}). Abstentions (frames the "
        f"in-distribution check refuses among them) count as errors, and as misses for pain recall."
    )
    deployed = report["deployed"]
    doc.table(
        [
            {
                "metric": key.replace("_", " "),
                "estimate": _percent(entry["estimate"]),
                "95% CI (by individual)": _interval(entry),
            }
            for key, entry in deployed.items()
        ]
    )
    held = "held-out individuals'" if report["held_out"] else "individuals'"
    add_refusal_section(doc, report.get("in_distribution"), what=f"the {held} face crops")
    doc.heading("Network on clean frames (calibrated)")
    ci = report["network"]["confidence_intervals"]["metrics"]
    rows = []
    for key in ("accuracy", "balanced_accuracy", "precision_pain", "recall_pain", "roc_auc", "ece"):
        entry = ci.get(key)
        if entry is not None:
            rows.append(
                {
                    "metric": key.replace("_", " "),
                    "estimate": _percent(entry["estimate"]),
                    "95% CI (by individual)": _interval(entry),
                }
            )
    doc.table(rows)
    doc.image(plots["reliability"].name, "Reliability of the calibrated network")
    doc.heading("Certified accuracy against radius")
    doc.table(
        [
            {
                "method": name,
                "accuracy": _percent(c["accuracy"]),
                "abstention": _percent(c["abstention_rate"]),
                "median radius (L2)": c["median_radius"],
                "median forward passes": c["median_forward_passes"],
            }
            for name, c in report["certified_accuracy"].items()
        ]
    )
    doc.image(
        plots["certified"].name, "Fraction of frames that are correct and certified at least that radius"
    )
    doc.heading("Noise and corruptions")
    doc.table(
        [
            {"sigma": s, "accuracy": _percent(a)}
            for s, a in zip(report["noise"]["sigma"], report["noise"]["accuracy"], strict=True)
        ],
        caption=f"Accuracy of the network under Gaussian noise ({report['noise']['draws_per_frame']} draws "
        f"per frame)",
    )
    doc.table([{"corruption": k, "accuracy": _percent(v)} for k, v in report["corruptions"].items()])
    doc.image(plots["noise"].name, "Accuracy under Gaussian noise and common corruptions")
    doc.heading("Smoothed robustness over (eps, sigma)")
    doc.paragraph(
        "For each frame and noise level sigma, with probability at least 1 - alpha, every perturbation "
        "of L2 size at most eps leaves the network correct on at least the shown fraction of noisy "
        "copies: Phi(PhiInv(p_low) - eps / sigma), p_low the Clopper-Pearson bound of the correct-class "
        "frequency under noise (the randomized-smoothing case of the smoothed-robustness framework)."
    )
    doc.image(plots["surface"].name, "Mean guaranteed probability of a correct answer under noise and attack")
    doc.heading("Per individual")
    doc.table(
        report["per_individual"],
        columns=[
            "individual",
            "frames",
            "accuracy",
            "deployed_accuracy",
            "recall_pain",
            "recall_no_pain",
            "abstention_rate",
            "refused_share",
            "median_radius",
        ],
    )
    doc.image(plots["per_individual"].name, "Per individual")
    doc.heading("Model card")
    for paragraph in model_card_markdown(report["model_card"]).split("\n\n"):
        lines = paragraph.splitlines()
        if lines and all(line.startswith("- ") for line in lines[1:]) and len(lines) > 1:
            doc.paragraph(lines[0].replace("**", ""))
            doc.bullets([line[2:] for line in lines[1:]])
        else:
            doc.paragraph(paragraph.replace("**", "").replace("`", ""))
    files = doc.write(out_dir, stem="report")
    files["json"] = atomic_write_json(out_dir / "report.json", report)
    files.update(plots)
    return files
