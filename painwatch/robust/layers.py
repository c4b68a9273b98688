"""Orthogonal (1-Lipschitz) layers [RC, Ch. 3-4] and their export to plain layers.

- :class:`OrthogonalLinear`: Björck orthonormalisation [Bjorck71; Anil19] (or PyTorch's exact
  ``matrix_exp`` parametrisation).
- :class:`OrthogonalConv2d`: block convolution orthogonal parametrisation (BCOP) [Li19];
  :class:`InvertibleDownsampling` for stride 2.
- :class:`MaxMin`, :class:`GroupSort`: gradient-norm preserving activations [Anil19].
- :func:`export_plain`: a copy of a network with every orthogonal layer replaced by a plain
  ``nn.Linear`` / ``nn.Conv2d`` holding the current weights, for fast inference.

Each layer declares ``lipschitz_upper_bound(input_shape)``, a sound L2 bound that
:func:`painwatch.robust.lipschitz_upper_bound` trusts: 1 up to the construction's checked residual
(docs/design.md, "The certificates", item 1), never an assumption.

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
import torch.nn.functional as F
from torch import nn

from painwatch.robust.spectral import FLOAT_SAFETY, conv_operator_norm_bound, dense_operator_norm
from painwatch.robust.validation import check_input_shape

__all__ = [
    "GroupSort",
    "InvertibleDownsampling",
    "MaxMin",
    "OrthogonalConv2d",
    "OrthogonalLinear",
    "bjorck_orthonormalize",
    "export_plain",
]


def bjorck_orthonormalize(
    matrix: torch.Tensor, iterations: int = 20, early_stop: bool = True
) -> torch.Tensor:
    """Closest (semi-)orthogonal matrix by first-order Björck–Bowie iterations [Bjorck71; Anil19].

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

    ``method="bjorck"`` (default, as in [RC, Ch. 3]): the weight is the Björck orthonormalisation
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
        *,
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
        shape = check_input_shape(input_shape)
        if shape[-1] != self.in_features:
            raise ValueError(
                f"OrthogonalLinear expects inputs (..., {self.in_features}), got sample shape {shape}"
            )
        residual = self.orthogonality_residual()
        if residual <= self.residual_tolerance:
            return math.sqrt(1.0 + residual) * (1.0 + FLOAT_SAFETY)
        return dense_operator_norm(self.weight)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, method={self.method!r}, bjorck_iters={self.bjorck_iters}"
        )


class InvertibleDownsampling(nn.Module):
    """Pixel unshuffle by ``factor``: ``(B, C, H, W) -> (B, C * factor^2, H / factor, W / factor)``.

    A permutation of the entries, hence orthogonal (norm preserving, Lipschitz constant exactly 1);
    the stride-2 substitute of orthogonal networks [Li19]. ``inverse`` undoes it.
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
    """Sorts consecutive groups of ``group_size`` channels (dimension 1), ascending [Anil19].

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
    """Orthogonal 2-D convolution by Block Convolution Orthogonal Parameterization (BCOP) [Li19].

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
        *,
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
        shape = check_input_shape(input_shape)
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
        return conv_operator_norm_bound(self.weight, input_size=size, padding=padding,
                                        padding_mode=self.padding_mode)

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
    """A deep copy of ``module`` with every :class:`OrthogonalLinear` replaced by an ``nn.Linear``, every
    :class:`OrthogonalConv2d` by an ``nn.Conv2d`` (behind an :class:`InvertibleDownsampling` when
    strided), and every other layer with a ``to_plain()`` method (the AOL and SLL layers of
    :mod:`painwatch.robust.lipschitz_layers`) by what that method returns, holding the current weights.
    Outputs are unchanged up to float rounding; the training flag is kept; ``module`` itself is not
    modified. The copy has no Björck or rescaling cost per forward."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")

    def replacement(layer: nn.Module) -> nn.Module | None:
        if isinstance(layer, OrthogonalLinear):
            return _plain_linear(layer)
        to_plain = getattr(type(layer), "to_plain", None)
        return layer.to_plain() if callable(to_plain) else None

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
