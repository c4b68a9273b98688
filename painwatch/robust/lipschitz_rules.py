"""Per-layer rules of :func:`painwatch.robust.lipschitz_upper_bound`: which layer classes have a sound
L2 Lipschitz bound, which methods define what they compute, and the bound itself.

A :class:`LayerRule` binds a bound to a class *and to the functions that class computes with*: the
bound applies to an instance only when its class resolves every name of ``methods`` (and the
``nn.Module`` call machinery) to the very functions the rule's class resolves them to. A subclass
that keeps the parent's computation (a ``torch.nn.utils.parametrize`` class, a library's layer that
only changes ``__init__``) keeps the parent's bound, computed from the attributes as the forward pass
reads them (a parametrized ``weight`` as computed); a subclass that overrides ``forward`` does not.
The bounds are L2 operator norms on one sample, in the units of the layer's input (docs/design.md,
"The certificates", item 1).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from painwatch.robust.spectral import FLOAT_SAFETY, conv_layer_norm_bound, dense_operator_norm

# Everything else here serves lipschitz_upper_bound only and is not part of painwatch.robust's API.
__all__ = ["UnsupportedLayerError"]


class UnsupportedLayerError(TypeError):
    """Raised when :func:`painwatch.robust.lipschitz_upper_bound` meets a layer it cannot soundly bound.

    Attributes ``path`` (dotted path of the layer in the module tree, ``<root>`` for the top module)
    and ``layer_type`` (class name) identify the layer.
    """

    def __init__(self, path: str, module: nn.Module, reason: str) -> None:
        self.path = path
        self.layer_type = type(module).__name__
        super().__init__(
            f"cannot bound the Lipschitz constant of layer '{path}' ({self.layer_type}): {reason}"
        )


Shape = tuple[int, ...]


@dataclass(frozen=True, kw_only=True)
class LayerContext:
    """What a rule's bound may use: the layer's path, its sample shapes, and ``bound_child(child, name,
    shape) -> (bound, output shape)``, the full (checked) bound of a sub-module the layer calls."""

    path: str
    input_shape: Shape
    output_shape: Shape
    bound_child: Callable[[nn.Module, str, Shape], tuple[float, Shape]]


@dataclass(frozen=True)
class LayerRule:
    """``bound(module, context)`` is a sound L2 bound of every instance of ``layer_class`` (or of a
    subclass) whose class resolves each name in ``methods`` to the same function as ``layer_class``."""

    layer_class: type
    bound: Callable[[nn.Module, LayerContext], float]
    methods: tuple[str, ...] = ("forward",)


@contextmanager
def preserved_buffers(module: nn.Module):
    """Restores every buffer of ``module`` and its sub-modules on exit, both the tensor objects (a
    layer may rebind a buffer) and their values (or update it in place): bounding a layer (a probe
    forward pass, a parametrization in training mode) must not change the model."""
    saved = []
    for submodule in module.modules():
        for name, tensor in submodule._buffers.items():
            saved.append((submodule, name, tensor, None if tensor is None else tensor.detach().clone()))
    try:
        yield
    finally:
        with torch.no_grad():
            for submodule, name, tensor, value in saved:
                submodule._buffers[name] = tensor
                if tensor is not None:
                    tensor.copy_(value)


# --- dense and convolution -------------------------------------------------------------------------


def linear_bound(module: nn.Linear, context: LayerContext) -> float:
    """``F.linear(x, weight, bias)``: the largest singular value of the weight (as computed)."""
    return dense_operator_norm(module.weight)


def _conv_bound(module: nn.modules.conv._ConvNd, context: LayerContext) -> float:
    """FFT bound of a convolution or a transposed convolution (:func:`conv_layer_norm_bound`)."""
    if len(context.input_shape) != module.weight.dim() - 1:
        raise ValueError(
            f"layer '{context.path}' ({type(module).__name__}) needs (C, *spatial) inputs, got shape "
            f"{context.input_shape}"
        )
    return conv_layer_norm_bound(module, context.input_shape, context.output_shape)


# --- normalisation -----------------------------------------------------------------------------------


def affine_scale_bound(weight: torch.Tensor | None, variance: torch.Tensor, eps: float) -> float:
    """``max |weight| / sqrt(variance + eps)`` in float64, times ``1 + FLOAT_SAFETY``: the norm of the
    per-channel affine map ``x -> weight (x - mean) / sqrt(variance + eps) + bias``."""
    scale = 1.0 / torch.sqrt(variance.detach().to(torch.float64) + eps)
    if weight is not None:
        scale = scale * weight.detach().to(torch.float64).abs()
    return float(scale.max()) * (1.0 + FLOAT_SAFETY)


def batchnorm_bound(module: nn.modules.batchnorm._BatchNorm, context: LayerContext) -> float:
    """Eval-mode batch norm: its largest per-channel scale. Training mode uses the batch's statistics
    (samples are not independent) and is refused."""
    if module.training:
        raise UnsupportedLayerError(
            context.path, module, "batch norm in training mode uses batch statistics; call model.eval() first"
        )
    if module.running_var is None:
        raise UnsupportedLayerError(
            context.path, module, "batch norm without running statistics (track_running_stats=False)"
        )
    return affine_scale_bound(module.weight, module.running_var, module.eps)


_NORMALISATION_BY_OWN_STATISTICS = tuple(
    layer for layer in (nn.LayerNorm, nn.GroupNorm, getattr(nn, "RMSNorm", None)) if layer is not None
)


# --- pooling and padding -------------------------------------------------------------------------------


def _as_tuple(value, spatial: int) -> tuple[int, ...]:
    if isinstance(value, (tuple, list)):
        return tuple(int(v) for v in value)
    return (int(value),) * spatial


def _max_window_coverage(
    length: int, out_length: int, kernel: int, stride: int, pad: int, dilation: int
) -> int:
    counts = torch.zeros(length, dtype=torch.long)
    for out_index in range(out_length):
        positions = out_index * stride - pad + dilation * torch.arange(kernel)
        positions = positions[(positions >= 0) & (positions < length)]
        counts[positions] += 1
    return int(counts.max())


def _adaptive_window_coverage(length: int, out_length: int) -> int:
    counts = torch.zeros(length, dtype=torch.long)
    for out_index in range(out_length):
        start = (out_index * length) // out_length
        end = -((-(out_index + 1) * length) // out_length)
        counts[start:end] += 1
    return int(counts.max())


_ADAPTIVE_MAX_POOLS = (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)


def _maxpool_bound(module, context: LayerContext) -> float:
    """sqrt(largest number of windows covering one pixel): each output moves at most by the largest
    change inside its window, and each squared input change is counted once per covering window."""
    if getattr(module, "return_indices", False):
        raise UnsupportedLayerError(context.path, module, "return_indices=True returns a tuple")
    shape, out_shape = context.input_shape, context.output_shape
    spatial = len(shape) - 1
    sizes, out_sizes = shape[1:], out_shape[1:]
    coverage = 1
    if isinstance(module, _ADAPTIVE_MAX_POOLS):
        for dim in range(spatial):
            coverage *= _adaptive_window_coverage(sizes[dim], out_sizes[dim])
    else:
        kernel = _as_tuple(module.kernel_size, spatial)
        stride = _as_tuple(module.stride if module.stride is not None else module.kernel_size, spatial)
        pad = _as_tuple(module.padding, spatial)
        dilation = _as_tuple(module.dilation, spatial)
        for dim in range(spatial):
            coverage *= _max_window_coverage(
                sizes[dim], out_sizes[dim], kernel[dim], stride[dim], pad[dim], dilation[dim]
            )
    return math.sqrt(coverage)


def nonnegative_linear_bound(module, context: LayerContext) -> float:
    """Schur test sqrt(max row sum * max column sum) of a channel-wise linear map whose entries have one
    sign (average pooling, possibly scaled), read off the layer itself: exact for non-overlapping
    windows, an upper bound otherwise. Valid only for layers known to compute such a map."""
    ones = torch.ones((1, 1, *context.input_shape[1:]), dtype=torch.float64, requires_grad=True)
    with torch.enable_grad():
        out = module(ones)
        (column_sums,) = torch.autograd.grad(out.sum(), ones)
    row_max = float(out.detach().abs().max())
    column_max = float(column_sums.abs().max())
    return math.sqrt(row_max * column_max) * (1.0 + FLOAT_SAFETY)


def l2_pool_bound(module, context: LayerContext) -> float:
    """L2 pooling (``nn.LPPool`` with ``norm_type=2``, possibly scaled): output ``j`` is
    ``sqrt(c_j * sum of x_i^2 over its window)``, so it moves by at most ``sqrt(c_j)`` times the change
    inside its window (reverse triangle inequality), and the squared changes sum to at most
    ``max_i sum_{windows j containing i} c_j`` times ``||x - y||^2``. Those column sums are the gradient of
    ``sum_j out_j^2`` (linear in the squared input) with respect to the squared input, read off the
    layer at ``x = 1``: 1 for disjoint full windows, more where a partial window is rescaled."""
    norm_type = getattr(module, "norm_type", 2)
    if norm_type != 2:
        raise UnsupportedLayerError(
            context.path, module, f"norm_type={norm_type!r}: only L2 pooling (norm_type=2) is bounded"
        )
    squares = torch.ones((1, 1, *context.input_shape[1:]), dtype=torch.float64, requires_grad=True)
    with torch.enable_grad():
        out = module(squares.sqrt())
        (coverage,) = torch.autograd.grad(out.pow(2).sum(), squares)
    return math.sqrt(float(coverage.max())) * (1.0 + FLOAT_SAFETY)


def copying_pad_bound(module, context: LayerContext) -> float:
    """A padding that copies pixels (reflection, replication, circular, symmetric) is a row selection:
    sqrt(most copies of one pixel), counted by padding the pixels' indices. Valid only for layers
    known to output copies of their input pixels."""
    numel = math.prod(context.input_shape[1:])
    index = torch.arange(numel, dtype=torch.float64).reshape(1, 1, *context.input_shape[1:])
    with torch.no_grad():
        copies = torch.bincount(module(index).reshape(-1).round().long(), minlength=numel)
    return math.sqrt(int(copies.max()))


# --- activations and shape layers ---------------------------------------------------------------------


def _dropout_bound(module, context: LayerContext) -> float:
    # In eval mode dropout is the identity; in training mode it scales kept units by 1 / (1 - p).
    return 1.0 / (1.0 - module.p) if module.training and module.p < 1 else 1.0


def constant_bound(value: float) -> Callable[[nn.Module, LayerContext], float]:
    return lambda module, context: value


def _leaky_relu_bound(module, context: LayerContext) -> float:
    return max(1.0, abs(float(module.negative_slope)))


def _elu_bound(module, context: LayerContext) -> float:
    return max(1.0, abs(float(module.alpha)))


def _selu_bound(module, context: LayerContext) -> float:
    # scale * x for x > 0, scale * alpha * exp(x) (derivative <= scale * alpha) for x <= 0
    return 1.0507009873554804934193349852946 * 1.6732632423543772848170429916717 * (1.0 + FLOAT_SAFETY)


def prelu_bound(module, context: LayerContext) -> float:
    return max(1.0, float(module.weight.detach().abs().max()))


def _hardtanh_bound(module, context: LayerContext) -> float:
    return 1.0 if module.max_val > module.min_val else 0.0


GELU_BOUND = 1.1291
"""Largest |GELU'| rounded up: 1.12899 (exact erf form), 1.12900 (tanh approximation)."""
SILU_BOUND = 1.0999
"""Largest |SiLU'| (x sigmoid(x)) rounded up: 1.09984; also that of x sigmoid(a x) after rescaling."""
MISH_BOUND = 1.0886
"""Largest |Mish'| rounded up: 1.08850."""

