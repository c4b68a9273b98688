"""An animal's checks over time in words and tables, shared by the animal page and the reports.

A check's *verdict* is what the model answered over its frames ("mostly pain: 4 of 5 answered frames,
1 refused"), never a diagnosis: the answers support, and never replace, the veterinarian's judgement.
The share of pain and the mean confidence are over the frames with an answer; refused frames are
counted apart. Times are stored in UTC and shown in the viewer's time zone when it is known.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, tzinfo
from typing import Any

import pandas as pd

from painwatch.inference.model_card import INTENDED_USE, KNOWN_LIMITS, SYNTHETIC_WARNING
from painwatch.records.service import CheckSummary, FrameRecord

SUPPORTS_NEVER_REPLACES = (
    "painwatch's answers support, and never replace, the veterinarian's judgement: they come from single "
    "frames of the face, without the animal's behaviour, posture or history."
)

HISTORY_COLUMNS: tuple[str, ...] = (
    "check", "time", "recorded by", "notes", "frames", "pain", "no pain", "refused", "pain share",
    "mean confidence", "robust", "model", "gate",
)
"""Columns of :func:`history_table`, in order."""


def local_time(value: datetime, zone: tzinfo | None = None) -> datetime:
    """``value`` (aware) in ``zone`` (UTC when None)."""
    return value.astimezone(zone or UTC)


def format_time(value: datetime, zone: tzinfo | None = None) -> str:
    """A time as ``2026-12-02 14:05`` in ``zone`` (UTC when None)."""
    return f"{local_time(value, zone):%Y-%m-%d %H:%M}"


def zone_name(zone: tzinfo | None) -> str:
    """The name of a time zone for captions ("UTC" when None)."""
    if zone is None:
        return "UTC"
    return str(getattr(zone, "key", None) or zone.tzname(datetime.now(UTC)) or zone)


def verdict_words(check: CheckSummary) -> str:
    """What the model answered over the check's frames, in words (not a diagnosis)."""
    decided = check.frames - check.abstained
    refused = f", {check.abstained} refused" if check.abstained else ""
    if not decided:
        return f"no answer: all {check.frames} frame(s) refused"
    share = check.pain / decided
    lean = "mostly pain" if share > 0.5 else "mostly no pain" if share < 0.5 else "split"
    return f"{lean}: pain on {check.pain} of {decided} answered frame(s) ({share:.0%}){refused}"


def gate_words(model_card: Mapping[str, Any]) -> list[str]:
    """Every gate verdict of a model card in words ("default.toml: passed on 2026-11-25"); one line ("not
    run: ...") when there is none."""
    gates = model_card.get("gates") or {}
    if not gates:
        return ["not run: use the answers for research only"]
    lines = []
    for name, gate in gates.items():
        verdict = "passed" if gate.get("passed") else "FAILED"
        date = str(gate.get("date") or "")[:10]
        failed = [str(r.get("detail") or r.get("name")) for r in gate.get("results") or []
                  if r.get("passed") is False]
        line = f"{name}: {verdict}" + (f" on {date}" if date else "")
        lines.append(line + (f" (failed: {'; '.join(failed)})" if failed else ""))
    return lines


def gate_summary(check: CheckSummary) -> str:
    """The model's gate state in one word: passed, FAILED or not run."""
    passed = check.model.gate_passed
    return "not run" if passed is None else "passed" if passed else "FAILED"


def is_synthetic(check: CheckSummary) -> bool:
    """Whether the model of the check was trained on synthetic frames (its model card says so)."""
    return bool((check.model.model_card.get("training_data") or {}).get("synthetic"))


def limits_of_use(checks: Sequence[CheckSummary]) -> list[str]:
    """The limits of use for a report of ``checks``: supports, never replaces, the veterinarian's
    judgement; the model card's intended use and limits; a warning for models trained on synthetic frames."""
    lines = [SUPPORTS_NEVER_REPLACES]
    if any(is_synthetic(c) for c in checks):
        lines.append(SYNTHETIC_WARNING)
    card = checks[-1].model.model_card if checks else {}
    lines.append(str(card.get("intended_use") or INTENDED_USE))
    lines += [str(limit) for limit in card.get("limits") or KNOWN_LIMITS]
    return lines


def frame_status(record: FrameRecord) -> str:
    """A stored frame's status in words: robust up to its radius, no guarantee, or refused (why; for a
    frame the in-distribution check refused, its score against the threshold)."""
    result = record.result
    if result.class_index < 0:
        status = f"refused: {result.abstain_reason}" if result.abstain_reason else "refused"
        score, threshold = result.in_distribution_score, result.in_distribution_threshold
        if score is not None and threshold is not None and score > threshold:
            status += f" (in-distribution score {score:.3g} above the threshold {threshold:.3g})"
        return status
    return "robust to small pixel changes" if result.radius > 0 else "no guarantee (radius 0)"


def history_table(checks: Sequence[CheckSummary], zone: tzinfo | None = None) -> pd.DataFrame:
    """One row per check, oldest first (:data:`HISTORY_COLUMNS`); ``time`` is in ``zone``, ``pain share``
    and ``mean confidence`` in [0, 1] over the answered frames (empty when every frame was refused)."""
    rows = [
        {
            "check": check.check_id,
            "time": local_time(check.created_at, zone),
            "recorded by": check.recorded_by or "",
            "notes": check.notes,
            "frames": check.frames,
            "pain": check.pain,
            "no pain": check.no_pain,
            "refused": check.abstained,
            "pain share": check.pain_share,
            "mean confidence": check.mean_confidence,
            "robust": check.certified,
            "model": f"{check.model.architecture} {check.model.weights_sha256[:12]}",
            "gate": gate_summary(check),
        }
        for check in checks
    ]
    table = pd.DataFrame(rows, columns=list(HISTORY_COLUMNS))
    for column in ("pain share", "mean confidence"):
        table[column] = table[column].astype("float64")
    return table


def frames_table(frames: Sequence[FrameRecord]) -> pd.DataFrame:
    """One row per stored frame: name, file, time, answer, confidence, radius (L2 and grey levels), method,
    in-distribution score (empty without the check), status."""
    rows = [
        {
            "frame": record.result.name,
            "file": record.source,
            "time (s)": record.result.time_s,
            "class": "abstain" if record.result.class_index < 0 else record.result.label,
            "confidence": None if record.result.class_index < 0 else record.result.confidence,
            "certified radius (L2)": record.result.radius,
            "radius (grey levels)": record.result.radius_grey_levels,
            "method": record.result.method,
            "in-distribution score": record.result.in_distribution_score,
            "status": frame_status(record),
        }
        for record in frames
    ]
    table = pd.DataFrame(rows, columns=["frame", "file", "time (s)", "class", "confidence",
                                        "certified radius (L2)", "radius (grey levels)", "method",
                                        "in-distribution score", "status"])
    for column in ("time (s)", "confidence", "in-distribution score"):
        table[column] = table[column].astype("float64")
    return table


__all__ = ["HISTORY_COLUMNS", "SUPPORTS_NEVER_REPLACES", "format_time", "frame_status", "frames_table",
           "gate_summary", "gate_words", "history_table", "is_synthetic", "limits_of_use", "local_time",
           "verdict_words", "zone_name"]
