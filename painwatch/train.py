"""Fine-tuning of the clinical model, noise-robust options included, and ``painwatch train``.

- :func:`fit` fine-tunes a :class:`~painwatch.models.PainNet` on frame records with AdamW, a cosine
  (with linear warm-up) or one-cycle schedule, class weighting or balanced sampling, early stopping on
  an inner validation split, mixed precision and channels_last on GPU (plain float32 on CPU).
- Noise-robust fine-tuning (thesis Ch. 4; issue 5): Gaussian noise augmentation at ``noise_sigma``
  (L2 per pixel, in [0, 1] pixel space, not clipped: the certificates assume unclipped noise) and
  the Monte Carlo expected-margin loss ``relu(d - mean_k M_f(x + xi_k))`` over ``k`` draws
  (:func:`painwatch.robust.losses.mc_expected_margin_loss`), alone (``"mc_margin"``) or added to
  cross-entropy (``"ce+mc_margin"``).
- :func:`extract_features` / :func:`fit_head` train a linear head on cached backbone features
  (frozen-backbone runs); :func:`predict_logits` runs a model over records.
- ``painwatch train DATA --out BUNDLE`` trains on all individuals (an inner validation split by
  individual serves early stopping and temperature scaling) and writes a model bundle.
- :func:`add_training_arguments` declares the command-line options of every ``TrainConfig`` field and
  :func:`train_config_from_args` reads them back: ``painwatch train`` and ``painwatch loio`` share both.

Every random draw (shuffling, sampling, noise, augmentation seeds) derives from ``TrainConfig.seed``.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # heavy imports stay inside functions so `painwatch --help` is fast
    import numpy as np
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, Dataset

    from painwatch.models import PainNet

LOSSES = ("ce", "mc_margin", "ce+mc_margin")
SCHEDULES = ("cosine", "onecycle", "constant")
CLASS_BALANCING = ("weights", "sampler", "none")
MONITORS = ("val_loss", "val_balanced_accuracy")
DEVICES = ("auto", "cpu", "cuda", "mps")


@dataclass
class TrainConfig:
    """Settings of a training run. Units: ``noise_sigma`` is an L2 noise level per pixel in [0, 1]
    pixel space at ``input_size``; ``warmup_epochs`` in epochs (fractions allowed); ``lr`` per step.

    ``margin`` (d) and ``num_draws`` (k) parametrise the expected-margin loss; ``margin_weight``
    scales it when added to cross-entropy. ``patience`` (epochs without improvement of ``monitor``
    on the validation records) stops early; ``None`` trains all ``epochs``. ``head_epochs``
    (L-BFGS rounds) and ``head_l2`` (L2 penalty on the weights of standardised features) are used
    by :func:`fit_head` (linear head on cached features) only.
    """

    arch: str = "resnet50"
    input_size: int = 224
    epochs: int = 10
    batch_size: int = 32
    eval_batch_size: int = 64
    lr: float = 3e-4
    weight_decay: float = 0.05
    schedule: str = "cosine"
    warmup_epochs: float = 1.0
    patience: int | None = 5
    monitor: str = "val_loss"
    class_balance: str = "weights"
    noise_sigma: float = 0.0
    loss: str = "ce"
    margin: float = 1.0
    num_draws: int = 4
    margin_weight: float = 1.0
    label_smoothing: float = 0.0
    augment: float = 1.0
    validate_under_noise: bool = True
    max_grad_norm: float | None = 5.0
    drop_rate: float = 0.0
    amp: bool = True
    channels_last: bool = True
    seed: int = 0
    num_workers: int = 0
    device: str = "auto"
    pretrained: bool = False
    weights_path: str | None = None
    head_epochs: int = 50
    head_l2: float = 1e-2

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> TrainConfig:
        """Check every setting; raises ``ValueError`` naming the field and the bad value."""

        def bad(name: str, requirement: str) -> ValueError:
            return ValueError(f"TrainConfig.{name} {requirement}, got {getattr(self, name)!r}")

        def is_int(value: Any) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        def is_real(value: Any) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

        for name in ("epochs", "batch_size", "eval_batch_size", "num_draws", "head_epochs"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise bad(name, "must be an integer >= 1")
        if not is_int(self.input_size) or not 16 <= self.input_size <= 4096:
            raise bad("input_size", "must be an integer number of pixels in [16, 4096]")
        if not is_real(self.lr) or self.lr <= 0:
            raise bad("lr", "must be a number > 0")
        for name in ("weight_decay", "warmup_epochs", "noise_sigma", "margin_weight", "head_l2"):
            if not is_real(getattr(self, name)) or getattr(self, name) < 0:
                raise bad(name, "must be a number >= 0")
        if not is_real(self.margin):
            raise bad("margin", "must be a finite number")
        if not is_real(self.label_smoothing) or not 0 <= self.label_smoothing < 1:
            raise bad("label_smoothing", "must be in [0, 1)")
        for name in ("amp", "channels_last", "pretrained", "validate_under_noise"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "must be True or False")
        if not is_real(self.augment) or not 0 <= self.augment <= 1:
            raise bad("augment", "must be in [0, 1] (0: no augmentation, 1: the full ranges)")
        if not is_real(self.drop_rate) or not 0 <= self.drop_rate < 1:
            raise bad("drop_rate", "must be in [0, 1)")
        if self.max_grad_norm is not None and (not is_real(self.max_grad_norm) or self.max_grad_norm <= 0):
            raise bad("max_grad_norm", "must be None or a number > 0")
        if self.patience is not None and (not is_int(self.patience) or self.patience < 1):
            raise bad("patience", "must be None or an integer >= 1")
        if not is_int(self.seed) or self.seed < 0:
            raise bad("seed", "must be an integer >= 0")
        if not is_int(self.num_workers) or self.num_workers < 0:
            raise bad("num_workers", "must be an integer >= 0")
        for name, allowed in (
            ("loss", LOSSES),
            ("schedule", SCHEDULES),
            ("class_balance", CLASS_BALANCING),
            ("monitor", MONITORS),
        ):
            if getattr(self, name) not in allowed:
                raise bad(name, f"must be one of {list(allowed)}")
        device = str(self.device)
        if device.split(":")[0] not in DEVICES:
            raise bad("device", f"must be one of {list(DEVICES)} (optionally with an index, e.g. cuda:1)")
        if not isinstance(self.arch, str) or not self.arch:
            raise bad("arch", "must be a timm model name")
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig field(s) {unknown}; known: {sorted(known)}")
        return cls(**values)


@dataclass
class FitResult:
    """Outcome of :func:`fit` / :func:`fit_head`.

    ``model`` holds the weights of ``best_epoch`` (1-based; the last epoch when there is no
    validation set). ``history`` has one dict per epoch (``epoch, lr, train_loss, train_accuracy,
    val_loss, val_accuracy, val_balanced_accuracy, seconds``; validation entries are ``None``
    without validation records). ``val_logits`` (float32, CPU) and ``val_labels`` are the
    validation predictions of the returned model (``None`` without validation records).
    """

    model: Any
    history: list[dict[str, Any]]
    best_epoch: int
    best_score: float | None
    stopped_early: bool
    epochs_run: int
    device: str
    seconds: float
    val_logits: Any = None
    val_labels: Any = None
    config: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------- utilities


def _worker_init(worker_id: int) -> None:
    # Each DataLoader worker gets a distinct seed derived from the loader's generator.
    import numpy as np
    import torch

    worker_seed = torch.initial_seed() % (2**32)
    random.seed(worker_seed)
    np.random.seed(worker_seed)


def _labels_of(records_or_dataset: Any) -> list[int]:
    """Labels of records (``.label``) or of a dataset exposing ``labels`` / ``records`` (or a Subset
    of one); other datasets are read item by item."""
    from torch.utils.data import Subset

    if isinstance(records_or_dataset, Subset):
        labels = _labels_of(records_or_dataset.dataset)
        return [labels[i] for i in records_or_dataset.indices]
    if hasattr(records_or_dataset, "labels"):
        return [int(v) for v in records_or_dataset.labels]
    if hasattr(records_or_dataset, "records"):
        return [int(r.label) for r in records_or_dataset.records]
    if isinstance(records_or_dataset, Sequence) and all(hasattr(r, "label") for r in records_or_dataset):
        return [int(r.label) for r in records_or_dataset]
    return [int(records_or_dataset[i][1]) for i in range(len(records_or_dataset))]


def _as_dataset(
    records_or_dataset: Any,
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
    from torch.utils.data import Dataset

    if isinstance(records_or_dataset, Dataset):
        return records_or_dataset
    from painwatch.data import FrameDataset, eval_transform, train_transform

    if train and augment > 0:
        transform = train_transform(input_size, seed=seed, strength=augment)
    else:
        transform = eval_transform(input_size)
    return FrameDataset(list(records_or_dataset), transform, detector=detector)


def _as_loader(
    records_or_loader: Any, input_size: int, batch_size: int, num_workers: int, detector: Any = None
) -> DataLoader:
    from torch.utils.data import DataLoader

    if isinstance(records_or_loader, DataLoader):
        return records_or_loader
    dataset = _as_dataset(records_or_loader, input_size, train=False, detector=detector)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        worker_init_fn=_worker_init if num_workers else None,
    )


def class_weights(labels: Sequence[int], num_classes: int) -> torch.Tensor:
    """Inverse-frequency class weights ``N / (K * n_c)`` (1.0 for balanced data); absent classes get 0."""
    import torch

    counts = torch.bincount(torch.as_tensor(list(labels), dtype=torch.long), minlength=num_classes).double()
    if counts.numel() > num_classes:
        raise ValueError(f"labels contain class {counts.numel() - 1} but the model has {num_classes} classes")
    present = counts > 0
    weights = torch.zeros(num_classes, dtype=torch.float64)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return weights.float()


def balanced_accuracy(predictions: Sequence[int] | np.ndarray, labels: Sequence[int] | np.ndarray) -> float:
    """Mean per-class recall over the classes present in ``labels``."""
    import numpy as np

    predictions = np.asarray(predictions)
    labels = np.asarray(labels)
    recalls = [float(np.mean(predictions[labels == c] == c)) for c in np.unique(labels)]
    return float(np.mean(recalls)) if recalls else float("nan")


def _autocast(device: torch.device, enabled: bool):
    import contextlib

    import torch

    if not enabled or device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast(device_type="cuda", dtype=dtype)


def make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int):
    """A per-step learning-rate schedule over ``config.epochs * steps_per_epoch`` steps.

    ``"cosine"``: linear warm-up for ``config.warmup_epochs`` then cosine decay to 0;
    ``"constant"``: warm-up then constant; ``"onecycle"``: PyTorch's OneCycleLR peaking at
    ``config.lr`` after the warm-up fraction (0.3 of the run without warm-up).
    """
    import torch

    total = max(1, config.epochs * steps_per_epoch)
    if config.schedule == "onecycle":
        pct = (
            min(0.5, max(1.0 / total, config.warmup_epochs / config.epochs)) if config.warmup_epochs else 0.3
        )
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=config.lr, total_steps=total, pct_start=pct, anneal_strategy="cos"
        )
    warmup = min(total - 1, round(config.warmup_epochs * steps_per_epoch))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if config.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on weight matrices and kernels only: biases and normalisation scales (1-D
    parameters) are not decayed, as is usual for fine-tuning convolutional networks."""
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (no_decay if parameter.ndim <= 1 else decay).append(parameter)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _progress(iterable: Any, enabled: bool, **kwargs: Any) -> Any:
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=not enabled, leave=False, file=sys.stderr, dynamic_ncols=True, **kwargs)


