"""Fine-tuning the clinical model: :func:`fit`, its schedule, loss and early stopping.

:func:`fit` fine-tunes a :class:`painwatch.models.PainNet` on frame records with AdamW, a cosine (with
linear warm-up), one-cycle or constant schedule, class weighting or balanced sampling, early stopping on
an inner validation split by individual, mixed precision and channels_last on GPU (plain float32 on
CPU). Noise-robust fine-tuning [RC, Ch. 4]: Gaussian noise augmentation at ``noise_sigma`` (L2 per
pixel in [0, 1] pixel space, not clipped: the certificates assume unclipped noise) and the Monte Carlo
expected-margin loss ``relu(d - mean_k M_f(x + xi_k))`` over ``k`` draws
(:func:`painwatch.robust.mc_expected_margin_loss`), alone (``"mc_margin"``) or added to cross-entropy
(``"ce+mc_margin"``); docs/design.md, "Training". For the Lipschitz networks, the margin certified
radius loss ``relu(d - M_f(x))`` (``"mcr"``, on the noisy frames when ``noise_sigma > 0``), the offset
cross-entropy ``tau CE((f - d onehot_y) / tau)`` [Prach22] (``"offset_ce"``, likewise) and the
margin smoothed certified radius loss ``relu(d - SM(x))`` (``"mscr"``, SM by Gaussian moment
propagation at input variance ``noise_sigma^2``) [RC, Ch. 3].
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, WeightedRandomSampler

from painwatch.models import Normalize, PainNet
from painwatch.robust import (
    MarginSmoothedCertifiedRadiusLoss,
    mc_expected_margin_loss,
    mcr_loss,
    offset_cross_entropy_loss,
    propagate_moments,
    register_moment_rule,
)
from painwatch.runtime import resolve_device, seed_everything
from painwatch.training.batches import (
    as_dataset,
    as_loader,
    autocast_context,
    labels_of,
    predict_logits,
    progress_bar,
    seed_loader_worker,
)
from painwatch.training.config import TrainConfig


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


def _normalize_moments(module: nn.Module, mean: torch.Tensor, var: torch.Tensor):
    # (x - m) / s per channel: the variance is divided by s^2.
    return module(mean), var / (module.std * module.std)


def _painnet_moments(module: nn.Module, mean: torch.Tensor, var: torch.Tensor):
    for _, layer in module.lipschitz_composition():
        mean, var = propagate_moments(layer, mean, var)
    return mean, var


# Moments through the model's own normalisation and composition (the MSCR loss of "mscr").
register_moment_rule(Normalize, _normalize_moments)
register_moment_rule(PainNet, _painnet_moments)


def class_weights(labels: Sequence[int], num_classes: int) -> torch.Tensor:
    """Inverse-frequency class weights ``N / (K * n_c)`` (1.0 for balanced data); absent classes get 0."""
    counts = torch.bincount(torch.as_tensor(list(labels), dtype=torch.long), minlength=num_classes).double()
    if counts.numel() > num_classes:
        raise ValueError(f"labels contain class {counts.numel() - 1} but the model has {num_classes} classes")
    present = counts > 0
    weights = torch.zeros(num_classes, dtype=torch.float64)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return weights.float()


def balanced_accuracy(predictions: Sequence[int] | np.ndarray, labels: Sequence[int] | np.ndarray) -> float:
    """Mean per-class recall over the classes present in ``labels``."""
    predictions = np.asarray(predictions)
    labels = np.asarray(labels)
    recalls = [float(np.mean(predictions[labels == c] == c)) for c in np.unique(labels)]
    return float(np.mean(recalls)) if recalls else float("nan")


def make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int):
    """A per-step learning-rate schedule over ``config.epochs * steps_per_epoch`` steps.

    ``"cosine"``: linear warm-up for ``config.warmup_epochs`` then cosine decay to 0;
    ``"constant"``: warm-up then constant; ``"onecycle"``: PyTorch's OneCycleLR peaking at
    ``config.lr`` after the warm-up fraction (0.3 of the run without warm-up).
    """
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


def validation_scores(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:

    loss = float(F.cross_entropy(logits.double(), labels).item())
    predictions = logits.argmax(dim=1)
    return {
        "val_loss": loss,
        "val_accuracy": float((predictions == labels).double().mean().item()),
        "val_balanced_accuracy": balanced_accuracy(predictions.numpy(), labels.numpy()),
    }


def improves(score: float, best: float | None, monitor: str) -> bool:
    if best is None:
        return True
    if monitor == "val_loss":
        return score < best - 1e-6
    return score > best + 1e-6


def _loss(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    config: TrainConfig,
    weights: torch.Tensor | None,
    noise_generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training loss of a batch and the logits used for the running accuracy."""


    noisy = images
    if config.noise_sigma > 0:
        noise = torch.randn(images.shape, generator=noise_generator, device=images.device, dtype=images.dtype)
        noisy = images + config.noise_sigma * noise
    logits = None
    total = images.new_zeros(())
    if config.loss in ("offset_ce", "mcr", "mscr"):
        if config.loss == "offset_ce":
            logits = model(noisy)
            per_sample = offset_cross_entropy_loss(logits.float(), labels, offset=config.margin,
                                                   temperature=config.offset_temperature, reduction="none")
        elif config.loss == "mcr":
            logits = model(noisy)
            per_sample = mcr_loss(logits.float(), labels, margin=config.margin, reduction="none")
        else:
            smoothed = MarginSmoothedCertifiedRadiusLoss(
                margin=config.margin, input_variance=config.noise_sigma**2, reduction="none"
            )
            per_sample = smoothed(model, images, labels).float()
        return _weighted_mean(per_sample, labels, weights), _logits_of(model, noisy, logits)
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
        margin_loss = _weighted_mean(per_sample, labels, weights)
        total = total + (config.margin_weight if config.loss == "ce+mc_margin" else 1.0) * margin_loss
    return total, _logits_of(model, noisy, logits)


