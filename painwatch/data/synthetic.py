"""A SYNTHETIC demo set of macaque-like face frames, drawn procedurally (numpy + OpenCV).

These frames are drawings, not photographs: they exist so that anyone can run the whole pipeline at
once, and they say nothing about clinical performance. Everything written is labelled synthetic: the
individuals are named ``syn-mNN``, files ``synthetic_<label>_NNN.jpg``, the manifest has a
``synthetic`` column, and the folder gets a README saying so.

What is drawn. Each individual has its own head and face shape, fur colour (grey-brown), face
colour (pink to red, as in Japanese macaques), eye spacing and size, ear size and pigment markings.
Pain frames show the facial-action cues that grimace scales report for macaques, each at its own
intensity: orbital tightening (narrowed eyes, crow's-feet wrinkles), brow lowering (brows pulled down
and together, furrow lines), lip tension (a thin, wide, pressed mouth), ears flattened back (smaller
and turned, partly hidden by the head) and cheek tightening (nasolabial creases, raised cheeks).
No-pain frames draw the relaxed versions with natural variation, including blinks; the two intensity
ranges overlap, so some frames are genuinely ambiguous. Both classes get the same distribution of
lighting, colour cast, pose (rotation, scale, position), blur, sensor noise, background and JPEG
quality, so a classifier has to learn the cues, not the individual or the photography.
"""

from __future__ import annotations

import csv
import functools
import io
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from painwatch import CLASS_NAMES
from painwatch.io import atomic_write_text

DEMO_IMAGE_SIZE: int = 160
"""Default frame size (pixels, square): the face occupies roughly 55-80% of it."""

DEMO_FRAMES_PER_CLASS: int = 20
"""Default frames per individual and class: 21 x 2 x 20 = 840 frames, a couple of minutes of CPU
training with a small backbone."""

DEMO_INDIVIDUALS: int = 21
"""Individuals in the published study, and the default here."""

README_MARKER = "<!-- painwatch synthetic demo set -->"
"""First line of the README that :func:`make_demo_dataset` writes; ``overwrite`` only ever removes a
folder that carries it, and :func:`painwatch.data.is_synthetic` recognises the set by it."""

CUES: tuple[str, ...] = ("orbital", "brow", "lip", "ears", "cheek")
"""The grimace cues, in manifest column order (each 0 = relaxed ... 1 = strongest)."""

_CANVAS = 256  # the face is drawn in a 256 x 256 canonical frame, then warped into the picture
_FEATURE_SCALE = 1.3  # eyes and mouth are drawn larger than life so their cues survive 64 px model inputs


@dataclass(frozen=True)
class IndividualStyle:
    """What makes one synthetic individual look like itself (canonical-canvas pixels and RGB 0..255)."""

    name: str
    fur: tuple[float, float, float]
    face: tuple[float, float, float]
    head_width: float
    head_height: float
    face_width: float
    muzzle_width: float
    eye_spacing: float
    eye_size: float
    ear_size: float
    baseline_eye_open: float
    markings: tuple[tuple[float, float, float, float], ...]
    fur_texture_seed: int


def _individual_style(name: str, rng: np.random.Generator) -> IndividualStyle:
    # Fur: grey-brown, from cool grey to warm brown.
    warmth = rng.uniform(0, 1)
    base = rng.uniform(95, 175)
    fur = (base + 26 * warmth, base + 8 * warmth - 2, base - 20 * warmth - 6)
    # Face: pink (pale adult female) to deep red; redness and lightness vary by individual.
    redness = rng.uniform(0, 1)
    lightness = rng.uniform(0.85, 1.05)
    face = (
        lightness * rng.uniform(205, 240),
        lightness * (170 - 95 * redness + rng.uniform(-8, 8)),
        lightness * (160 - 85 * redness + rng.uniform(-8, 8)),
    )
    markings = tuple(
        (rng.uniform(-40, 40), rng.uniform(-30, 60), rng.uniform(2.5, 7.0), rng.uniform(0.55, 0.8))
        for _ in range(int(rng.integers(0, 5)))
    )
    return IndividualStyle(
        name=name,
        fur=tuple(float(np.clip(c, 40, 230)) for c in fur),
        face=tuple(float(np.clip(c, 60, 245)) for c in face),
        head_width=float(rng.uniform(0.85, 1.0)),
        head_height=float(rng.uniform(0.86, 1.0)),
        face_width=float(rng.uniform(0.82, 1.0)),
        muzzle_width=float(rng.uniform(0.85, 1.1)),
        eye_spacing=float(rng.uniform(0.9, 1.1)),
        eye_size=float(rng.uniform(0.9, 1.12)),
        ear_size=float(rng.uniform(1.0, 1.3)),
        baseline_eye_open=float(rng.uniform(-0.08, 0.08)),
        markings=markings,
        fur_texture_seed=int(rng.integers(0, 2**31 - 1)),
    )


