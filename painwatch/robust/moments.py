"""Gaussian moment propagation through a network [RC, Ch. 3] (docs/design.md, "Training").

Given an input ``X ~ N(x, diag(v))`` (for training: ``v = sigma_x^2`` everywhere), this module
propagates a mean and a **diagonal** variance through a network layer by layer:

* affine layers (``nn.Linear``, ``nn.Conv2d``, the orthogonal layers of
  :mod:`painwatch.robust.layers`, the AOL layers of :mod:`painwatch.robust.lipschitz_layers`): the
  mean goes through the layer, the variance through the element-wise squared weights without bias
  (``Var[sum_j W_ij X_j] = sum_j W_ij^2 v_j`` for independent ``X_j``);
* ``ReLU``: the exact mean and variance of a rectified Gaussian;
* ``MaxMin``: Clark's [Clark61] exact first two moments of the max (and min) of two Gaussians;
* pixel permutations (``Flatten``, ``Unflatten``, ``PixelUnshuffle``, invertible downsampling,
  ``Identity``) and zero channel padding: the same map for the mean and the variance;
* average pooling without padding: the mean is pooled, the variance pooled and divided by the divisor.

The one approximation is that every layer treats its inputs as independent Gaussians (the diagonal
of the covariance is kept, the correlations created by earlier layers are dropped, and the output of
a ReLU is treated as Gaussian again). For the first affine layer the result is exact. The tests
compare against Monte Carlo with stated tolerances.

:func:`expected_margin` turns the logit moments into the closed-form smoothed margin
``SM(x) ~ mu_y - E[max of the top two incorrect logits]`` (Clark's formula for the max), the
quantity the MSCR loss maximises. All means are in the units of the layer they describe (logits at
the output), variances in their squares.

All formulas are evaluated in float64 and returned in the dtype of the input; they are
differentiable (no NaN gradients at zero variance).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from painwatch.robust.layers import (
    GroupSort,
    InvertibleDownsampling,
    MaxMin,
    OrthogonalConv2d,
    OrthogonalLinear,
)
from painwatch.robust.lipschitz_layers import AOLConv2d, AOLLinear, ChannelPad

__all__ = [
    "MomentRule",
    "clark_max_moments",
    "expected_margin",
    "gaussian_logit_moments",
    "incorrect_max_moments",
    "propagate_moments",
    "register_moment_rule",
    "relu_moments",
]

MomentRule = Callable[[nn.Module, Tensor, Tensor], "tuple[Tensor, Tensor]"]
"""A rule ``(module, mean, var) -> (mean, var)`` propagating diagonal Gaussian moments."""

_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
# Standard deviations below this are treated as exactly zero (deterministic input): the formulas
# then reduce to their noiseless limits, evaluated on a safe branch so gradients stay finite.
_TINY_STD = 1e-12


def _normal_pdf(a: Tensor) -> Tensor:
    return torch.exp(-0.5 * a * a) * _INV_SQRT_2PI


def _safe_sqrt(values: Tensor) -> Tensor:
    """sqrt with a finite gradient at 0 (there it is 0 instead of inf, which would turn into NaN)."""
    positive = values > 0
    return torch.where(positive, torch.where(positive, values, torch.ones_like(values)).sqrt(), 0.0)


def _check_moments(mean: Tensor, var: Tensor) -> None:
    if not isinstance(mean, Tensor) or not isinstance(var, Tensor):
        raise TypeError(f"mean and var must be tensors, got {type(mean).__name__} and {type(var).__name__}")
    if mean.shape != var.shape:
        raise ValueError(f"mean shape {tuple(mean.shape)} and var shape {tuple(var.shape)} differ")
    if not mean.dtype.is_floating_point or not var.dtype.is_floating_point:
        raise TypeError(f"mean and var must be floating point, got {mean.dtype} and {var.dtype}")


# ----------------------------------------------------------------------------- elementary moments
def relu_moments(mean: Tensor, var: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and variance of ``relu(X)`` for ``X ~ N(mean, var)``, element-wise (exact).

    With ``s = sqrt(var)``, ``a = mean / s``: ``E = mean Phi(a) + s phi(a)`` and
    ``Var = var * [(a^2 + 1) Phi(a) + a phi(a) - (a Phi(a) + phi(a))^2]``. Computed in float64; the
    variance is clipped to ``[0, var]`` (ReLU is 1-Lipschitz, so it cannot increase the variance),
    which only removes round-off far in the tails. Where ``var == 0`` it returns ``(relu(mean), 0)``.
    """
    _check_moments(mean, var)
    if bool((var < 0).any()):
        raise ValueError(f"var must be >= 0, got minimum {float(var.min())}")
    out_dtype = mean.dtype
    mu, v = mean.double(), var.double()
    deterministic = v <= _TINY_STD**2
    # sqrt has an infinite derivative at 0: take it on a safe branch only.
    safe_std = torch.where(deterministic, torch.ones_like(v), v).sqrt()
    a = mu / safe_std
    cdf, pdf = torch.special.ndtr(a), _normal_pdf(a)
    unit_mean = a * cdf + pdf  # E[relu(Z + a)], Z standard normal
    unit_var = ((a * a + 1.0) * cdf + a * pdf - unit_mean * unit_mean).clamp(0.0, 1.0)
    out_mean = torch.where(deterministic, mu.clamp_min(0.0), safe_std * unit_mean)
    out_var = torch.where(deterministic, torch.zeros_like(v), v * unit_var)
    return out_mean.to(out_dtype), out_var.to(out_dtype)


