"""How often the in-distribution check refused frames of held-out individuals (certification and LOIO).

docs/design.md, "The in-distribution check": the check's threshold refuses at most 5 % of frames
exchangeable with its inner-validation frames; frames of a new individual are not exactly exchangeable
with them, so the share of a held-out individual's face crops that is refused is measured here. The goal
is at most :data:`REFUSAL_GOAL` of them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from painwatch.evaluation.report import Report, format_percent

REFUSAL_GOAL = 0.10
"""At most this share of held-out individuals' face crops should be refused."""


def refusal_summary(
    refused: Sequence[bool],
    groups: Sequence[str],
    *,
    score: str,
    threshold: float | None,
    level: float,
) -> dict[str, Any]:
    """The share of frames refused, pooled and per individual (``groups``), with the check's ``score``
    name, ``threshold`` (None when each fold had its own) and refusal ``level``."""
    flags = np.asarray(refused, dtype=bool)
    names = np.asarray(groups)
    per_individual = [
        {"individual": str(name), "frames": int(np.sum(names == name)),
         "refused": int(np.sum(flags[names == name])), "share": float(np.mean(flags[names == name]))}
        for name in sorted(set(names.tolist()))
    ]
    share = float(np.mean(flags)) if len(flags) else 0.0
    return {"available": True, "score": score, "threshold": threshold, "level": level,
            "frames": len(flags), "refused": int(np.sum(flags)), "share": share, "goal": REFUSAL_GOAL,
            "goal_met": share <= REFUSAL_GOAL, "per_individual": per_individual}


def missing_check_summary(note: str) -> dict[str, Any]:
    """The summary of a model without an in-distribution check: nothing was refused, and why."""
    return {"available": False, "note": note}


def add_refusal_section(report: Report, summary: Mapping[str, Any] | None, *, what: str) -> None:
    """The report's section on the in-distribution check: ``what`` names the frames measured (e.g.
    "the held-out individuals' face crops")."""
    if summary is None:
        return
    report.heading("In-distribution check")
    if not summary.get("available"):
        report.paragraph(f"No in-distribution check: {summary.get('note')}. Frames that are not macaque "
                         "face crops cannot be refused.", note=True)
        return
    threshold = summary.get("threshold")
    threshold_text = "each fold's own threshold" if threshold is None else f"threshold {threshold:.4g}"
    verdict = "meets" if summary["goal_met"] else "DOES NOT MEET"
    report.paragraph(
        f"The check ({summary['score']}, {threshold_text}, refusal level {summary['level']:g} on "
        f"inner-validation frames) refused {summary['refused']} of {summary['frames']} of {what} "
        f"({format_percent(summary['share'])}); this {verdict} the goal of at most "
        f"{format_percent(summary['goal'], 0)}. A refused frame is an abstention: the page says the "
        "picture does not look like the macaque face crops the model was trained on."
    )
    report.table([{"individual": row["individual"], "frames": row["frames"], "refused": row["refused"],
                   "share refused": format_percent(row["share"])} for row in summary["per_individual"]],
                 columns=["individual", "frames", "refused", "share refused"])
