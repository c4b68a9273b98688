"""Margin losses for certifiable training [RC, Ch. 3] (docs/design.md, "Training").

Notation: ``f(x)`` is the logit vector (K entries) of a network, ``y`` the true class and
``M_f(x) = f_y(x) - max_{j != y} f_j(x)`` the *true-class margin* (positive exactly when the network
classifies ``x`` correctly). With an L2 Lipschitz bound ``L`` of ``f``, ``M_f(x) / (sqrt(2) L)`` is the
certified L2 radius [Tsuzuku18], so losses that push ``M_f`` (or its Gaussian expectation,
the smoothed margin ``SM(x) = E_xi[M_f(x + xi)]``) above a target ``d`` buy certified radius.

Losses (each a function on tensors and an ``nn.Module`` called as ``loss(model, x, y)``):

========= ======================================= ============================================
name      loss                                    what minimising it maximises
========= ======================================= ============================================
sce       softmax cross-entropy                   likelihood of the true class
sc-sce    cross-entropy of the moment-propagated  likelihood of the true class under the
          mean logits (input variance sigma_x^2)  expected logits E[f(x + xi)]
mh        multiclass hinge (Weston-Watkins, as    every pairwise margin f_y - f_j up to d
          ``torch.nn.MultiMarginLoss``)
offset-ce tau CE((f - d onehot_y) / tau)          every margin past d, smoothly (a soft hinge
          [Prach22]                               of sharpness tau); for Lipschitz networks
mcr       relu(d - M_f(x))                        the margin M_f, hence the Lipschitz certified
                                                  radius M_f / (sqrt(2) L), up to d
mscr      relu(d - SM(x)), SM in closed form      the smoothed margin, hence the smoothed-margin
          by moment propagation                   certified radius, up to d
zhen      relu(d - sigma (mu_y - mu_r) /          a Gaussian approximation of the randomized
          sqrt(v_y + v_r))                        smoothing radius [Zhen21], up to d
mc-margin relu(d - mean_k M_f(x + xi_k))          an unbiased estimate of SM, any network
========= ======================================= ============================================

``sc-sce``, ``mscr`` and ``zhen`` propagate moments with :mod:`painwatch.robust.moments`, so they
need networks made of the layers it supports (the orthogonal MLPs and conv nets of [RC]);
``mc-margin`` is the route for ResNet50 and other networks.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from painwatch.robust.moments import expected_margin, gaussian_logit_moments
from painwatch.robust.validation import check_labels

__all__ = [
    "LOSS_NAMES",
    "MCExpectedMarginLoss",
    "MarginCertifiedRadiusLoss",
    "MarginSmoothedCertifiedRadiusLoss",
    "MulticlassHingeLoss",
    "OffsetCrossEntropyLoss",
    "SmoothedCrossEntropyLoss",
    "SoftmaxCrossEntropyLoss",
    "ZhenLoss",
    "make_loss",
    "mc_expected_margin_loss",
    "mcr_loss",
    "mscr_loss",
    "multiclass_hinge_loss",
    "offset_cross_entropy_loss",
    "sc_sce_loss",
    "sce_loss",
    "true_class_margin",
    "zhen_loss",
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
    *,
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
    y = check_labels(y, batch=batch).to(x.device)

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

    name = "mc-margin"

    def __init__(
        self,
        *,
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
            model, x, y, sigma=self.sigma, num_draws=self.num_draws, margin=self.margin,
            generator=self.generator, reduction=self.reduction, max_batch=self.max_batch,
        )

    def extra_repr(self) -> str:
        return f"sigma={self.sigma}, num_draws={self.num_draws}, margin={self.margin}"


# ----------------------------------------------------------------------------- losses on logits
def _check_logits(logits: Tensor, y: Tensor) -> Tensor:
    if not isinstance(logits, Tensor) or not logits.dtype.is_floating_point:
        found = getattr(logits, "dtype", type(logits))
        raise TypeError(f"logits must be a floating-point tensor, got {found}")
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise ValueError(f"logits must have shape (B, K) with K >= 2, got {tuple(logits.shape)}")
    return check_labels(y, batch=logits.shape[0], num_classes=logits.shape[1]).to(logits.device)


def _check_logit_variance(mean: Tensor, var: Tensor) -> None:
    if not isinstance(var, Tensor) or var.shape != mean.shape:
        raise ValueError(
            f"logit variances must have the shape {tuple(mean.shape)} of the means, got "
            f"{tuple(getattr(var, 'shape', ()))}"
        )


def sce_loss(logits: Tensor, y: Tensor, reduction: str = "mean") -> Tensor:
    """Softmax cross-entropy ``-log softmax(f(x))_y``; maximises the likelihood of the true class."""
    y = _check_logits(logits, y)
    return F.cross_entropy(logits, y, reduction=_check_reduction(reduction))


def multiclass_hinge_loss(
    logits: Tensor, y: Tensor, *, margin: float = 1.0, reduction: str = "mean"
) -> Tensor:
    """Multiclass hinge ``(1/K) sum_{j != y} relu(d - (f_y - f_j))`` (``torch.nn.MultiMarginLoss``).

    Pushes every pairwise logit gap ``f_y - f_j`` up to the target ``d = margin``; zero once all are.
    """
    y = _check_logits(logits, y)
    margin = _check_finite_number("margin", margin)
    gaps = logits.gather(1, y.unsqueeze(1)) - logits
    hinge = F.relu(margin - gaps).scatter(1, y.unsqueeze(1), 0.0)
    return _reduce(hinge.sum(dim=1) / logits.shape[1], _check_reduction(reduction))


def offset_cross_entropy_loss(
    logits: Tensor,
    y: Tensor,
    *,
    offset: float = 1.0,
    temperature: float = 0.25,
    weight: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Offset cross-entropy [Prach22]: ``tau CE((f - d onehot_y) / tau)``, with ``d = offset`` and
    ``tau = temperature``.

    The true logit is handicapped by ``d`` before the softmax, so the loss stays high until every margin
    ``f_y - f_j`` exceeds ``d``; ``tau`` sets how sharply (``tau -> 0`` is the multiclass hinge at ``d``,
    summed over classes in the log-sum-exp sense). Multiplying back by ``tau`` keeps the gradient of a
    badly classified input near 1 in logit units whatever ``tau``. Made for Lipschitz networks, whose
    logits cannot grow fast: with a bound ``L`` the margin ``d`` is a certified radius of
    ``d / (sqrt(2) L)``. ``weight`` is a per-class weight as in ``F.cross_entropy``.
    """
    y = _check_logits(logits, y)
    offset = _check_finite_number("offset", offset, minimum=0.0)
    temperature = _check_finite_number("temperature", temperature)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    shifted = (logits - offset * F.one_hot(y, logits.shape[1]).to(logits.dtype)) / temperature
    return temperature * F.cross_entropy(shifted, y, weight=weight, reduction=_check_reduction(reduction))