def clark_max_moments(
    mean1: Tensor, var1: Tensor, mean2: Tensor, var2: Tensor, *, correlation: float | Tensor = 0.0
) -> tuple[Tensor, Tensor]:
    """Clark's [Clark61] mean and variance of ``max(X1, X2)`` for jointly Gaussian ``X1, X2``.

    With ``theta^2 = var1 + var2 - 2 rho sqrt(var1 var2)`` and ``alpha = (mean1 - mean2) / theta``:
    ``E[max] = mean1 Phi(alpha) + mean2 Phi(-alpha) + theta phi(alpha)`` and
    ``E[max^2] = (mean1^2 + var1) Phi(alpha) + (mean2^2 + var2) Phi(-alpha)
    + (mean1 + mean2) theta phi(alpha)``.
    These two moments are exact for a bivariate Gaussian (only the max itself is not Gaussian). The
    variance is computed after shifting by ``mean2`` (it is shift-invariant) to avoid cancellation.
    When ``theta == 0`` (``X1 - X2`` deterministic) the larger-mean variable is returned.

    Args:
        mean1, var1, mean2, var2: broadcastable tensors; variances >= 0.
        correlation: ``rho`` in [-1, 1] (0 for the independent case used by moment propagation).
    """
    _check_moments(mean1, var1)
    _check_moments(mean2, var2)
    rho = torch.as_tensor(correlation, dtype=torch.float64, device=mean1.device)
    if bool(((rho < -1) | (rho > 1)).any()):
        raise ValueError(f"correlation must lie in [-1, 1], got {correlation}")
    if bool((var1 < 0).any()) or bool((var2 < 0).any()):
        raise ValueError("variances must be >= 0")
    out_dtype = torch.promote_types(mean1.dtype, mean2.dtype)
    m1, v1, m2, v2 = mean1.double(), var1.double(), mean2.double(), var2.double()
    product = v1 * v2
    covariance_term = torch.where(rho == 0, torch.zeros_like(product), rho * _safe_sqrt(product))
    theta_sq = (v1 + v2 - 2.0 * covariance_term).clamp_min(0.0)
    degenerate = theta_sq <= _TINY_STD**2
    safe_theta = _safe_sqrt(torch.where(degenerate, torch.ones_like(theta_sq), theta_sq))
    gap = m1 - m2
    alpha = gap / safe_theta
    cdf, cdf_neg, pdf = torch.special.ndtr(alpha), torch.special.ndtr(-alpha), _normal_pdf(alpha)
    # Moments of max(X1 - mean2, X2 - mean2), i.e. the second mean shifted to 0.
    shifted_mean = gap * cdf + safe_theta * pdf
    shifted_second = (gap * gap + v1) * cdf + v2 * cdf_neg + gap * safe_theta * pdf
    var = (shifted_second - shifted_mean * shifted_mean).clamp_min(0.0)
    first_wins = gap >= 0
    degenerate_mean = torch.where(first_wins, m1, m2)
    degenerate_var = torch.where(first_wins, v1, v2)
    out_mean = torch.where(degenerate, degenerate_mean, m2 + shifted_mean)
    out_var = torch.where(degenerate, degenerate_var, var)
    return out_mean.to(out_dtype), out_var.to(out_dtype)


# ----------------------------------------------------------------------------- layer rules
_RULES: dict[type, MomentRule] = {}


def register_moment_rule(module_type: type, rule: MomentRule) -> None:
    """Register how moments pass through ``module_type`` (and its subclasses without their own rule).

    ``rule(module, mean, var)`` receives the input mean and diagonal variance (same shape) and returns
    the output mean and variance.
    """
    if not isinstance(module_type, type) or not issubclass(module_type, nn.Module):
        raise TypeError(f"module_type must be an nn.Module subclass, got {module_type!r}")
    _RULES[module_type] = rule


