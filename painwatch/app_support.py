"""Page logic of the veterinarian's Streamlit page (``app.py``), kept free of Streamlit.

Everything here is plain Python so that the page stays thin and this logic can be tested on its
own: where the bundle comes from, turning uploaded files into frames (with one clear message per
bad file), the results table, the summary, the CSV/JSON downloads and the saliency overlay.
Decoding itself is :mod:`painwatch.data`'s job and classification/certification is
:class:`painwatch.predict.Predictor`'s; nothing here re-implements either.

Units follow DESIGN.md: a radius is an L2 norm in [0, 1]-pixel space at the model's input
resolution; its 8-bit grey-level equivalent is ``255 * r / sqrt(C*H*W)``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import io
import json
import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from painwatch import __version__
from painwatch.data.images import centre_square
from painwatch.io import to_json_text

IMAGE_SUFFIXES: tuple[str, ...] = ("jpg", "jpeg", "png", "bmp", "tif", "tiff")
"""Frame formats the page accepts (lower case, without the dot)."""
CLIP_SUFFIXES: tuple[str, ...] = ("mp4", "avi", "mov")
"""Clip formats the page accepts; clips are sampled at a chosen rate."""

MEGABYTE = 1024 * 1024
MAX_IMAGE_BYTES = 30 * MEGABYTE
"""Largest frame file the page decodes, in bytes."""
MAX_CLIP_BYTES = 100 * MEGABYTE
"""Largest clip file the page decodes, in bytes (equal to server.maxUploadSize in .streamlit/config.toml)."""
MAX_IMAGE_PIXELS = 50_000_000
"""Largest frame the page decodes, in pixels (width x height); guards against decompression bombs."""
MAX_ASPECT_RATIO = 20.0
"""Frames whose longer side is more than this many times the shorter one are refused: they cannot
hold a face, and scaling their short side to the model's input would need enormous memory."""
MAX_FRAMES_PER_CLIP = 300
"""At most this many frames are taken from one clip; the page says so when a clip is cut."""

DEFAULT_BUNDLE = Path("data/demo-bundle")
"""Bundle used when neither ``--bundle`` nor ``PAINWATCH_BUNDLE`` is given (built by ``make app``)."""
BUNDLE_ENV = "PAINWATCH_BUNDLE"

ABSTAIN_LABEL = "abstain"


# --------------------------------------------------------------------------- bundle location


def bundle_path_from_args(
    argv: Sequence[str], environ: Mapping[str, str], default: Path = DEFAULT_BUNDLE
) -> tuple[Path, str]:
    """Where the page takes its model bundle from, and why.

    Precedence: ``--bundle PATH`` in ``argv`` (``streamlit run app.py -- --bundle PATH``), then the
    ``PAINWATCH_BUNDLE`` environment variable, then ``default``. Arguments that are not ``--bundle``
    are ignored (under test runners ``sys.argv`` belongs to someone else).

    Returns ``(path, source)`` where ``source`` is a short phrase for the page ("--bundle",
    "PAINWATCH_BUNDLE" or "default").
    """
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--bundle", default=None)
    known, _ = parser.parse_known_args(list(argv))
    if known.bundle:
        return Path(known.bundle).expanduser(), "--bundle"
    from_env = environ.get(BUNDLE_ENV, "").strip()
    if from_env:
        return Path(from_env).expanduser(), BUNDLE_ENV
    return default, "default"


def bundle_problem(path: Path) -> str | None:
    """A message saying how to get a bundle when ``path`` is not one, else ``None``.

    A bundle is a folder holding ``model.json`` and ``weights.safetensors`` (DESIGN.md).
    """
    how_to_build = (
        "Build the demo bundle with `make app` (it also starts this page), or "
        "`painwatch demo-data data/demo && painwatch demo-bundle --data data/demo --out data/demo-bundle`, "
        "or give your own bundle: `streamlit run app.py -- --bundle PATH`, the environment variable "
        f"`{BUNDLE_ENV}=PATH`, or the field in the sidebar."
    )
    if not path.exists():
        return f"No model bundle at `{path}`. {how_to_build}"
    if not path.is_dir():
        return f"`{path}` is a file, not a model bundle folder. {how_to_build}"
    missing = [name for name in ("model.json", "weights.safetensors") if not (path / name).is_file()]
    if missing:
        return f"`{path}` is not a complete model bundle: missing {', '.join(missing)}. {how_to_build}"
    return None


