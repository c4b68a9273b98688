"""Sound L2 Lipschitz upper bounds, orthogonal (1-Lipschitz) layers, and export to plain layers.

Everything here is about the L2 norm on a single sample: for a network ``f`` taking a batch
``(B, *input_shape)``, ``L`` bounds ``||f(x) - f(y)||_2 <= L ||x - y||_2`` for every pair of samples,
in the units of the input (pixels in [0, 1] for painwatch models).

Public API
----------
- :func:`lipschitz_upper_bound` - a *sound* upper bound, composed layer by layer along ``nn.Sequential``:
  exact spectral norm for dense layers, the FFT (Sedghi et al. 2019) bound for convolutions,
  exact constants for activations, pooling and normalisation layers. Layers it cannot bound raise
  :class:`UnsupportedLayerError` naming the layer. Use it for certificates.
- :func:`lipschitz_lower_estimate` - power iteration on the Jacobian at random points: a *lower*
  estimate of the Lipschitz constant, for tests and reports. Never use it for a certificate.
- :class:`OrthogonalLinear`, :class:`OrthogonalConv2d` (BCOP), :class:`InvertibleDownsampling`,
  :class:`MaxMin`, :class:`GroupSort` - the 1-Lipschitz building blocks of the thesis.
- :func:`export_plain` - a copy of a network with every orthogonal layer replaced by a plain
  ``nn.Linear`` / ``nn.Conv2d`` holding the current weights, for fast inference.

Example::

    net = nn.Sequential(OrthogonalConv2d(1, 8, 3), MaxMin(), OrthogonalConv2d(8, 16, 3, stride=2), MaxMin(),
                        nn.Flatten(), OrthogonalLinear(16 * 14 * 14, 10))
    ...  # train
    plain = export_plain(net).eval()
    L = lipschitz_upper_bound(plain, (1, 28, 28))  # 1.000001...: sound, for the Lipschitz-margin certificate
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn

__all__ = [
    "FLOAT_SAFETY",
    "GroupSort",
    "InvertibleDownsampling",
    "MaxMin",
    "OrthogonalConv2d",
    "OrthogonalLinear",
    "UnsupportedLayerError",
    "bjorck_orthonormalize",
    "conv_operator_norm_bound",
    "export_plain",
    "lipschitz_lower_estimate",
    "lipschitz_upper_bound",
]

FLOAT_SAFETY = 1e-6
"""Relative safety margin multiplied into every computed (non-exact-constant) layer bound.

