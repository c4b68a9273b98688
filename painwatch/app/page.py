"""What the page shows, kept free of Streamlit: the results table, the summary, the time course, the
radius in words, the gate verdicts, thumbnails and the saliency overlay.

Units (docs/design.md, "Units and conventions"): a radius is an L2 norm in [0, 1]-pixel space at the
model's input resolution; its 8-bit grey-level equivalent is ``255 * r / sqrt(C*H*W)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import cv2
import numpy as np
import pandas as pd
from matplotlib import colormaps

from painwatch.app.uploads import Frame, check_aligned
from painwatch.data import centre_square
from painwatch.inference import ABSTAIN_LABEL
from painwatch.models import GateVerdict
from painwatch.robust import method_spec


def is_abstention(result: Any) -> bool:
    """True when the Predictor abstained on this frame (class index -1)."""
    return int(result.class_index) < 0


ABSTAIN_STATUS: dict[str, str] = {
    "unclear_under_noise": "refused: no clear answer under noise",
    "not_like_training_frames": "refused: not like the training face crops",
}
"""The table's status of an abstention, by ``abstain_code`` (the reason in a few words; the frame view
and the downloads give it in full)."""

NO_CHECK_WARNING = (
    "**This model cannot tell when a picture is not a macaque face.** It answers every picture, a cat, a "
    "person or an empty frame included, as if it were a macaque face crop ({note}). Upload only face "
    "crops of macaques."
)
"""What the page says about a bundle without an in-distribution check; ``{note}`` says why it has none."""


TABLE_COLUMNS: tuple[str, ...] = (
    "frame", "file", "time (s)", "class", "confidence", "certified radius (L2)",
    "radius (grey levels)", "noise kept (at least)", "method", "status", "certified",
)
"""Columns of the on-page results table, in order: ``noise kept (at least)`` is the share of random
pixel noise at the certification sigma that leaves the answer unchanged (a lower bound at level
``1 - alpha``), ``certified`` the share of the frame's draw budget spent (1 once certified)."""


STATUS_ROBUST = "robust to small pixel changes"
"""A frame with a radius above 0: no pixel change smaller than the radius can change the answer."""
STATUS_NOT_ROBUST = "no guarantee (radius 0)"
STATUS_REFUSED = "refused"

ROBUST_IS_NOT_CORRECT = (
    "*Robust* means that no change of the pixels smaller than the radius can change the answer. It does "
    "not mean the answer is correct: how often the model is right is in the model card."
)


def status_of(result: Any) -> str:
    """The table's status of one answer, in words: robust up to its radius, no guarantee, or refused
    (with the reason)."""
    if is_abstention(result):
        code = getattr(result, "abstain_code", None) or ""
        if code in ABSTAIN_STATUS:
            return ABSTAIN_STATUS[code]
        reason = getattr(result, "abstain_reason", None)
        return f"{STATUS_REFUSED}: {reason}" if reason else STATUS_REFUSED
    return STATUS_ROBUST if float(result.radius) > 0 else STATUS_NOT_ROBUST


def results_table(frames: Sequence[Frame], results: Sequence[Any]) -> Any:
    """The on-page results table (a pandas DataFrame), one row per frame, in upload order.

    ``class`` is the predicted class name or "abstain"; ``confidence`` is the calibrated probability
    of the predicted class (empty for abstentions); radii are exactly the Predictor's values
    (``radius`` and ``radius_grey_levels``); ``status`` is :func:`status_of` the answer.
    """
    check_aligned(frames, results)
    rows = []
    for frame, result in zip(frames, results, strict=True):
        abstained = is_abstention(result)
        rows.append(
            {
                "frame": frame.name,
                "file": frame.source,
                "time (s)": frame.time_s,
                "class": ABSTAIN_LABEL if abstained else str(result.label),
                "confidence": None if abstained else float(result.confidence),
                "certified radius (L2)": float(result.radius),
                "radius (grey levels)": float(result.radius_grey_levels),
                "noise kept (at least)": getattr(result, "noise_survival", None),
                "method": str(result.method),
                "status": status_of(result),
                "certified": 1.0,
            }
        )
    table = pd.DataFrame(rows, columns=list(TABLE_COLUMNS))
    for column in ("time (s)", "confidence", "noise kept (at least)"):
        table[column] = table[column].astype("float64")
    return table


@dataclass(frozen=True)
class Summary:
    """Counts over a batch; ``pain_share`` is over frames with an answer (abstentions excluded);
    ``refused`` counts the abstentions on frames unlike the training frames."""

    frames: int
    pain: int
    no_pain: int
    abstained: int
    certified: int
    refused: int = 0

    @property
    def decided(self) -> int:
        return self.frames - self.abstained

    @property
    def pain_share(self) -> float | None:
        """Share of pain among frames with an answer, in [0, 1]; ``None`` when every frame abstained."""
        return self.pain / self.decided if self.decided else None


