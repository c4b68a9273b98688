"""What the page shows while certificates grow: the draw budget a time budget allows, every frame's row
(its first answer, then its certificate as it comes), the progress of the whole upload and the bound in
use, in words. Streamlit-free (docs/design.md, "The answer at once and a certificate that grows").

Units: radii are L2 norms in [0, 1] pixels at the model's input size; times in seconds; throughput in
forward passes (noisy copies through the network) per second, as the engine measures it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd

from painwatch.app.certifier import JobSnapshot
from painwatch.app.page import ABSTAIN_STATUS, STATUS_REFUSED, TABLE_COLUMNS, is_abstention, status_of
from painwatch.app.uploads import Frame, check_aligned
from painwatch.inference import ABSTAIN_LABEL
from painwatch.robust import method_spec

DEFAULT_SECONDS_PER_FRAME = 60.0
"""The page's default time budget per frame: about what a veterinarian waits for one frame."""
MAX_SECONDS_PER_FRAME = 600.0
"""The largest time budget per frame the page offers."""
PAGE_MAX_DRAWS = 20_000
"""The sample slider's cap when the throughput is not known yet: 20 000 draws of a ResNet50 at 224 px
take about half an hour a frame on a 2-core CPU."""
POLL_S = 1.0
"""Seconds between two looks of the page at the certification worker."""

STATUS_QUEUED = "waiting to be certified"
STATUS_CERTIFYING = "certifying"


@dataclass(frozen=True)
class DrawBudget:
    """The estimation draws per frame the page certifies with.

    ``n = min(requested, fits)`` kept within the bundle's bounds ``[low, high]``; ``fits`` is what
    ``seconds`` allow at ``passes_per_s`` (after the selection draws and the answer's pass).
    """

    n: int
    requested: int
    seconds: float
    fits: int
    passes_per_s: float
    low: int
    high: int

    @property
    def limited_by_time(self) -> bool:
        """The time budget, not the sample budget, set ``n``."""
        return self.n < self.requested

    @property
    def over_time(self) -> bool:
        """Even the bundle's smallest budget takes longer than ``seconds`` at this throughput."""
        return self.n > self.fits


def choose_budget(predictor: Any, *, requested: int, seconds: float) -> DrawBudget:
    """The :class:`DrawBudget` of ``predictor`` for a sample budget ``requested`` and a time budget of
    ``seconds`` per frame, from the engine's measured throughput (a warm-up pass when none yet)."""
    bounds = predictor.metadata.certification.bounds.get("n", [predictor.settings.n] * 2)
    low, high = (int(v) for v in bounds)
    fits = int(predictor.draw_budget(float(seconds)))
    n = max(low, min(high, int(requested), fits))
    return DrawBudget(n=n, requested=int(requested), seconds=float(seconds), fits=fits,
                      passes_per_s=float(predictor.engine.draws_per_s), low=low, high=high)


def budget_words(budget: DrawBudget) -> str:
    """The budget in one sentence: how many draws per frame and why."""
    rate = f"{budget.passes_per_s:.3g} forward passes per second" if math.isfinite(budget.passes_per_s) \
        else "an unknown speed"
    if budget.over_time:
        return (f"{budget.n} noise draws per frame, the smallest this model allows: at {rate} that takes "
                f"longer than the time budget of {budget.seconds:g} s.")
    if budget.limited_by_time:
        return (f"{budget.n} noise draws per frame (of the {budget.requested} asked for): what a time "
                f"budget of {budget.seconds:g} s allows at {rate}.")
    if math.isfinite(budget.passes_per_s) and budget.passes_per_s > 0:
        return f"{budget.n} noise draws per frame, about {budget.n / budget.passes_per_s:.0f} s at {rate}."
    return f"{budget.n} noise draws per frame."


def sample_cap(high: int, passes_per_s: float | None) -> int:
    """The sample slider's largest value: the bundle's bound, at most what :data:`MAX_SECONDS_PER_FRAME`
    allows at ``passes_per_s`` (or :data:`PAGE_MAX_DRAWS` when the throughput is not known)."""
    if passes_per_s is None or not math.isfinite(passes_per_s) or passes_per_s <= 0:
        return min(int(high), PAGE_MAX_DRAWS)
    return max(1, min(int(high), int(passes_per_s * MAX_SECONDS_PER_FRAME)))


def bound_in_words(interim_valid: bool, method: str) -> str:
    """Which bound is in use and what it means for the radius shown while sampling (Markdown)."""
    if method_spec(method).deterministic:
        return (f"**Exact bound** ({method}): computed from the network itself in one pass, without noise "
                "draws; each frame's radius comes with its answer.")
    if interim_valid:
        return (f"**Anytime-valid bound** ({method}): the radius shown holds at every moment with the "
                "stated error probability, so it is safe to stop looking early; it grows as noise draws "
                "come in, until the budget is spent or the radius is decided.")
    how = "Clopper-Pearson over all draws" if method == "randomized_smoothing" else "from all draws at once"
    return (f"**Fixed-budget bound** ({method}, {how}): no radius is valid before the budget is spent, so "
            "each frame shows its progress and then its radius.")


