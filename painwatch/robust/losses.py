"""Margin losses for certifiable training (thesis Ch. 3; DESIGN.md "Training").

Notation: ``f(x)`` is the logit vector (K entries) of a network, ``y`` the true class and
``M_f(x) = f_y(x) - max_{j != y} f_j(x)`` the *true-class margin* (positive exactly when the network
classifies ``x`` correctly). With an L2 Lipschitz bound ``L`` of ``f``, ``M_f(x) / (sqrt(2) L)`` is the
certified L2 radius (Tsuzuku et al. 2018), so losses that push ``M_f`` (or its Gaussian expectation,
the smoothed margin ``SM(x) = E_xi[M_f(x + xi)]``) above a target ``d`` buy certified radius.

This module starts with the Monte Carlo expected-margin loss, which works for any network
(ResNet50 included); the closed-form losses built on :mod:`painwatch.robust.moments` follow below.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "MCExpectedMarginLoss",
    "mc_expected_margin_loss",
    "true_class_margin",
]

_REDUCTIONS = ("mean", "sum", "none")


def _check_reduction(reduction: str) -> str:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    return reduction


def _reduce(values: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return values.mean()
    if reduction == "sum":
        return values.sum()
    return values


def _check_finite_number(name: str, value: float, *, minimum: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return value


def _check_positive_int(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def _check_labels(logits_or_batch: int, y: Tensor, num_classes: int | None = None) -> Tensor:
    """Check ``y`` is an integer tensor of shape (B,) with entries in [0, K)."""
    if not isinstance(y, Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(y).__name__}")
    if y.dtype.is_floating_point or y.dtype == torch.bool or y.is_complex():
        raise TypeError(f"labels must be an integer tensor, got dtype {y.dtype}")
    if y.dim() != 1 or y.shape[0] != logits_or_batch:
        raise ValueError(
            f"labels must have shape ({logits_or_batch},) to match the batch, got {tuple(y.shape)}"
        )
    if y.numel() and num_classes is not None:
        low, high = int(y.min()), int(y.max())
        if low < 0 or high >= num_classes:
            bad = low if low < 0 else high
            raise ValueError(f"label {bad} is outside [0, {num_classes}) for {num_classes} classes")
    return y.long()


def true_class_margin(logits: Tensor, y: Tensor) -> Tensor:
    """The true-class margin ``M_f = f_y - max_{j != y} f_j`` of each row of ``logits``.

    Args:
        logits: tensor ``(..., K)`` with ``K >= 2``.
        y: integer labels with the shape ``logits.shape[:-1]``, entries in ``[0, K)``.

    Returns:
        Tensor of shape ``logits.shape[:-1]`` (same dtype as ``logits``; differentiable). It is
        positive exactly where the row's largest logit is the true class and is unique.
    """
    if logits.dim() < 1 or logits.shape[-1] < 2:
        raise ValueError(f"logits must have shape (..., K) with K >= 2, got {tuple(logits.shape)}")
    if y.shape != logits.shape[:-1]:
        raise ValueError(f"labels shape {tuple(y.shape)} does not match logits {tuple(logits.shape)}")
    y = y.long().unsqueeze(-1)
    true_logit = logits.gather(-1, y).squeeze(-1)
    # Mask the true class with -inf so the max runs over the incorrect classes only.
    others = logits.scatter(-1, y, float("-inf"))
    return true_logit - others.amax(dim=-1)


def mc_expected_margin_loss(
    model: Callable[[Tensor], Tensor],
    x: Tensor,
    y: Tensor,
    sigma: float,
    num_draws: int,
    margin: float = 1.0,
    generator: torch.Generator | None = None,
    reduction: str = "mean",
    max_batch: int | None = None,
) -> Tensor:
    """Monte Carlo expected-margin loss ``relu(d - (1/k) sum_k M_f(x + xi_k))``.

    Minimising it maximises (up to the target ``d``) an unbiased estimate of the smoothed margin
    ``SM(x) = E_xi[M_f(x + xi)]`` with ``xi ~ N(0, sigma^2 I)``, the quantity the smoothed-margin
    certificate lower-bounds (``r = SM_low / (sqrt(2) L)``). It needs no structure of the network, so it
    is the route for ResNet50 and other networks without orthogonal layers.

    Args:
        model: callable ``(N, *S) -> (N, K)`` logits; for images ``S = (C, H, W)`` with pixels in [0, 1].
        x: inputs ``(B, *S)``, floating point.
        y: integer labels ``(B,)`` in ``[0, K)``.
        sigma: noise standard deviation (L2 units of the input space, >= 0). The noise is not clipped
            to [0, 1]: the certificates assume unclipped Gaussian noise.
        num_draws: ``k >= 1`` noise draws per input.
        margin: the target margin ``d`` (finite); the loss of an input is 0 once its estimated
            smoothed margin reaches ``d``.
        generator: the ``torch.Generator`` the noise is drawn from (same seed, same loss); when it lives
            on another device than ``x`` the noise is drawn there and moved.
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"`` (per-input losses, shape ``(B,)``).
        max_batch: split the ``B * k`` noisy inputs into forwards of at most this many (``None``: one
            forward of ``B * k``). The value of the loss does not depend on it.

    Returns:
        The loss, differentiable with respect to the model's parameters and to ``x``; >= 0.
    """
    if not isinstance(x, Tensor) or not x.dtype.is_floating_point:
        raise TypeError(f"x must be a floating-point torch.Tensor, got {getattr(x, 'dtype', type(x))}")
    if x.dim() < 2 or x.shape[0] == 0:
        raise ValueError(f"x must have shape (B, ...) with B >= 1, got {tuple(x.shape)}")
    sigma = _check_finite_number("sigma", sigma, minimum=0.0)
    margin = _check_finite_number("margin", margin)
    _check_positive_int("num_draws", num_draws)
    if max_batch is not None:
        _check_positive_int("max_batch", max_batch)
    _check_reduction(reduction)
    batch = x.shape[0]
    y = _check_labels(batch, y).to(x.device)

    # Without noise every draw is the same input: one forward gives the identical value.
    draws = num_draws if sigma > 0 else 1
    if sigma > 0:
        noise_device = generator.device if generator is not None else x.device
        noise = torch.randn((draws, *x.shape), generator=generator, device=noise_device, dtype=x.dtype)
        noisy = (x.unsqueeze(0) + sigma * noise.to(x.device)).reshape(draws * batch, *x.shape[1:])
    else:
        noisy = x
    chunk = noisy.shape[0] if max_batch is None else max_batch
    logits = torch.cat([model(part) for part in noisy.split(chunk)], dim=0)
    if logits.dim() != 2 or logits.shape[0] != draws * batch:
        raise ValueError(
            f"model must return logits of shape (N, K) for N = {draws * batch} inputs, "
            f"got {tuple(logits.shape)}"
        )
    num_classes = logits.shape[1]
    if int(y.max()) >= num_classes or int(y.min()) < 0:
        bad = int(y.max()) if int(y.max()) >= num_classes else int(y.min())
        raise ValueError(f"label {bad} is outside [0, {num_classes}) for the model's {num_classes} classes")
    margins = true_class_margin(logits.reshape(draws, batch, num_classes), y.expand(draws, batch))
    losses = F.relu(margin - margins.mean(dim=0))
    return _reduce(losses, reduction)


class MCExpectedMarginLoss(torch.nn.Module):
    """Module form of :func:`mc_expected_margin_loss`: ``loss(model, x, y)``.

    Holds the hyper-parameters (``sigma``, ``num_draws``, target margin ``d``) and its own seeded
    ``torch.Generator`` so that a training run is reproducible from ``seed``.
    """

    def __init__(
        self,
        sigma: float,
        num_draws: int,
        margin: float = 1.0,
        seed: int = 0,
        reduction: str = "mean",
        max_batch: int | None = None,
    ) -> None:
        super().__init__()
        self.sigma = _check_finite_number("sigma", sigma, minimum=0.0)
        self.num_draws = _check_positive_int("num_draws", num_draws)
        self.margin = _check_finite_number("margin", margin)
        self.reduction = _check_reduction(reduction)
        self.max_batch = None if max_batch is None else _check_positive_int("max_batch", max_batch)
        self.generator = torch.Generator().manual_seed(int(seed))

    def forward(self, model: Callable[[Tensor], Tensor], x: Tensor, y: Tensor) -> Tensor:
        return mc_expected_margin_loss(
            model, x, y, self.sigma, self.num_draws, margin=self.margin, generator=self.generator,
            reduction=self.reduction, max_batch=self.max_batch,
        )

    def extra_repr(self) -> str:
        return f"sigma={self.sigma}, num_draws={self.num_draws}, margin={self.margin}"
