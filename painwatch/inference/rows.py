"""One CSV row per answered frame: the columns the page's download and bulk prediction share.

A row holds a :class:`~painwatch.inference.predict.FrameResult`'s values at full precision (floats
written with ``repr``, so they read back exactly) and its provenance: the certification settings, the
frame's noise seed (give it back to re-check the certificate), the predictor's fixed seed (empty in
deployment, where every frame's seed is unpredictable) and the bundle's weights hash, so that a row
copied elsewhere still says where it came from. Radii are L2 norms in [0, 1] pixel units at the model's
input size (docs/design.md, "Units and conventions").
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from painwatch import __version__

CSV_COLUMNS_FIXED: tuple[str, ...] = (
    "frame", "file", "time_s", "label", "class_index", "confidence",
)
CSV_COLUMNS_TAIL: tuple[str, ...] = (
    "abstain_reason", "in_distribution_score", "in_distribution_threshold", "radius_l2", "radius_rms",
    "radius_grey_levels", "method", "sigma", "alpha", "n", "n_budget", "forward_passes", "noise_seed", "seed",
    "bundle_weights_sha256", "painwatch_version",
)
"""After the per-class probabilities: why a frame was refused (in words), its in-distribution score and
the threshold above which a frame is refused (empty for a bundle without a check), the certificate, the
settings (``n`` = estimation draws used for this frame, ``n_budget`` = the most allowed), the frame's
noise seed (give it back to re-check the certificate), the predictor's fixed seed (empty in deployment,
where every frame's seed is unpredictable) and the bundle's weights hash."""

DETAIL_COLUMNS: tuple[str, ...] = ("abstain_code", "bound", "stop_reason", "classifier")
"""The rest of a FrameResult's fields, after :data:`CSV_COLUMNS_TAIL` in bulk results: the refusal's
code, the statistic the radius came from, why sequential sampling stopped, the certified classifier."""


def csv_columns(classes: Sequence[str]) -> list[str]:
    """Header of the page's CSV download: fixed columns, one ``prob_<class>`` per class, provenance."""
    return [*CSV_COLUMNS_FIXED, *(f"prob_{name}" for name in classes), *CSV_COLUMNS_TAIL]


def result_row(
    result: Any,
    *,
    frame: str,
    file: str,
    time_s: float | None,
    classes: Sequence[str],
    budget: int | None,
    seed: int | None,
    weights_sha256: str,
) -> dict[str, Any]:
    """The values of one frame's row, by column of :func:`csv_columns` then :data:`DETAIL_COLUMNS`.

    ``result`` is a FrameResult; ``frame`` the frame's name, ``file`` the file it came from, ``time_s``
    its time in the clip (None for still frames); ``budget`` the most estimation draws allowed,
    ``seed`` the predictor's fixed seed (None in deployment), ``weights_sha256`` the bundle's hash.
    """
    row: dict[str, Any] = {
        "frame": frame,
        "file": file,
        "time_s": time_s,
        "label": str(result.label),
        "class_index": int(result.class_index),
        "confidence": float(result.confidence),
    }
    for name in classes:
        row[f"prob_{name}"] = float(result.probabilities[name])
    row.update(
        {
            "abstain_reason": result.abstain_reason,
            "in_distribution_score": result.in_distribution_score,
            "in_distribution_threshold": result.in_distribution_threshold,
            "radius_l2": float(result.radius),
            "radius_rms": float(result.radius_rms),
            "radius_grey_levels": float(result.radius_grey_levels),
            "method": str(result.method),
            "sigma": float(result.sigma),
            "alpha": float(result.alpha),
            "n": int(result.n),
            "n_budget": budget,
            "forward_passes": int(result.forward_passes),
            "noise_seed": result.noise_seed,
            "seed": seed,
            "bundle_weights_sha256": weights_sha256,
            "painwatch_version": __version__,
            "abstain_code": result.abstain_code,
            "bound": float(result.bound),
            "stop_reason": result.stop_reason,
            "classifier": result.classifier,
        }
    )
    return row


def csv_value(value: Any) -> Any:
    """A value as a CSV cell: empty for None and NaN (as in the JSON download), every digit of a float
    (``repr``), anything else as is."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    # repr keeps every digit of a float (str would too on 3.x, but be explicit).
    return repr(value) if isinstance(value, float) else value
