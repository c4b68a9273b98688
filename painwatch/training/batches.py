"""Running a model over frame records: data loaders, logits and pooled features.

Records are read with the albumentations transforms of :mod:`painwatch.data.transforms` (the train
transform for training, the deterministic eval transform otherwise); a ready ``Dataset`` or
``DataLoader`` is used as it is. Every function restores the model's train/eval mode.
"""

from __future__ import annotations

import contextlib
import math
import random
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from painwatch.data import FrameDataset, eval_transform, train_transform
from painwatch.models import PainNet
from painwatch.runtime import resolve_device


def seed_loader_worker(worker_id: int) -> None:
    # Each DataLoader worker gets a distinct seed derived from the loader's generator.
    worker_seed = torch.initial_seed() % (2**32)
    random.seed(worker_seed)
    np.random.seed(worker_seed)


def labels_of(records_or_dataset: Any) -> list[int]:
    """Labels of records (``.label``) or of a dataset exposing ``labels`` / ``records`` (or a Subset
    of one); other datasets are read item by item."""
    if isinstance(records_or_dataset, Subset):
        labels = labels_of(records_or_dataset.dataset)
        return [labels[i] for i in records_or_dataset.indices]
    if hasattr(records_or_dataset, "labels"):
        return [int(v) for v in records_or_dataset.labels]
    if hasattr(records_or_dataset, "records"):
        return [int(r.label) for r in records_or_dataset.records]
    if isinstance(records_or_dataset, Sequence) and all(hasattr(r, "label") for r in records_or_dataset):
        return [int(r.label) for r in records_or_dataset]
    return [int(records_or_dataset[i][1]) for i in range(len(records_or_dataset))]


def as_dataset(
    records_or_dataset: Any,
    *,
    input_size: int,
    train: bool,
    detector: Any = None,
    seed: int = 0,
    augment: float = 1.0,
) -> Dataset:
    """A dataset yielding ``(float tensor (3, S, S) in [0, 1], label)`` from records or a dataset.

    Records get the albumentations train transform (augmentations of strength ``augment`` seeded by
    ``seed``; ``augment=0``: none) or the deterministic eval transform at ``input_size``; a ready
    dataset is used as it is.
    """
    if isinstance(records_or_dataset, Dataset):
        return records_or_dataset

    if train and augment > 0:
        transform = train_transform(input_size, seed=seed, strength=augment)
    else:
        transform = eval_transform(input_size)
    return FrameDataset(list(records_or_dataset), transform, detector=detector)


def as_loader(
    records_or_loader: Any, *, input_size: int, batch_size: int, num_workers: int, detector: Any = None
) -> DataLoader:

    if isinstance(records_or_loader, DataLoader):
        return records_or_loader
    dataset = as_dataset(records_or_loader, input_size=input_size, train=False, detector=detector)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        worker_init_fn=seed_loader_worker if num_workers else None,
    )


def autocast_context(device: torch.device, enabled: bool):


    if not enabled or device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast(device_type="cuda", dtype=dtype)


def progress_bar(iterable: Any, enabled: bool, **kwargs: Any) -> Any:

    return tqdm(iterable, disable=not enabled, leave=False, file=sys.stderr, dynamic_ncols=True, **kwargs)


def predict_logits(
    model: nn.Module,
    records_or_loader: Any,
    *,
    input_size: int | None = None,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    num_workers: int = 0,
    detector: Any = None,
    amp: bool = False,
    progress: bool = False,
    noise_sigma: float = 0.0,
    noise_seed: int = 0,
) -> torch.Tensor:
    """Logits ``(N, K)`` (float32, CPU) of ``model`` in eval mode over records, a dataset or a loader.

    Records are read with the deterministic eval transform at ``input_size`` (default: the model's).
    Rows follow the order of the records. The model's train/eval mode is restored afterwards.
    ``noise_sigma > 0``: the logits of ``x + xi`` with one draw ``xi ~ N(0, noise_sigma^2 I)`` per frame
    (unclipped, [0, 1] pixel units), drawn on the CPU from a generator seeded with ``noise_seed``, so
    the same call gives the same logits on any device.
    """


    if not math.isfinite(noise_sigma) or noise_sigma < 0:
        raise ValueError(f"noise_sigma must be a finite number >= 0, got {noise_sigma!r}")
    noise_generator = torch.Generator().manual_seed(int(noise_seed))

    size = int(input_size or getattr(model, "input_size", 224))
    loader = as_loader(records_or_loader, input_size=size, batch_size=batch_size, num_workers=num_workers,
                       detector=detector)
    target = resolve_device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    model.to(target)
    outputs = []
    try:
        with torch.inference_mode():
            for images, _ in progress_bar(loader, progress, desc="predict", unit="batch"):
                if noise_sigma > 0:
                    noise = torch.randn(images.shape, generator=noise_generator, dtype=images.dtype)
                    images = images + noise_sigma * noise
                images = images.to(target, non_blocking=True)
                if target.type == "cuda":
                    images = images.contiguous(memory_format=torch.channels_last)
                with autocast_context(target, amp):
                    logits = model(images)
                outputs.append(logits.float().cpu())
    finally:
        model.train(was_training)
    if not outputs:
        num_classes = int(getattr(model, "num_classes", 0))
        return torch.zeros(0, num_classes)
    return torch.cat(outputs)


def extract_features(
    model: PainNet,
    records_or_loader: Any,
    *,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    num_workers: int = 0,
    detector: Any = None,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled backbone features ``(N, num_features)`` (float32, CPU) and labels ``(N,)`` (int64).

    Uses the eval transform at the model's input size; ``model.head(features)`` equals the logits of
    :func:`predict_logits` (up to float rounding). The model's train/eval mode is restored.
    """


    loader = as_loader(records_or_loader, input_size=model.input_size, batch_size=batch_size,
                       num_workers=num_workers, detector=detector)
    target = resolve_device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    model.to(target)
    features, labels = [], []
    try:
        with torch.inference_mode():
            for images, batch_labels in progress_bar(loader, progress, desc="features", unit="batch"):
                images = images.to(target, non_blocking=True)
                if target.type == "cuda":
                    images = images.contiguous(memory_format=torch.channels_last)
                features.append(model.features(images).float().cpu())
                labels.append(torch.as_tensor(batch_labels, dtype=torch.long))
    finally:
        model.train(was_training)
    if not features:
        return torch.zeros(0, model.num_features), torch.zeros(0, dtype=torch.long)
    return torch.cat(features), torch.cat(labels)