def bundle_fingerprint(path: Path) -> str:
    """A string that changes whenever the bundle's files change (used as a cache key)."""
    parts = []
    for name in ("model.json", "weights.safetensors"):
        stat = (path / name).stat()
        parts.append(f"{name}:{stat.st_size}:{stat.st_mtime_ns}")
    return f"{path.resolve()}|{'|'.join(parts)}"


# --------------------------------------------------------------------------- uploads -> frames


@dataclass(frozen=True)
class Upload:
    """One uploaded file as the page received it: its name and its bytes."""

    name: str
    data: bytes


@dataclass(frozen=True)
class Frame:
    """One frame to classify.

    ``name`` is unique within a batch ("clip.mp4 @ 1.50 s" for clip frames), ``source`` the
    uploaded file's name, ``time_s`` the frame time in seconds for clip frames (``None`` for still
    frames), ``image`` an HxWx3 uint8 RGB array.
    """

    name: str
    source: str
    time_s: float | None
    image: np.ndarray


@dataclass(frozen=True)
class FileProblem:
    """A file (or part of one) that could not be used, with the reason in plain words."""

    file: str
    problem: str
    severity: str = "error"  # "error": file skipped; "warning": file used only in part

    @property
    def message(self) -> str:
        return f"{self.file}: {self.problem}"


def suffix_of(name: str) -> str:
    """Lower-case extension of ``name`` without the dot ("" when there is none)."""
    return Path(name).suffix.lower().lstrip(".")


def _human_size(num_bytes: int) -> str:
    if num_bytes >= MEGABYTE:
        return f"{num_bytes / MEGABYTE:.1f} MB"
    if num_bytes >= 1024:
        return f"{num_bytes / 1024:.1f} kB"
    return f"{num_bytes} bytes"


def _unique_name(name: str, taken: set[str]) -> str:
    candidate, copy = name, 2
    while candidate in taken:
        candidate = f"{name} ({copy})"
        copy += 1
    taken.add(candidate)
    return candidate


