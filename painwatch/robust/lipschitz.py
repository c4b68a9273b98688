"""Sound L2 Lipschitz upper bounds of networks, and a lower estimate to check them against.

Everything here is about the L2 norm on a single sample: for a network ``f`` taking a batch
``(B, *input_shape)``, ``L`` bounds ``||f(x) - f(y)||_2 <= L ||x - y||_2`` for every pair of samples,
in the units of the input (pixels in [0, 1] for painwatch models). The Lipschitz margin certificate
[Tsuzuku18] and the smoothed margin [RC, Ch. 3] need ``L`` to be an *upper* bound (docs/design.md,
"The certificates", item 1).

- :func:`lipschitz_upper_bound` - a *sound* upper bound, composed layer by layer along ``nn.Sequential``:
  exact spectral norm for dense layers, the FFT bound [Sedghi19] for convolutions (both in
  :mod:`painwatch.robust.spectral`), exact constants for activations, pooling and normalisation
  layers, and the declared bounds of the orthogonal layers of :mod:`painwatch.robust.layers`. Layers
  it cannot bound raise :class:`UnsupportedLayerError` naming the layer. Use it for certificates.
- :func:`lipschitz_lower_estimate` - power iteration on the Jacobian at random points: a *lower*
  estimate of the Lipschitz constant, for tests and reports. Never use it for a certificate.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn

from painwatch.robust.spectral import FLOAT_SAFETY, conv_layer_norm_bound, dense_operator_norm
from painwatch.robust.validation import check_input_shape

__all__ = [
    "UnsupportedLayerError",
    "lipschitz_lower_estimate",
    "lipschitz_upper_bound",
]

_ROOT = "<root>"


class UnsupportedLayerError(TypeError):
    """Raised when :func:`lipschitz_upper_bound` meets a layer it cannot soundly bound.

    Attributes ``path`` (dotted path of the layer in the module tree, ``<root>`` for the top module)
    and ``layer_type`` (class name) identify the layer.
    """

    def __init__(self, path: str, module: nn.Module, reason: str) -> None:
        self.path = path
        self.layer_type = type(module).__name__
        super().__init__(
            f"cannot bound the Lipschitz constant of layer '{path}' ({self.layer_type}): {reason}"
        )


# ---------------------------------------------------------------------------------------------------
# Upper bound
# ---------------------------------------------------------------------------------------------------


def lipschitz_upper_bound(module: nn.Module, input_shape: Sequence[int]) -> float:
    """Return a sound upper bound of the L2 Lipschitz constant of ``module`` on inputs of ``input_shape``.

    Parameters
    ----------
    module:
        The network. Supported: ``nn.Sequential`` (recursively; the bound is the product of its
        layers' bounds), ``nn.Linear`` (exact largest singular value), ``nn.Conv1d/2d/3d`` with any
        stride, padding (zeros, circular, reflect, replicate), dilation and groups (FFT bound, see
        :func:`painwatch.robust.spectral.conv_operator_norm_bound`) and their transposes, batch norm
        in eval mode, a normalisation layer with ``mean``/``std`` attributes computing ``(x - mean) / std``,
        max/average pooling (plain and adaptive), padding layers, Flatten/Unflatten/Identity/Dropout,
        the usual activations (ReLU, LeakyReLU, ELU, Tanh, Sigmoid, GELU, SiLU, ...), and the layers
        of :mod:`painwatch.robust.layers`. Any module may declare its own bound by defining a method
        ``lipschitz_upper_bound(input_shape) -> float``; that method is trusted. Anything else
        raises :class:`UnsupportedLayerError` naming the layer.
    input_shape:
        Shape of one sample, without the batch dimension, e.g. ``(C, H, W)``. Convolution and pooling
        bounds depend on it (the FFT grid), so pass the true input resolution.

    Returns
    -------
    float
        ``L`` such that ``||module(x) - module(y)||_2 <= L * ||x - y||_2`` for all samples ``x, y`` of
        that shape, in exact arithmetic, with the weights the module holds now. Power iteration is never
        used: every layer bound is exact or provably an upper bound (computed in float64 with a relative
        margin :data:`FLOAT_SAFETY`).

    Raises
    ------
    UnsupportedLayerError
        For a layer without a sound bound (its path and type are in the message), for batch norm in
        training mode, and for containers whose ``forward`` is not a plain composition.
    ValueError
        For a bad ``input_shape`` or when a layer rejects the activation shape it receives.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    shape = check_input_shape(input_shape)
    bound, _ = _bound(module, shape, _ROOT)
    return float(bound)


def _child_path(path: str, name: str) -> str:
    return name if path == _ROOT else f"{path}.{name}"


def _probe_dtype_device(module: nn.Module) -> tuple[torch.dtype, torch.device]:
    for tensor in list(module.parameters()) + list(module.buffers()):
        if tensor.is_floating_point():
            return tensor.dtype, tensor.device
    return torch.float32, torch.device("cpu")


def _output_shape(module: nn.Module, shape: tuple[int, ...], path: str) -> tuple[int, ...]:
    """Shape of one output sample, by a forward pass on zeros (buffers restored afterwards)."""
    dtype, device = _probe_dtype_device(module)
    saved_buffers = [buffer.detach().clone() for buffer in module.buffers()]
    try:
        with torch.no_grad():
            out = module(torch.zeros((1, *shape), dtype=dtype, device=device))
    except Exception as error:  # the layer's own message says what is wrong
        raise ValueError(
            f"layer '{path}' ({type(module).__name__}) rejects an input of shape {shape}: {error}"
        ) from error
    finally:
        with torch.no_grad():
            for buffer, saved in zip(module.buffers(), saved_buffers, strict=True):
                buffer.copy_(saved)
    if not isinstance(out, torch.Tensor):
        raise UnsupportedLayerError(path, module, f"its forward returns {type(out).__name__}, not a tensor")
    return tuple(out.shape[1:])


def _bound(module: nn.Module, shape: tuple[int, ...], path: str) -> tuple[float, tuple[int, ...]]:
    """(bound, output shape) of ``module`` on samples of ``shape``."""
    own = getattr(type(module), "lipschitz_upper_bound", None)
    if callable(own):
        value = module.lipschitz_upper_bound(shape)
        value = float(value)
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"layer '{path}' ({type(module).__name__}) declared an invalid bound {value!r}")
        return value, _output_shape(module, shape, path)
    if isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward:
        total = 1.0
        for name, child in module.named_children():
            value, shape = _bound(child, shape, _child_path(path, name))
            total *= value
        return total, shape
    for layer_types, handler in _HANDLERS:
        if isinstance(module, layer_types):
            out_shape = _output_shape(module, shape, path)
            return handler(module, shape, out_shape, path), out_shape
    if _is_standardizer(module):
        out_shape = _output_shape(module, shape, path)
        return _standardizer_bound(module, shape, out_shape, path), out_shape
    if isinstance(module, (nn.Sequential, nn.ModuleList, nn.ModuleDict)) or len(list(module.children())) > 0:
        raise UnsupportedLayerError(
            path,
            module,
            "its forward is not known to be a plain composition of its children (only nn.Sequential is "
            "composed automatically); define lipschitz_upper_bound(input_shape) on it or restructure it "
            "as nn.Sequential",
        )
    raise UnsupportedLayerError(path, module, "no sound Lipschitz bound is known for this layer type")


