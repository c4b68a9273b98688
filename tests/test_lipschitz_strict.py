"""The Lipschitz bound is never below the exact operator norm, by any amount: the checks, and the wrong
bounds they reject.

The Lipschitz margin and the smoothed margin need a sound *upper* bound (docs/design.md, "The
certificates", item 1). Two defects give a bound that looks right and is not:

- a dense layer bounded by power iteration, a lower estimate that after many iterations is only 1e-6
  or less below the largest singular value: compared here with the exact singular value in float64 and
  no tolerance at all;
- batch norm's ``|gamma|`` left out of its scale ``|gamma| / sqrt(var + eps)`` (or its sign trusted).

Each check takes the bound function, so that the test next to the real one runs it on the defective
variant (written in the test) and asserts that it is rejected.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence

import pytest
import torch
from torch import nn

from painwatch.robust import lipschitz_rules, lipschitz_upper_bound, spectral

UpperBound = Callable[[nn.Module, Sequence[int]], float]


def exact_operator_norm(module: nn.Module, shape: tuple[int, ...]) -> float:
    """Largest singular value of an affine network, from its full matrix in float64 (standard basis)."""
    module = copy.deepcopy(module).double().eval()
    size = math.prod(shape)
    basis = torch.eye(size, dtype=torch.float64).reshape(size, *shape)
    with torch.no_grad():
        matrix = (module(basis) - module(torch.zeros(1, *shape, dtype=torch.float64))).reshape(size, -1)
    return float(torch.linalg.svdvals(matrix)[0])


def slowly_converging_weight(rows: int, columns: int, seed: int) -> torch.Tensor:
    """A weight whose two largest singular values are 1 and 0.9999: power iteration gains a factor of
    only 0.9998 per step on the second direction, so it stays below the norm for thousands of steps."""
    generator = torch.Generator().manual_seed(seed)
    left, _ = torch.linalg.qr(torch.randn(rows, rows, generator=generator, dtype=torch.float64))
    right, _ = torch.linalg.qr(torch.randn(columns, columns, generator=generator, dtype=torch.float64))
    values = torch.linspace(0.5, 0.9, min(rows, columns), dtype=torch.float64)
    values[-2:] = torch.tensor([0.9999, 1.0], dtype=torch.float64)
    return (left[:, : values.numel()] * values.flip(0)) @ right[:, : values.numel()].T


def dense_cases() -> list[tuple[str, nn.Module, tuple[int, ...]]]:
    generator = torch.Generator().manual_seed(0)
    cases: list[tuple[str, nn.Module, tuple[int, ...]]] = []
    for name, weight in [
        ("gaussian", torch.randn(17, 30, generator=generator)),
        ("row", torch.randn(1, 12, generator=generator)),
        ("column", torch.randn(9, 1, generator=generator)),
        ("near-degenerate top", slowly_converging_weight(20, 24, seed=1).float()),
        ("float64 near-degenerate", slowly_converging_weight(16, 16, seed=2)),
    ]:
        layer = nn.Linear(weight.shape[1], weight.shape[0], dtype=weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(weight)
        cases.append((name, layer, (weight.shape[1],)))
        cases.append((f"{name} in a network", nn.Sequential(nn.Flatten(), copy.deepcopy(layer), nn.ReLU()),
                      (1, weight.shape[1])))
    return cases


def check_dense_bounds_are_never_below_the_exact_norm(upper_bound: UpperBound) -> None:
    """``bound >= sigma_max`` exactly (float64 SVD of the weight, as the layer holds it), and at most
    ``1e-5`` above: sound, and not sound by being loose."""
    for name, module, shape in dense_cases():
        layer = module if isinstance(module, nn.Linear) else module[1]
        exact = float(torch.linalg.svdvals(layer.weight.detach().to(torch.float64))[0])
        bound = upper_bound(module, shape)
        assert bound >= exact, f"{name}: bound {bound!r} is below the largest singular value {exact!r}"
        assert bound <= exact * (1 + 1e-5), f"{name}: bound {bound!r} is loose against {exact!r}"


def test_dense_bounds_are_never_below_the_exact_norm() -> None:
    check_dense_bounds_are_never_below_the_exact_norm(lipschitz_upper_bound)


def power_iteration_norm(weight: torch.Tensor, iterations: int = 200) -> float:
    """``||W v||`` after power iteration on ``W^T W`` from a fixed start, in float64: a lower estimate."""
    matrix = weight.detach().to(torch.float64)
    vector = torch.ones(matrix.shape[1], dtype=torch.float64)
    for _ in range(iterations):
        vector = matrix.T @ (matrix @ vector)
        vector = vector / vector.norm()
    return float((matrix @ vector).norm())


@pytest.mark.parametrize("defect", ["power iteration", "1e-6 low", "1e-12 low"])
def test_dense_bound_below_the_norm_by_any_amount_is_rejected(monkeypatch: pytest.MonkeyPatch,
                                                              defect: str) -> None:
    exact_norm = spectral.dense_operator_norm

    def defective(weight: torch.Tensor) -> float:
        if defect == "power iteration":
            return power_iteration_norm(weight)
        exact = float(torch.linalg.svdvals(weight.detach().to(torch.float64))[0])
        return exact * (1 - (1e-6 if defect == "1e-6 low" else 1e-12))

    slow = slowly_converging_weight(20, 24, seed=1)
    shortfall = 1 - power_iteration_norm(slow) / float(torch.linalg.svdvals(slow)[0])
    assert 0 < shortfall < 1e-4  # a lower estimate, and a close one: no tolerance may let it pass
    assert exact_norm(slow) >= float(torch.linalg.svdvals(slow)[0])
    for module in (spectral, lipschitz_rules):  # wherever the bound looks the function up
        monkeypatch.setattr(module, "dense_operator_norm", defective)
    with pytest.raises(AssertionError, match="below the largest singular value"):
        check_dense_bounds_are_never_below_the_exact_norm(lipschitz_upper_bound)


def batchnorm(gamma: list[float], variance: list[float], *, spatial: bool) -> nn.Module:
    layer = (nn.BatchNorm2d if spatial else nn.BatchNorm1d)(len(gamma))
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(gamma))
        layer.bias.copy_(torch.linspace(-1, 1, len(gamma)))
        layer.running_var.copy_(torch.tensor(variance))
        layer.running_mean.copy_(torch.linspace(0.5, -0.5, len(gamma)))
    return layer.eval()


def batchnorm_cases() -> list[tuple[str, nn.Module, tuple[int, ...]]]:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 3, 3, padding=1)
    return [
        # The largest |gamma| / sqrt(var) is on a channel whose 1 / sqrt(var) is not the largest, and
        # its gamma is negative: ignoring gamma or its sign picks another channel.
        ("negative gamma dominates", batchnorm([0.5, -3.0, 1.0], [1.0, 0.25, 4.0], spatial=True), (3, 4, 4)),
        ("small gammas", batchnorm([0.1, 0.1], [0.01, 1.0], spatial=False), (2,)),
        ("all gammas negative", batchnorm([-0.2, -2.0, -0.7], [0.5, 2.0, 0.1], spatial=False), (3,)),
        ("after a convolution",
         nn.Sequential(copy.deepcopy(conv),
                       batchnorm([2.0, -0.3, 0.6], [0.2, 0.05, 1.0], spatial=True)).eval(),
         (3, 5, 5)),
    ]


def check_batchnorm_bounds_hold_and_are_tight(upper_bound: UpperBound) -> None:
    """Batch norm in eval mode is a diagonal affine map: its bound is ``max |gamma| / sqrt(var + eps)``,
    at least the exact norm of the layer's matrix (and of the network it sits in) and at most 1e-5
    above it for the layer alone."""
    for name, module, shape in batchnorm_cases():
        exact = exact_operator_norm(module, shape)
        bound = upper_bound(module, shape)
        assert bound >= exact, f"{name}: bound {bound!r} is below the exact norm {exact!r}"
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            assert bound <= exact * (1 + 1e-5), f"{name}: bound {bound!r} is loose against {exact!r}"


def test_batchnorm_bounds_hold_and_are_tight() -> None:
    check_batchnorm_bounds_hold_and_are_tight(lipschitz_upper_bound)


def bound_ignoring_gamma(module: nn.Module, shape: Sequence[int]) -> float:
    """The defect: batch norm bounded by ``1 / sqrt(var + eps)`` alone (as if every gamma were 1)."""
    module = copy.deepcopy(module)
    for layer in module.modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                layer.weight.fill_(1.0)
    return lipschitz_upper_bound(module, shape)


def bound_trusting_the_sign_of_gamma(module: nn.Module, shape: Sequence[int]) -> float:
    """The defect: a lone batch norm bounded by ``max gamma / sqrt(var + eps)`` without the absolute value."""
    if not isinstance(module, nn.modules.batchnorm._BatchNorm):
        return lipschitz_upper_bound(module, shape)
    scale = module.weight.detach().double() / torch.sqrt(module.running_var.double() + module.eps)
    return float(scale.max())


@pytest.mark.parametrize("defective", [bound_ignoring_gamma, bound_trusting_the_sign_of_gamma])
def test_batchnorm_bound_without_the_absolute_gamma_is_rejected(defective: UpperBound) -> None:
    with pytest.raises(AssertionError, match=r"below the exact norm|loose"):
        check_batchnorm_bounds_hold_and_are_tight(defective)