_ACTIVATION_CONSTANTS: list[tuple[tuple[type, ...], float]] = [
    (
        (nn.ReLU, nn.ReLU6, nn.Tanh, nn.Softsign, nn.Softplus, nn.Tanhshrink, nn.Softshrink),
        1.0,
    ),
    ((nn.Identity, nn.Flatten, nn.Unflatten, nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d), 1.0),
    ((nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d), 1.0),
    ((nn.PixelShuffle, nn.PixelUnshuffle), 1.0),  # permutations of the entries
    ((nn.Sigmoid,), 0.25),
    ((nn.Hardsigmoid,), 1.0 / 6.0),
    ((nn.Hardswish,), 1.5),
    ((nn.GELU,), GELU_BOUND),
    ((nn.SiLU,), SILU_BOUND),
    ((nn.Mish,), MISH_BOUND),
]


def _rules(
    layer_classes: tuple[type, ...], bound, methods: tuple[str, ...] = ("forward",)
) -> list[LayerRule]:
    return [LayerRule(layer_class, bound, methods) for layer_class in layer_classes]


_LP_POOLS = tuple(getattr(nn, f"LPPool{d}d") for d in (1, 2, 3) if hasattr(nn, f"LPPool{d}d"))

TORCH_RULES: list[LayerRule] = [
    *_rules((nn.Linear,), linear_bound),
    *_rules((nn.Conv1d, nn.Conv2d, nn.Conv3d), _conv_bound, ("forward", "_conv_forward")),
    *_rules((nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d), _conv_bound),
    *_rules((nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm), batchnorm_bound),
    *_rules((nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, *_ADAPTIVE_MAX_POOLS), _maxpool_bound),
    *_rules(
        (
            nn.AvgPool1d,
            nn.AvgPool2d,
            nn.AvgPool3d,
            nn.AdaptiveAvgPool1d,
            nn.AdaptiveAvgPool2d,
            nn.AdaptiveAvgPool3d,
        ),
        nonnegative_linear_bound,
    ),
    *_rules(_LP_POOLS, l2_pool_bound),
    *_rules(
        (
            nn.ReflectionPad1d,
            nn.ReflectionPad2d,
            nn.ReflectionPad3d,
            nn.ReplicationPad1d,
            nn.ReplicationPad2d,
            nn.ReplicationPad3d,
            nn.CircularPad1d,
            nn.CircularPad2d,
            nn.CircularPad3d,
        ),
        copying_pad_bound,
    ),
    *_rules((nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d), _dropout_bound),
    *_rules((nn.LeakyReLU,), _leaky_relu_bound),
    *_rules((nn.ELU, nn.CELU), _elu_bound),
    *_rules((nn.SELU,), _selu_bound),
    *_rules((nn.PReLU,), prelu_bound),
    *_rules((nn.Hardtanh,), _hardtanh_bound),
    *[rule for types, value in _ACTIVATION_CONSTANTS for rule in _rules(types, constant_bound(value))],
]
"""Rules for the layers of ``torch.nn``. ``nn.Sequential`` is composed by the caller."""

OWN_STATISTICS_REASON = (
    "it divides by a statistic of its own input (its Lipschitz constant grows like 1 / sqrt(eps)); "
    "no bound is implemented for it"
)

TORCH_REFUSALS: list[tuple[tuple[type, ...], str]] = [
    (_NORMALISATION_BY_OWN_STATISTICS, OWN_STATISTICS_REASON)
]
"""Layers refused outright, with the reason (their subclasses too, timm's fused ones included)."""