# --- dense and convolution -------------------------------------------------------------------------


def _linear_bound(module: nn.Linear, shape, out_shape, path) -> float:
    return dense_operator_norm(module.weight)


def _conv_bound(module: nn.modules.conv._ConvNd, shape, out_shape, path) -> float:
    """FFT bound of a convolution or a transposed convolution (:func:`conv_layer_norm_bound`)."""
    if len(shape) != module.weight.dim() - 1:
        raise ValueError(
            f"layer '{path}' ({type(module).__name__}) needs (C, *spatial) inputs, got shape {shape}"
        )
    return conv_layer_norm_bound(module, shape, out_shape)


# --- normalisation -----------------------------------------------------------------------------------


def _batchnorm_bound(module: nn.modules.batchnorm._BatchNorm, shape, out_shape, path) -> float:
    if module.training:
        raise UnsupportedLayerError(
            path, module, "batch norm in training mode uses batch statistics; call model.eval() first"
        )
    if module.running_var is None:
        raise UnsupportedLayerError(
            path, module, "batch norm without running statistics (track_running_stats=False)"
        )
    scale = 1.0 / torch.sqrt(module.running_var.detach().to(torch.float64) + module.eps)
    if module.weight is not None:
        scale = scale * module.weight.detach().to(torch.float64).abs()
    return float(scale.max()) * (1.0 + FLOAT_SAFETY)


def _is_standardizer(module: nn.Module) -> bool:
    return (
        hasattr(module, "mean")
        and hasattr(module, "std")
        and len(list(module.children())) == 0
        and not isinstance(module.mean, Callable)
        and not isinstance(module.std, Callable)
    )