@functools.lru_cache(maxsize=128)
def _fur_texture(seed: int) -> np.ndarray:
    """A 256 x 256 multiplicative fur texture around 1.0 (strands plus low-frequency mottling)."""
    import cv2

    rng = np.random.default_rng(seed)
    fine = rng.normal(0, 1, (_CANVAS, _CANVAS)).astype(np.float32)
    strands = cv2.GaussianBlur(fine, (0, 0), sigmaX=0.6, sigmaY=2.5)  # hair runs roughly downwards
    coarse = cv2.resize(
        rng.normal(0, 1, (8, 8)).astype(np.float32), (_CANVAS, _CANVAS), interpolation=cv2.INTER_CUBIC
    )
    texture = 1.0 + 0.16 * strands / (strands.std() + 1e-6) + 0.06 * coarse
    texture.flags.writeable = False  # shared through the cache
    return texture


def _shade(colour: tuple[float, float, float], factor: float) -> tuple[float, float, float]:
    return tuple(min(255.0, max(0.0, c * factor)) for c in colour)


def _pt(x: float, y: float) -> tuple[int, int]:
    # Drawing at 4x sub-pixel precision (shift=2) keeps thin features smooth after warping.
    return round(x * 4), round(y * 4)


def _ellipse(img, centre, axes, angle, colour, thickness=-1) -> None:
    import cv2

    cv2.ellipse(
        img,
        _pt(*centre),
        (max(1, round(axes[0] * 4)), max(1, round(axes[1] * 4))),
        angle,
        0,
        360,
        colour,
        thickness,
        cv2.LINE_AA,
        2,
    )


def _polyline(img, points, colour, thickness, closed=False) -> None:
    import cv2

    pts = np.array([_pt(x, y) for x, y in points], dtype=np.int32).reshape(-1, 1, 2)
    cv2.polylines(img, [pts], closed, colour, max(1, round(thickness)), cv2.LINE_AA, 2)


def _fill(img, points, colour) -> None:
    import cv2

    pts = np.array([_pt(x, y) for x, y in points], dtype=np.int32).reshape(-1, 1, 2)
    cv2.fillPoly(img, [pts], colour, cv2.LINE_AA, 2)


def _curve(x0: float, x1: float, y: float, sag: float, n: int = 12) -> list[tuple[float, float]]:
    """Points of a parabola from (x0, y) to (x1, y) whose middle is ``sag`` pixels lower."""
    xs = np.linspace(x0, x1, n)
    t = (xs - x0) / (x1 - x0)
    return [(float(x), float(y + sag * 4 * u * (1 - u))) for x, u in zip(xs, t, strict=True)]