# ---------------------------------------------------------------------------------------- inference


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
    import torch

    from painwatch.runtime import resolve_device

    if not math.isfinite(noise_sigma) or noise_sigma < 0:
        raise ValueError(f"noise_sigma must be a finite number >= 0, got {noise_sigma!r}")
    noise_generator = torch.Generator().manual_seed(int(noise_seed))

    size = int(input_size or getattr(model, "input_size", 224))
    loader = _as_loader(records_or_loader, size, batch_size, num_workers, detector)
    target = resolve_device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    model.to(target)
    outputs = []
    try:
        with torch.inference_mode():
            for images, _ in _progress(loader, progress, desc="predict", unit="batch"):
                if noise_sigma > 0:
                    noise = torch.randn(images.shape, generator=noise_generator, dtype=images.dtype)
                    images = images + noise_sigma * noise
                images = images.to(target, non_blocking=True)
                if target.type == "cuda":
                    images = images.contiguous(memory_format=torch.channels_last)
                with _autocast(target, amp):
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
    import torch

    from painwatch.runtime import resolve_device

    loader = _as_loader(records_or_loader, model.input_size, batch_size, num_workers, detector)
    target = resolve_device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    model.to(target)
    features, labels = [], []
    try:
        with torch.inference_mode():
            for images, batch_labels in _progress(loader, progress, desc="features", unit="batch"):
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


