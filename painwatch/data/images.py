"""Reading frames into HxWx3 uint8 RGB arrays, and cropping faces.

:func:`read_image` is the one door through which every still frame enters painwatch (training, LOIO,
certification and the app), so the same file always gives the same pixels.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO, Protocol, runtime_checkable

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from painwatch.data.errors import ImageReadError

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"})
"""File suffixes (lower case) accepted as frames in the folder layout."""

VIDEO_EXTENSIONS: frozenset[str] = frozenset(
    {".mp4", ".avi", ".mov", ".mkv", ".m4v", ".mpg", ".mpeg", ".webm"}
)
"""File suffixes (lower case) recognised as video clips."""

DEFAULT_MAX_PIXELS: int = 100_000_000
"""Largest image (width x height) :func:`read_image` decodes by default: 100 megapixels, far above
any video frame (8K is 33 MP) and far below what would exhaust memory. Larger files are refused as
possible decompression bombs."""

Box = tuple[int, int, int, int]
"""A face box ``(x0, y0, x1, y1)`` in pixels; ``x0, y0`` inclusive, ``x1, y1`` exclusive."""

ImageSource = str | os.PathLike | bytes | bytearray | memoryview | BinaryIO


@runtime_checkable
class Detector(Protocol):
    """A face detector: any callable taking an HxWx3 uint8 RGB image and returning a face box
    ``(x0, y0, x1, y1)`` in that image's pixels, or ``None`` when it finds no face.

    painwatch ships no detector (the published study used RetinaFace boxes); plug in your own.
    """

    def __call__(self, image: np.ndarray) -> Box | None: ...


def _describe(source: ImageSource, name: str | None) -> str:
    if name is not None:
        return name
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    return getattr(source, "name", None) or "<bytes>"


def _read_bytes(source: ImageSource, label: str) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise ImageReadError(label, "file does not exist")
        if path.is_dir():
            raise ImageReadError(label, "is a folder, not an image file")
        try:
            return path.read_bytes()
        except OSError as error:
            raise ImageReadError(label, f"cannot be read ({error.strerror or error})") from error
    if hasattr(source, "read"):
        data = source.read()
        if isinstance(data, str):
            raise ImageReadError(label, "file object was opened in text mode; open it in binary mode ('rb')")
        return bytes(data)
    raise TypeError(f"read_image expects a path, bytes or a binary file object, got {type(source).__name__}")


def _to_uint8(array: np.ndarray, label: str) -> np.ndarray:
    """Scale a single-channel integer or float array to uint8 (see :func:`read_image` for the rules)."""
    if array.dtype == np.uint8:
        return array
    if array.dtype.kind == "f":
        if not np.all(np.isfinite(array)):
            raise ImageReadError(label, "float image contains NaN or infinite values")
        top = float(array.max()) if array.size else 0.0
        scale = 255.0 if top <= 1.0 else 1.0
        return np.clip(np.rint(array * scale), 0, 255).astype(np.uint8)
    if array.dtype.kind in "iu":
        # 16-bit (and Pillow's 32-bit "I", used for 16-bit greyscale PNG) samples: 0..65535 -> 0..255.
        scaled = np.rint(np.clip(array.astype(np.float64), 0, 65535) * (255.0 / 65535.0))
        return scaled.astype(np.uint8)
    raise ImageReadError(label, f"unsupported sample type {array.dtype}")


def _composite_on_white(image: Image.Image) -> Image.Image:
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _pil_to_rgb(image: Image.Image, label: str) -> np.ndarray:
    mode = image.mode
    has_transparency = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        mode in ("P", "L", "RGB") and "transparency" in image.info
    )
    if has_transparency:
        return np.asarray(_composite_on_white(image))
    if mode in ("I", "F") or mode.startswith("I;16"):
        grey = _to_uint8(np.asarray(image), label)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if mode == "RGB":
        return np.asarray(image)
    # "1", "L", "P", "CMYK", "YCbCr", "LAB", "HSV": Pillow's own conversions.
    try:
        return np.asarray(image.convert("RGB"))
    except (ValueError, OSError) as error:
        raise ImageReadError(label, f"image mode {mode!r} cannot be converted to RGB ({error})") from error


def _open_decoded(
    source: ImageSource, label: str, max_pixels: int, reduced: bool
) -> tuple[Image.Image, tuple[int, int]]:
    """Open and fully decode an image, turning every failure into an :class:`ImageReadError`.

    Returns the image and its stored ``(width, height)`` (before any reduced decoding).

    ``reduced`` lets JPEG decoding work at 1/8 scale (Pillow's draft mode): the whole compressed stream
    is still read, so truncation and corruption are still caught, at a fraction of the cost.
    """
    if max_pixels <= 0:
        raise ValueError(f"max_pixels must be a positive pixel count, got {max_pixels}")
    data = _read_bytes(source, label)
    if len(data) == 0:
        raise ImageReadError(label, "file is empty (0 bytes)")
    with warnings.catch_warnings():
        # Pillow's own bomb check warns at 89 MP and raises at twice that; ours is the max_pixels setting.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
        except UnidentifiedImageError as error:
            raise ImageReadError(label, "not an image (format not recognised)") from error
        except Image.DecompressionBombError as error:
            raise ImageReadError(label, f"image is too large to open safely (more than {max_pixels} pixels "
                                 "are accepted)") from error
        except (OSError, ValueError, SyntaxError) as error:
            raise ImageReadError(label, f"not a readable image ({error})") from error
        width, height = image.size
        if width <= 0 or height <= 0:
            raise ImageReadError(label, f"image has no pixels ({width}x{height})")
        if width * height > max_pixels:
            raise ImageReadError(
                label,
                f"image is {width}x{height} = {width * height} pixels, above the limit of {max_pixels} "
                "pixels accepted (a picture this large is refused so that it cannot exhaust the memory)",
            )
        if reduced and image.format == "JPEG":
            image.draft(image.mode, (max(1, width // 8), max(1, height // 8)))
        try:
            image.load()
        except Image.DecompressionBombError as error:
            raise ImageReadError(label, f"image is too large to open safely (more than {max_pixels} pixels "
                                 "are accepted)") from error
        except (OSError, ValueError, SyntaxError) as error:
            reason = str(error) or type(error).__name__
            if "truncated" in reason:
                detail = reason if reason.startswith("image file is truncated") else f"truncated ({reason})"
                raise ImageReadError(label, detail) from error
            raise ImageReadError(label, f"image data is corrupt ({reason})") from error
    return image, (width, height)


def probe_image(
    source: ImageSource,
    name: str | None = None,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[int, int]:
    """Check that an image decodes and return its ``(height, width)`` as :func:`read_image` gives it
    (after EXIF orientation), faster than reading it.

    Catches the same file problems as :func:`read_image` (missing, empty, not an image, truncated or
    corrupt data, too many pixels); JPEGs are decoded at reduced scale, which still reads the whole
    stream. Used by validation.

    Raises:
        ImageReadError: naming the file and the problem.
    """
    label = _describe(source, name)
    image, (width, height) = _open_decoded(source, label, max_pixels, reduced=True)
    orientation = 1
    with contextlib.suppress(Exception):  # a broken EXIF block: read_image ignores it too
        orientation = int(image.getexif().get(0x0112, 1))
    if orientation in (5, 6, 7, 8):  # transposed or rotated by 90 degrees
        return width, height
    return height, width


def read_image(
    source: ImageSource,
    name: str | None = None,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """Read one image into an ``(H, W, 3)`` C-contiguous ``uint8`` RGB array.

    ``source`` is a path, the file's bytes, or a binary file object (an upload); ``name`` is used in
    error messages instead of the path (useful for uploads).

    Guarantees:

    - EXIF orientation is applied (Pillow's ``ImageOps.exif_transpose``), so the array is the frame as a
      viewer shows it. A broken EXIF block is ignored with a warning (the pixels are still good).
    - Greyscale and bilevel images are repeated over the three channels; palette, CMYK, YCbCr, LAB and
      HSV images are converted by Pillow.
    - Transparency (RGBA, LA, PA, palette or RGB with a transparent colour) is composited on **white**:
      dropping alpha would expose whatever colour the encoder left under transparent pixels.
    - 16-bit samples (``I;16`` PNG/TIFF, Pillow's ``I``) are scaled linearly from 0..65535 to 0..255.
      16-bit RGB files are reduced to 8 bits by Pillow itself.
    - Float images (``F`` TIFF) are taken to be in [0, 1] when their maximum is <= 1, else in [0, 255];
      values are clipped; NaN or infinite values are an error.
    - Multi-frame files (GIF, multi-page TIFF) give their first frame.

    Raises:
        ImageReadError: naming the file, for a missing or empty file, a file that is not an image, a
            truncated or corrupt image, or an image larger than ``max_pixels`` (width x height).
    """
    label = _describe(source, name)
    image, _ = _open_decoded(source, label, max_pixels, reduced=False)
    try:
        oriented = ImageOps.exif_transpose(image)
    except Exception as error:
        warnings.warn(f"{label}: EXIF orientation ignored ({error})", stacklevel=2)
        oriented = image
    if oriented is None:  # exif_transpose(in_place=False) always returns an image; guard old Pillows
        oriented = image
    rgb = _pil_to_rgb(oriented, label)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ImageReadError(label, f"decoded to an unexpected shape {rgb.shape}")
    return np.ascontiguousarray(rgb, dtype=np.uint8)


def check_box(box: Sequence[float], image_shape: Sequence[int] | None = None, *, name: str = "box") -> Box:
    """Check a face box and return it as four ints ``(x0, y0, x1, y1)``.

    Coordinates must be whole numbers (``12`` or ``12.0``) with ``x1 > x0`` and ``y1 > y0``; with
    ``image_shape`` (H, W, ...) the box must also lie inside the image: ``0 <= x0 < x1 <= W`` and
    ``0 <= y0 < y1 <= H``.

    Raises:
        ValueError: naming the bad coordinate.
    """
    values = list(box)
    if len(values) != 4:
        raise ValueError(f"{name} must have 4 coordinates (x0, y0, x1, y1), got {len(values)}: {values!r}")
    ints = []
    for axis, value in zip(("x0", "y0", "x1", "y1"), values, strict=True):
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name} coordinate {axis}={value!r} is not a number") from None
        if not np.isfinite(number) or number != round(number):
            raise ValueError(f"{name} coordinate {axis}={value!r} is not a whole number of pixels")
        ints.append(round(number))
    x0, y0, x1, y1 = ints
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"{name} {tuple(ints)} is empty: need x1 > x0 and y1 > y0")
    if image_shape is not None:
        height, width = int(image_shape[0]), int(image_shape[1])
        if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
            raise ValueError(f"{name} {tuple(ints)} lies outside the {width}x{height} image")
    return x0, y0, x1, y1


def crop_face(image: np.ndarray, box: Sequence[float], margin: float = 0.1) -> np.ndarray:
    """Crop the face box, enlarged by ``margin`` and clamped to the image.

    ``margin`` is a fraction of the box size added on **each** side (0.1 widens a 100-px box by 10 px
    left and right). The enlarged box is clamped to the image, so the crop is never padded; it is a
    C-contiguous copy with the image's dtype and channels.

    Raises:
        ValueError: for a malformed box, a negative margin, or a box that does not overlap the image.
    """
    if not isinstance(image, np.ndarray) or image.ndim not in (2, 3):
        raise ValueError(f"image must be an HxW or HxWxC array, got {getattr(image, 'shape', type(image))}")
    if not np.isfinite(margin) or margin < 0:
        raise ValueError(f"margin must be a finite fraction >= 0, got {margin}")
    x0, y0, x1, y1 = check_box(box)
    height, width = image.shape[:2]
    dx, dy = margin * (x1 - x0), margin * (y1 - y0)
    left, top = max(0, int(np.floor(x0 - dx))), max(0, int(np.floor(y0 - dy)))
    right, bottom = min(width, int(np.ceil(x1 + dx))), min(height, int(np.ceil(y1 + dy)))
    if right <= left or bottom <= top:
        raise ValueError(f"box {(x0, y0, x1, y1)} does not overlap the {width}x{height} image")
    return np.ascontiguousarray(image[top:bottom, left:right])


def centre_square(height: int, width: int) -> tuple[int, int, int]:
    """``(top, left, side)`` of the centre square of a ``height x width`` frame, in pixels.

    ``side = min(height, width)``; the square is ``frame[top : top + side, left : left + side]``, with
    an odd leftover pixel on the bottom or right (the offsets of albumentations' ``CenterCrop``). It is
    the part of a frame the model sees: :func:`~painwatch.data.eval_transform` resizes the shorter side
    and keeps the same centre square, and the saliency map and the page's outline are placed on it.

    Raises:
        ValueError: naming the value, unless height and width are whole numbers of pixels >= 1.
    """
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a whole number of pixels >= 1, got {value!r}")
    height, width = int(height), int(width)
    side = min(height, width)
    return (height - side) // 2, (width - side) // 2, side