def summarize(results: Sequence[Any], pain_label: str = "pain") -> Summary:
    """Count pain / no-pain / abstained (of them refused as unlike the training frames) / certified
    (radius > 0) frames."""
    abstained = sum(1 for r in results if is_abstention(r))
    pain = sum(1 for r in results if not is_abstention(r) and r.label == pain_label)
    certified = sum(1 for r in results if not is_abstention(r) and float(r.radius) > 0)
    refused = sum(1 for r in results if getattr(r, "abstain_code", None) == "not_like_training_frames")
    return Summary(len(results), pain, len(results) - abstained - pain, abstained, certified, refused)


def time_course(frames: Sequence[Frame], results: Sequence[Any], pain_label: str = "pain") -> Any:
    """Per clip frame: clip, time (s), probability of pain, class; an empty DataFrame without clips."""

    check_aligned(frames, results)
    rows = [
        {
            "clip": frame.source,
            "time (s)": frame.time_s,
            "P(pain)": float(result.probabilities.get(pain_label, float("nan"))),
            "class": ABSTAIN_LABEL if is_abstention(result) else str(result.label),
        }
        for frame, result in zip(frames, results, strict=True)
        if frame.time_s is not None
    ]
    return pd.DataFrame(rows, columns=["clip", "time (s)", "P(pain)", "class"])


def describe_radius(radius: float, grey_levels: float, *, method: str, alpha: float) -> str:
    """One plain-language sentence on what a certified radius guarantees."""
    if radius <= 0:
        return (
            "No guarantee for this frame: a small change of the pixels might change the answer. "
            "Treat it with more caution or look at another frame."
        )
    sentence = (
        f"The answer cannot change for any pixel noise whose total L2 size is below {radius:.3g} "
        f"(pixels counted from 0 to 1); spread evenly over the image that is about {grey_levels:.2g} "
        "grey levels (of 255) per pixel."
    )
    if method_spec(method).deterministic:
        sentence += (" This bound is exact for the network itself (one pass, no sampling, no error "
                     "probability).")
    else:
        sentence += (
            f" It holds for the noise-averaged model and was established from random samples, so it can be "
            f"wrong with probability at most {alpha:g}."
        )
    return sentence + " Robust is not the same as correct."


def describe_survival(share: float | None, *, sigma: float, alpha: float) -> str:
    """One plain-language sentence on the share of random noise that leaves the answer unchanged."""
    if share is None or not share > 0:
        return ("No share of random noise is guaranteed to keep this answer (nothing was certified, or "
                "the method draws no noise).")
    return (
        f"With probability at least {1 - alpha:.4g}, at least {share:.1%} of random pixel noise of "
        f"{255 * sigma:.0f} grey levels per pixel (σ = {sigma:g}) leaves this answer unchanged: the "
        "typical case, where the radius is the worst case."
    )


def describe_cost(results: Sequence[Any], seconds: float) -> str:
    """What analysing a batch cost, in words: seconds per frame and network evaluations per frame
    (``FrameResult.forward_passes``), e.g. "0.004 s per frame (1 network evaluation each)"."""
    if not results:
        return "No frame was analysed."
    per_frame = float(seconds) / len(results)
    passes = sorted({int(r.forward_passes) for r in results})
    if len(passes) == 1:
        count = f"{passes[0]} network evaluation{'s' if passes[0] != 1 else ''} each"
    else:
        count = f"{passes[0]} to {passes[-1]} network evaluations each"
    return f"{seconds:.2f} s for {len(results)} frame(s): {per_frame:.3g} s per frame ({count})."


def grey_levels_per_unit_radius(input_shape: Sequence[int]) -> float:
    """Grey levels (of 255) per pixel that an L2 radius of 1, spread evenly over all pixels, amounts to
    at a model input of ``input_shape`` ``(C, H, W)``: ``255 / sqrt(C * H * W)``."""
    return 255.0 / float(np.sqrt(np.prod([int(d) for d in input_shape])))


def radius_note(input_shape: Sequence[int], sigma: float) -> str:
    """What the radius and the noise level mean, with this model's numbers (Markdown)."""
    per_unit = grey_levels_per_unit_radius(input_shape)
    example = 0.1
    return (
        "**What the radius means.** For each frame the model gives a *certified radius* r: the answer "
        "cannot change for any change of the pixels whose total size (L2 norm, pixels from 0 to 1) is below "
        f"r. Spread evenly over all pixels, a radius of {example:g} is about {example * per_unit:.2g} grey "
        f"levels of 255 per pixel for this model (its input is {' x '.join(map(str, input_shape))}); the "
        "'grey levels' column gives it for every frame. Larger is sturdier. A radius of 0 means no "
        "guarantee; 'refused' means the model would not commit to an answer for that frame, and says "
        f"why.\n\n**The noise level σ = {sigma:g}** is per pixel: about {255 * sigma:.0f} grey levels of "
        "random noise on every pixel, which the certificate averages over.\n\n" + ROBUST_IS_NOT_CORRECT
    )