def _standardizer_bound(module: nn.Module, shape, out_shape, path) -> float:
    """1 / min |std|, after checking numerically that the layer really computes (x - mean) / std."""
    dtype, device = _probe_dtype_device(module)
    try:
        mean = torch.as_tensor(module.mean, dtype=torch.float64).detach().cpu()
        std = torch.as_tensor(module.std, dtype=torch.float64).detach().cpu()
    except (TypeError, ValueError) as error:
        raise UnsupportedLayerError(path, module, f"its mean/std are not numeric ({error})") from error
    if torch.any(std == 0) or not torch.all(torch.isfinite(std)):
        raise UnsupportedLayerError(path, module, f"its std has zero or non-finite entries: {std.tolist()}")

    def per_channel(values: torch.Tensor) -> torch.Tensor:
        if values.dim() == 1 and values.numel() == shape[0] and len(shape) > 1:
            return values.reshape(shape[0], *([1] * (len(shape) - 1)))
        return values

    probe = torch.rand((2, *shape), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = (probe - per_channel(mean)) / per_channel(std)
    with torch.no_grad():
        actual = module(probe.to(dtype=dtype, device=device)).to(torch.float64).cpu()
    tolerance = 1e-4 * (1.0 + float(expected.abs().max()))
    if actual.shape != expected.shape or not torch.allclose(actual, expected, atol=tolerance, rtol=1e-4):
        raise UnsupportedLayerError(
            path, module, "it has mean/std attributes but does not compute (x - mean) / std"
        )
    return float(1.0 / std.abs().min()) * (1.0 + FLOAT_SAFETY)


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


def _maxpool_bound(module, shape, out_shape, path) -> float:
    """sqrt(largest number of windows covering one pixel): each output moves at most by the largest
    change inside its window, and each squared input change is counted once per covering window."""
    if getattr(module, "return_indices", False):
        raise UnsupportedLayerError(path, module, "return_indices=True returns a tuple")
    spatial = len(shape) - 1
    sizes, out_sizes = shape[1:], out_shape[1:]
    coverage = 1
    if isinstance(module, (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)):
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


def _nonnegative_linear_bound(module, shape, out_shape, path) -> float:
    """Schur test sqrt(max row sum * max column sum) for a channel-wise linear map with entries of one
    sign (average pooling): exact for non-overlapping windows, an upper bound otherwise."""
    ones = torch.ones((1, 1, *shape[1:]), dtype=torch.float64, requires_grad=True)
    out = module(ones)
    (column_sums,) = torch.autograd.grad(out.sum(), ones)
    row_max = float(out.detach().abs().max())
    column_max = float(column_sums.abs().max())
    return math.sqrt(row_max * column_max) * (1.0 + FLOAT_SAFETY)


def _copying_pad_bound(module, shape, out_shape, path) -> float:
    """Reflection/replication/circular padding is a row selection: sqrt(most copies of one pixel)."""
    numel = math.prod(shape[1:])
    index = torch.arange(numel, dtype=torch.float64).reshape(1, 1, *shape[1:])
    copies = torch.bincount(module(index).reshape(-1).round().long(), minlength=numel)
    return math.sqrt(int(copies.max()))


# --- activations and shape layers ---------------------------------------------------------------------


def _dropout_bound(module, shape, out_shape, path) -> float:
    # In eval mode dropout is the identity; in training mode it scales kept units by 1 / (1 - p).
    return 1.0 / (1.0 - module.p) if module.training and module.p < 1 else 1.0


def _constant(value: float):
    return lambda module, shape, out_shape, path: value


def _leaky_relu_bound(module, shape, out_shape, path) -> float:
    return max(1.0, abs(float(module.negative_slope)))


def _elu_bound(module, shape, out_shape, path) -> float:
    return max(1.0, abs(float(module.alpha)))


def _selu_bound(module, shape, out_shape, path) -> float:
    # scale * x for x > 0, scale * alpha * exp(x) (derivative <= scale * alpha) for x <= 0
    return 1.0507009873554804934193349852946 * 1.6732632423543772848170429916717 * (1.0 + FLOAT_SAFETY)


def _prelu_bound(module, shape, out_shape, path) -> float:
    return max(1.0, float(module.weight.detach().abs().max()))


def _hardtanh_bound(module, shape, out_shape, path) -> float:
    return 1.0 if module.max_val > module.min_val else 0.0


_ACTIVATION_CONSTANTS: list[tuple[tuple[type, ...], float]] = [
    (
        (nn.ReLU, nn.ReLU6, nn.Tanh, nn.Softsign, nn.Softplus, nn.Tanhshrink, nn.Softshrink),
        1.0,
    ),
    ((nn.Identity, nn.Flatten, nn.Unflatten, nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d), 1.0),
    ((nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d), 1.0),
    ((nn.Sigmoid,), 0.25),
    ((nn.Hardsigmoid,), 1.0 / 6.0),
    ((nn.Hardswish,), 1.5),
    # Largest |derivative|, rounded up: GELU 1.12899 (tanh approximation 1.12900), SiLU 1.09984, Mish 1.08850.
    ((nn.GELU,), 1.1291),
    ((nn.SiLU,), 1.0999),
    ((nn.Mish,), 1.0886),
]

_HANDLERS: list[tuple[tuple[type, ...], Callable]] = [
    ((nn.Linear,), _linear_bound),
    ((nn.modules.conv._ConvNd,), _conv_bound),
    ((nn.modules.batchnorm._BatchNorm,), _batchnorm_bound),
    (
        (
            nn.MaxPool1d,
            nn.MaxPool2d,
            nn.MaxPool3d,
            nn.AdaptiveMaxPool1d,
            nn.AdaptiveMaxPool2d,
            nn.AdaptiveMaxPool3d,
        ),
        _maxpool_bound,
    ),
    (
        (
            nn.AvgPool1d,
            nn.AvgPool2d,
            nn.AvgPool3d,
            nn.AdaptiveAvgPool1d,
            nn.AdaptiveAvgPool2d,
            nn.AdaptiveAvgPool3d,
        ),
        _nonnegative_linear_bound,
    ),
    (
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
        _copying_pad_bound,
    ),
    ((nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d), _dropout_bound),
    ((nn.LeakyReLU,), _leaky_relu_bound),
    ((nn.ELU, nn.CELU), _elu_bound),
    ((nn.SELU,), _selu_bound),
    ((nn.PReLU,), _prelu_bound),
    ((nn.Hardtanh,), _hardtanh_bound),
    *[(types, _constant(value)) for types, value in _ACTIVATION_CONSTANTS],
]


# ---------------------------------------------------------------------------------------------------
# Lower estimate (tests and reports only)
# ---------------------------------------------------------------------------------------------------


def _jacobian_vector_product(
    module: nn.Module, points: torch.Tensor, direction: torch.Tensor
) -> torch.Tensor:
    """J(points) @ direction by forward-mode automatic differentiation."""
    with fwAD.dual_level():
        outputs = module(fwAD.make_dual(points, direction))
        tangent = fwAD.unpack_dual(outputs).tangent
    return tangent if tangent is not None else torch.zeros_like(outputs)


def lipschitz_lower_estimate(
    module: nn.Module,
    input_shape: Sequence[int],
    *,
    num_points: int = 8,
    iterations: int = 50,
    generator: torch.Generator | None = None,
    inputs: torch.Tensor | None = None,
) -> float:
    """A LOWER estimate of the L2 Lipschitz constant: the largest Jacobian norm found by power iteration.

    At each of ``num_points`` inputs (uniform in [0, 1], or the rows of ``inputs``), runs ``iterations``
    steps of power iteration on ``J(x)^T J(x)`` with Jacobian-vector and vector-Jacobian products, and
    returns the largest ``||J(x) v||`` over unit vectors ``v`` it reached. Every such value is at most the
    true Lipschitz constant (up to float rounding), so this is a lower bound: useful to check that
    :func:`lipschitz_upper_bound` is sound and tight, never a certificate. The module must treat samples
    independently (eval mode for batch norm). Random draws come from ``generator``.
    """
    shape = check_input_shape(input_shape)
    if num_points < 1 or iterations < 1:
        raise ValueError(f"num_points and iterations must be >= 1, got {num_points} and {iterations}")
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    dtype, device = _probe_dtype_device(module)
    if inputs is None:
        points = torch.rand((num_points, *shape), generator=generator, dtype=dtype).to(device)
    else:
        points = inputs.detach().to(dtype=dtype, device=device)
        if tuple(points.shape[1:]) != shape:
            raise ValueError(f"inputs must have shape (B, *{shape}), got {tuple(points.shape)}")
    direction = torch.randn(points.shape, generator=generator, dtype=dtype).to(device)

    def normalized(vectors: torch.Tensor) -> torch.Tensor:
        norms = vectors.flatten(1).norm(dim=1).clamp_min(torch.finfo(vectors.dtype).tiny)
        return vectors / norms.view(-1, *([1] * (vectors.dim() - 1)))

    direction = normalized(direction)
    # Derivatives are taken w.r.t. the input only; freezing the parameters meanwhile also lets layers
    # with derived weights (Björck) reuse them instead of rebuilding them at every product.
    trainable = [parameter for parameter in module.parameters() if parameter.requires_grad]
    try:
        for parameter in trainable:
            parameter.requires_grad_(False)
        with torch.enable_grad():
            tracked = points.clone().requires_grad_(True)
            outputs = module(tracked)  # one graph, reused for every vector-Jacobian product
            for _ in range(iterations):
                image = _jacobian_vector_product(module, points, direction)
                (direction,) = torch.autograd.grad(
                    outputs, tracked, image, retain_graph=True, allow_unused=True
                )
                if direction is None:  # the output does not depend on the input
                    return 0.0
                direction = normalized(direction)
            image = _jacobian_vector_product(module, points, direction)
    finally:
        for parameter in trainable:
            parameter.requires_grad_(True)
    return float(image.detach().flatten(1).norm(dim=1).max())


