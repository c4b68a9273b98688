"""1-Lipschitz layers that are cheaper than BCOP, and residual blocks with a proven bound.

- :class:`AOLConv2d`, :class:`AOLLinear`: almost-orthogonal layers [Prach22]. The applied weight is
  ``W D`` with ``D = diag(sum_j |W^T W|_ij)^(-1/2)`` (for a convolution, ``W^T W`` is the
  ``c_in x c_in`` kernel ``K^T * K`` and the sum runs over its taps too), which makes ``||W D|| <= 1``
  (Gershgorin on ``D W^T W D``). One cheap rescaling per forward instead of Björck iterations.
- :class:`SLLConv2d`, :class:`SLLLinear`: the SDP-based Lipschitz residual layer [Araujo23],
  ``h(x) = x - 2 W T^-1 relu(W^T x + b)`` with ``T = diag(sum_j |W^T W|_ij q_j / q_i)`` (``q > 0``
  learnt), so that ``T - W^T W`` is diagonally dominant, hence ``T >= W^T W``.
- :class:`ChannelPad`: zero channels appended (an isometry), to widen the 3 colour channels.

Every layer declares ``lipschitz_upper_bound(input_shape)``, computed from the weights it applies now
(docs/design.md, "Lipschitz networks for face crops"); none relies on the construction being exact:

- AOL: the FFT bound of the applied kernel [Sedghi19] (exact SVD for the dense layer); at most 1 by
  [Prach22], and often less.
- SLL: for ``ReLU``, ``relu(a) - relu(b) = d (a - b)`` with ``d`` in ``[0, 1]`` per coordinate, so
  ``h(x) - h(y) = (I - 2 A* T^-1 D A)(x - y)`` with ``A`` the map ``x -> W^T x`` (a convolution),
  ``A*`` its adjoint (the transposed convolution with the same kernel and padding) and ``D`` diagonal in
  ``[0, 1]``. ``A* (T^-1 D) A`` is symmetric with eigenvalues in ``[0, rho^2]``,
  ``rho = ||T^(-1/2) A||``, so the Jacobian's eigenvalues lie in ``[1 - 2 rho^2, 1]`` and
  ``L <= max(1, 2 rho^2 - 1)``. ``rho`` is the FFT bound of the kernel scaled by ``T^(-1/2)``, and
  ``rho <= 1`` whenever ``T >= W^T W`` [Araujo23, Thm. 3]: the bound is then exactly 1.

:func:`painwatch.robust.export_plain` turns AOL layers into ``nn.Conv2d`` / ``nn.Linear`` and SLL layers
into :class:`PlainSLL` (the same residual map with its kernel and scale fixed, no per-call rescaling).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from painwatch.robust.layers import _CachedWeight
from painwatch.robust.spectral import FLOAT_SAFETY, conv_operator_norm_bound, dense_operator_norm
from painwatch.robust.validation import check_input_shape

__all__ = [
    "AOLConv2d",
    "AOLLinear",
    "ChannelPad",
    "PlainSLL",
    "SLLConv2d",
    "SLLLinear",
    "aol_rescale",
    "sdp_residual_bound",
]

_EPS = 1e-6
"""Added to every rescaling denominator so that a zero column or row stays finite (it then stays 0)."""


def _check_positive_int(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _check_kernel_size(layer: str, kernel_size: int) -> int:
    _check_positive_int("kernel_size", kernel_size)
    if kernel_size % 2 == 0:
        raise ValueError(f"{layer} needs an odd kernel_size ('same' padding), got {kernel_size}")
    return kernel_size


def _gram_kernel(kernel: torch.Tensor, over: str) -> torch.Tensor:
    """The kernel of ``K^T K`` (``over="inputs"``: ``c_in x c_in``, summed over output channels) or of
    ``K K^T`` (``over="outputs"``: ``c_out x c_out``), with all ``2k - 1`` taps of each spatial dim.
    A dense weight ``(out, in)`` is a kernel without spatial dims."""
    if kernel.dim() == 2:
        return kernel.mT @ kernel if over == "inputs" else kernel @ kernel.mT
    stacked = kernel.transpose(0, 1) if over == "inputs" else kernel
    pad = [size - 1 for size in kernel.shape[2:]]
    return F.conv2d(stacked, stacked, padding=pad)


def aol_rescale(weight: torch.Tensor) -> torch.Tensor:
    """``W D`` with ``D = diag(sum_j |W^T W|_ij + eps)^(-1/2)`` per input channel [Prach22].

    ``weight`` is a dense ``(out, in)`` matrix or a convolution kernel ``(out, in, k, k)`` (then ``W^T W``
    is the kernel ``K^T * K`` and the sum also runs over its taps). The result has operator norm at
    most 1 on any input size (zero or circular padding). Differentiable.
    """
    if weight.dim() not in (2, 4):
        raise ValueError(
            f"aol_rescale needs a (out, in) or (out, in, k, k) weight, got {tuple(weight.shape)}"
        )
    gram = _gram_kernel(weight, "inputs").abs()
    sums = gram.sum(dim=tuple(d for d in range(gram.dim()) if d != 0))
    scale = (sums + _EPS).rsqrt()
    return weight * scale.reshape(1, -1, *([1] * (weight.dim() - 2)))


def sdp_residual_bound(weight: torch.Tensor, scale: torch.Tensor, input_shape: Sequence[int]) -> float:
    """Sound L2 bound of ``h(x) = x - A* diag(scale) relu(A x + b)`` with ``A`` the dense map ``W`` or
    the 'same' zero-padded convolution with kernel ``W`` on samples of ``input_shape``, ``A*`` its adjoint
    and ``scale >= 0`` per output channel of ``A``: ``max(1, rho^2 - 1)`` with
    ``rho = ||diag(sqrt(scale)) A||`` (the exact SVD or the FFT bound [Sedghi19]). See the module
    docstring for the proof; an SLL layer has ``scale = 2 / T``."""
    scale = scale.detach().to(torch.float64)
    if bool((scale < 0).any()) or not bool(torch.isfinite(scale).all()):
        raise ValueError(f"scale must be finite and >= 0, got {scale.tolist()[:8]}...")
    root = scale.sqrt().reshape(-1, *([1] * (weight.dim() - 1)))
    scaled = weight.detach().to(torch.float64) * root
    if weight.dim() == 2:
        rho = dense_operator_norm(scaled)
    else:
        size = tuple(int(v) for v in input_shape[1:])
        padding = [((k - 1) // 2, (k - 1) // 2) for k in weight.shape[2:]]
        rho = conv_operator_norm_bound(scaled, input_size=size, padding=padding)
    return max(1.0, rho * rho - 1.0) * (1.0 + FLOAT_SAFETY)


def _check_conv_input(layer: str, shape: tuple[int, ...], channels: int) -> None:
    if len(shape) != 3 or shape[0] != channels:
        raise ValueError(f"{layer} expects samples ({channels}, H, W), got {shape}")


# --------------------------------------------------------------------------------------------- AOL


def _unit_gram_rows(rows: int, columns: int, generator: torch.Generator | None) -> torch.Tensor:
    """An initial ``(rows, columns)`` weight that AOL leaves as it is (every row of ``|W^T W|`` sums to
    1), so that the layer starts as an isometry or a projection instead of a contraction: orthonormal
    columns when ``rows >= columns``; otherwise each row averages its own block of ``columns / rows``
    inputs with random signs (disjoint blocks, orthonormal rows), or orthonormal rows when the blocks
    cannot be equal."""
    weight = torch.empty(rows, columns)
    if rows >= columns or columns % rows:
        return nn.init.orthogonal_(weight, generator=generator)
    block = columns // rows
    signs = torch.randint(0, 2, (rows, block), generator=generator).float() * 2.0 - 1.0
    weight.zero_()
    for row in range(rows):
        weight[row, row * block:(row + 1) * block] = signs[row] / math.sqrt(block)
    return weight


class AOLConv2d(nn.Module):
    """Almost-orthogonal 'same' convolution [Prach22]: kernel ``K D`` (:func:`aol_rescale`), stride 1.

    ``(B, in_channels, H, W) -> (B, out_channels, H, W)``, zero padding ``(k - 1) / 2``. 1-Lipschitz by
    construction; :meth:`lipschitz_upper_bound` is the FFT bound of the kernel applied.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        *,
        bias: bool = True,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.in_channels = _check_positive_int("in_channels", in_channels)
        self.out_channels = _check_positive_int("out_channels", out_channels)
        self.kernel_size = _check_kernel_size("AOLConv2d", kernel_size)
        # It starts as a 1x1 isometry or projection (the other taps 0: AOL then rescales nothing).
        raw = torch.zeros(out_channels, in_channels, kernel_size, kernel_size)
        raw[:, :, kernel_size // 2, kernel_size // 2] = _unit_gram_rows(out_channels, in_channels, generator)
        self.raw_kernel = nn.Parameter(raw)
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self._cache = _CachedWeight()

    @property
    def padding(self) -> int:
        return (self.kernel_size - 1) // 2

    @property
    def weight(self) -> torch.Tensor:
        """The ``(out_channels, in_channels, k, k)`` kernel applied."""
        return self._cache.get([self.raw_kernel], lambda: aol_rescale(self.raw_kernel))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"AOLConv2d expects (B, {self.in_channels}, H, W) inputs, got {tuple(x.shape)}")
        return F.conv2d(x, self.weight, self.bias, padding=self.padding)

    def lipschitz_upper_bound(self, input_shape: Sequence[int]) -> float:
        """FFT bound [Sedghi19] of the applied kernel on this input size (<= 1 by [Prach22])."""
        shape = check_input_shape(input_shape)
        _check_conv_input("AOLConv2d", shape, self.in_channels)
        return conv_operator_norm_bound(self.weight, input_size=shape[1:], padding=[(self.padding,) * 2] * 2)

    def to_plain(self) -> nn.Conv2d:
        """An ``nn.Conv2d`` holding the applied kernel."""
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, padding=self.padding,
                         bias=self.bias is not None)
        conv.to(device=self.raw_kernel.device, dtype=self.raw_kernel.dtype)
        with torch.no_grad():
            conv.weight.copy_(self.weight.detach())
            if self.bias is not None:
                conv.bias.copy_(self.bias.detach())
        return conv

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"bias={self.bias is not None}")