The norms are computed in float64 from the layer's weights, whose relative error is ~1e-15 per
operation; the margin covers that with a wide berth. It does not (and cannot) cover the rounding of
the network's own float32 forward pass, which is a property of the evaluation, not of the function.
"""

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
        :func:`conv_operator_norm_bound`) and their transposes, batch norm in eval mode, a
        normalisation layer with ``mean``/``std`` attributes computing ``(x - mean) / std``,
        max/average pooling (plain and adaptive), padding layers, Flatten/Unflatten/Identity/Dropout,
        the usual activations (ReLU, LeakyReLU, ELU, Tanh, Sigmoid, GELU, SiLU, ...), and the layers
        of this module. Any module may declare its own bound by defining a method
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
    shape = _check_input_shape(input_shape)
    bound, _ = _bound(module, shape, _ROOT)
    return float(bound)


def _check_input_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    if isinstance(input_shape, torch.Size):
        input_shape = tuple(input_shape)
    if not isinstance(input_shape, (tuple, list)) or len(input_shape) == 0:
        raise ValueError(
            f"input_shape must be a non-empty tuple of positive ints like (C, H, W), got {input_shape!r}"
        )
    for size in input_shape:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"input_shape must contain positive ints, got {tuple(input_shape)!r}")
    return tuple(int(size) for size in input_shape)


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
    weight = module.weight.detach().to(torch.float64)
    return float(torch.linalg.matrix_norm(weight, ord=2)) * (1.0 + FLOAT_SAFETY)


def _pad_pair(padding, dim: int, kernel: int, dilation: int) -> tuple[int, int]:
    if isinstance(padding, str):
        if padding == "valid":
            return 0, 0
        if padding == "same":  # as torch.nn.modules.conv._ConvNd: the extra pixel goes right
            total = dilation * (kernel - 1)
            return total // 2, total - total // 2
        raise ValueError(f"unknown padding {padding!r}")
    return int(padding[dim]), int(padding[dim])


def _padding_multiplicity(length: int, left: int, right: int, mode: str) -> int:
    """Largest number of copies of one input pixel made by padding a 1-D signal (mode != zeros)."""
    index = torch.arange(length, dtype=torch.float64).reshape(1, 1, length)
    padded = F.pad(index, (left, right), mode=mode).reshape(-1).round().long()
    return int(torch.bincount(padded, minlength=length).max())


def conv_operator_norm_bound(
    weight: torch.Tensor,
    input_size: Sequence[int],
    padding: Sequence[tuple[int, int]],
    dilation: Sequence[int] | None = None,
    groups: int = 1,
    padding_mode: str = "zeros",
    stride: Sequence[int] | None = None,
) -> float:
    """Upper bound of the L2 operator norm of an ``nn.ConvNd`` convolution, computed in float64.

    ``weight`` has the ``nn.ConvNd`` layout ``(c_out, c_in / groups, *kernel)``; ``input_size`` is the
    spatial size of the input; ``padding`` gives ``(left, right)`` per spatial dimension.

    Method (Sedghi, Gupta, Long 2019): a circular convolution on an ``N_1 x ... x N_d`` grid is
    block-diagonalised by the DFT, so its norm is exactly the largest spectral norm of the
    ``c_out x c_in`` matrices of kernel DFTs over the grid frequencies. A zero-padded convolution of an
    ``n``-pixel signal is the *valid* correlation of the padded signal of length ``M = n + left + right``,
    which never wraps on any grid ``N >= M``: it is a restriction (a subset of output rows, after an
    isometric embedding of the input) of the circular convolution on that grid, so its norm is at most
    the circular one. Circular padding whose outputs do not repeat a position is exactly such a
    restriction on the input grid itself (tight bound). Other padding modes copy pixels: the padding
    map is a row selection whose norm is the square root of the largest number of copies of one pixel
    (computed exactly), times the bound of the valid correlation.

    Stride ``s`` (per dimension): on a grid ``N`` divisible by ``s``, the strided circular correlation
    equals a stride-1 circular correlation on the ``N / s`` grid of the ``s`` polyphase components of
    the input (an orthogonal rearrangement) with the polyphase components of the kernel, so the bound
    is the largest norm of the ``c_out x (c_in * s_1 * ... * s_d)`` symbol matrices (exact for circular
    convolutions, not the looser bound of the stride-1 convolution). Groups give a block-diagonal matrix
    (the maximum over groups); dilation spaces the taps.

    Returns the bound multiplied by ``1 + FLOAT_SAFETY``.
    """
    weight = weight.detach().to(device="cpu", dtype=torch.float64)
    spatial = weight.dim() - 2
    if spatial < 1:
        raise ValueError(f"convolution weight must have at least 3 dims, got shape {tuple(weight.shape)}")
    dilation = tuple(int(d) for d in dilation) if dilation is not None else (1,) * spatial
    stride = tuple(int(s) for s in stride) if stride is not None else (1,) * spatial
    if any(len(values) != spatial for values in (input_size, padding, dilation, stride)):
        raise ValueError(
            f"weight of shape {tuple(weight.shape)} needs {spatial} spatial sizes, paddings, dilations and"
            f" strides, got input_size={tuple(input_size)}, padding={tuple(padding)},"
            f" dilation={tuple(dilation)}, stride={tuple(stride)}"
        )
    if any(value < 1 for value in (*dilation, *stride)):
        raise ValueError(f"dilation and stride must be >= 1, got dilation={dilation}, stride={stride}")
    c_out, c_in_per_group = weight.shape[:2]
    if groups < 1 or c_out % groups != 0:
        raise ValueError(f"groups={groups} must divide c_out={c_out}")
    kernel = tuple(weight.shape[2:])

    grids: list[int] = []
    copies = 1
    for dim in range(spatial):
        n, (left, right), k, d, s = (
            int(input_size[dim]),
            padding[dim],
            kernel[dim],
            dilation[dim],
            stride[dim],
        )
        k_eff = d * (k - 1) + 1
        padded = n + left + right
        if padded < k_eff:
            raise ValueError(
                f"padded input size {padded} is smaller than the (dilated) kernel {k_eff} in dim {dim}"
            )
        outputs = (padded - k_eff) // s + 1
        if padding_mode == "zeros":
            grid = padded
        elif padding_mode == "circular" and n % s == 0 and outputs <= n // s:
            grid = n  # a cyclic shift of the input, then distinct rows of the circular correlation on n
        else:
            copies *= _padding_multiplicity(n, left, right, padding_mode)
            grid = padded
        if k_eff == 1:
            grid = 1  # a one-tap symbol is the same at every frequency of every grid
        grids.append(s * -(-grid // s))  # round up to a multiple of the stride (still >= the length)

    # Per dimension, D[f, r, t] = exp(-2 pi i f q_t / (N / s)) when tap t lands on phase r, where
    # d * t = s * q_t + r. The last dimension only needs half of the frequencies: a real kernel's
    # symbol at -f is the complex conjugate of that at f (same singular values).
    dfts = []
    for dim in range(spatial):
        s = stride[dim]
        coarse = grids[dim] // s
        frequencies = torch.arange(coarse // 2 + 1 if dim == spatial - 1 else coarse, dtype=torch.float64)
        offsets = torch.arange(kernel[dim]) * dilation[dim]
        quotients, phases = (offsets // s).to(torch.float64), offsets % s
        waves = torch.exp(torch.outer(frequencies, quotients) * (-2j * math.pi / coarse))  # (F, k)
        selector = (phases.unsqueeze(0) == torch.arange(s).unsqueeze(1)).to(torch.complex128)  # (s, k)
        dfts.append(waves.unsqueeze(1) * selector.unsqueeze(0))  # (F, s, k)

    blocks = weight.reshape(groups, c_out // groups, c_in_per_group, *kernel).to(torch.complex128)
    # Transform the trailing dimensions once, then sweep the first one in chunks to bound memory.
    tail = blocks
    for dim in range(spatial - 1, 0, -1):
        tail = torch.tensordot(tail, dfts[dim].reshape(-1, kernel[dim]), dims=([3 + dim], [1]))
        tail = tail.movedim(-1, 3 + dim)
    per_frequency = groups * (c_out // groups) * c_in_per_group * stride[0]
    for dim in range(1, spatial):
        per_frequency *= tail.shape[3 + dim]
    chunk = max(1, (1 << 22) // per_frequency)
    freq_axes = [3 + 2 * dim for dim in range(spatial)]
    phase_axes = [4 + 2 * dim for dim in range(spatial)]
    columns = c_in_per_group * math.prod(stride)
    best = 0.0
    for start in range(0, dfts[0].shape[0], chunk):
        first = dfts[0][start : start + chunk]
        symbol = torch.tensordot(tail, first.reshape(-1, kernel[0]), dims=([3], [1])).movedim(-1, 3)
        split = [groups, c_out // groups, c_in_per_group]
        for dim in range(spatial):
            split += [first.shape[0] if dim == 0 else dfts[dim].shape[0], stride[dim]]
        symbol = symbol.reshape(split).permute(*freq_axes, 0, 1, 2, *phase_axes)
        symbol = symbol.reshape(*symbol.shape[: spatial + 2], columns)  # (*freqs, g, o, i * phases)
        best = max(best, float(torch.linalg.matrix_norm(symbol, ord=2).max()))
    return best * math.sqrt(copies) * (1.0 + FLOAT_SAFETY)


def _conv_bound(module: nn.modules.conv._ConvNd, shape, out_shape, path) -> float:
    """FFT bound of a convolution. A transposed convolution is the adjoint of the convolution with the
    same weight, stride, padding, dilation and groups acting on its *output* grid (that is how PyTorch
    defines it, output_padding only choosing that grid's size); an adjoint has the same norm."""
    spatial = module.weight.dim() - 2
    if len(shape) != spatial + 1:
        raise ValueError(
            f"layer '{path}' ({type(module).__name__}) needs (C, *spatial) inputs, got shape {shape}"
        )
    transposed = isinstance(module, nn.modules.conv._ConvTransposeNd)
    kernel = tuple(module.weight.shape[2:])
    padding = [_pad_pair(module.padding, dim, kernel[dim], module.dilation[dim]) for dim in range(spatial)]
    return conv_operator_norm_bound(
        module.weight,
        out_shape[1:] if transposed else shape[1:],
        padding,
        dilation=module.dilation,
        groups=module.groups,
        padding_mode=module.padding_mode,
        stride=module.stride,
    )


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
    shape = _check_input_shape(input_shape)
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


# ---------------------------------------------------------------------------------------------------
# Orthogonal layers
# ---------------------------------------------------------------------------------------------------


def bjorck_orthonormalize(
    matrix: torch.Tensor, iterations: int = 20, early_stop: bool = True
) -> torch.Tensor:
    """Closest (semi-)orthogonal matrix by first-order Björck–Bowie iterations (Anil et al. 2019).

    ``matrix`` is ``(..., m, n)``. It is first divided by a sound upper bound of its spectral norm,
    the smaller of the Frobenius norm and ``sqrt(max row sum of |G|)`` with ``G`` the Gram matrix
    (``||W||^2 = ||G||_2 <= ||G||_inf`` for symmetric ``G``; tight when ``W`` is close to orthogonal up to
    a scale, as a trained parameter usually is, so few iterations are needed). Every singular value
    then lies in (0, 1], where ``W <- W (3/2 I - 1/2 W^T W)`` converges (quadratically near 1) to the
    orthogonal polar factor: ``W^T W = I`` for tall matrices (orthonormal columns), ``W W^T = I`` for
    wide ones. Differentiable. Exactly-zero singular values stay zero (a rank-deficient input stays
    so): check the residual, e.g. with :meth:`OrthogonalLinear.orthogonality_residual`.

    ``iterations`` is the maximum; with ``early_stop`` the loop ends after the step taken from a
    Frobenius residual ``||G - I||_F <= sqrt(eps)`` of the current dtype, which leaves a residual at
    float precision (quadratic convergence), and saves the remaining steps.
    """
    if matrix.dim() < 2:
        raise ValueError(f"matrix must have at least 2 dims, got shape {tuple(matrix.shape)}")
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
        raise ValueError(f"iterations must be a non-negative int, got {iterations!r}")
    rows, cols = matrix.shape[-2:]
    if matrix.numel() == 0:
        return matrix
    tall = rows >= cols

    def gram_of(current: torch.Tensor) -> torch.Tensor:
        return current.mT @ current if tall else current @ current.mT

    gram = gram_of(matrix)
    squared_frobenius = gram.diagonal(dim1=-2, dim2=-1).sum(-1)
    squared_bound = torch.minimum(squared_frobenius, gram.abs().sum(-1).amax(-1))
    squared_bound = squared_bound.clamp_min(torch.finfo(matrix.dtype).tiny)[..., None, None]
    current = matrix / torch.sqrt(squared_bound)
    gram = gram / squared_bound  # the Gram of the scaled matrix, reused by the first iteration
    identity = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    # Near convergence one step maps a residual e = ||G - I|| to about 3/4 e^2: once e is below
    # sqrt(machine epsilon), that step reaches float precision and later ones change nothing.
    converged = math.sqrt(torch.finfo(matrix.dtype).eps)
    for index in range(iterations):
        if index > 0:
            gram = gram_of(current)
        current = 1.5 * current - 0.5 * (current @ gram if tall else gram @ current)
        if early_stop and float(torch.linalg.matrix_norm(gram.detach() - identity).max()) <= converged:
            break
    return current


def _orthogonality_residual(matrix: torch.Tensor) -> float:
    """Spectral norm of W^T W - I (tall) or W W^T - I (wide), in float64; max over a batch."""
    matrix = matrix.detach().to(torch.float64)
    rows, cols = matrix.shape[-2:]
    if matrix.numel() == 0:
        return 0.0
    gram = matrix.mT @ matrix if rows >= cols else matrix @ matrix.mT
    identity = torch.eye(gram.shape[-1], dtype=torch.float64, device=gram.device)
    return float(torch.linalg.matrix_norm(gram - identity, ord=2).max())


class _CachedWeight:
    """Recomputes a derived weight only when autograd needs it or a parameter changed (eval speed)."""

    def __init__(self) -> None:
        self.key = None
        self.value: torch.Tensor | None = None

    def get(self, parameters: list[torch.Tensor], compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        needs_graph = torch.is_grad_enabled() and any(p.requires_grad for p in parameters)
        if needs_graph:
            self.key, self.value = None, None
            return compute()
        key = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in parameters)
        if self.key != key or self.value is None:
            with torch.no_grad():
                self.value = compute()
            self.key = key
        return self.value


def _check_positive_int(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class OrthogonalLinear(nn.Module):
    """Dense layer whose weight is (semi-)orthogonal by construction: 1-Lipschitz, norm preserving when
    ``in_features <= out_features``.

    ``method="bjorck"`` (default, as in the thesis): the weight is the Björck orthonormalisation
    (:func:`bjorck_orthonormalize`, at most ``bjorck_iters`` iterations, fewer once converged) of an
    unconstrained parameter initialised orthogonal. ``method="matrix_exp"``: PyTorch's exact parametrisation
    ``torch.nn.utils.parametrizations.orthogonal(..., orthogonal_map="matrix_exp")`` (exact up to float
    rounding, maintained upstream; slower for large matrices).

    Shapes follow ``nn.Linear``: ``(B, in_features) -> (B, out_features)``, weight ``(out, in)``.
    With ``out >= in`` the columns are orthonormal (``W^T W = I``, ``||W x|| = ||x||``); with
    ``out < in`` the rows are (``W W^T = I``, a projection, ``||W x|| <= ||x||``).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        bjorck_iters: int = 20,
        method: str = "bjorck",
        residual_tolerance: float = 1e-3,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.in_features = _check_positive_int("in_features", in_features)
        self.out_features = _check_positive_int("out_features", out_features)
        if method not in ("bjorck", "matrix_exp"):
            raise ValueError(f"method must be 'bjorck' or 'matrix_exp', got {method!r}")
        if isinstance(bjorck_iters, bool) or not isinstance(bjorck_iters, int) or bjorck_iters < 0:
            raise ValueError(f"bjorck_iters must be a non-negative int, got {bjorck_iters!r}")
        if not 0 < residual_tolerance < 1:
            raise ValueError(f"residual_tolerance must be in (0, 1), got {residual_tolerance!r}")
        self.method = method
        self.bjorck_iters = bjorck_iters
        self.residual_tolerance = residual_tolerance
        initial = torch.empty(out_features, in_features)
        nn.init.orthogonal_(initial, generator=generator)
        if method == "bjorck":
            self.raw_weight = nn.Parameter(initial)
        else:
            self.parametrized = nn.Linear(in_features, out_features, bias=False)
            with torch.no_grad():
                self.parametrized.weight.copy_(initial)
            nn.utils.parametrizations.orthogonal(self.parametrized, "weight", orthogonal_map="matrix_exp")
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self._cache = _CachedWeight()

    @property
    def weight(self) -> torch.Tensor:
        """The (semi-)orthogonal ``(out_features, in_features)`` matrix the layer applies."""
        if self.method == "matrix_exp":
            return self.parametrized.weight
        return self._cache.get(
            [self.raw_weight], lambda: bjorck_orthonormalize(self.raw_weight, self.bjorck_iters)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def orthogonality_residual(self) -> float:
        """``||W^T W - I||_2`` (``||W W^T - I||_2`` when wide), in float64, of the weight applied now."""
        return _orthogonality_residual(self.weight)

    def lipschitz_upper_bound(self, input_shape: Sequence[int]) -> float:
        """Sound bound: ``sqrt(1 + residual)`` (since ``||W||^2 = ||W^T W|| <= 1 + ||W^T W - I||``), i.e. 1
        up to the construction's residual; when the residual exceeds ``residual_tolerance`` (Björck did
        not converge), the exact spectral norm of the weight instead."""
        shape = _check_input_shape(input_shape)
        if shape[-1] != self.in_features:
            raise ValueError(
                f"OrthogonalLinear expects inputs (..., {self.in_features}), got sample shape {shape}"
            )
        residual = self.orthogonality_residual()
        if residual <= self.residual_tolerance:
            return math.sqrt(1.0 + residual) * (1.0 + FLOAT_SAFETY)
        weight = self.weight.detach().to(torch.float64)
        return float(torch.linalg.matrix_norm(weight, ord=2)) * (1.0 + FLOAT_SAFETY)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, method={self.method!r}, bjorck_iters={self.bjorck_iters}"
        )


class InvertibleDownsampling(nn.Module):
    """Pixel unshuffle by ``factor``: ``(B, C, H, W) -> (B, C * factor^2, H / factor, W / factor)``.

    A permutation of the entries, hence orthogonal (norm preserving, Lipschitz constant exactly 1);
    the stride-2 substitute of orthogonal networks (Li et al. 2019). ``inverse`` undoes it.
    """

    def __init__(self, factor: int = 2) -> None:
        super().__init__()
        self.factor = _check_positive_int("factor", factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[-1] % self.factor or x.shape[-2] % self.factor:
            raise ValueError(
                f"InvertibleDownsampling(factor={self.factor}) needs (B, C, H, W) inputs with H and W"
                f" divisible by {self.factor}, got shape {tuple(x.shape)}"
            )
        return F.pixel_unshuffle(x, self.factor)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return F.pixel_shuffle(y, self.factor)

    def lipschitz_upper_bound(self, input_shape: Sequence[int]) -> float:
        return 1.0

    def extra_repr(self) -> str:
        return f"factor={self.factor}"


class GroupSort(nn.Module):
    """Sorts consecutive groups of ``group_size`` channels (dimension 1), ascending (Anil et al. 2019).

    Its Jacobian is a permutation matrix almost everywhere: 1-Lipschitz and gradient-norm preserving.
    The channel count must be divisible by ``group_size``.
    """

    def __init__(self, group_size: int = 2) -> None:
        super().__init__()
        self.group_size = _check_positive_int("group_size", group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or x.shape[1] % self.group_size:
            raise ValueError(
                f"GroupSort(group_size={self.group_size}) needs (B, C, ...) inputs with C divisible by "
                f"{self.group_size}, got shape {tuple(x.shape)}"
            )
        grouped = x.reshape(x.shape[0], x.shape[1] // self.group_size, self.group_size, *x.shape[2:])
        return grouped.sort(dim=2).values.reshape(x.shape)

    def lipschitz_upper_bound(self, input_shape: Sequence[int]) -> float:
        return 1.0

    def extra_repr(self) -> str:
        return f"group_size={self.group_size}"


class MaxMin(nn.Module):
    """Pairs consecutive channels ``(a, b)`` and outputs ``(max(a, b), min(a, b))``.

    GroupSort with groups of 2 (in descending order): 1-Lipschitz, gradient-norm preserving. The
    channel count (dimension 1) must be even.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or x.shape[1] % 2:
            raise ValueError(f"MaxMin needs (B, C, ...) inputs with an even C, got shape {tuple(x.shape)}")
        pairs = x.reshape(x.shape[0], x.shape[1] // 2, 2, *x.shape[2:])
        first, second = pairs.unbind(dim=2)
        return torch.stack((torch.maximum(first, second), torch.minimum(first, second)), dim=2).reshape(
            x.shape
        )

    def lipschitz_upper_bound(self, input_shape: Sequence[int]) -> float:
        return 1.0


def _block_convolve(
    kernel: torch.Tensor, first: torch.Tensor, second: torch.Tensor, axis: int
) -> torch.Tensor:
    """Block convolution of ``kernel`` (c, c, a, b) with the two-tap kernel ``[first, second]`` along
    ``axis`` (2 = height, 3 = width): ``C[t + s] = K[t] @ B[s]``, so that correlating with ``C`` equals
    correlating with ``B`` and then with ``K`` (the symbols multiply)."""
    out_shape = list(kernel.shape)
    out_shape[axis] += 1
    result = kernel.new_zeros(out_shape)
    head = [slice(None)] * 4
    tail = [slice(None)] * 4
    head[axis] = slice(0, kernel.shape[axis])
    tail[axis] = slice(1, kernel.shape[axis] + 1)
    result[tuple(head)] = result[tuple(head)] + torch.einsum("oikl,ij->ojkl", kernel, first)
    result[tuple(tail)] = result[tuple(tail)] + torch.einsum("oikl,ij->ojkl", kernel, second)
    return result


class OrthogonalConv2d(nn.Module):
    """Orthogonal 2-D convolution by Block Convolution Orthogonal Parameterization (BCOP, Li et al. 2019).

    The ``c x c x k x k`` kernel (``c = max(in_channels * stride^2, out_channels)``) is the block
    convolution of a ``c x c`` orthogonal matrix ``H`` with ``k - 1`` horizontal and ``k - 1`` vertical
    two-tap kernels ``[P, I - P]``, each ``P = Q Q^T`` a symmetric projector with ``Q`` (``c x c/2``)
    orthonormalised by Björck. Each factor's DFT symbol is unitary at every frequency, so the circular
    convolution is orthogonal on any grid; with zero padding (the default, 'same' size) the layer is a
    restriction of it: 1-Lipschitz, and norm preserving away from the border.

    Channel mismatch: when ``out_channels > in_channels * stride^2`` the input is zero-padded in channels
    (an isometry; the layer stays norm preserving); when smaller, the first ``out_channels`` output
    channels are kept (a projection; 1-Lipschitz only). Both amount to slicing the square kernel, so
    ``.weight`` is a plain ``(out_channels, in_channels * stride^2, k, k)`` kernel.

    ``stride > 1``: :class:`InvertibleDownsampling` (pixel unshuffle, orthogonal) first, then the
    stride-1 orthogonal convolution on ``in_channels * stride^2`` channels; ``.weight`` is the kernel of
    that second step. Odd ``kernel_size`` only (symmetric 'same' padding). ``padding_mode`` is
    ``"zeros"`` or ``"circular"``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        bias: bool = False,
        padding_mode: str = "zeros",
        bjorck_iters: int = 20,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.in_channels = _check_positive_int("in_channels", in_channels)
        self.out_channels = _check_positive_int("out_channels", out_channels)
        self.kernel_size = _check_positive_int("kernel_size", kernel_size)
        self.stride = _check_positive_int("stride", stride)
        if kernel_size % 2 == 0:
            raise ValueError(
                f"OrthogonalConv2d needs an odd kernel_size (symmetric padding), got {kernel_size}"
            )
        if padding_mode not in ("zeros", "circular"):
            raise ValueError(f"padding_mode must be 'zeros' or 'circular', got {padding_mode!r}")
        if isinstance(bjorck_iters, bool) or not isinstance(bjorck_iters, int) or bjorck_iters < 0:
            raise ValueError(f"bjorck_iters must be a non-negative int, got {bjorck_iters!r}")
        self.padding_mode = padding_mode
        self.bjorck_iters = bjorck_iters
        self.conv_in_channels = in_channels * stride * stride
        self.channels = max(self.conv_in_channels, out_channels)
        self.projector_rank = self.channels // 2
        num_projectors = 2 * (kernel_size - 1)
        raw_orthogonal = torch.empty(self.channels, self.channels)
        nn.init.orthogonal_(raw_orthogonal, generator=generator)
        raw_projectors = torch.empty(num_projectors, self.channels, self.projector_rank)
        for index in range(num_projectors):
            if self.projector_rank > 0:
                nn.init.orthogonal_(raw_projectors[index], generator=generator)
        self.raw_orthogonal = nn.Parameter(raw_orthogonal)
        self.raw_projectors = nn.Parameter(raw_projectors)
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.downsample = InvertibleDownsampling(stride) if stride > 1 else None
        self._cache = _CachedWeight()

    def _factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        orthogonal = bjorck_orthonormalize(self.raw_orthogonal, self.bjorck_iters)
        if self.projector_rank == 0:
            bases = self.raw_projectors
        else:
            bases = bjorck_orthonormalize(self.raw_projectors, self.bjorck_iters)
        return orthogonal, bases

    def _full_kernel(self) -> torch.Tensor:
        orthogonal, bases = self._factors()
        identity = torch.eye(self.channels, dtype=orthogonal.dtype, device=orthogonal.device)
        kernel = orthogonal.reshape(self.channels, self.channels, 1, 1)
        half = self.kernel_size - 1
        for index in range(bases.shape[0]):
            projector = bases[index] @ bases[index].mT
            kernel = _block_convolve(kernel, projector, identity - projector, axis=3 if index < half else 2)
        return kernel

    @property
    def weight(self) -> torch.Tensor:
        """The ``(out_channels, in_channels * stride^2, k, k)`` kernel applied (after downsampling)."""
        return self._cache.get(
            [self.raw_orthogonal, self.raw_projectors],
            lambda: self._full_kernel()[: self.out_channels, : self.conv_in_channels],
        )

    @property
    def padding(self) -> int:
        return (self.kernel_size - 1) // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"OrthogonalConv2d expects (B, {self.in_channels}, H, W) inputs, got shape {tuple(x.shape)}"
            )
        if self.downsample is not None:
            x = self.downsample(x)
        if self.padding_mode == "circular" and self.padding > 0:
            x = F.pad(x, (self.padding,) * 4, mode="circular")
            return F.conv2d(x, self.weight, self.bias)
        return F.conv2d(x, self.weight, self.bias, padding=self.padding)

    def orthogonality_residual(self) -> float:
        """Largest ``||Q^T Q - I||_2`` over the Björck factors (``H`` and every ``Q``), in float64.

        Small residuals mean the projectors are projectors and ``H`` is orthogonal, so the kernel is
        orthogonal up to that error; :meth:`lipschitz_upper_bound` does not rely on it.
        """
        orthogonal, bases = self._factors()
        residual = _orthogonality_residual(orthogonal)
        if self.projector_rank > 0:
            residual = max(residual, _orthogonality_residual(bases))
        return residual

    def lipschitz_upper_bound(self, input_shape: Sequence[int]) -> float:
        """FFT bound (:func:`conv_operator_norm_bound`) of the kernel actually applied, on this input
        size: sound for the current weights whatever the residual, and 1 up to float error when the
        construction converged. Downsampling is orthogonal and does not change it."""
        shape = _check_input_shape(input_shape)
        if (
            len(shape) != 3
            or shape[0] != self.in_channels
            or shape[1] % self.stride
            or shape[2] % self.stride
        ):
            raise ValueError(
                f"OrthogonalConv2d expects samples ({self.in_channels}, H, W) with H, W divisible by "
                f"{self.stride}, got {shape}"
            )
        size = (shape[1] // self.stride, shape[2] // self.stride)
        padding = [(self.padding, self.padding)] * 2
        return conv_operator_norm_bound(self.weight, size, padding, padding_mode=self.padding_mode)

    def to_plain(self) -> nn.Module:
        """An ``nn.Conv2d`` (preceded by the downsampling when ``stride > 1``) with the current kernel."""
        conv = nn.Conv2d(
            self.conv_in_channels,
            self.out_channels,
            self.kernel_size,
            padding=self.padding,
            padding_mode=self.padding_mode,
            bias=self.bias is not None,
        )
        with torch.no_grad():
            conv.weight.copy_(self.weight.detach())
            if self.bias is not None:
                conv.bias.copy_(self.bias.detach())
        conv.to(device=self.raw_orthogonal.device, dtype=self.raw_orthogonal.dtype)
        if self.downsample is not None:
            return nn.Sequential(InvertibleDownsampling(self.stride), conv)
        return conv

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"bias={self.bias is not None}, padding_mode={self.padding_mode!r}, "
            f"bjorck_iters={self.bjorck_iters}"
        )


def _plain_linear(layer: OrthogonalLinear) -> nn.Linear:
    weight = layer.weight.detach()
    linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
    linear.to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if layer.bias is not None:
            linear.bias.copy_(layer.bias.detach())
    return linear


def export_plain(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` with every :class:`OrthogonalLinear` replaced by an ``nn.Linear`` and
    every :class:`OrthogonalConv2d` by an ``nn.Conv2d`` (behind an :class:`InvertibleDownsampling` when
    strided) holding the current weights. Outputs are unchanged up to float rounding; the training flag
    is kept; ``module`` itself is not modified. The copy has no Björck cost per forward."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")

    def replacement(layer: nn.Module) -> nn.Module | None:
        if isinstance(layer, OrthogonalLinear):
            return _plain_linear(layer)
        if isinstance(layer, OrthogonalConv2d):
            return layer.to_plain()
        return None

    with torch.no_grad():
        root = replacement(module)
        if root is not None:
            return root.train(module.training)
        copied = copy.deepcopy(module)

        def replace_children(parent: nn.Module) -> None:
            for name, child in parent.named_children():
                plain = replacement(child)
                if plain is not None:
                    setattr(parent, name, plain.train(child.training))
                else:
                    replace_children(child)

        replace_children(copied)
    return copied