def mcr_loss(logits: Tensor, y: Tensor, *, margin: float = 1.0, reduction: str = "mean") -> Tensor:
    """Margin certified radius loss ``relu(d - M_f(x))``.

    Maximises the true-class margin ``M_f`` up to ``d``; for an ``L``-Lipschitz network the certified
    L2 radius is ``M_f / (sqrt(2) L)``, so ``d`` is a target radius of ``d / (sqrt(2) L)``.
    """
    y = _check_logits(logits, y)
    margin = _check_finite_number("margin", margin)
    return _reduce(F.relu(margin - true_class_margin(logits, y)), _check_reduction(reduction))


def sc_sce_loss(mean_logits: Tensor, y: Tensor, reduction: str = "mean") -> Tensor:
    """SC-SCE: cross-entropy of the mean logits ``E[f(x + xi)]`` from moment propagation.

    Maximises the likelihood of the true class under the expected-logit classifier
    ``h(x) = argmax_c E[f_c(x + xi)]`` (the classifier the smoothed-margin certificate certifies).
    """
    return sce_loss(mean_logits, y, reduction)


def mscr_loss(
    mean_logits: Tensor,
    var_logits: Tensor,
    y: Tensor,
    *,
    margin: float = 1.0,
    mode: str = "top2",
    reduction: str = "mean",
) -> Tensor:
    """Margin smoothed certified radius loss ``relu(d - SM(x))``, SM in closed form.

    ``SM = mu_y - E[max_{j != y} Z_j]`` with Clark's approximation of the expected max over the top two
    incorrect logits (:func:`painwatch.robust.moments.expected_margin`). Maximises the smoothed margin
    up to ``d``; the smoothed-margin certificate's radius is ``SM_low / (sqrt(2) L)``.
    """
    y = _check_logits(mean_logits, y)
    _check_logit_variance(mean_logits, var_logits)
    margin = _check_finite_number("margin", margin)
    smoothed = expected_margin(mean_logits, var_logits, y, mode=mode)
    return _reduce(F.relu(margin - smoothed), _check_reduction(reduction))


