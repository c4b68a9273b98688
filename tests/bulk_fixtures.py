"""Small real inputs for bulk prediction: a tiny bundle and an archive of images, a clip and bad files."""

from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from painwatch.models import create_model, save_bundle

CLIP_FPS = 10.0
CLIP_FRAMES = 25


def write_bundle(folder: Path) -> Path:
    """A tiny ResNet bundle (32 px, randomized smoothing at sigma 0.25 by default)."""
    model = create_model("test_resnet", num_classes=2, input_size=32, seed=0)
    save_bundle(folder, model, {"training": {"individuals": ["m01"], "num_frames": 8, "loss": "ce",
                                             "noise_sigma": 0.25, "epochs": 1}})
    return folder


def write_clip(path: Path, frames: int = CLIP_FRAMES, fps: float = CLIP_FPS) -> Path:
    """An MJPG clip whose frame i is a flat colour that changes with i (so frames differ)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (48, 40))
    assert writer.isOpened()
    for index in range(frames):
        writer.write(np.full((40, 48, 3), (250 - index * 10, 60, index * 10), np.uint8))
    writer.release()
    return path


def write_archive(root: Path, images: int = 3) -> Path:
    """``root/`` with ``faces/face_<i>.png`` (random 40 x 40 frames), ``clips/clip.avi`` (2.5 s at 10 fps),
    ``broken.jpg`` (not an image), ``notes.txt`` (not a frame) and a hidden file that is skipped."""
    rng = np.random.default_rng(0)
    (root / "faces").mkdir(parents=True)
    for index in range(images):
        frame = rng.integers(0, 256, size=(40, 40, 3), dtype=np.uint8)
        Image.fromarray(frame).save(root / "faces" / f"face_{index}.png")
    write_clip(root / "clips" / "clip.avi")
    (root / "broken.jpg").write_bytes(b"this is not a jpeg")
    (root / "notes.txt").write_text("field notes\n")
    (root / ".hidden.png").write_bytes(b"skipped: hidden")
    return root


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


def write_frames_dataset(root: Path, individuals: int = 4, frames_per_class: int = 4) -> Path:
    """``root/<individual>/<label>/*.png``, 40 x 40 frames: pain frames carry a dark band at an
    individual-specific height, every frame its own noise (enough for a head on cached features)."""
    rng = np.random.default_rng(0)
    for index in range(individuals):
        base = rng.integers(60, 200, size=3)
        for label in ("no_pain", "pain"):
            folder = root / f"macaque_{index:02d}" / label
            folder.mkdir(parents=True)
            for k in range(frames_per_class):
                image = np.clip(base + rng.normal(0, 25, size=(40, 40, 3)), 0, 255)
                if label == "pain":
                    image[12 + index % 3: 18 + index % 3, 6:34] *= 0.25
                Image.fromarray(image.astype(np.uint8)).save(folder / f"frame_{k}.png")
    return root