def decode_uploads(
    uploads: Iterable[Upload],
    fps: float,
    *,
    max_image_bytes: int = MAX_IMAGE_BYTES,
    max_clip_bytes: int = MAX_CLIP_BYTES,
    max_frames_per_clip: int = MAX_FRAMES_PER_CLIP,
    max_image_pixels: int = MAX_IMAGE_PIXELS,
) -> tuple[list[Frame], list[FileProblem]]:
    """Turn uploaded files into frames; every file that cannot be used becomes a :class:`FileProblem`.

    Still frames are decoded with :func:`painwatch.data.read_image`, clips are sampled at ``fps``
    frames per second with :func:`painwatch.data.sample_video`. A bad file (unknown type, empty,
    larger than ``max_image_bytes`` / ``max_clip_bytes``, more than ``max_image_pixels`` pixels, not
    decodable, truncated, a colour mode the reader rejects) never stops the others. A clip with more
    than ``max_frames_per_clip`` sampled frames keeps its first ``max_frames_per_clip`` frames and gets
    a warning saying so: nothing is dropped silently.

    Raises ``ValueError`` only for bad arguments (``fps`` not positive, limits not positive).
    """
    from painwatch.data import ImageReadError, read_image, sample_video

    if not (isinstance(fps, int | float) and math.isfinite(fps) and fps > 0):
        raise ValueError(f"fps must be a positive number of frames per second, got {fps!r}")
    for label, value in (
        ("max_image_bytes", max_image_bytes),
        ("max_clip_bytes", max_clip_bytes),
        ("max_frames_per_clip", max_frames_per_clip),
        ("max_image_pixels", max_image_pixels),
    ):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{label} must be a positive integer, got {value!r}")

    frames: list[Frame] = []
    problems: list[FileProblem] = []
    taken: set[str] = set()
    for upload in uploads:
        name, data = upload.name, upload.data
        suffix = suffix_of(name)
        if suffix not in IMAGE_SUFFIXES + CLIP_SUFFIXES:
            accepted = ", ".join(IMAGE_SUFFIXES + CLIP_SUFFIXES)
            problems.append(FileProblem(name, f"unsupported file type '.{suffix}' (accepted: {accepted})"))
            continue
        if len(data) == 0:
            problems.append(FileProblem(name, "the file is empty (0 bytes)"))
            continue
        is_clip = suffix in CLIP_SUFFIXES
        limit = max_clip_bytes if is_clip else max_image_bytes
        if len(data) > limit:
            kind = "clip" if is_clip else "frame"
            problems.append(
                FileProblem(name, f"{_human_size(len(data))} is larger than the {_human_size(limit)} "
                            f"allowed for one {kind}")
            )
            continue
        try:
            if is_clip:
                # One frame more than the cap tells whether the clip was cut; the reader's own
                # "stopped after" warning is replaced by the page's message below.
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)
                    sampled = sample_video(data, fps, max_frames=max_frames_per_clip + 1, name=name)
            else:
                image = read_image(data, name=name, max_pixels=max_image_pixels)
        except ImageReadError as error:
            problems.append(FileProblem(name, error.reason))
            continue
        except Exception as error:  # one broken file must never stop the batch
            problems.append(FileProblem(name, f"could not be read ({type(error).__name__}: {error})"))
            continue

        if not is_clip:
            height, width = image.shape[:2]
            if max(height, width) > MAX_ASPECT_RATIO * min(height, width):
                problems.append(FileProblem(
                    name, f"the frame is {width} x {height} pixels: too elongated to hold a face (the longer "
                    f"side is more than {MAX_ASPECT_RATIO:g} times the shorter)"))
                continue
            frames.append(Frame(_unique_name(name, taken), name, None, image))
            continue
        if not sampled:
            problems.append(FileProblem(name, "the clip has no frames that could be decoded"))
            continue
        if len(sampled) > max_frames_per_clip:
            problems.append(
                FileProblem(
                    name,
                    f"{len(sampled)} frames at {fps:g} per second is more than the {max_frames_per_clip} "
                    f"analysed per clip: only the first {max_frames_per_clip} frames (up to "
                    f"{sampled[max_frames_per_clip - 1][0]:.2f} s) are in the results; lower the rate "
                    "or cut the clip to see the rest",
                    severity="warning",
                )
            )
            sampled = sampled[:max_frames_per_clip]
        for time_s, image in sampled:
            frame_name = _unique_name(f"{name} @ {time_s:.2f} s", taken)
            frames.append(Frame(frame_name, name, float(time_s), image))
    return frames, problems


def classify_frames(
    predictor: Any,
    frames: Sequence[Frame],
    progress: Callable[[int, int], None] | None = None,
) -> tuple[list[Frame], list[Any], list[FileProblem]]:
    """Classify and certify ``frames`` with ``predictor``, one frame at a time.

    Returns ``(kept_frames, results, problems)``: ``results[i]`` is the Predictor's answer for
    ``kept_frames[i]`` with ``time_s`` set from the frame; a frame the Predictor refuses
    (``ValueError``) becomes a :class:`FileProblem` naming it, and the others still go through.
    Answers equal those of one ``predictor.predict`` call over all frames, since each frame's noise
    is seeded from its own pixels. ``progress(done, total)`` is called after every frame.
    """
    kept: list[Frame] = []
    results: list[Any] = []
    problems: list[FileProblem] = []
    for done, frame in enumerate(frames, start=1):
        try:
            (result,) = predictor.predict([frame.image], names=[frame.name])
        except ValueError as error:
            problems.append(FileProblem(frame.source, f"{frame.name} could not be classified: {error}"))
        else:
            kept.append(frame)
            results.append(dataclasses.replace(result, time_s=frame.time_s))
        if progress is not None:
            progress(done, len(frames))
    return kept, results, problems