def overlay_saliency(image: np.ndarray, saliency: np.ndarray, opacity: float = 0.45) -> np.ndarray:
    """Blend a saliency map (HxW, values in [0, 1]) over an RGB uint8 image as a heat map.

    The map is resized to the image (bilinear) when sizes differ. Returns HxWx3 uint8.
    """

    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be HxWx3 uint8 RGB, got shape {image.shape} dtype {image.dtype}")
    if saliency.ndim != 2:
        raise ValueError(f"saliency must be a 2-D map, got shape {saliency.shape}")
    if not 0.0 <= opacity <= 1.0:
        raise ValueError(f"opacity must be in [0, 1], got {opacity}")
    heat = np.nan_to_num(saliency.astype(np.float32), nan=0.0)
    if heat.shape != image.shape[:2]:
        heat = cv2.resize(heat, (image.shape[1], image.shape[0]), interpolation=cv2.INTER_LINEAR)
    heat = np.clip(heat, 0.0, 1.0)
    colours = colormaps["jet"](heat)[..., :3] * 255.0
    blended = (1.0 - opacity) * image.astype(np.float32) + opacity * colours
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def tensor_to_image(x: Any) -> np.ndarray:
    """A model input ``(3, H, W)`` float tensor with pixels in [0, 1] as an HxWx3 uint8 RGB array."""
    array = x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)
    if array.ndim != 3 or array.shape[0] != 3:
        raise ValueError(f"expected a (3, H, W) image tensor, got shape {tuple(array.shape)}")
    return np.clip(np.rint(array.transpose(1, 2, 0) * 255.0), 0, 255).astype(np.uint8)


THUMBNAIL_SIDE = 480
"""Longest side, in pixels, of the copy of each uploaded frame the page keeps for display."""


def thumbnail_with_crop(image: np.ndarray, max_side: int = THUMBNAIL_SIDE) -> np.ndarray:
    """A copy of an RGB uint8 frame with its longest side at most ``max_side`` pixels, and the centre
    square the model sees outlined (2 px, white on dark, so it shows on any frame).

    Frames already small enough keep their size. Returns HxWx3 uint8.
    """

    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be HxWx3 uint8 RGB, got shape {image.shape} dtype {image.dtype}")
    if not isinstance(max_side, int) or max_side < 16:
        raise ValueError(f"max_side must be an integer >= 16 pixels, got {max_side!r}")
    height, width = image.shape[:2]
    scale = min(1.0, max_side / max(height, width))
    small = image if scale == 1.0 else cv2.resize(
        image, (max(1, round(width * scale)), max(1, round(height * scale))), interpolation=cv2.INTER_AREA
    )
    small = np.ascontiguousarray(small).copy()
    if height != width:  # a square frame is seen whole: no outline needed
        top, left, side = centre_square(*small.shape[:2])
        corner0, corner1 = (left, top), (left + side - 1, top + side - 1)
        cv2.rectangle(small, corner0, corner1, (20, 20, 20), 4)
        cv2.rectangle(small, corner0, corner1, (255, 255, 255), 2)
    return small


def gate_lines(gate: GateVerdict | None) -> tuple[str, list[str]]:
    """One gate verdict in words for the page: ``(headline, failed_checks)``.

    ``headline`` names the gate file and says passed / FAILED / not run, when, and on how many frames
    and individuals; ``failed_checks`` has one line per failed threshold ("accuracy (point estimate)
    >= 0.6: got 0.425"). Unknown or missing fields are left out rather than guessed.
    """
    if gate is None:
        return "not run", []
    parts = [f"{gate.gate_file}: {'passed' if gate.passed else 'FAILED'}"]
    if gate.date:
        try:
            stamp = datetime.fromisoformat(gate.date)
            parts.append(f"on {stamp.astimezone(UTC):%Y-%m-%d %H:%M} UTC")
        except ValueError:
            parts.append(f"on {gate.date}")
    frames, individuals = gate.details.get("num_frames"), gate.details.get("individuals")
    if isinstance(frames, int) and isinstance(individuals, list) and individuals:
        held = "held-out " if gate.held_out else ""
        parts.append(f"({frames} frames of {len(individuals)} {held}individuals)")
    failed = []
    for check in gate.results:
        if check.get("passed") is False:
            what = check.get("detail") or check.get("name") or "a check"
            value = check.get("value")
            failed.append(f"{what}: got {value:.3g}" if isinstance(value, int | float) else str(what))
    return " ".join(parts), failed