def render_face(
    style: IndividualStyle, cues: dict[str, float], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Draw one face on the 256 x 256 canonical canvas.

    ``cues`` maps each name in :data:`CUES` to an intensity in [0, 1] (0 relaxed, 1 strongest pain
    expression). Returns ``(rgb float32 (256, 256, 3) in 0..255, alpha float32 (256, 256) in [0, 1])``;
    alpha covers the head and ears. Small per-frame variation (gaze, asymmetry) comes from ``rng``.
    """
    import cv2

    c_orb, c_brow, c_lip, c_ears, c_cheek = (float(np.clip(cues[name], 0, 1)) for name in CUES)
    img = np.zeros((_CANVAS, _CANVAS, 3), np.float32)
    alpha = np.zeros((_CANVAS, _CANVAS), np.float32)
    cx = 128.0
    head_rx, head_ry = 98 * style.head_width, 104 * style.head_height
    head_cy = 132.0
    fur = style.fur
    ear_colour = _shade(style.face, 0.82)

    # Ears first: the head covers their inner part, so flattening them back hides them.
    for side in (-1, 1):
        visible = 1.0 - 0.7 * c_ears
        ex = cx + side * (head_rx - 2 - 16 * c_ears)
        ey = 104 + 16 * c_ears
        axes = (17 * style.ear_size * (0.45 + 0.55 * visible), 23 * style.ear_size * (0.7 + 0.3 * visible))
        angle = side * (8 + 45 * c_ears)
        _ellipse(img, (ex + side * 9, ey), axes, angle, _shade(fur, 0.9))
        _ellipse(img, (ex + side * 9, ey), (axes[0] * 0.62, axes[1] * 0.62), angle, ear_colour)
        _ellipse(alpha, (ex + side * 9, ey), axes, angle, 1.0)

    # Head fur, with a ragged outline.
    theta = np.linspace(0, 2 * np.pi, 96, endpoint=False)
    tufts = rng.standard_normal(theta.size)
    ragged = 1 + 0.03 * (tufts + np.roll(tufts, 1) + np.roll(tufts, -1)) / np.sqrt(3)
    outline = [
        (cx + head_rx * r * np.cos(t), head_cy + head_ry * r * np.sin(t))
        for t, r in zip(theta, ragged, strict=True)
    ]
    head_mask = np.zeros((_CANVAS, _CANVAS), np.float32)
    _fill(head_mask, outline, 1.0)
    _fill(alpha, outline, 1.0)
    texture = _fur_texture(style.fur_texture_seed)
    fur_layer = np.asarray(fur, np.float32)[None, None, :] * texture[:, :, None]
    img += (fur_layer - img) * head_mask[:, :, None]

    # Bare face: the eye region and the muzzle.
    face_mask = np.zeros((_CANVAS, _CANVAS), np.float32)
    fw, mw = style.face_width, style.muzzle_width
    _ellipse(face_mask, (cx, 122), (64 * fw, 46), 0, 1.0)
    _ellipse(face_mask, (cx, 168), (40 * mw, 44), 0, 1.0)
    _ellipse(face_mask, (cx, 142), (48 * fw, 40), 0, 1.0)
    face_mask = cv2.GaussianBlur(face_mask, (0, 0), 1.5)
    yy = np.linspace(-1, 1, _CANVAS, dtype=np.float32)[:, None]
    relief = 1.0 + 0.06 * yy + 0.05 * rng.standard_normal((1, 1)).astype(np.float32)  # forehead a bit darker
    face_layer = np.asarray(style.face, np.float32)[None, None, :] * relief[:, :, None]  # (256, 1, 3)
    img += (face_layer - img) * face_mask[:, :, None]

    # Pigment markings belong to the individual.
    for dx, dy, radius, darkness in style.markings:
        _ellipse(img, (cx + dx, 130 + dy), (radius, radius * 0.8), 0, _shade(style.face, darkness))

    skin_dark = _shade(style.face, 0.62)
    crease = _shade(style.face, 0.5)
    eye_y = 118.0
    spacing = 30 * style.eye_spacing
    eye_w = 14 * _FEATURE_SCALE * style.eye_size
    openness = float(np.clip(1.0 - 0.85 * c_orb + style.baseline_eye_open + rng.normal(0, 0.04), 0.06, 1.1))
    gaze = rng.uniform(-2.5, 2.5)

    for side in (-1, 1):
        ex = cx + side * spacing
        # Eye socket shadow, deeper when the orbit tightens.
        _ellipse(
            img,
            (ex, eye_y + 1),
            (eye_w + 5, 11 * _FEATURE_SCALE + 2 * c_orb),
            0,
            _shade(style.face, 0.8 - 0.15 * c_orb),
        )
        # Almond eye: upper and lower lid curves meet at the corners.
        h = 8.5 * _FEATURE_SCALE * style.eye_size * openness
        upper = _curve(ex - eye_w, ex + eye_w, eye_y, -h)
        lower = _curve(ex + eye_w, ex - eye_w, eye_y, h * 0.55)
        _fill(img, upper + lower, (35, 25, 20))
        if openness > 0.2:
            # Iris and pupil drawn in a small window, then clipped to the lids.
            left, top = int(ex - eye_w - 4), int(eye_y - 18)
            window = img[top : top + 36, left : left + int(2 * eye_w + 8)]
            local = (ex + gaze - left, eye_y + 0.5 - top)
            eye_drawing = window.copy()
            iris = 6.5 * _FEATURE_SCALE * style.eye_size
            _ellipse(eye_drawing, local, (iris, iris), 0, (150, 95, 40))
            _ellipse(eye_drawing, local, (3.2, 3.2 * min(1.0, openness + 0.2)), 0, (10, 8, 8))
            _ellipse(eye_drawing, (local[0] + 2.5, local[1] - 2.5), (1.5, 1.5), 0, (235, 225, 210))
            lids = np.zeros(window.shape[:2], np.float32)
            _fill(lids, [(x - left, y - top) for x, y in upper + lower], 1.0)
            window[:] = window * (1 - lids[:, :, None]) + eye_drawing * lids[:, :, None]
        _polyline(img, upper, (25, 18, 15), 2.2)
        # Orbital tightening: crow's-feet wrinkles at the outer corner and a raised lower lid.
        for k in range(round(4 * c_orb)):
            y_off = (k - 1.5) * 4.0
            _polyline(
                img,
                [(ex + side * (eye_w + 2), eye_y + y_off * 0.5), (ex + side * (eye_w + 11), eye_y + y_off)],
                crease,
                1.8,
            )
        if c_orb > 0.3:
            _polyline(
                img, _curve(ex - eye_w + 2, ex + eye_w - 2, eye_y + 8 + 2 * (1 - c_orb), 3.0), crease, 1.8
            )

        # Brow ridge: lowered and pulled towards the midline with pain (inner end drops more).
        drop = 12 * c_brow
        inner_x, outer_x = ex - side * (eye_w - 1) - side * 3 * c_brow, ex + side * (eye_w + 5)
        inner_y, outer_y = eye_y - 17 + drop * 1.3, eye_y - 19 + drop * 0.6
        brow = [
            (outer_x, outer_y),
            ((inner_x + outer_x) / 2, min(inner_y, outer_y) - 4 + 2 * c_brow),
            (inner_x, inner_y),
        ]
        _polyline(img, brow, _shade(style.face, 0.55 - 0.15 * c_brow), 4.5 + 3.0 * c_brow)
        _polyline(img, [(x, y - 3.5) for x, y in brow], _shade(fur, 0.85), 2.5)

    # Furrow between the brows.
    for k in range(round(3 * c_brow)):
        x = cx + (k - 1) * 4.0
        _polyline(img, [(x, eye_y - 22 + 4 * c_brow), (x + (k - 1) * 0.8, eye_y - 9)], crease, 2.0)

    # Nose: a flat bridge and two nostrils.
    _polyline(img, [(cx, eye_y + 6), (cx, 152)], _shade(style.face, 1.08), 3.0)
    for side in (-1, 1):
        _ellipse(img, (cx + side * 6.5 * mw, 158), (3.6, 2.4), side * 25, skin_dark)

    # Cheek tightening: nasolabial creases from the nose wings down past the mouth corners.
    mouth_y = 186.0
    half_mouth = (14 + 9 * c_lip) * _FEATURE_SCALE * mw
    for side in (-1, 1):
        if c_cheek > 0.15:
            top = (cx + side * 12 * mw, 156)
            bottom = (cx + side * (half_mouth + 6), mouth_y + 4)
            mid = ((top[0] + bottom[0]) / 2 + side * 5 * c_cheek, (top[1] + bottom[1]) / 2)
            _polyline(img, [top, mid, bottom], _shade(style.face, 0.8 - 0.35 * c_cheek), 1.2 + 2.5 * c_cheek)
        # Raised cheek pad under the eye.
        _ellipse(
            img,
            (cx + side * (spacing + 6), eye_y + 20 - 4 * c_cheek),
            (13, 6 + 3 * c_cheek),
            0,
            _shade(style.face, 1.0 + 0.12 * c_cheek),
        )

    # Mouth: relaxed lips are full and softly curved; tense lips are a thin, wide, pressed line.
    lip_h = 7.0 * (1 - c_lip) + 1.0
    sag = 3.0 * (1 - c_lip) + rng.uniform(-1, 1)
    upper_lip = _curve(cx - half_mouth, cx + half_mouth, mouth_y - lip_h * 0.4, -1.5 * (1 - c_lip))
    lower_lip = _curve(cx + half_mouth, cx - half_mouth, mouth_y + lip_h * 0.6, sag)
    _fill(img, upper_lip + lower_lip, _shade(style.face, 0.78))
    _polyline(
        img, _curve(cx - half_mouth, cx + half_mouth, mouth_y, sag * 0.4), (60, 30, 30), 1.6 + 1.6 * c_lip
    )
    if c_lip > 0.4:  # corners pulled back
        for side in (-1, 1):
            _polyline(
                img,
                [(cx + side * half_mouth, mouth_y), (cx + side * (half_mouth + 5 * c_lip), mouth_y - 1.5)],
                crease,
                1.8,
            )

    return np.clip(img, 0, 255, out=img), np.clip(alpha, 0, 1, out=alpha)


def _background(size: int, rng: np.random.Generator) -> np.ndarray:
    """A float32 RGB (size, size, 3) background: enclosure wall, foliage, cage bars or rock."""
    import cv2

    kind = int(rng.integers(0, 4))
    top, bottom = rng.uniform(40, 220, 3), rng.uniform(40, 220, 3)
    # Half-way to grey: enclosure colours are muted.
    top, bottom = (top + top.mean()) / 2, (bottom + bottom.mean()) / 2
    t = np.linspace(0, 1, size, dtype=np.float32)[:, None, None]
    base = (top * (1 - t) + bottom * t).astype(np.float32) * np.ones((1, size, 1), np.float32)
    if kind == 1:  # foliage: blurred green-brown blobs
        for _ in range(int(rng.integers(10, 30))):
            colour = (rng.uniform(30, 120), rng.uniform(70, 170), rng.uniform(20, 90))
            cv2.circle(
                base,
                (int(rng.integers(0, size)), int(rng.integers(0, size))),
                int(rng.integers(size // 20, size // 5)),
                colour,
                -1,
                cv2.LINE_AA,
            )
        base = cv2.GaussianBlur(base, (0, 0), size / 60)
    elif kind == 2:  # cage bars
        colour = rng.uniform(20, 90, 3)
        step = int(rng.integers(size // 8, size // 4))
        width = max(1, int(rng.integers(size // 60, size // 25 + 2)))
        for x in range(int(rng.integers(0, step)), size, step):
            cv2.rectangle(base, (x, 0), (x + width, size), colour.tolist(), -1)
    elif kind == 3:  # rock / concrete
        grey = rng.uniform(80, 190)
        coarse = cv2.resize(
            rng.normal(0, 1, (6, 6)).astype(np.float32), (size, size), interpolation=cv2.INTER_CUBIC
        )
        base = np.full((size, size, 3), grey, np.float32) * (1 + 0.15 * coarse[:, :, None])
    grain = rng.standard_normal((size, size, 1), dtype=np.float32) * np.float32(rng.uniform(2, 9))
    return base + grain  # clipped once, at the end of the frame


def _frame_cues(label: int, rng: np.random.Generator) -> tuple[float, dict[str, float]]:
    """(overall pain intensity, per-cue intensities) for one frame of class ``label``.

    Pain intensity is uniform in [0.35, 1]; no-pain in [0, 0.5], so [0.35, 0.5] overlaps. Each cue
    varies around the overall intensity; a no-pain frame blinks (strong orbital cue alone) with
    probability 0.1, and a pain frame relaxes one cue fully with probability 0.15.
    """
    intensity = rng.uniform(0.35, 1.0) if label == 1 else rng.uniform(0.0, 0.5)
    cues = {name: float(np.clip(intensity + rng.normal(0, 0.13), 0, 1)) for name in CUES}
    if label == 0 and rng.uniform() < 0.1:
        cues["orbital"] = float(rng.uniform(0.75, 1.0))
    if label == 1 and rng.uniform() < 0.15:
        cues[CUES[int(rng.integers(0, len(CUES)))]] = float(rng.uniform(0.0, 0.15))
    return float(intensity), cues


def _render_frame(
    style: IndividualStyle, label: int, size: int, rng: np.random.Generator
) -> tuple[np.ndarray, tuple[int, int, int, int], float, dict[str, float], int]:
    """One finished frame: (uint8 RGB image, face box, intensity, cues, JPEG quality)."""
    import cv2

    intensity, cues = _frame_cues(label, rng)
    face, alpha = render_face(style, cues, rng)

    # Pose: the face fills 55-80% of the frame, tilted up to 18 degrees, anywhere it fits.
    face_fraction = rng.uniform(0.55, 0.8)
    scale = face_fraction * size / _CANVAS
    angle = rng.uniform(-18, 18)
    # Anti-alias before shrinking: the canonical canvas is 2-3x the final resolution.
    sigma = max(0.0, 0.45 / scale - 0.3)
    if sigma > 0:
        face = cv2.GaussianBlur(face, (0, 0), sigma)
        alpha = cv2.GaussianBlur(alpha, (0, 0), sigma)
    matrix = cv2.getRotationMatrix2D((_CANVAS / 2, _CANVAS / 2), angle, scale)
    # A slight head turn (yaw) seen from the front narrows the face: squash x before rotating.
    squash = rng.uniform(0.85, 1.0)
    matrix[:, 0] *= squash
    matrix[:, 2] += matrix[:, 0] * (_CANVAS / 2) * (1 / squash - 1)  # keep the canvas centre fixed
    contours, _ = cv2.findContours((alpha > 0.5).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    hull = np.concatenate([c.reshape(-1, 2) for c in contours]).astype(np.float64)
    support = np.hstack([hull, np.ones((len(hull), 1))]) @ matrix.T
    low, high = support.min(axis=0), support.max(axis=0)
    extent = high - low
    slack = np.maximum(size - extent - 2, 0)
    offset = -low + 1 + rng.uniform(0, 1, 2) * slack
    matrix[:, 2] += offset
    warped = cv2.warpAffine(face, matrix, (size, size), flags=cv2.INTER_LINEAR, borderValue=(0, 0, 0))
    mask = cv2.warpAffine(alpha, matrix, (size, size), flags=cv2.INTER_LINEAR, borderValue=0)[:, :, None]
    image = _background(size, rng) * (1 - mask) + warped * mask

    # Face box: the head and ears as placed, inside the frame.
    x0, y0 = np.floor(low + offset).astype(int)
    x1, y1 = np.ceil(high + offset).astype(int) + 1
    box = (max(0, int(x0)), max(0, int(y0)), min(size, int(x1)), min(size, int(y1)))

    # Lighting: exposure, colour cast and a directional gradient.
    gain = rng.uniform(0.65, 1.25)
    cast = 1 + np.array([1, 0, -1], np.float32) * rng.uniform(-0.08, 0.08)
    direction = rng.uniform(0, 2 * np.pi)
    grid = np.linspace(-1, 1, size, dtype=np.float32)
    ramp = np.cos(direction) * grid[None, :] + np.sin(direction) * grid[:, None]
    shading = 1 + rng.uniform(0, 0.3) * ramp
    image = (image * (gain * cast[None, None, :]) * shading[:, :, None]).astype(np.float32)
    # Camera: focus blur and sensor noise.
    blur = rng.uniform(0, 1.2)
    if blur > 0.3:
        image = cv2.GaussianBlur(image.astype(np.float32), (0, 0), blur)
    image += rng.standard_normal(image.shape, dtype=np.float32) * np.float32(rng.uniform(0, 6))
    quality = int(rng.integers(35, 96))
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), box, intensity, cues, quality


def _check_int(name: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not low <= value <= high:
        raise ValueError(f"{name} must be an int in [{low}, {high}], got {value!r}")
    return int(value)


def _readme(individuals: int, frames_per_class: int, seed: int, size: int) -> str:
    return f"""{README_MARKER}
# SYNTHETIC demo data: not real macaques

Every image in this folder was **drawn by a program** (`painwatch demo-data`, seed {seed}). None is
a photograph of an animal. The set exists so that the painwatch pipeline (validation, LOIO training,
certification, the app) can be tried at once; results on it say **nothing** about clinical
performance.

- {individuals} synthetic individuals (`syn-m01` ...), {frames_per_class} frames per class each,
  {size} x {size} px JPEG, in `<individual>/<label>/synthetic_<label>_NNN.jpg`.
- `manifest.csv`: `path, individual, label, x0, y0, x1, y1` (face box: head and ears, pixels,
  x1/y1 exclusive), `synthetic` (always `true`), `pain_intensity` and one column per drawn cue
  ({", ".join(CUES)}; 0 relaxed ... 1 strongest), so errors can be related to how visible the cues were.
- Pain frames draw grimace-scale cues (orbital tightening, brow lowering, lip tension, ears flattened
  back, cheek tightening) at intensities 0.35-1; no-pain frames draw relaxed faces (0-0.5, with blinks),
  so the classes overlap. Lighting, colour cast, pose, blur, noise, background and JPEG quality are
  drawn from the same ranges for both classes.

Regenerate with (the same arguments give the same files):

```
painwatch demo-data OUT --individuals {individuals} --frames-per-class {frames_per_class} --seed {seed} \\
    --size {size}
```
"""


def make_demo_dataset(
    out_dir: str | os.PathLike,
    *,
    individuals: int = DEMO_INDIVIDUALS,
    frames_per_class: int = DEMO_FRAMES_PER_CLASS,
    seed: int = 0,
    image_size: int = DEMO_IMAGE_SIZE,
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """Write the SYNTHETIC demo set into ``out_dir`` and return the path of its ``manifest.csv``.

    Layout: ``out_dir/syn-mNN/<label>/synthetic_<label>_NNN.jpg``, ``out_dir/manifest.csv`` (with face
    boxes and the drawn cue intensities) and ``out_dir/README.md`` saying the data are synthetic.
    Frames are ``image_size`` pixels square.

    Deterministic: the same arguments give byte-identical files. Frame ``k`` of an individual and class
    depends only on ``(seed, individual, class, k)``, so asking for more individuals or frames keeps the
    existing ones.

    ``out_dir`` must be missing or empty; with ``overwrite=True`` an earlier demo set there (recognised
    by its README) is replaced, and any other content is refused. The manifest is written last and
    atomically, so a folder with a manifest is a complete set.

    Raises:
        ValueError: for out-of-range arguments.
        FileExistsError: when ``out_dir`` holds anything but an earlier demo set (or one without
            ``overwrite``).
    """
    import cv2

    individuals = _check_int("individuals", individuals, 1, 99)
    frames_per_class = _check_int("frames_per_class", frames_per_class, 1, 100_000)
    image_size = _check_int("image_size", image_size, 48, 1024)
    seed = _check_int("seed", seed, 0, 2**32 - 1)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        readme = out / "README.md"
        is_demo = readme.is_file() and readme.read_text(encoding="utf-8", errors="replace").startswith(
            README_MARKER
        )
        if not is_demo:
            raise FileExistsError(
                f"{out} is not empty and is not a painwatch demo set; choose an empty or new folder"
            )
        if not overwrite:
            raise FileExistsError(
                f"{out} already holds a demo set; pass overwrite=True (--overwrite) to replace it"
            )
        for child in out.iterdir():
            if child.is_dir() and child.name.startswith("syn-m"):
                shutil.rmtree(child)
            elif child.name in ("manifest.csv", "README.md"):
                child.unlink()
            else:
                raise FileExistsError(
                    f"{out} holds {child.name}, which the demo set did not write; not overwriting"
                )
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "README.md", _readme(individuals, frames_per_class, seed, image_size))

    rows: list[list[str]] = []
    started = time.perf_counter()
    for index in range(individuals):
        name = f"syn-m{index + 1:02d}"
        style = _individual_style(name, np.random.default_rng([seed, index, 7919]))
        for label, label_name in enumerate(CLASS_NAMES):
            folder = out / name / label_name
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(frames_per_class):
                rng = np.random.default_rng([seed, index, label, k])
                image, box, intensity, cues, quality = _render_frame(style, label, image_size, rng)
                relative = f"{name}/{label_name}/synthetic_{label_name}_{k:03d}.jpg"
                ok, encoded = cv2.imencode(
                    ".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality]
                )
                if not ok:
                    raise RuntimeError(f"OpenCV could not encode {relative} as JPEG")
                (out / relative).write_bytes(encoded.tobytes())
                rows.append(
                    [
                        relative,
                        name,
                        label_name,
                        *map(str, box),
                        "true",
                        f"{intensity:.3f}",
                        *(f"{cues[c]:.3f}" for c in CUES),
                    ]
                )
        if progress:
            print(
                f"  {name}: {2 * frames_per_class} frames ({time.perf_counter() - started:.1f} s)", flush=True
            )

    header = ["path", "individual", "label", "x0", "y0", "x1", "y1", "synthetic", "pain_intensity", *CUES]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return atomic_write_text(out / "manifest.csv", buffer.getvalue())