def uploads_digest(uploads: Iterable[Upload], settings: Mapping[str, Any]) -> str:
    """sha256 over the uploaded names, bytes and the settings: same digest, same results."""
    digest = hashlib.sha256()
    for upload in uploads:
        digest.update(upload.name.encode("utf-8", "surrogateescape") + b"\0")
        digest.update(hashlib.sha256(upload.data).digest())
    digest.update(json.dumps(dict(settings), sort_keys=True, default=str).encode())
    return digest.hexdigest()


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Provenance:
    """What produced a batch of results; goes into every download.

    ``certification`` holds the settings in force (the Predictor's ``settings.to_dict()``: method,
    sigma, alpha, n = the per-frame budget of estimation draws, n0, sequential, ...).
    """

    bundle_path: str
    weights_sha256: str
    architecture: str
    classes: tuple[str, ...]
    certification: Mapping[str, Any]
    seed: int | None
    gate_passed: bool | None

    @classmethod
    def from_predictor(cls, predictor: Any) -> Provenance:
        """Provenance of a :class:`painwatch.predict.Predictor` (bundle identity, settings, seed, gate)."""
        metadata = predictor.metadata
        gate = predictor.gate
        return cls(
            bundle_path=str(predictor.bundle_path),
            weights_sha256=str(metadata["weights_sha256"]),
            architecture=str(metadata["architecture"]),
            classes=tuple(predictor.classes),
            certification=dict(predictor.settings.to_dict()),
            seed=predictor.seed,
            gate_passed=None if gate is None else bool(gate.get("passed")),
        )

    @property
    def budget(self) -> int | None:
        value = self.certification.get("n")
        return None if value is None else int(value)

    def as_dict(self) -> dict[str, Any]:
        return {
            "bundle": {
                "path": self.bundle_path,
                "weights_sha256": self.weights_sha256,
                "architecture": self.architecture,
                "classes": list(self.classes),
                "gate_passed": self.gate_passed,
            },
            "certification": {**dict(self.certification), "seed": self.seed},
        }


def is_abstention(result: Any) -> bool:
    """True when the Predictor abstained on this frame (class index -1)."""
    return int(result.class_index) < 0


TABLE_COLUMNS: tuple[str, ...] = (
    "frame", "file", "time (s)", "class", "confidence", "certified radius (L2)",
    "radius (grey levels)", "method", "status",
)
"""Columns of the on-page results table, in order."""


def results_table(frames: Sequence[Frame], results: Sequence[Any]) -> Any:
    """The on-page results table (a pandas DataFrame), one row per frame, in upload order.

    ``class`` is the predicted class name or "abstain"; ``confidence`` is the calibrated probability
    of the predicted class (empty for abstentions); radii are exactly the Predictor's values
    (``radius`` and ``radius_grey_levels``); ``status`` says "certified", "not certified
    (radius 0)" or "abstained".
    """
    import pandas as pd

    _check_aligned(frames, results)
    rows = []
    for frame, result in zip(frames, results, strict=True):
        abstained = is_abstention(result)
        if abstained:
            status = "abstained"
        elif float(result.radius) > 0:
            status = "certified"
        else:
            status = "not certified (radius 0)"
        rows.append(
            {
                "frame": frame.name,
                "file": frame.source,
                "time (s)": frame.time_s,
                "class": ABSTAIN_LABEL if abstained else str(result.label),
                "confidence": None if abstained else float(result.confidence),
                "certified radius (L2)": float(result.radius),
                "radius (grey levels)": float(result.radius_grey_levels),
                "method": str(result.method),
                "status": status,
            }
        )
    table = pd.DataFrame(rows, columns=list(TABLE_COLUMNS))
    table["time (s)"] = table["time (s)"].astype("float64")
    table["confidence"] = table["confidence"].astype("float64")
    return table


def _check_aligned(frames: Sequence[Frame], results: Sequence[Any]) -> None:
    if len(frames) != len(results):
        raise ValueError(f"got {len(frames)} frames but {len(results)} results; they must match one to one")