class AOLLinear(nn.Module):
    """Almost-orthogonal dense layer [Prach22]: weight ``W D`` (:func:`aol_rescale`); ``nn.Linear``
    shapes. :meth:`lipschitz_upper_bound` is the exact spectral norm of the weight applied (<= 1)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool = True,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.in_features = _check_positive_int("in_features", in_features)
        self.out_features = _check_positive_int("out_features", out_features)
        self.raw_weight = nn.Parameter(_unit_gram_rows(out_features, in_features, generator))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self._cache = _CachedWeight()

    @property
    def weight(self) -> torch.Tensor:
        return self._cache.get([self.raw_weight], lambda: aol_rescale(self.raw_weight))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def lipschitz_upper_bound(self, input_shape: Sequence[int]) -> float:
        shape = check_input_shape(input_shape)
        if shape[-1] != self.in_features:
            raise ValueError(f"AOLLinear expects inputs (..., {self.in_features}), got sample shape {shape}")
        return dense_operator_norm(self.weight)

    def to_plain(self) -> nn.Linear:
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        linear.to(device=self.raw_weight.device, dtype=self.raw_weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(self.weight.detach())
            if self.bias is not None:
                linear.bias.copy_(self.bias.detach())
        return linear

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}")


# --------------------------------------------------------------------------------------------- SLL


def _residual_apply(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    """``x - A* (scale * relu(A x + b))`` for a dense weight ``(inner, features)`` or a kernel
    ``(inner, channels, k, k)`` ('same' zero padding; ``conv_transpose2d`` is the exact adjoint)."""
    if weight.dim() == 2:
        return x - F.linear(scale * torch.relu(F.linear(x, weight, bias)), weight.mT)
    padding = (weight.shape[-1] - 1) // 2
    inner = torch.relu(F.conv2d(x, weight, bias, padding=padding))
    return x - F.conv_transpose2d(inner * scale.reshape(1, -1, 1, 1), weight, padding=padding)


class _SLL(nn.Module):
    """Shared parts of the SLL layers: ``weight`` ``(inner, features[, k, k])``, ``bias``, ``log_q``."""

    def __init__(self, weight: torch.Tensor, generator: torch.Generator | None) -> None:
        super().__init__()
        fan_in = math.prod(weight.shape[1:])
        nn.init.xavier_normal_(weight, generator=generator)
        self.weight = nn.Parameter(weight)
        bound = 1.0 / math.sqrt(fan_in)
        self.bias = nn.Parameter(torch.empty(weight.shape[0]).uniform_(-bound, bound, generator=generator))
        self.log_q = nn.Parameter(torch.zeros(weight.shape[0]))
        self._cache = _CachedWeight()

    def _inverse_t(self) -> torch.Tensor:
        gram = _gram_kernel(self.weight, "outputs").abs()
        if gram.dim() > 2:
            gram = gram.sum(dim=(2, 3))
        q = self.log_q.exp()
        return 1.0 / ((gram * q[None, :] / q[:, None]).sum(dim=1) + _EPS)

    @property
    def scale(self) -> torch.Tensor:
        """``2 / T`` per inner channel: the factor between the activation and the adjoint map."""
        return self._cache.get([self.weight, self.log_q], lambda: 2.0 * self._inverse_t())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _residual_apply(x, self.weight, self.bias, self.scale)

    def to_plain(self) -> PlainSLL:
        """The same residual map with the kernel and ``scale`` fixed (:class:`PlainSLL`)."""
        return PlainSLL(self.weight.detach(), self.bias.detach(), self.scale.detach())


class SLLConv2d(_SLL):
    """SDP-based Lipschitz residual convolution [Araujo23]: ``(B, C, H, W) -> (B, C, H, W)``.

    ``x - 2 conv_transpose(T^-1 relu(conv(x) + b))`` with ``inner_channels`` (default ``channels``)
    channels inside, 'same' zero padding. 1-Lipschitz; :meth:`lipschitz_upper_bound` checks it from the
    applied kernel (module docstring).
    """

    def __init__(
        self,
        channels: int,
        inner_channels: int | None = None,
        kernel_size: int = 3,
        *,
        generator: torch.Generator | None = None,
    ) -> None:
        inner = _check_positive_int("inner_channels", inner_channels or channels)
        size = _check_kernel_size("SLLConv2d", kernel_size)
        super().__init__(torch.empty(inner, _check_positive_int("channels", channels), size, size), generator)
        self.channels, self.inner_channels, self.kernel_size = channels, inner, size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"SLLConv2d expects (B, {self.channels}, H, W) inputs, got {tuple(x.shape)}")
        return super().forward(x)

    def lipschitz_upper_bound(self, input_shape: Sequence[int]) -> float:
        shape = check_input_shape(input_shape)
        _check_conv_input("SLLConv2d", shape, self.channels)
        return sdp_residual_bound(self.weight, self.scale, shape)

    def extra_repr(self) -> str:
        return f"{self.channels}, inner_channels={self.inner_channels}, kernel_size={self.kernel_size}"


class SLLLinear(_SLL):
    """SDP-based Lipschitz residual dense layer [Araujo23]: ``(B, F) -> (B, F)``,
    ``x - 2 W T^-1 relu(W^T x + b)`` with ``inner_features`` (default ``features``) inside."""

    def __init__(
        self, features: int, inner_features: int | None = None, *, generator: torch.Generator | None = None
    ) -> None:
        inner = _check_positive_int("inner_features", inner_features or features)
        super().__init__(torch.empty(inner, _check_positive_int("features", features)), generator)
        self.features, self.inner_features = features, inner

    def lipschitz_upper_bound(self, input_shape: Sequence[int]) -> float:
        shape = check_input_shape(input_shape)
        if shape != (self.features,):
            raise ValueError(f"SLLLinear expects samples ({self.features},), got {shape}")
        return sdp_residual_bound(self.weight, self.scale, shape)

    def extra_repr(self) -> str:
        return f"{self.features}, inner_features={self.inner_features}"


class PlainSLL(nn.Module):
    """The exported form of an SLL layer: ``x - A* (scale * relu(A x + b))`` with fixed tensors (kernel
    or dense weight, bias, ``scale >= 0``) and no rescaling at each call. Same bound as the layer it came
    from (:func:`sdp_residual_bound`)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, scale: torch.Tensor) -> None:
        super().__init__()
        if weight.dim() not in (2, 4) or bias.shape != weight.shape[:1] or scale.shape != weight.shape[:1]:
            raise ValueError(
                f"PlainSLL needs a (inner, F) or (inner, C, k, k) weight with (inner,) bias and scale, got "
                f"{tuple(weight.shape)}, {tuple(bias.shape)}, {tuple(scale.shape)}"
            )
        self.weight = nn.Parameter(weight.clone())
        self.bias = nn.Parameter(bias.clone())
        self.register_buffer("scale", scale.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _residual_apply(x, self.weight, self.bias, self.scale)

    def lipschitz_upper_bound(self, input_shape: Sequence[int]) -> float:
        shape = check_input_shape(input_shape)
        features = self.weight.shape[1]
        fits = shape == (features,) if self.weight.dim() == 2 else len(shape) == 3 and shape[0] == features
        if not fits:
            raise ValueError(f"PlainSLL with weight {tuple(self.weight.shape)} cannot take samples {shape}")
        return sdp_residual_bound(self.weight, self.scale, shape)


class ChannelPad(nn.Module):
    """Appends zero channels: ``(B, C, ...) -> (B, out_channels, ...)``, an isometry (bound 1)."""

    def __init__(self, out_channels: int) -> None:
        super().__init__()
        self.out_channels = _check_positive_int("out_channels", out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or x.shape[1] > self.out_channels:
            raise ValueError(f"ChannelPad({self.out_channels}) needs (B, C, ...) inputs with C <= "
                             f"{self.out_channels}, got {tuple(x.shape)}")
        padding = [0, 0] * (x.dim() - 2) + [0, self.out_channels - x.shape[1]]
        return F.pad(x, padding)

    def lipschitz_upper_bound(self, input_shape: Sequence[int]) -> float:
        return 1.0

    def extra_repr(self) -> str:
        return f"out_channels={self.out_channels}"