def upload_progress_words(snapshot: JobSnapshot) -> str:
    """The whole upload's certification in one line: frames done, time left at most."""
    total = len(snapshot.results)
    done = snapshot.frames_done
    if snapshot.state == "failed":
        return f"Certification failed: {snapshot.error}"
    if snapshot.state == "cancelled":
        return "Certification was cancelled (the uploads changed)."
    if snapshot.finished:
        return f"All {total} frame(s) certified."
    waiting = f" after {snapshot.ahead} other analysis(es)" if snapshot.ahead else ""
    left = (f"; at most about {_duration(snapshot.time_left_s)} left at {snapshot.passes_per_s:.3g} forward "
            "passes per second" if math.isfinite(snapshot.time_left_s) else "")
    return f"Certifying{waiting}: {done} of {total} frame(s) done{left}."


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{max(seconds, 0):.0f} s"
    return f"{seconds / 60:.0f} min"


def upload_fraction(snapshot: JobSnapshot) -> float:
    """Share of the whole upload's draw budget spent (finished frames count whole), in [0, 1]."""
    total = len(snapshot.results) * max(snapshot.budget, 1)
    spent = sum(max(snapshot.budget, 1) if result is not None else (step.draws if step is not None else 0)
                for step, result in zip(snapshot.progress, snapshot.results, strict=True))
    return min(1.0, spent / total) if total else 1.0


def frame_status(step: Any, result: Any, interim_valid: bool) -> str:
    """A row's status: the certificate's (:func:`status_of`) once done, else where sampling stands."""
    if result is not None:
        return status_of(result)
    if step is None:
        return STATUS_QUEUED
    share = f"{step.fraction:.0%} of {step.budget} draws"
    if interim_valid and step.radius > 0:
        return f"{STATUS_CERTIFYING}: radius so far {step.radius:.3g} ({share})"
    return f"{STATUS_CERTIFYING}: {share}"


def live_table(frames: Sequence[Frame], answers: Sequence[Any], snapshot: JobSnapshot | None,
               *, grey_levels_per_unit: float, method: str) -> Any:
    """The results table while certificates grow: every frame's first answer, its radius so far (with
    the anytime bound) or its final certificate, its progress (``certified``, 0 to 1) and status.

    Columns are :data:`TABLE_COLUMNS`; ``grey_levels_per_unit`` converts an interim radius to grey
    levels (:func:`painwatch.app.page.grey_levels_per_unit_radius`); ``method`` names the method of
    the certificates still growing.
    """
    check_aligned(frames, answers)
    interim = bool(snapshot and snapshot.interim_valid)
    rows = []
    for index, (frame, answer) in enumerate(zip(frames, answers, strict=True)):
        step = snapshot.progress[index] if snapshot is not None else None
        result = snapshot.results[index] if snapshot is not None else None
        row = {"frame": frame.name, "file": frame.source, "time (s)": frame.time_s}
        if result is not None:
            abstained = is_abstention(result)
            row.update({"class": ABSTAIN_LABEL if abstained else str(result.label),
                        "confidence": None if abstained else float(result.confidence),
                        "certified radius (L2)": float(result.radius),
                        "radius (grey levels)": float(result.radius_grey_levels),
                        "noise kept (at least)": result.noise_survival, "certified": 1.0})
        elif getattr(answer, "abstain_code", None):  # refused on its clean pass: nothing to certify
            row.update({"class": ABSTAIN_LABEL, "confidence": None, "certified radius (L2)": 0.0,
                        "radius (grey levels)": 0.0, "noise kept (at least)": None, "certified": 1.0})
        else:
            growing = step is not None and interim
            radius = float(step.radius) if growing else None
            row.update({"class": str(answer.label), "confidence": float(answer.confidence),
                        "certified radius (L2)": radius,
                        "radius (grey levels)": None if radius is None else radius * grey_levels_per_unit,
                        "noise kept (at least)": step.noise_survival if growing else None,
                        "certified": step.fraction if step is not None else 0.0})
        row["method"] = str(result.method) if result is not None else method
        code = getattr(answer, "abstain_code", None)
        row["status"] = ABSTAIN_STATUS.get(code, STATUS_REFUSED) if (result is None and code) \
            else frame_status(step, result, interim)
        rows.append(row)
    table = pd.DataFrame(rows, columns=list(TABLE_COLUMNS))
    for column in ("time (s)", "confidence", "certified radius (L2)", "radius (grey levels)",
                   "noise kept (at least)", "certified"):
        table[column] = table[column].astype("float64")
    return table