def zhen_loss(
    mean_logits: Tensor,
    var_logits: Tensor,
    y: Tensor,
    *,
    sigma: float,
    margin: float = 1.0,
    reduction: str = "mean",
    eps: float = 1e-12,
) -> Tensor:
    """[Zhen21] radius loss ``relu(d - sigma (mu_y - mu_r) / sqrt(v_y + v_r))``.

    ``r`` is the incorrect class with the largest mean logit. Treating ``f_y - f_r`` as Gaussian,
    ``(mu_y - mu_r) / sqrt(v_y + v_r)`` approximates ``PhiInv(P[f_y > f_r])`` and ``sigma`` times it the
    randomized smoothing radius; the loss maximises that approximate radius up to ``d``. ``eps`` keeps the
    square root away from 0 (noiseless inputs).
    """
    y = _check_logits(mean_logits, y)
    _check_logit_variance(mean_logits, var_logits)
    sigma = _check_finite_number("sigma", sigma, minimum=0.0)
    margin = _check_finite_number("margin", margin)
    label = y.unsqueeze(1)
    runner_up = mean_logits.detach().scatter(1, label, float("-inf")).argmax(dim=1, keepdim=True)
    gap = (mean_logits.gather(1, label) - mean_logits.gather(1, runner_up)).squeeze(1)
    spread = (var_logits.gather(1, label) + var_logits.gather(1, runner_up)).squeeze(1)
    radius = sigma * gap / torch.sqrt(spread + eps)
    return _reduce(F.relu(margin - radius), _check_reduction(reduction))


# ----------------------------------------------------------------------------- module forms
class _ModelLoss(nn.Module):
    """Base: ``loss(model, x, y) -> Tensor``; subclasses say how the logits are obtained."""

    name = ""

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = _check_reduction(reduction)


class SoftmaxCrossEntropyLoss(_ModelLoss):
    """SCE: :func:`sce_loss` on ``model(x)``."""

    name = "sce"

    def forward(self, model: Callable[[Tensor], Tensor], x: Tensor, y: Tensor) -> Tensor:
        return sce_loss(model(x), y, self.reduction)


