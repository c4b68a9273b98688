"""Image transforms (albumentations): uint8 RGB frame -> float tensor (3, size, size) in [0, 1].

No mean/std normalisation here: it is a layer inside the model (docs/design.md, "Units and conventions"),
so that noise levels and certified radii are measured in [0, 1] pixel space.
"""

from __future__ import annotations

import numpy as np
import torch

DEFAULT_SIZE: int = 224
"""Model input size in pixels (height = width) unless a setting says otherwise."""


def _check_size(size: int) -> int:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 8:
        raise ValueError(f"size must be an int >= 8 pixels, got {size!r}")
    return int(size)


class ImageTransform:
    """A picklable callable: ``(H, W, 3)`` uint8 RGB array -> ``float32`` tensor ``(3, size, size)``
    with values in [0, 1].

    ``train`` tells whether it draws random augmentations. A random transform draws from its own
    generator seeded by ``seed``; inside a ``torch.utils.data.DataLoader`` worker it re-seeds itself
    once per worker from ``(seed, worker seed)``, so workers do not repeat each other's draws and a
    loader with a seeded ``generator`` gives the same augmentations on every run.
    """

    def __init__(self, compose, size: int, train: bool, seed: int | None) -> None:
        self.compose = compose
        self.size = size
        self.train = train
        self.seed = seed
        self._worker_seed: int | None = None
        if seed is not None:
            compose.set_random_seed(seed)

    def _reseed_for_worker(self) -> None:
        info = torch.utils.data.get_worker_info()
        if info is None or info.seed == self._worker_seed:
            return
        self._worker_seed = info.seed
        entropy = [info.seed] if self.seed is None else [self.seed, info.seed]
        self.compose.set_random_seed(int(np.random.SeedSequence(entropy).generate_state(1)[0]))

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(
                f"expected an (H, W, 3) RGB array, got {getattr(image, 'shape', type(image).__name__)}"
            )
        if image.dtype != np.uint8:
            raise ValueError(f"expected a uint8 image (0..255), got dtype {image.dtype}")
        if image.shape[0] < 1 or image.shape[1] < 1:
            raise ValueError(f"image has no pixels: shape {image.shape}")
        if self.train:
            self._reseed_for_worker()
        out = self.compose(image=np.ascontiguousarray(image))["image"]
        tensor = torch.from_numpy(np.ascontiguousarray(out.transpose(2, 0, 1))).to(torch.float32)
        return tensor.div_(255.0).clamp_(0.0, 1.0)

    def __repr__(self) -> str:
        kind = "train" if self.train else "eval"
        return f"ImageTransform({kind}, size={self.size}, seed={self.seed})"


def train_transform(
    size: int = DEFAULT_SIZE, *, seed: int | None = 0, strength: float = 1.0
) -> ImageTransform:
    """Mild, face-appropriate training augmentation ending in a ``(3, size, size)`` tensor in [0, 1].

    In order: a random resized crop keeping 70-100% of the face crop's area with aspect 0.8-1.25; a
    horizontal flip (faces are near-symmetric, the pain cues are on both sides); a small affine move
    (rotation up to 10 degrees, scale 0.95-1.05, shift up to 4%; borders reflected so no black
    corners); colour jitter (brightness / contrast 0.2, saturation 0.15, hue 0.02: lighting and
    camera white balance, not new skin colours); with probability 0.2 a slight Gaussian or motion
    blur; with probability 0.2 sensor noise (std 1-4% of full scale); with probability 0.3 JPEG
    re-compression at quality 50-95. ``strength`` in (0, 1] scales the geometric and colour ranges
    (1 = the ranges above).
    """
    import albumentations as A
    import cv2

    size = _check_size(size)
    if not (0 < strength <= 1):
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    s = float(strength)
    compose = A.Compose(
        [
            A.RandomResizedCrop(
                size=(size, size),
                scale=(1 - 0.3 * s, 1.0),
                ratio=(1 / (1 + 0.25 * s), 1 + 0.25 * s),
                area_for_downscale="image",
            ),
            A.HorizontalFlip(p=0.5),
            A.Affine(
                rotate=(-10 * s, 10 * s),
                scale=(1 - 0.05 * s, 1 + 0.05 * s),
                translate_percent=(-0.04 * s, 0.04 * s),
                border_mode=cv2.BORDER_REFLECT_101,
                p=0.5,
            ),
            A.ColorJitter(brightness=0.2 * s, contrast=0.2 * s, saturation=0.15 * s, hue=0.02 * s, p=0.8),
            A.OneOf(
                [A.GaussianBlur(blur_limit=(3, 5), sigma_limit=(0.3, 1.2)), A.MotionBlur(blur_limit=(3, 5))],
                p=0.2,
            ),
            A.GaussNoise(std_range=(0.01, 0.04), p=0.2),
            A.ImageCompression(quality_range=(50, 95), p=0.3),
        ]
    )
    return ImageTransform(compose, size, train=True, seed=seed)


def eval_transform(size: int = DEFAULT_SIZE, *, mode: str = "crop") -> ImageTransform:
    """Deterministic evaluation transform ending in a ``(3, size, size)`` tensor in [0, 1].

    ``mode="crop"`` (default, as in ImageNet evaluation): resize the shorter side to ``size``, then
    take the centre ``size x size`` square; for the near-square face crops painwatch feeds it this
    loses at most a thin strip at the long sides. ``mode="pad"``: resize the longer side to ``size``
    and pad the shorter one symmetrically by edge reflection, keeping the whole crop. Shrinking uses
    area averaging (no aliasing), enlarging bilinear interpolation. Same input, same
    output, always.
    """
    import albumentations as A
    import cv2

    size = _check_size(size)
    if mode == "crop":
        steps = [
            A.SmallestMaxSize(max_size=size, interpolation=cv2.INTER_LINEAR, area_for_downscale="image"),
            A.CenterCrop(size, size),
        ]
    elif mode == "pad":
        steps = [
            A.LongestMaxSize(max_size=size, interpolation=cv2.INTER_LINEAR, area_for_downscale="image"),
            A.PadIfNeeded(min_height=size, min_width=size, border_mode=cv2.BORDER_REFLECT_101),
        ]
    else:
        raise ValueError(f"mode must be 'crop' or 'pad', got {mode!r}")
    return ImageTransform(A.Compose(steps), size, train=False, seed=None)