def affine_moments(weight: Tensor, bias: Tensor | None, mean: Tensor, var: Tensor) -> tuple[Tensor, Tensor]:
    """Moments through ``x -> x W^T + b`` (``weight`` is ``(out, in)``) for independent inputs."""
    return F.linear(mean, weight, bias), F.linear(var, weight * weight)


def conv2d_moments(
    module: nn.Conv2d, weight: Tensor, bias: Tensor | None, mean: Tensor, var: Tensor
) -> tuple[Tensor, Tensor]:
    """Moments through a 2-D convolution with the geometry (stride, padding, ...) of ``module``.

    The variance goes through the squared kernel with the same padding: zero padding pads the
    variance with zeros (a constant has no variance); circular / reflect / replicate padding copy
    input pixels, and the copies carry those pixels' variances.
    """
    out_mean = module._conv_forward(mean, weight, bias)
    out_var = module._conv_forward(var, weight * weight, None)
    return out_mean, out_var


def _linear_rule(module: nn.Module, mean: Tensor, var: Tensor) -> tuple[Tensor, Tensor]:
    return affine_moments(module.weight, module.bias, mean, var)


def _conv2d_rule(module: nn.Module, mean: Tensor, var: Tensor) -> tuple[Tensor, Tensor]:
    return conv2d_moments(module, module.weight, module.bias, mean, var)


def _relu_rule(_module: nn.Module, mean: Tensor, var: Tensor) -> tuple[Tensor, Tensor]:
    return relu_moments(mean, var)


def _permutation_rule(module: nn.Module, mean: Tensor, var: Tensor) -> tuple[Tensor, Tensor]:
    # A pure rearrangement of coordinates moves each variance with its coordinate.
    return module(mean), module(var)


def _sequential_rule(module: nn.Module, mean: Tensor, var: Tensor) -> tuple[Tensor, Tensor]:
    for child in module:
        mean, var = propagate_moments(child, mean, var)
    return mean, var


def _avg_pool_rule(module: nn.Module, mean: Tensor, var: Tensor) -> tuple[Tensor, Tensor]:
    """Average (or, with ``divisor_override``, scaled sum) pooling without padding: every output is
    ``sum / divisor`` of a full window, so its variance is ``sum var / divisor^2``."""
    kernel = module.kernel_size if isinstance(module.kernel_size, tuple) else (module.kernel_size,) * 2
    padding = module.padding if isinstance(module.padding, tuple) else (module.padding,) * 2
    if any(padding) or module.ceil_mode:
        raise TypeError(
            f"no moment-propagation rule for {module!r}: only pooling without padding or ceil_mode"
        )
    divisor = module.divisor_override or kernel[0] * kernel[1]
    return module(mean), module(var) / divisor


def _dropout_rule(module: nn.Module, mean: Tensor, var: Tensor) -> tuple[Tensor, Tensor]:
    if module.training and module.p > 0:
        raise TypeError(
            f"{type(module).__name__} in training mode is random: call .eval() before moment propagation"
        )
    return mean, var


for _type, _rule in (
    (nn.Linear, _linear_rule),
    (nn.Conv2d, _conv2d_rule),
    (nn.ReLU, _relu_rule),
    (nn.Flatten, _permutation_rule),
    (nn.Unflatten, _permutation_rule),
    (nn.Identity, _permutation_rule),
    (nn.PixelUnshuffle, _permutation_rule),
    (nn.PixelShuffle, _permutation_rule),
    (nn.Sequential, _sequential_rule),
    (nn.Dropout, _dropout_rule),
    (nn.AvgPool2d, _avg_pool_rule),
):
    register_moment_rule(_type, _rule)

def _orthogonal_conv_rule(module: nn.Module, mean: Tensor, var: Tensor) -> tuple[Tensor, Tensor]:
    """BCOP convolution: optional pixel-unshuffle (a permutation), then a stride-1 'same' convolution."""
    if module.downsample is not None:
        mean, var = module.downsample(mean), module.downsample(var)
    weight, padding = module.weight, module.padding
    if module.padding_mode == "circular" and padding > 0:
        # Circular padding copies pixels: the copies carry the same variances.
        mean = F.pad(mean, (padding,) * 4, mode="circular")
        var = F.pad(var, (padding,) * 4, mode="circular")
        padding = 0
    return (
        F.conv2d(mean, weight, module.bias, padding=padding),
        F.conv2d(var, weight * weight, None, padding=padding),
    )