class MulticlassHingeLoss(_ModelLoss):
    """MH: :func:`multiclass_hinge_loss` on ``model(x)`` with target margin ``d``."""

    name = "mh"

    def __init__(self, margin: float = 1.0, reduction: str = "mean") -> None:
        super().__init__(reduction)
        self.margin = _check_finite_number("margin", margin)

    def forward(self, model: Callable[[Tensor], Tensor], x: Tensor, y: Tensor) -> Tensor:
        return multiclass_hinge_loss(model(x), y, margin=self.margin, reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"margin={self.margin}"


class OffsetCrossEntropyLoss(_ModelLoss):
    """Offset CE: :func:`offset_cross_entropy_loss` on ``model(x)`` with offset ``d`` and temperature."""

    name = "offset-ce"

    def __init__(self, margin: float = 1.0, temperature: float = 0.25, reduction: str = "mean") -> None:
        super().__init__(reduction)
        self.margin = _check_finite_number("margin", margin, minimum=0.0)
        self.temperature = _check_finite_number("temperature", temperature)

    def forward(self, model: Callable[[Tensor], Tensor], x: Tensor, y: Tensor) -> Tensor:
        return offset_cross_entropy_loss(model(x), y, offset=self.margin, temperature=self.temperature,
                                         reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"margin={self.margin}, temperature={self.temperature}"


class MarginCertifiedRadiusLoss(MulticlassHingeLoss):
    """MCR: :func:`mcr_loss` ``relu(d - M_f(x))`` on ``model(x)``."""

    name = "mcr"

    def forward(self, model: Callable[[Tensor], Tensor], x: Tensor, y: Tensor) -> Tensor:
        return mcr_loss(model(x), y, margin=self.margin, reduction=self.reduction)


class _MomentLoss(_ModelLoss):
    def __init__(self, input_variance: float, reduction: str = "mean") -> None:
        super().__init__(reduction)
        self.input_variance = _check_finite_number("input_variance", input_variance, minimum=0.0)

    def moments(self, model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
        return gaussian_logit_moments(model, x, self.input_variance)


class SmoothedCrossEntropyLoss(_MomentLoss):
    """SC-SCE: :func:`sc_sce_loss` on the mean logits for input variance ``sigma_x^2``."""

    name = "sc-sce"

    def __init__(self, input_variance: float = 0.1, reduction: str = "mean") -> None:
        super().__init__(input_variance, reduction)

    def forward(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        mean, _ = self.moments(model, x)
        return sc_sce_loss(mean, y, self.reduction)

    def extra_repr(self) -> str:
        return f"input_variance={self.input_variance}"


class MarginSmoothedCertifiedRadiusLoss(_MomentLoss):
    """MSCR: :func:`mscr_loss` ``relu(d - SM(x))`` with SM from moments at input variance ``sigma_x^2``.

    Defaults of [RC, Ch. 3]: ``d = 1``, ``sigma_x^2 = 0.1``.
    """

    name = "mscr"

    def __init__(
        self, *, margin: float = 1.0, input_variance: float = 0.1, mode: str = "top2", reduction: str = "mean"
    ) -> None:
        super().__init__(input_variance, reduction)
        self.margin = _check_finite_number("margin", margin)
        if mode not in ("top2", "all"):
            raise ValueError(f"mode must be 'top2' or 'all', got {mode!r}")
        self.mode = mode

    def forward(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        mean, var = self.moments(model, x)
        return mscr_loss(mean, var, y, margin=self.margin, mode=self.mode, reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"margin={self.margin}, input_variance={self.input_variance}, mode={self.mode!r}"


class ZhenLoss(_MomentLoss):
    """Zhen: :func:`zhen_loss` with ``sigma = sqrt(sigma_x^2)`` and moments at input variance ``sigma_x^2``.

    Default ``sigma_x = 0.25`` (the randomized smoothing noise of the MNIST experiment).
    """

    name = "zhen"

    def __init__(self, margin: float = 1.0, input_variance: float = 0.0625, reduction: str = "mean") -> None:
        super().__init__(input_variance, reduction)
        self.margin = _check_finite_number("margin", margin)

    def forward(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        mean, var = self.moments(model, x)
        return zhen_loss(mean, var, y, sigma=math.sqrt(self.input_variance), margin=self.margin,
                         reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"margin={self.margin}, input_variance={self.input_variance}"


_LOSSES: dict[str, type[nn.Module]] = {
    cls.name: cls
    for cls in (
        SoftmaxCrossEntropyLoss,
        SmoothedCrossEntropyLoss,
        MulticlassHingeLoss,
        OffsetCrossEntropyLoss,
        MarginCertifiedRadiusLoss,
        MarginSmoothedCertifiedRadiusLoss,
        ZhenLoss,
        MCExpectedMarginLoss,
    )
}
LOSS_NAMES: tuple[str, ...] = tuple(_LOSSES)
"""Names accepted by :func:`make_loss`: sce, sc-sce, mh, offset-ce, mcr, mscr, zhen, mc-margin."""


def make_loss(name: str, **hyperparameters: float | int | str) -> nn.Module:
    """Build a loss module by name (case-insensitive; ``_`` and ``-`` are interchangeable).

    Every module is called as ``loss(model, x, y)``. Hyper-parameters are the constructor's keywords,
    e.g. ``make_loss("mscr", margin=1.0, input_variance=0.1)``; ``mc-margin`` needs ``sigma`` and
    ``num_draws``.
    """
    key = str(name).lower().replace("_", "-")
    if key not in _LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(LOSS_NAMES)}")
    try:
        return _LOSSES[key](**hyperparameters)
    except TypeError as error:
        raise TypeError(f"bad hyper-parameters for loss {key!r}: {error}") from error
