"""What the pages need of the animal records, kept free of Streamlit: saving an analysed batch as a check,
when the page must ask for sign-in, the animal page's chart data and file names.

The records themselves (database, check service, reports, accounts) are :mod:`painwatch.records`; the
Streamlit sections over this module are :mod:`painwatch.app.widgets`.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from collections.abc import Mapping, Sequence
from datetime import datetime, tzinfo
from typing import Any

import pandas as pd

from painwatch.app.downloads import Provenance
from painwatch.app.uploads import FileProblem, Frame, check_aligned
from painwatch.records.database import Database
from painwatch.records.history import local_time
from painwatch.records.service import CheckSummary, ModelUsed, SavedCheck, save_check
from painwatch.records.settings import SIGN_IN_ALWAYS, RecordsSettings

LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})


def model_used(provenance: Provenance, model_card: Mapping[str, Any]) -> ModelUsed:
    """The record of the model behind a batch: its provenance and its model card (gate verdicts)."""
    return ModelUsed(
        bundle_path=provenance.bundle_path,
        weights_sha256=provenance.weights_sha256,
        architecture=provenance.architecture,
        classes=tuple(provenance.classes),
        certification=dict(provenance.certification),
        seed=provenance.seed,
        gate_passed=provenance.gate_passed,
        model_card=dict(model_card),
    )


def save_batch(
    frames: Sequence[Frame],
    results: Sequence[Any],
    provenance: Provenance,
    *,
    database: Database,
    model_card: Mapping[str, Any],
    animal: str,
    create_animal: bool = False,
    notes: str = "",
    recorded_by: str | None = None,
    problems: Sequence[FileProblem] = (),
    analysed_at: datetime | None = None,
    settings: RecordsSettings | None = None,
) -> SavedCheck:
    """Save an analysed batch (``results[i]`` the answer for ``frames[i]``) as one check of ``animal``
    (see :func:`painwatch.records.service.save_check`: one transaction; an unknown animal only with
    ``create_animal``)."""
    check_aligned(frames, results)
    return save_check(
        database, frames, results, model=model_used(provenance, model_card), animal=animal,
        create_animal=create_animal, notes=notes, recorded_by=recorded_by,
        problems=[dataclasses.asdict(p) for p in problems], analysed_at=analysed_at, settings=settings,
    )


def is_loopback(address: str | None) -> bool:
    """Whether a server address listens on this machine only (127.0.0.0/8, ::1, localhost).

    An empty address is not: Streamlit then listens on every interface.
    """
    text = (address or "").strip().strip("[]")
    if not text:
        return False
    if text.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(text).is_loopback
    except ValueError:
        return False  # a host name: it may well be reachable from elsewhere


def sign_in_required(address: str | None, policy: str) -> bool:
    """Whether the page asks for sign-in when served at ``address`` (Streamlit's ``server.address``)
    under the ``sign_in`` policy: always for ``always``, else unless it listens on loopback only."""
    return policy == SIGN_IN_ALWAYS or not is_loopback(address)


MEASURES: tuple[str, ...] = ("pain frames (share of answered)", "mean confidence", "refused frames (share)")


def history_chart_data(checks: Sequence[CheckSummary], zone: tzinfo | None = None) -> pd.DataFrame:
    """Long-form data for the time-course chart: per check and measure of :data:`MEASURES`, its value
    in [0, 1] (missing when every frame was refused), with the check's time in ``zone`` (naive, for the
    chart's axis), its number, frames, refusals and notes for the tooltip."""
    rows = []
    for check in checks:
        values = (check.pain_share, check.mean_confidence,
                  check.abstained / check.frames if check.frames else None)
        for measure, value in zip(MEASURES, values, strict=True):
            rows.append({
                "time": local_time(check.created_at, zone).replace(tzinfo=None),
                "check": check.check_id,
                "measure": measure,
                "value": value,
                "frames": check.frames,
                "refused": check.abstained,
                "notes": check.notes,
            })
    table = pd.DataFrame(rows, columns=["time", "check", "measure", "value", "frames", "refused", "notes"])
    table["value"] = table["value"].astype("float64")
    return table


def file_stem(*parts: str) -> str:
    """A file name stem from words, e.g. ``painwatch-M01-checks``: letters, digits, ``.``, ``_`` and ``-``."""
    text = "-".join(p for p in parts if p)
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "painwatch"


def check_label(check: CheckSummary, zone: tzinfo | None = None) -> str:
    """How a check is named in a picker: its time, who recorded it, and the start of its notes."""
    by = f" by {check.recorded_by}" if check.recorded_by else ""
    notes = f": {check.notes[:40]}{'…' if len(check.notes) > 40 else ''}" if check.notes else ""
    return f"#{check.check_id} {local_time(check.created_at, zone):%Y-%m-%d %H:%M}{by}{notes}"


__all__ = ["MEASURES", "check_label", "file_stem", "history_chart_data", "is_loopback", "model_used",
           "save_batch", "sign_in_required"]
