"""A linear head on cached (frozen-backbone) features: :func:`fit_head`."""

from __future__ import annotations

import math
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from painwatch.training.batches import progress_bar
from painwatch.training.config import TrainConfig
from painwatch.training.loops import FitResult, class_weights, improves, validation_scores


def fit_head(
    features: Any,
    labels: Any,
    *,
    val_features: Any | None = None,
    val_labels: Any | None = None,
    config: TrainConfig,
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
    for epoch in progress_bar(range(1, config.head_epochs + 1), progress, desc="head", unit="epoch"):
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
            record.update(validation_scores(val_logits, vy))
            score = record[config.monitor]
            if improves(score, best_score, config.monitor):
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