@dataclass(frozen=True)
class Summary:
    """Counts over a batch; ``pain_share`` is over frames with an answer (abstentions excluded)."""

    frames: int
    pain: int
    no_pain: int
    abstained: int
    certified: int

    @property
    def decided(self) -> int:
        return self.frames - self.abstained

    @property
    def pain_share(self) -> float | None:
        """Share of pain among frames with an answer, in [0, 1]; ``None`` when every frame abstained."""
        return self.pain / self.decided if self.decided else None


def summarize(results: Sequence[Any], pain_label: str = "pain") -> Summary:
    """Count pain / no-pain / abstained / certified (radius > 0) frames."""
    abstained = sum(1 for r in results if is_abstention(r))
    pain = sum(1 for r in results if not is_abstention(r) and r.label == pain_label)
    certified = sum(1 for r in results if not is_abstention(r) and float(r.radius) > 0)
    return Summary(len(results), pain, len(results) - abstained - pain, abstained, certified)


def time_course(frames: Sequence[Frame], results: Sequence[Any], pain_label: str = "pain") -> Any:
    """Per clip frame: clip, time (s), probability of pain, class; an empty DataFrame without clips."""
    import pandas as pd

    _check_aligned(frames, results)
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


def describe_radius(radius: float, grey_levels: float, method: str, alpha: float) -> str:
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
    if method == "lipschitz":
        return sentence + " This bound is exact for the network itself (no sampling)."
    return sentence + (
        f" It holds for the noise-averaged model and was established from random samples, so it can be "
        f"wrong with probability at most {alpha:g}."
    )


RADIUS_NOTE = (
    "**What the radius means.** For each frame the model gives a *certified radius* r: the answer "
    "cannot change for any change of the pixels whose total size (L2 norm, pixels from 0 to 1) is below "
    "r. Spread evenly over all pixels that is about *g* grey levels of 255 per pixel (the "
    "'grey levels' column). Larger is sturdier. A radius of 0 means no guarantee; 'abstain' means "
    "the model would not commit to an answer for that frame. The radius says nothing about whether "
    "the answer is medically right: that is what the model card's accuracy is for."
)


# --------------------------------------------------------------------------- downloads

CSV_COLUMNS_FIXED: tuple[str, ...] = (
    "frame", "file", "time_s", "label", "class_index", "confidence",
)
CSV_COLUMNS_TAIL: tuple[str, ...] = (
    "radius_l2", "radius_rms", "radius_grey_levels", "method", "sigma", "alpha", "n", "n_budget",
    "forward_passes", "seed", "bundle_weights_sha256", "painwatch_version",
)
"""After the per-class probabilities: the certificate, the settings (``n`` = estimation draws used for
this frame, ``n_budget`` = the most allowed), the seed and the bundle's weights hash."""


def csv_columns(classes: Sequence[str]) -> list[str]:
    """Header of the CSV download: fixed columns, one ``prob_<class>`` per class, then provenance."""
    return [*CSV_COLUMNS_FIXED, *(f"prob_{name}" for name in classes), *CSV_COLUMNS_TAIL]


def _row(frame: Frame, result: Any, provenance: Provenance) -> dict[str, Any]:
    row: dict[str, Any] = {
        "frame": frame.name,
        "file": frame.source,
        "time_s": frame.time_s,
        "label": str(result.label),
        "class_index": int(result.class_index),
        "confidence": float(result.confidence),
    }
    for name in provenance.classes:
        row[f"prob_{name}"] = float(result.probabilities[name])
    row.update(
        {
            "radius_l2": float(result.radius),
            "radius_rms": float(result.radius_rms),
            "radius_grey_levels": float(result.radius_grey_levels),
            "method": str(result.method),
            "sigma": float(result.sigma),
            "alpha": float(result.alpha),
            "n": int(result.n),
            "n_budget": provenance.budget,
            "forward_passes": int(result.forward_passes),
            "seed": provenance.seed,
            "bundle_weights_sha256": provenance.weights_sha256,
            "painwatch_version": __version__,
        }
    )
    return row