def _evaluate(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    import torch.nn.functional as F

    loss = float(F.cross_entropy(logits.double(), labels).item())
    predictions = logits.argmax(dim=1)
    return {
        "val_loss": loss,
        "val_accuracy": float((predictions == labels).double().mean().item()),
        "val_balanced_accuracy": balanced_accuracy(predictions.numpy(), labels.numpy()),
    }


def _is_better(score: float, best: float | None, monitor: str) -> bool:
    if best is None:
        return True
    if monitor == "val_loss":
        return score < best - 1e-6
    return score > best + 1e-6


# ------------------------------------------------------------------------------------------ training


def _loss(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    config: TrainConfig,
    weights: torch.Tensor | None,
    noise_generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training loss of a batch and the logits used for the running accuracy."""
    import torch
    import torch.nn.functional as F

    from painwatch.robust.losses import mc_expected_margin_loss

    noisy = images
    if config.noise_sigma > 0:
        noise = torch.randn(images.shape, generator=noise_generator, device=images.device, dtype=images.dtype)
        noisy = images + config.noise_sigma * noise
    logits = None
    total = images.new_zeros(())
    if config.loss in ("ce", "ce+mc_margin"):
        logits = model(noisy)
        total = F.cross_entropy(
            logits.float(), labels, weight=weights, label_smoothing=config.label_smoothing
        )
    if config.loss in ("mc_margin", "ce+mc_margin"):
        per_sample = mc_expected_margin_loss(
            model,
            images,
            labels,
            sigma=config.noise_sigma,
            num_draws=config.num_draws,
            margin=config.margin,
            generator=noise_generator,
            reduction="none",
        ).float()
        if weights is not None:
            sample_weights = weights[labels]
            margin_loss = (per_sample * sample_weights).sum() / sample_weights.sum().clamp_min(1e-12)
        else:
            margin_loss = per_sample.mean()
        total = total + (config.margin_weight if config.loss == "ce+mc_margin" else 1.0) * margin_loss
    if logits is None:
        with torch.no_grad():
            logits = model(noisy)
    return total, logits.detach()


def fit(
    model: PainNet,
    train_records: Any,
    val_records: Any | None,
    config: TrainConfig,
    progress: bool = True,
    *,
    detector: Any = None,
) -> FitResult:
    """Fine-tune ``model`` on ``train_records`` and return the weights of the best validation epoch.

    ``train_records`` / ``val_records``: sequences of :class:`painwatch.data.FrameRecord` (read with the
    albumentations train / eval transforms at ``config.input_size``) or ready torch datasets yielding
    ``(image (3, S, S) in [0, 1], label)``. ``val_records`` empty or ``None``: no early stopping, the last
    epoch is returned. Labels must lie in ``[0, model.num_classes)``.

    The global random generators are seeded from ``config.seed`` (weight-free randomness such as
    dropout and augmentation); shuffling and noise use dedicated generators seeded from it too.
    """
    import numpy as np
    import torch
    from torch.utils.data import DataLoader, WeightedRandomSampler

    from painwatch.runtime import resolve_device, seed_everything

    config.validate()
    started = time.perf_counter()
    seed_everything(config.seed)
    device = resolve_device(config.device)
    use_amp = bool(config.amp and device.type == "cuda")
    train_set = _as_dataset(
        train_records, config.input_size, True, detector=detector, seed=config.seed, augment=config.augment
    )
    if len(train_set) == 0:
        raise ValueError("train_records is empty: nothing to train on")
    train_labels = _labels_of(train_records)
    num_classes = int(getattr(model, "num_classes", 0)) or (max(train_labels) + 1)
    bad = sorted({y for y in train_labels if not 0 <= y < num_classes})
    if bad:
        raise ValueError(f"train labels {bad} are outside [0, {num_classes}) for a {num_classes}-class model")
    has_val = val_records is not None and len(val_records) > 0
    if has_val:
        val_loader = _as_loader(
            val_records, config.input_size, config.eval_batch_size, config.num_workers, detector
        )
        val_labels = torch.as_tensor(_labels_of(val_records), dtype=torch.long)

    val_noise_sigma = config.noise_sigma if config.validate_under_noise else 0.0
    loader_generator = torch.Generator().manual_seed(config.seed)
    weights = None
    sampler = None
    if config.class_balance == "weights":
        weights = class_weights(train_labels, num_classes).to(device)
    elif config.class_balance == "sampler":
        per_class = class_weights(train_labels, num_classes).double()
        sample_weights = per_class[torch.as_tensor(train_labels)]
        sampler = WeightedRandomSampler(
            sample_weights, num_samples=len(train_labels), replacement=True, generator=loader_generator
        )
    drop_last = len(train_set) > config.batch_size and len(train_set) % config.batch_size == 1
    train_loader = DataLoader(
        train_set,
        batch_size=config.batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        num_workers=config.num_workers,
        generator=loader_generator,
        drop_last=drop_last,
        worker_init_fn=_worker_init if config.num_workers else None,
        pin_memory=device.type == "cuda",
        persistent_workers=config.num_workers > 0,
    )
    steps_per_epoch = len(train_loader)

    model.to(device)
    if device.type == "cuda" and config.channels_last:
        model.to(memory_format=torch.channels_last)
    noise_generator = torch.Generator(device=device).manual_seed(config.seed + 1)
    optimizer = torch.optim.AdamW(parameter_groups(model, config.weight_decay), lr=config.lr)
    scheduler = make_scheduler(optimizer, config, steps_per_epoch)
    amp_dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if use_amp else None
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)

    history: list[dict[str, Any]] = []
    best_score: float | None = None
    best_epoch = 0
    best_state: dict[str, torch.Tensor] | None = None
    best_val_logits = None
    epochs_without_gain = 0
    stopped_early = False
    epoch_bar = _progress(range(1, config.epochs + 1), progress, desc="epochs", unit="epoch")
    for epoch in epoch_bar:
        epoch_started = time.perf_counter()
        model.train()
        loss_sum, correct, seen = 0.0, 0, 0
        batch_bar = _progress(train_loader, progress, desc=f"epoch {epoch}", unit="batch")
        for images, labels in batch_bar:
            images = images.to(device, non_blocking=True)
            labels = torch.as_tensor(labels, dtype=torch.long).to(device, non_blocking=True)
            if device.type == "cuda" and config.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with _autocast(device, use_amp):
                loss, logits = _loss(model, images, labels, config, weights, noise_generator)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"training loss became {loss.item()} at epoch {epoch}; lower TrainConfig.lr "
                    f"(now {config.lr}) or check the data"
                )
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if config.max_grad_norm is not None:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            batch = labels.shape[0]
            loss_sum += float(loss.item()) * batch
            correct += int((logits.argmax(dim=1) == labels).sum().item())
            seen += batch
            batch_bar.set_postfix(loss=f"{loss_sum / seen:.4f}")
        record: dict[str, Any] = {
            "epoch": epoch,
            "lr": float(optimizer.param_groups[0]["lr"]),
            "train_loss": loss_sum / max(1, seen),
            "train_accuracy": correct / max(1, seen),
            "val_loss": None,
            "val_accuracy": None,
            "val_balanced_accuracy": None,
            "val_noise_sigma": val_noise_sigma if has_val else None,
        }
        if has_val:
            val_logits = predict_logits(
                model,
                val_loader,
                device=device,
                amp=use_amp,
                noise_sigma=val_noise_sigma,
                noise_seed=config.seed + 2,
            )
            record.update(_evaluate(val_logits, val_labels))
            score = record[config.monitor]
            if _is_better(score, best_score, config.monitor):
                best_score, best_epoch, epochs_without_gain = score, epoch, 0
                best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
                best_val_logits = val_logits
            else:
                epochs_without_gain += 1
        record["seconds"] = time.perf_counter() - epoch_started
        history.append(record)
        epoch_bar.set_postfix(
            {
                k: f"{v:.4f}"
                for k, v in record.items()
                if k in ("train_loss", "val_loss", "val_balanced_accuracy") and v is not None
            }
        )
        if has_val and config.patience is not None and epochs_without_gain >= config.patience:
            stopped_early = True
            break

    if best_state is not None:
        model.load_state_dict(best_state)
    else:
        best_epoch = len(history)
    model.eval()
    return FitResult(
        model=model,
        history=history,
        best_epoch=best_epoch,
        best_score=best_score,
        stopped_early=stopped_early,
        epochs_run=len(history),
        device=str(device),
        seconds=time.perf_counter() - started,
        val_logits=best_val_logits,
        val_labels=val_labels if has_val else None,
        config=config.to_dict()
        | {
            "num_train_frames": len(train_set),
            "train_class_counts": np.bincount(np.asarray(train_labels), minlength=num_classes).tolist(),
        },
    )


def fit_head(
    features: Any,
    labels: Any,
    val_features: Any | None,
    val_labels: Any | None,
    config: TrainConfig,
    *,
    num_classes: int | None = None,
    progress: bool = False,
) -> FitResult:
    """Train a linear head on cached (frozen-backbone) features: L2-regularised, class-weighted
    multinomial logistic regression solved with full-batch L-BFGS (a convex problem, so the result
    does not depend on an initialisation or on the seed).

    ``features`` ``(N, F)`` and ``labels`` ``(N,)`` (NumPy or torch). Features are standardised inside
    the solver and the scaling is folded back into the returned layer, so it applies to raw features.
    The objective is ``mean_i w_{y_i} CE_i + head_l2 / 2 * ||W||^2`` (``w``: inverse class frequencies
    unless ``config.class_balance == "none"``). Each "epoch" is one L-BFGS call of up to 20 iterations,
    ``config.head_epochs`` at most; with validation features the epoch that is best on
    ``config.monitor`` is kept and ``config.patience`` epochs without gain stop early. Pixel-space
    noise cannot be applied to cached features, so ``config.noise_sigma`` must be 0 and
    ``config.loss`` ``"ce"``.

    Returns a :class:`FitResult` whose ``model`` is an ``nn.Linear(F, K)`` (float32, eval mode) giving
    logits of raw features; copy it into ``PainNet.head`` with ``load_state_dict``.
    """
    import torch
    import torch.nn.functional as F
    from torch import nn

    config.validate()
    if config.noise_sigma > 0 or config.loss != "ce":
        raise ValueError(
            f"fit_head trains on cached features, where pixel-space noise cannot be applied: it needs "
            f"noise_sigma=0 and loss='ce' (got noise_sigma={config.noise_sigma}, loss={config.loss!r}); "
            f"fine-tune the whole network with fit() for noise-robust training"
        )
    started = time.perf_counter()
    x = torch.as_tensor(features).detach().to("cpu", torch.float64)
    y = torch.as_tensor(labels).detach().to("cpu", torch.long)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"features must have shape (N, F) with N >= 1, got {tuple(x.shape)}")
    if y.shape != (x.shape[0],):
        raise ValueError(
            f"labels must have shape ({x.shape[0]},) to match the features, got {tuple(y.shape)}"
        )
    if not torch.isfinite(x).all():
        raise ValueError("features contain NaN or infinite values")
    k = max(2, int(num_classes) if num_classes is not None else int(y.max()) + 1)
    if y.min() < 0 or y.max() >= k:
        raise ValueError(f"labels must lie in [0, {k}), found {int(y.min())}..{int(y.max())}")
    has_val = val_features is not None and len(val_features) > 0
    if has_val:
        vx = torch.as_tensor(val_features).detach().to("cpu", torch.float64)
        vy = torch.as_tensor(val_labels).detach().to("cpu", torch.long)
        if vx.ndim != 2 or vx.shape[1] != x.shape[1] or vy.shape != (vx.shape[0],):
            raise ValueError(
                f"val_features {tuple(vx.shape)} / val_labels {tuple(vy.shape)} do not match features "
                f"(N, {x.shape[1]})"
            )

    mean = x.mean(dim=0)
    scale = x.std(dim=0, unbiased=False).clamp_min(1e-6)
    z = (x - mean) / scale
    weight = torch.zeros(k, x.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(k, dtype=torch.float64, requires_grad=True)
    sample_weights = None
    if config.class_balance != "none":
        sample_weights = class_weights(y.tolist(), k).double()[y]
    optimizer = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=20,
        history_size=20,
        line_search_fn="strong_wolfe",
        tolerance_grad=1e-9,
        tolerance_change=1e-12,
    )

    def penalised_loss() -> torch.Tensor:
        per_sample = F.cross_entropy(
            z @ weight.T + bias, y, reduction="none", label_smoothing=config.label_smoothing
        )
        if sample_weights is None:
            data_term = per_sample.mean()
        else:
            data_term = (per_sample * sample_weights).sum() / sample_weights.sum()
        return data_term + 0.5 * config.head_l2 * weight.pow(2).sum()

    def objective() -> torch.Tensor:
        optimizer.zero_grad()
        loss = penalised_loss()
        loss.backward()
        return loss

    def folded() -> tuple[torch.Tensor, torch.Tensor]:
        # logits = W (x - mean) / scale + b = (W / scale) x + (b - (W / scale) mean)
        raw_weight = weight.detach() / scale
        return raw_weight, bias.detach() - raw_weight @ mean

    history: list[dict[str, Any]] = []
    best_score: float | None = None
    best_epoch, best_params, best_val_logits = 0, None, None
    epochs_without_gain, stopped_early, previous_loss = 0, False, math.inf
    for epoch in _progress(range(1, config.head_epochs + 1), progress, desc="head", unit="epoch"):
        epoch_started = time.perf_counter()
        optimizer.step(objective)
        with torch.no_grad():
            loss = float(penalised_loss())
        raw_weight, raw_bias = folded()
        with torch.no_grad():
            train_logits = x @ raw_weight.T + raw_bias
        record: dict[str, Any] = {
            "epoch": epoch,
            "lr": None,
            "train_loss": loss,
            "train_accuracy": float((train_logits.argmax(1) == y).double().mean()),
            "val_loss": None,
            "val_accuracy": None,
            "val_balanced_accuracy": None,
        }
        if has_val:
            val_logits = (vx @ raw_weight.T + raw_bias).float()
            record.update(_evaluate(val_logits, vy))
            score = record[config.monitor]
            if _is_better(score, best_score, config.monitor):
                best_score, best_epoch, epochs_without_gain = score, epoch, 0
                best_params, best_val_logits = (raw_weight, raw_bias), val_logits
            else:
                epochs_without_gain += 1
        record["seconds"] = time.perf_counter() - epoch_started
        history.append(record)
        converged = abs(previous_loss - loss) <= 1e-10 * max(1.0, abs(loss))
        previous_loss = loss
        if has_val and config.patience is not None and epochs_without_gain >= config.patience:
            stopped_early = True
            break
        if converged:
            break
    if best_params is None:
        best_params, best_epoch = folded(), len(history)
    head = nn.Linear(x.shape[1], k)
    with torch.no_grad():
        head.weight.copy_(best_params[0].float())
        head.bias.copy_(best_params[1].float())
    head.eval()
    return FitResult(
        model=head,
        history=history,
        best_epoch=best_epoch,
        best_score=best_score,
        stopped_early=stopped_early,
        epochs_run=len(history),
        device="cpu",
        seconds=time.perf_counter() - started,
        val_logits=best_val_logits,
        val_labels=vy if has_val else None,
        config=config.to_dict(),
    )


# ---------------------------------------------------------------------------------- painwatch train


def add_training_arguments(
    parser: argparse.ArgumentParser, defaults: TrainConfig | None = None, *, head: bool = False
) -> argparse._ArgumentGroup:
    """Declare every command-line option that sets a :class:`TrainConfig` field, in a "training
    options" group of ``parser``, with ``defaults`` (``TrainConfig()`` when omitted) as defaults.

    ``painwatch train`` and ``painwatch loio`` both call this, so they accept the same training options
    with the same defaults and units; :func:`train_config_from_args` turns the parsed options back into
    a :class:`TrainConfig`. ``head=True`` adds the options of the linear head on cached features
    (``--head-epochs``, ``--head-l2``), which only ``loio --cache-features`` uses. Two fields have no
    option because they change speed only: ``eval_batch_size`` and ``channels_last``.

    Options whose field may be ``None`` take 0 for "off" (``--patience 0``, ``--max-grad-norm 0``);
    ``--validate-clean`` and ``--no-amp`` switch off ``validate_under_noise`` and ``amp``.
    """
    d = TrainConfig() if defaults is None else defaults
    group = parser.add_argument_group(
        "training options",
        "the same for `painwatch train` and `painwatch loio` (each LOIO fold trains with them); noise sigma "
        "is in [0, 1] pixel units at --input-size",
    )
    add = group.add_argument
    add("--arch", default=d.arch, help="timm architecture name (e.g. resnet50, resnet18, resnet10t)")
    add(
        "--input-size",
        type=int,
        default=d.input_size,
        metavar="PIXELS",
        help="side of the square model input in pixels; frames are resized to it",
    )
    add(
        "--weights",
        default=d.weights_path,
        metavar="FILE",
        help="local ImageNet weights of the backbone (safetensors or .pth state dict); used instead of "
        "--pretrained",
    )
    add(
        "--pretrained",
        action="store_true",
        default=d.pretrained,
        help="ImageNet weights from the Hugging Face hub (needs network)",
    )
    add("--epochs", type=int, default=d.epochs, help="at most this many passes over the training frames")
    add("--batch-size", type=int, default=d.batch_size, metavar="FRAMES", help="frames per training step")
    add("--lr", type=float, default=d.lr, help="peak AdamW learning rate (per step)")
    add(
        "--weight-decay",
        type=float,
        default=d.weight_decay,
        help="AdamW decoupled weight decay (weight matrices and kernels; not biases or norm scales)",
    )
    add(
        "--schedule",
        choices=SCHEDULES,
        default=d.schedule,
        help="per-step learning-rate schedule: cosine (warm-up, then cosine decay to 0), onecycle "
        "(OneCycleLR peaking after the warm-up, or after 30%% of the run without one), constant (after the "
        "warm-up)",
    )
    add(
        "--warmup-epochs",
        type=float,
        default=d.warmup_epochs,
        metavar="EPOCHS",
        help="linear learning-rate warm-up, in epochs (fractions allowed); 0 for none",
    )
    add(
        "--patience",
        type=int,
        default=d.patience or 0,
        metavar="EPOCHS",
        help="early stopping: epochs without improvement of --monitor on the validation individuals; "
        "0 disables",
    )
    add(
        "--monitor",
        choices=MONITORS,
        default=d.monitor,
        help="validation score that picks the best epoch and drives early stopping",
    )
    add(
        "--class-balance",
        choices=CLASS_BALANCING,
        default=d.class_balance,
        help="class imbalance: inverse-frequency loss weights, balanced sampling, or none",
    )
    add(
        "--noise-sigma",
        type=float,
        default=d.noise_sigma,
        metavar="SIGMA",
        help="Gaussian noise augmentation: sigma of the noise added to every pixel, in [0, 1] pixel units "
        "(unclipped; the sigma of the certificates); 0 for none",
    )
    add(
        "--augment",
        type=float,
        default=d.augment,
        metavar="STRENGTH",
        help="strength of the image augmentation in [0, 1] (scales the crop, affine and colour ranges); "
        "0 for none",
    )
    add(
        "--validate-clean",
        action="store_true",
        default=not d.validate_under_noise,
        help="validate on clean frames even when training with noise (otherwise under the training noise)",
    )
    add(
        "--loss",
        choices=LOSSES,
        default=d.loss,
        help="cross-entropy, the Monte Carlo expected-margin loss (needs --noise-sigma > 0), or their sum",
    )
    add(
        "--margin",
        type=float,
        default=d.margin,
        help="target margin d of the expected-margin loss, in logit units",
    )
    add(
        "--num-draws",
        type=int,
        default=d.num_draws,
        metavar="K",
        help="noise draws k per frame and step of the expected-margin loss",
    )
    add(
        "--margin-weight",
        type=float,
        default=d.margin_weight,
        help="weight of the expected-margin term in --loss ce+mc_margin",
    )
    add(
        "--label-smoothing",
        type=float,
        default=d.label_smoothing,
        help="label smoothing of the cross-entropy, in [0, 1)",
    )
    add(
        "--drop-rate",
        type=float,
        default=d.drop_rate,
        help="dropout probability of the backbone (on the pooled features for ResNets), in [0, 1)",
    )
    add(
        "--max-grad-norm",
        type=float,
        default=d.max_grad_norm or 0.0,
        help="clip the gradient's global L2 norm to this; 0 disables",
    )
    add(
        "--seed",
        type=int,
        default=d.seed,
        help="seed of every random draw (splits, initialisation, shuffling, augmentation, noise)",
    )
    add(
        "--device",
        default=d.device,
        help="auto (CUDA when available, else CPU), cpu, cuda, cuda:N or mps",
    )
    add(
        "--num-workers",
        type=int,
        default=d.num_workers,
        help="data-loading worker processes; 0 loads in the main process",
    )
    add(
        "--no-amp",
        action="store_true",
        default=not d.amp,
        help="disable mixed precision (bfloat16/float16 autocast, used on CUDA only)",
    )
    if head:
        add(
            "--head-epochs",
            type=int,
            default=d.head_epochs,
            metavar="ROUNDS",
            help="with --cache-features: at most this many L-BFGS rounds (up to 20 iterations each) of the "
            "linear head",
        )
        add(
            "--head-l2",
            type=float,
            default=d.head_l2,
            help="with --cache-features: L2 penalty of the head on standardised features",
        )
    return group


def train_config_from_args(args: argparse.Namespace, **overrides: Any) -> TrainConfig:
    """The :class:`TrainConfig` of options declared by :func:`add_training_arguments` (validated: a bad
    value raises ``ValueError`` naming the field). ``overrides`` replace fields; fields without an
    option (and ``head_epochs`` / ``head_l2`` when they were not declared) keep their defaults."""
    values: dict[str, Any] = {
        "arch": args.arch,
        "input_size": args.input_size,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "schedule": args.schedule,
        "warmup_epochs": args.warmup_epochs,
        "patience": args.patience or None,
        "monitor": args.monitor,
        "class_balance": args.class_balance,
        "noise_sigma": args.noise_sigma,
        "loss": args.loss,
        "margin": args.margin,
        "num_draws": args.num_draws,
        "margin_weight": args.margin_weight,
        "label_smoothing": args.label_smoothing,
        "augment": args.augment,
        "validate_under_noise": not args.validate_clean,
        "max_grad_norm": args.max_grad_norm or None,
        "drop_rate": args.drop_rate,
        "amp": not args.no_amp,
        "seed": args.seed,
        "num_workers": args.num_workers,
        "device": args.device,
        "pretrained": bool(args.pretrained),
        "weights_path": args.weights,
    }
    for name in ("head_epochs", "head_l2"):
        if hasattr(args, name):
            values[name] = getattr(args, name)
    values.update(overrides)
    return TrainConfig(**values)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``painwatch train`` to the CLI."""
    parser = subparsers.add_parser(
        "train",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="train the clinical model on all individuals and save a model bundle",
        description=(
            "Fine-tune a timm backbone on DATA (folder DATA/<individual>/<label>/* or a manifest CSV) and "
            "write a model bundle (weights.safetensors + model.json). An inner validation split by "
            "individual drives early stopping and temperature scaling."
        ),
    )
    parser.add_argument("data", help="data folder or manifest CSV")
    parser.add_argument("--out", required=True, help="bundle folder to write")
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=0.2,
        help="fraction of individuals held out for validation; 0 for none",
    )
    parser.add_argument(
        "--individuals", default=None, help="comma-separated individuals to use; all in DATA when omitted"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    add_training_arguments(parser, TrainConfig())
    parser.set_defaults(func=_train_command)


def _train_command(args: argparse.Namespace) -> int:
    try:
        return _run_train(args)
    except (ValueError, OSError, FloatingPointError) as error:
        print(f"painwatch train: error: {error}", file=sys.stderr)
        return 2


def _run_train(args: argparse.Namespace) -> int:
    import numpy as np

    from painwatch.calibration import fit_temperature
    from painwatch.data import dataset_hash, is_synthetic, load_records, split_by_individual
    from painwatch.models import create_model, default_certification, save_bundle

    config = train_config_from_args(args)
    if config.loss != "ce" and config.noise_sigma <= 0:
        raise ValueError(f"--loss {config.loss} maximises the margin under noise: it needs --noise-sigma > 0")
    out = Path(args.out)
    records = load_records(args.data)
    if args.individuals:
        wanted = [name.strip() for name in args.individuals.split(",") if name.strip()]
        present = sorted({r.individual for r in records})
        unknown = sorted(set(wanted) - set(present))
        if unknown:
            raise ValueError(f"--individuals {unknown} are not in {args.data} (present: {present})")
        records = [r for r in records if r.individual in set(wanted)]
    if not records:
        raise ValueError(f"no frames to train on in {args.data}")
    train_records, val_records = split_by_individual(records, args.val_fraction, config.seed)
    individuals = sorted({r.individual for r in records})
    counts = np.bincount([r.label for r in records], minlength=2).tolist()
    synthetic = is_synthetic(args.data)
    kind = "SYNTHETIC " if synthetic else ""
    print(
        f"training on {len(records)} {kind}frames from {len(individuals)} individuals "
        f"({len(train_records)} fit / {len(val_records)} validation frames; class counts {counts})",
        file=sys.stderr,
    )

    model = create_model(
        config.arch,
        num_classes=2,
        pretrained=config.pretrained,
        weights_path=config.weights_path,
        input_size=config.input_size,
        drop_rate=config.drop_rate,
        seed=config.seed,
    )
    result = fit(model, train_records, val_records, config, progress=not args.quiet)
    temperature = 1.0
    if result.val_logits is not None:
        temperature = float(fit_temperature(result.val_logits, result.val_labels))
    last = result.history[result.best_epoch - 1] if result.history else {}
    weights_source = (
        f"file:{Path(config.weights_path).name}"
        if config.weights_path
        else ("imagenet-hub" if config.pretrained else "none (random init)")
    )
    metadata = {
        "temperature": temperature,
        "certification": default_certification(config.noise_sigma if config.noise_sigma > 0 else None),
        "training": {
            "individuals": individuals,
            "fit_individuals": sorted({r.individual for r in train_records}),
            "validation_individuals": sorted({r.individual for r in val_records}),
            "data_source": str(args.data),
            "synthetic_data": synthetic,
            "data_hash": dataset_hash(records),
            "num_frames": len(records),
            "class_counts": counts,
            "loss": config.loss,
            "noise_sigma": config.noise_sigma,
            "margin": config.margin,
            "num_draws": config.num_draws,
            "epochs": config.epochs,
            "epochs_run": result.epochs_run,
            "best_epoch": result.best_epoch,
            "seed": config.seed,
            "lr": config.lr,
            "batch_size": config.batch_size,
            "schedule": config.schedule,
            "class_balance": config.class_balance,
            "augment": config.augment,
            "validation_noise_sigma": last.get("val_noise_sigma"),
            "initial_weights": weights_source,
            "val_loss": last.get("val_loss"),
            "val_accuracy": last.get("val_accuracy"),
            "val_balanced_accuracy": last.get("val_balanced_accuracy"),
            "device": result.device,
            "seconds": round(result.seconds, 1),
        },
    }
    model.to("cpu")
    save_bundle(out, model, metadata)
    summary = (
        f"saved bundle {out} ({config.arch}, best epoch {result.best_epoch}/{result.epochs_run}, "
        f"temperature {temperature:.3f}"
    )
    if last.get("val_balanced_accuracy") is not None:
        summary += f", validation balanced accuracy {last['val_balanced_accuracy']:.3f}"
    print(summary + ")", file=sys.stderr)
    return 0
