"""Operator norms of dense and convolutional layers, computed soundly in float64.

The per-layer bounds that :func:`painwatch.robust.lipschitz_upper_bound` multiplies along a network
(docs/design.md, "The certificates", item 1): the exact largest singular value of a dense weight, and
for a convolution the FFT bound of [Sedghi19] on a grid of at least ``n + k - 1`` per side (zero
padding is a restriction of the circular convolution, so its norm is at most the circular one). Every
bound is an L2 operator norm on one sample, multiplied by ``1 + FLOAT_SAFETY``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "FLOAT_SAFETY",
    "conv_layer_norm_bound",
    "conv_operator_norm_bound",
    "dense_operator_norm",
]

FLOAT_SAFETY = 1e-6
"""Relative safety margin multiplied into every computed (non-exact-constant) layer bound.

The norms are computed in float64 from the layer's weights, whose relative error is ~1e-15 per
operation; the margin covers that with a wide berth. It does not (and cannot) cover the rounding of
the network's own float32 forward pass, which is a property of the evaluation, not of the function.
"""


def dense_operator_norm(weight: torch.Tensor) -> float:
    """The largest singular value of a ``(out, in)`` weight, exact in float64, times ``1 + FLOAT_SAFETY``."""
    return float(torch.linalg.matrix_norm(weight.detach().to(torch.float64), ord=2)) * (1.0 + FLOAT_SAFETY)


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
    *,
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

    Method [Sedghi19]: a circular convolution on an ``N_1 x ... x N_d`` grid is
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



def conv_layer_norm_bound(
    module: nn.modules.conv._ConvNd, input_shape: Sequence[int], output_shape: Sequence[int]
) -> float:
    """:func:`conv_operator_norm_bound` of an ``nn.ConvNd`` / ``nn.ConvTransposeNd`` layer on samples of
    ``input_shape`` ``(C, *spatial)`` giving ``output_shape``.

    A transposed convolution is the adjoint of the convolution with the same weight, stride, padding,
    dilation and groups acting on its *output* grid (that is how PyTorch defines it, output_padding only
    choosing that grid's size); an adjoint has the same norm.
    """
    spatial = module.weight.dim() - 2
    if len(input_shape) != spatial + 1:
        raise ValueError(
            f"{type(module).__name__} needs (C, *spatial) inputs, got shape {tuple(input_shape)}"
        )
    transposed = isinstance(module, nn.modules.conv._ConvTransposeNd)
    kernel = tuple(module.weight.shape[2:])
    padding = [_pad_pair(module.padding, dim, kernel[dim], module.dilation[dim]) for dim in range(spatial)]
    return conv_operator_norm_bound(
        module.weight,
        input_size=tuple(output_shape[1:] if transposed else input_shape[1:]),
        padding=padding,
        dilation=module.dilation,
        groups=module.groups,
        padding_mode=module.padding_mode,
        stride=module.stride,
    )