def results_csv(frames: Sequence[Frame], results: Sequence[Any], provenance: Provenance) -> bytes:
    """UTF-8 CSV, one row per frame with the Predictor's values at full precision and provenance.

    Every row carries the bundle's weights hash and the certification settings, so a row copied
    elsewhere still says where it came from. Empty ``time_s`` for still frames.
    """
    _check_aligned(frames, results)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=csv_columns(provenance.classes), lineterminator="\n")
    writer.writeheader()
    for frame, result in zip(frames, results, strict=True):
        row = _row(frame, result, provenance)
        writer.writerow({key: ("" if value is None else _csv_value(value)) for key, value in row.items()})
    return buffer.getvalue().encode("utf-8")


def _csv_value(value: Any) -> Any:
    # repr keeps every digit of a float (str would too on 3.x, but be explicit).
    return repr(value) if isinstance(value, float) else value


def results_json(
    frames: Sequence[Frame],
    results: Sequence[Any],
    provenance: Provenance,
    problems: Sequence[FileProblem] = (),
    created: datetime | None = None,
) -> bytes:
    """UTF-8 JSON: provenance, the per-frame results (the Predictor's fields) and the file problems."""
    _check_aligned(frames, results)
    records = []
    for frame, result in zip(frames, results, strict=True):
        # FrameResult.to_dict turns NaN (e.g. an undefined bound) into null: JSON has no NaN.
        record = result.to_dict() if hasattr(result, "to_dict") else dataclasses.asdict(result)
        record.update({"frame": frame.name, "file": frame.source, "time_s": frame.time_s})
        records.append(record)
    document = {
        "painwatch_version": __version__,
        "created": (created or datetime.now(UTC)).isoformat(timespec="seconds"),
        **provenance.as_dict(),
        "frames": records,
        "problems": [dataclasses.asdict(problem) for problem in problems],
    }
    return to_json_text(document).encode("utf-8")


# --------------------------------------------------------------------------- pictures


def overlay_saliency(image: np.ndarray, saliency: np.ndarray, opacity: float = 0.45) -> np.ndarray:
    """Blend a saliency map (HxW, values in [0, 1]) over an RGB uint8 image as a heat map.

    The map is resized to the image (bilinear) when sizes differ. Returns HxWx3 uint8.
    """
    import cv2
    from matplotlib import colormaps

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


def download_name(stem: str, created: datetime | None = None) -> str:
    """A file name such as ``painwatch-results-20260101-120000``: sortable, no spaces."""
    stamp = (created or datetime.now(UTC)).strftime("%Y%m%d-%H%M%S")
    return f"{stem}-{stamp}"


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
    import cv2

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


def gate_lines(gate: Mapping[str, Any] | None) -> tuple[str, list[str]]:
    """The gate verdict in words for the page: ``(headline, failed_checks)``.

    ``headline`` says passed / FAILED / not run, when, and on how many frames and individuals;
    ``failed_checks`` has one line per failed threshold ("accuracy (point estimate) >= 0.6: got
    0.425"). Unknown or missing fields are left out rather than guessed.
    """
    if gate is None:
        return "not run", []
    verdict = "passed" if gate.get("passed") else "FAILED"
    parts = [verdict]
    date = gate.get("date")
    if isinstance(date, str) and date:
        try:
            stamp = datetime.fromisoformat(date)
            parts.append(f"on {stamp.astimezone(UTC):%Y-%m-%d %H:%M} UTC")
        except ValueError:
            parts.append(f"on {date}")
    frames, individuals = gate.get("num_frames"), gate.get("individuals")
    if isinstance(frames, int) and isinstance(individuals, list) and individuals:
        held = "held-out " if gate.get("held_out") else ""
        parts.append(f"({frames} frames of {len(individuals)} {held}individuals)")
    failed = []
    for check in gate.get("results") or []:
        if isinstance(check, Mapping) and check.get("passed") is False:
            what = check.get("detail") or check.get("name") or "a check"
            value = check.get("value")
            failed.append(f"{what}: got {value:.3g}" if isinstance(value, int | float) else str(what))
    return " ".join(parts), failed