def _weighted_mean(
    per_sample: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None
) -> torch.Tensor:
    if weights is None:
        return per_sample.mean()
    sample_weights = weights[labels]
    return (per_sample * sample_weights).sum() / sample_weights.sum().clamp_min(1e-12)


def _logits_of(model: nn.Module, noisy: torch.Tensor, logits: torch.Tensor | None) -> torch.Tensor:
    """The logits for the running accuracy: those the loss used, else one more pass without autograd."""
    if logits is None:
        with torch.no_grad():
            logits = model(noisy)
    return logits.detach()


def fit(
    model: PainNet,
    train_records: Any,
    val_records: Any | None,
    *,
    config: TrainConfig,
    progress: bool = True,
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


    config.validate()
    started = time.perf_counter()
    seed_everything(config.seed)
    device = resolve_device(config.device)
    use_amp = bool(config.amp and device.type == "cuda")
    train_set = as_dataset(train_records, input_size=config.input_size, train=True, detector=detector,
                           seed=config.seed, augment=config.augment)
    if len(train_set) == 0:
        raise ValueError("train_records is empty: nothing to train on")
    train_labels = labels_of(train_records)
    num_classes = int(getattr(model, "num_classes", 0)) or (max(train_labels) + 1)
    bad = sorted({y for y in train_labels if not 0 <= y < num_classes})
    if bad:
        raise ValueError(f"train labels {bad} are outside [0, {num_classes}) for a {num_classes}-class model")
    has_val = val_records is not None and len(val_records) > 0
    if has_val:
        val_loader = as_loader(val_records, input_size=config.input_size, batch_size=config.eval_batch_size,
                               num_workers=config.num_workers, detector=detector)
        val_labels = torch.as_tensor(labels_of(val_records), dtype=torch.long)

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
        worker_init_fn=seed_loader_worker if config.num_workers else None,
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
    epoch_bar = progress_bar(range(1, config.epochs + 1), progress, desc="epochs", unit="epoch")
    for epoch in epoch_bar:
        epoch_started = time.perf_counter()
        model.train()
        loss_sum, correct, seen = 0.0, 0, 0
        batch_bar = progress_bar(train_loader, progress, desc=f"epoch {epoch}", unit="batch")
        for images, labels in batch_bar:
            images = images.to(device, non_blocking=True)
            labels = torch.as_tensor(labels, dtype=torch.long).to(device, non_blocking=True)
            if device.type == "cuda" and config.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with autocast_context(device, use_amp):
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
            record.update(validation_scores(val_logits, val_labels))
            score = record[config.monitor]
            if improves(score, best_score, config.monitor):
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
