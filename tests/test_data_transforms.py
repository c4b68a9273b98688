"""Train / eval transforms and FrameDataset."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from painwatch.data import FrameDataset, FrameRecord, eval_transform, train_transform


def _photo(height: int = 90, width: int = 120, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, width, dtype=np.float32)[None, :, None] * np.ones((height, 1, 3), np.float32)
    return np.clip(base + rng.normal(0, 20, (height, width, 3)), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("make", [lambda s: train_transform(s, seed=1), eval_transform])
@pytest.mark.parametrize("size", [32, 57])
def test_output_shape_dtype_and_range(make, size: int) -> None:
    transform = make(size)
    for image in (
        _photo(),
        _photo(200, 40),
        np.zeros((10, 10, 3), np.uint8),
        np.full((30, 30, 3), 255, np.uint8),
    ):
        out = transform(image)
        assert isinstance(out, torch.Tensor)
        assert out.shape == (3, size, size) and out.dtype == torch.float32
        assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0


def test_eval_is_deterministic_and_not_normalised() -> None:
    transform = eval_transform(64)
    image = _photo()
    first, second = transform(image), transform(image)
    assert torch.equal(first, second)
    white = transform(np.full((50, 80, 3), 255, np.uint8))
    assert torch.allclose(white, torch.ones_like(white))  # [0, 1] pixels, no mean/std inside
    # crop: the centre of a wide image; pad: the whole image with reflected borders.
    wide = np.zeros((50, 100, 3), np.uint8)
    wide[:, :25] = 255  # a white strip at the far left
    assert float(eval_transform(50, mode="crop")(wide)[0, :, :5].max()) == 0.0
    assert float(eval_transform(50, mode="pad")(wide)[0, 12:37, :5].min()) > 0.9
    with pytest.raises(ValueError, match="mode"):
        eval_transform(50, mode="stretch")
    # Enlarging a small crop interpolates (bilinear), it does not repeat pixels in blocks.
    edge = np.zeros((20, 20, 3), np.uint8)
    edge[:, 10:] = 255
    row = eval_transform(40)(edge)[0, 0]
    assert ((row > 0.1) & (row < 0.9)).sum() >= 2


def test_train_is_random_but_seeded() -> None:
    image = _photo()
    a = train_transform(64, seed=3)(image)
    b = train_transform(64, seed=3)(image)
    assert torch.equal(a, b)
    transform = train_transform(64, seed=3)
    draws = [transform(image) for _ in range(4)]
    assert any(not torch.equal(draws[0], d) for d in draws[1:])
    assert not torch.equal(train_transform(64, seed=4)(image), a)


def test_bad_inputs_are_named() -> None:
    transform = eval_transform(32)
    with pytest.raises(ValueError, match="uint8"):
        transform(np.zeros((10, 10, 3), np.float32))
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        transform(np.zeros((10, 10), np.uint8))
    with pytest.raises(ValueError, match="size"):
        eval_transform(0)
    with pytest.raises(ValueError, match="strength"):
        train_transform(32, strength=2)


def test_transform_pickles_for_dataloader_workers() -> None:
    transform = train_transform(32, seed=5)
    clone = pickle.loads(pickle.dumps(transform))
    image = _photo()
    assert clone(image).shape == (3, 32, 32)


def test_frame_dataset_reads_crops_and_labels(tmp_path: Path) -> None:
    records = []
    for k, label in enumerate((0, 1, 1)):
        path = tmp_path / f"{k}.png"
        Image.fromarray(_photo(seed=k)).save(path)
        records.append(FrameRecord(path, f"m{k % 2}", label, box=(10, 10, 70, 70) if k == 2 else None))
    dataset = FrameDataset(records, eval_transform(48))
    assert len(dataset) == 3
    image, label = dataset[2]
    assert image.shape == (3, 48, 48) and label == 1
    assert dataset.labels.tolist() == [0, 1, 1] and dataset.groups.tolist() == ["m0", "m1", "m0"]
    loader = torch.utils.data.DataLoader(dataset, batch_size=2)
    batches = list(loader)
    assert batches[0][0].shape == (2, 3, 48, 48) and batches[0][1].tolist() == [0, 1]
    with pytest.raises(TypeError, match="FrameRecord"):
        FrameDataset(["a.png"], eval_transform(48))  # type: ignore[list-item]


@pytest.mark.slow
def test_dataloader_workers_draw_different_but_reproducible_augmentations(tmp_path: Path) -> None:
    path = tmp_path / "frame.png"
    Image.fromarray(_photo()).save(path)
    dataset = FrameDataset([FrameRecord(path, "m", 0)] * 4, train_transform(32, seed=0))

    def run() -> torch.Tensor:
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=1, num_workers=2, generator=torch.Generator().manual_seed(7)
        )
        return torch.cat([batch for batch, _ in loader])

    first, second = run(), run()
    assert torch.equal(first, second)  # same loader seed, same augmentations
    assert not torch.equal(first[0], first[1])  # items 0 and 1 go to different workers