def _pair_max_min(
    first_mean: Tensor, first_var: Tensor, second_mean: Tensor, second_var: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    high_mean, high_var = clark_max_moments(first_mean, first_var, second_mean, second_var)
    # min(a, b) = -max(-a, -b): the same exact formula, no cancellation from E[a^2] + E[b^2] - E[max^2].
    low_mean, low_var = clark_max_moments(-first_mean, first_var, -second_mean, second_var)
    return high_mean, high_var, -low_mean, low_var


def _split_pairs(x: Tensor, layer: str) -> tuple[Tensor, Tensor]:
    if x.dim() < 2 or x.shape[1] % 2:
        raise ValueError(f"{layer} needs (B, C, ...) inputs with an even C, got shape {tuple(x.shape)}")
    pairs = x.reshape(x.shape[0], x.shape[1] // 2, 2, *x.shape[2:])
    return pairs[:, :, 0], pairs[:, :, 1]


def _join_pairs(first: Tensor, second: Tensor, shape: torch.Size) -> Tensor:
    return torch.stack((first, second), dim=2).reshape(shape)


def _maxmin_rule(_module: nn.Module, mean: Tensor, var: Tensor) -> tuple[Tensor, Tensor]:
    """MaxMin: channel pairs ``(a, b) -> (max, min)``; Clark's exact moments for independent a, b."""
    first_mean, second_mean = _split_pairs(mean, "MaxMin")
    first_var, second_var = _split_pairs(var, "MaxMin")
    high_mean, high_var, low_mean, low_var = _pair_max_min(first_mean, first_var, second_mean, second_var)
    return _join_pairs(high_mean, low_mean, mean.shape), _join_pairs(high_var, low_var, var.shape)


def _groupsort_rule(module: nn.Module, mean: Tensor, var: Tensor) -> tuple[Tensor, Tensor]:
    """GroupSort of size 1 (identity) or 2 (ascending pairs: ``(min, max)``); larger groups have no rule."""
    if module.group_size == 1:
        return mean, var
    if module.group_size != 2:
        raise TypeError(
            f"no moment-propagation rule for GroupSort(group_size={module.group_size}): only sizes 1 and 2"
        )
    first_mean, second_mean = _split_pairs(mean, "GroupSort")
    first_var, second_var = _split_pairs(var, "GroupSort")
    high_mean, high_var, low_mean, low_var = _pair_max_min(first_mean, first_var, second_mean, second_var)
    return _join_pairs(low_mean, high_mean, mean.shape), _join_pairs(low_var, high_var, var.shape)


def _aol_conv_rule(module: nn.Module, mean: Tensor, var: Tensor) -> tuple[Tensor, Tensor]:
    """AOL convolution: a 'same' zero-padded convolution with the rescaled kernel."""
    weight, padding = module.weight, module.padding
    return (
        F.conv2d(mean, weight, module.bias, padding=padding),
        F.conv2d(var, weight * weight, None, padding=padding),
    )


# The 1-Lipschitz layers of painwatch.robust.layers and .lipschitz_layers (kept here so that this module
# owns every rule). The SLL residual layers have none: their two branches are strongly correlated, which
# the diagonal approximation would drop.
for _type, _rule in (
    (OrthogonalLinear, _linear_rule),
    (OrthogonalConv2d, _orthogonal_conv_rule),
    (InvertibleDownsampling, _permutation_rule),
    (MaxMin, _maxmin_rule),
    (GroupSort, _groupsort_rule),
    (AOLConv2d, _aol_conv_rule),
    (AOLLinear, _linear_rule),
    (ChannelPad, _permutation_rule),
):
    register_moment_rule(_type, _rule)


def _find_rule(module: nn.Module) -> MomentRule | None:
    for klass in type(module).__mro__:
        if klass in _RULES:
            # A subclass that overrides forward computes something else than the class with the rule.
            if klass is not type(module) and type(module).forward is not klass.forward:
                return None
            return _RULES[klass]
    return None


def propagate_moments(module: nn.Module, mean: Tensor, var: Tensor) -> tuple[Tensor, Tensor]:
    """Propagate the mean and diagonal variance of a Gaussian input through ``module``.

    Args:
        module: a network built from supported layers (see the module docstring), or any module type
            given a rule with :func:`register_moment_rule`.
        mean: input mean, e.g. ``(B, C, H, W)`` pixels or ``(B, D)`` features.
        var: input variance, same shape, >= 0.

    Returns:
        ``(mean, var)`` of the output under the layer-wise independence approximation.

    Raises:
        TypeError: naming the first layer without a rule.
    """
    _check_moments(mean, var)
    rule = _find_rule(module)
    if rule is None:
        raise TypeError(
            f"no moment-propagation rule for layer {type(module).__name__} ({module!r}); supported: "
            f"{sorted(t.__name__ for t in _RULES)}; add one with register_moment_rule"
        )
    return rule(module, mean, var)


def gaussian_logit_moments(
    model: nn.Module, x: Tensor, input_variance: float | Tensor
) -> tuple[Tensor, Tensor]:
    """Logit mean and variance of ``model`` for the input ``x + xi``, ``xi ~ N(0, input_variance I)``.

    Args:
        model: supported network (see :func:`propagate_moments`).
        x: input batch (the mean of the Gaussian input).
        input_variance: ``sigma_x^2`` (a number, or a tensor broadcastable to ``x``), >= 0; in squared
            input units (squared [0, 1] pixels for images).

    Returns:
        ``(mean, var)`` logits, each ``(B, K)``.
    """
    variance = torch.as_tensor(input_variance, dtype=x.dtype, device=x.device)
    if not bool(torch.isfinite(variance).all()) or bool((variance < 0).any()):
        raise ValueError(f"input_variance must be finite and >= 0, got {input_variance!r}")
    return propagate_moments(model, x, variance.expand_as(x).clone())


# ----------------------------------------------------------------------------- margins
def _check_logit_moments(mean: Tensor, var: Tensor, y: Tensor) -> None:
    _check_moments(mean, var)
    if mean.dim() != 2 or mean.shape[1] < 2:
        raise ValueError(f"logit moments must have shape (B, K) with K >= 2, got {tuple(mean.shape)}")
    if not isinstance(y, Tensor) or y.dtype.is_floating_point or y.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {getattr(y, 'dtype', type(y))}")
    if y.shape != mean.shape[:1]:
        raise ValueError(f"labels must have shape ({mean.shape[0]},), got {tuple(y.shape)}")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= mean.shape[1]):
        bad = int(y.min()) if int(y.min()) < 0 else int(y.max())
        raise ValueError(f"label {bad} is outside [0, {mean.shape[1]})")


def incorrect_max_moments(
    mean: Tensor, var: Tensor, y: Tensor, *, mode: str = "top2"
) -> tuple[Tensor, Tensor]:
    """Approximate mean and variance of ``max_{j != y} Z_j`` for independent ``Z_j ~ N(mean_j, var_j)``.

    ``mode="top2"`` (as in [RC, Ch. 3]): Clark's formula on the two incorrect classes with the largest means
    (exact for K = 3, and for K = 2 it is the single incorrect logit). ``mode="all"``: Clark's
    recursion over every incorrect class in decreasing order of mean (each step treats the running max
    as Gaussian).
    """
    _check_logit_moments(mean, var, y)
    if mode not in ("top2", "all"):
        raise ValueError(f"mode must be 'top2' or 'all', got {mode!r}")
    num_classes = mean.shape[1]
    y = y.long().unsqueeze(1)
    # Sort the incorrect classes by mean, the true class pushed last with -inf.
    masked = mean.detach().scatter(1, y, float("-inf"))
    order = masked.argsort(dim=1, descending=True)[:, : num_classes - 1]
    sorted_mean, sorted_var = mean.gather(1, order), var.gather(1, order)
    run_mean, run_var = sorted_mean[:, 0], sorted_var[:, 0]
    steps = 1 if mode == "top2" else num_classes - 2
    for index in range(1, min(steps, num_classes - 2) + 1):
        run_mean, run_var = clark_max_moments(run_mean, run_var, sorted_mean[:, index], sorted_var[:, index])
    return run_mean, run_var


def expected_margin(mean: Tensor, var: Tensor, y: Tensor, *, mode: str = "top2") -> Tensor:
    """Closed-form smoothed margin ``SM ~ mu_y - E[max_{j != y} Z_j]`` from logit moments ``(B, K)``.

    ``E[max]`` comes from :func:`incorrect_max_moments` ([Clark61]; ``mode="top2"`` as in [RC, Ch. 3]).
    Since ``E[max] >= max_j mu_j``, ``SM <= mu_y - max_{j != y} mu_j``: noise can only cost margin.
    Returns a ``(B,)`` tensor, differentiable in ``mean`` and ``var``.
    """
    max_mean, _ = incorrect_max_moments(mean, var, y, mode=mode)
    return mean.gather(1, y.long().unsqueeze(1)).squeeze(1) - max_mean
