"""Orthogonal layers: norm preservation, small residuals, bounds of 1, and export to plain layers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from painwatch.robust.layers import (
    GroupSort,
    InvertibleDownsampling,
    MaxMin,
    OrthogonalConv2d,
    OrthogonalLinear,
    bjorck_orthonormalize,
    export_plain,
)
from painwatch.robust.lipschitz import lipschitz_lower_estimate, lipschitz_upper_bound


def ratios(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return y.flatten(1).norm(dim=1) / x.flatten(1).norm(dim=1)


def exact_operator_norm(layer: nn.Module, shape: tuple[int, ...]) -> float:
    size = math.prod(shape)
    basis = torch.eye(size).reshape(size, *shape)
    with torch.no_grad():
        matrix = (layer(basis) - layer(torch.zeros(1, *shape))).reshape(size, -1).double()
    return float(torch.linalg.matrix_norm(matrix, ord=2))


@pytest.mark.parametrize("shape", [(20, 10), (10, 20), (16, 16), (3, 7, 4)])
def test_bjorck_converges_from_an_arbitrary_matrix(shape, generator):
    matrix = 5.0 * torch.randn(shape, generator=generator, dtype=torch.float64)
    result = bjorck_orthonormalize(matrix, iterations=25)
    rows, cols = shape[-2:]
    gram = result.mT @ result if rows >= cols else result @ result.mT
    assert torch.allclose(gram, torch.eye(min(rows, cols), dtype=torch.float64).expand_as(gram), atol=1e-10)
    # the closest orthogonal matrix is the polar factor U V^T of the SVD
    u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
    assert torch.allclose(result, u @ vh, atol=1e-8)


def test_bjorck_stops_once_converged(generator):
    orthogonal, _ = torch.linalg.qr(torch.randn(12, 12, generator=generator, dtype=torch.float64))
    assert torch.equal(bjorck_orthonormalize(orthogonal, 20), bjorck_orthonormalize(orthogonal, 1))
    matrix = torch.randn(12, 8, generator=generator, dtype=torch.float64)
    early = bjorck_orthonormalize(matrix, 40)
    assert torch.allclose(early, bjorck_orthonormalize(matrix, 40, early_stop=False), atol=1e-12)
    assert not torch.allclose(early, bjorck_orthonormalize(matrix, 3), atol=1e-3)  # it did iterate


def test_bjorck_rejects_bad_arguments():
    with pytest.raises(ValueError, match="at least 2 dims"):
        bjorck_orthonormalize(torch.ones(3))
    with pytest.raises(ValueError, match="iterations"):
        bjorck_orthonormalize(torch.ones(3, 3), iterations=-1)


@pytest.mark.parametrize("method", ["bjorck", "matrix_exp"])
@pytest.mark.parametrize(("in_features", "out_features"), [(8, 16), (12, 12)])
def test_orthogonal_linear_preserves_norms(method, in_features, out_features, generator):
    layer = OrthogonalLinear(in_features, out_features, method=method, generator=generator)
    x = torch.randn(32, in_features, generator=generator)
    assert torch.allclose(ratios(layer(x), x), torch.ones(32), atol=1e-5)
    assert layer.orthogonality_residual() < 1e-5
    bound = lipschitz_upper_bound(layer, (in_features,))
    assert 1.0 <= bound <= 1.0 + 1e-4
    assert bound >= float(torch.linalg.svdvals(layer.weight.detach().double())[0])


def test_wide_orthogonal_linear_has_orthonormal_rows(generator):
    layer = OrthogonalLinear(16, 6, bias=True, generator=generator)
    weight = layer.weight.detach().double()
    assert torch.allclose(weight @ weight.T, torch.eye(6, dtype=torch.float64), atol=1e-5)
    x = torch.randn(64, 16, generator=generator)
    assert torch.all(ratios(layer(x) - layer.bias, x) <= 1 + 1e-5)
    assert lipschitz_upper_bound(layer, (16,)) <= 1.0 + 1e-4


def test_orthogonal_linear_stays_orthogonal_while_training(generator):
    layer = OrthogonalLinear(10, 10, bias=True, generator=generator)
    before = layer.weight.detach().clone()
    optimizer = torch.optim.Adam(layer.parameters(), lr=0.05)
    x = torch.randn(64, 10, generator=generator)
    target = torch.randn(64, 10, generator=generator)
    for _ in range(20):
        optimizer.zero_grad()
        F.mse_loss(layer(x), target).backward()
        optimizer.step()
    assert not torch.allclose(layer.weight, before, atol=1e-3)  # it learned something
    assert layer.orthogonality_residual() < 1e-5


def test_orthogonal_linear_falls_back_to_the_exact_norm_when_bjorck_did_not_converge(generator):
    layer = OrthogonalLinear(6, 6, bjorck_iters=0, generator=generator)
    with torch.no_grad():
        layer.raw_weight.copy_(torch.randn(6, 6, generator=generator))
    assert layer.orthogonality_residual() > layer.residual_tolerance
    exact = float(torch.linalg.svdvals(layer.weight.detach().double())[0])
    assert lipschitz_upper_bound(layer, (6,)) == pytest.approx(exact, rel=1e-5)


def test_cached_weights_follow_parameter_updates(generator):
    source = nn.Sequential(
        OrthogonalLinear(6, 6, generator=generator), OrthogonalConv2d(2, 2, 3, generator=generator)
    )
    target = nn.Sequential(
        OrthogonalLinear(6, 6, generator=generator), OrthogonalConv2d(2, 2, 3, generator=generator)
    )
    with torch.no_grad():  # evaluation caches the derived weights...
        stale = (target[0].weight.clone(), target[1].weight.clone())
        target.load_state_dict(source.state_dict())  # ...which a load must invalidate
        assert torch.equal(target[0].weight, source[0].weight)
        assert torch.equal(target[1].weight, source[1].weight)
        assert not torch.allclose(target[0].weight, stale[0])
        assert not torch.allclose(target[1].weight, stale[1])


def test_orthogonal_linear_validates_arguments():
    with pytest.raises(ValueError, match="in_features"):
        OrthogonalLinear(0, 3)
    with pytest.raises(ValueError, match="method"):
        OrthogonalLinear(3, 3, method="householder")
    with pytest.raises(ValueError, match=r"inputs \(\.\.\., 3\)"):
        OrthogonalLinear(3, 3).lipschitz_upper_bound((4,))


@pytest.mark.parametrize(
    ("in_channels", "out_channels", "kernel_size", "stride"),
    [(4, 4, 3, 1), (3, 8, 3, 1), (2, 8, 3, 2), (3, 6, 5, 1), (1, 1, 3, 1), (3, 5, 1, 1)],
)
def test_circular_bcop_convolution_preserves_norms(in_channels, out_channels, kernel_size, stride, generator):
    layer = OrthogonalConv2d(
        in_channels, out_channels, kernel_size, stride=stride, padding_mode="circular", generator=generator
    )
    x = torch.randn(4, in_channels, 8, 8, generator=generator)
    y = layer(x)
    assert y.shape == (4, out_channels, 8 // stride, 8 // stride)
    assert torch.allclose(ratios(y, x), torch.ones(4), atol=1e-5)
    assert layer.orthogonality_residual() < 1e-5


def test_zero_padded_bcop_preserves_norms_in_the_interior(generator):
    layer = OrthogonalConv2d(4, 6, 3, generator=generator)
    x = torch.zeros(8, 4, 10, 10)
    x[:, :, 1:-1, 1:-1] = torch.randn(8, 4, 8, 8, generator=generator)  # a border of width (k - 1) / 2
    assert torch.allclose(ratios(layer(x), x), torch.ones(8), atol=1e-5)
    anywhere = torch.randn(8, 4, 10, 10, generator=generator)
    assert torch.all(ratios(layer(anywhere), anywhere) <= 1 + 1e-5)


@pytest.mark.parametrize(
    ("in_channels", "out_channels", "stride", "padding_mode"),
    [(3, 5, 1, "zeros"), (6, 3, 1, "zeros"), (2, 4, 2, "zeros"), (3, 3, 1, "circular")],
)
def test_bcop_bound_is_one_and_dominates_the_exact_norm(
    in_channels, out_channels, stride, padding_mode, generator
):
    layer = OrthogonalConv2d(
        in_channels, out_channels, 3, stride=stride, padding_mode=padding_mode, generator=generator
    )
    shape = (in_channels, 6, 6)
    bound = lipschitz_upper_bound(layer, shape)
    exact = exact_operator_norm(layer, shape)
    assert bound <= 1.0 + 1e-4
    assert bound >= exact * (1 - 1e-6)
    if in_channels * stride**2 <= out_channels and padding_mode == "circular":
        assert exact == pytest.approx(1.0, abs=1e-5)


def test_bcop_weight_is_a_plain_kernel_of_the_documented_shape(generator):
    layer = OrthogonalConv2d(3, 8, 3, stride=2, generator=generator)
    assert layer.weight.shape == (8, 12, 3, 3)
    x = torch.randn(2, 3, 8, 8, generator=generator)
    manual = F.conv2d(F.pixel_unshuffle(x, 2), layer.weight, padding=1)
    assert torch.allclose(layer(x), manual, atol=1e-6)


def test_bcop_learns_and_stays_orthogonal(generator):
    layer = OrthogonalConv2d(4, 4, 3, bias=True, padding_mode="circular", generator=generator)
    optimizer = torch.optim.Adam(layer.parameters(), lr=0.05)
    x = torch.randn(8, 4, 6, 6, generator=generator)
    target = torch.randn(8, 4, 6, 6, generator=generator)
    first_loss = None
    for _ in range(15):
        optimizer.zero_grad()
        loss = F.mse_loss(layer(x), target)
        loss.backward()
        optimizer.step()
        first_loss = first_loss if first_loss is not None else loss.item()
    assert loss.item() < first_loss
    assert layer.orthogonality_residual() < 1e-5
    assert torch.allclose(ratios(layer(x) - layer.bias.view(1, -1, 1, 1), x), torch.ones(8), atol=1e-5)


def test_bcop_validates_arguments_and_inputs():
    with pytest.raises(ValueError, match="odd kernel_size"):
        OrthogonalConv2d(3, 3, 2)
    with pytest.raises(ValueError, match="padding_mode"):
        OrthogonalConv2d(3, 3, 3, padding_mode="reflect")
    with pytest.raises(ValueError, match=r"expects \(B, 3, H, W\)"):
        OrthogonalConv2d(3, 3, 3)(torch.zeros(1, 4, 5, 5))
    with pytest.raises(ValueError, match="divisible by 2"):
        OrthogonalConv2d(3, 3, 3, stride=2)(torch.zeros(1, 3, 5, 6))


def test_invertible_downsampling_is_an_orthogonal_permutation(generator):
    layer = InvertibleDownsampling(2)
    x = torch.randn(3, 2, 6, 4, generator=generator)
    y = layer(x)
    assert y.shape == (3, 8, 3, 2)
    assert torch.allclose(ratios(y, x), torch.ones(3))
    assert torch.equal(layer.inverse(y), x)
    assert lipschitz_upper_bound(layer, (2, 6, 4)) == 1.0


@pytest.mark.parametrize("activation", [MaxMin(), GroupSort(2), GroupSort(4)])
def test_groupsort_activations_are_gradient_norm_preserving(activation, generator):
    x = torch.randn(5, 8, 3, 3, generator=generator, requires_grad=True)
    y = activation(x)
    assert torch.allclose(
        y.detach().flatten(1).norm(dim=1), x.detach().flatten(1).norm(dim=1)
    )  # a permutation
    cotangent = torch.randn(y.shape, generator=generator)
    (gradient,) = torch.autograd.grad(y, x, cotangent)
    assert torch.allclose(gradient.flatten(1).norm(dim=1), cotangent.flatten(1).norm(dim=1))
    assert lipschitz_upper_bound(activation, (8, 3, 3)) == 1.0
    estimate = lipschitz_lower_estimate(activation, (8, 3, 3), iterations=5, generator=generator)
    assert estimate == pytest.approx(1.0, abs=1e-5)


def test_maxmin_orders_each_pair_and_groupsort_sorts_each_group():
    x = torch.tensor([[3.0, 1.0, -2.0, 5.0]])
    assert MaxMin()(x).tolist() == [[3.0, 1.0, 5.0, -2.0]]
    assert GroupSort(4)(x).tolist() == [[-2.0, 1.0, 3.0, 5.0]]
    with pytest.raises(ValueError, match="even C"):
        MaxMin()(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="divisible by 4"):
        GroupSort(4)(torch.zeros(2, 6))


def thesis_cifar_net(generator: torch.Generator, image_size: int = 8) -> nn.Sequential:
    """The thesis's CIFAR-10 layout, scaled down: 4 BCOP layers (8, 8, 16, 16 channels), dense head."""
    return nn.Sequential(
        OrthogonalConv2d(3, 8, 3, generator=generator),
        MaxMin(),
        OrthogonalConv2d(8, 8, 3, stride=2, generator=generator),
        MaxMin(),
        OrthogonalConv2d(8, 16, 3, generator=generator),
        nn.ReLU(),
        OrthogonalConv2d(16, 16, 3, stride=2, generator=generator),
        nn.ReLU(),
        nn.Flatten(),
        OrthogonalLinear(16 * (image_size // 4) ** 2, 32, bias=True, generator=generator),
        GroupSort(4),
        OrthogonalLinear(32, 10, generator=generator),
    )


def test_orthogonal_network_has_bound_one(generator):
    network = thesis_cifar_net(generator)
    bound = lipschitz_upper_bound(network, (3, 8, 8))
    assert 1.0 <= bound <= 1.0 + 1e-3
    estimate = lipschitz_lower_estimate(network, (3, 8, 8), num_points=4, iterations=20, generator=generator)
    assert estimate <= bound


def test_export_plain_keeps_outputs_and_the_bound(generator):
    network = thesis_cifar_net(generator).eval()
    plain = export_plain(network)
    kinds = {type(module) for module in plain.modules()}
    assert OrthogonalConv2d not in kinds and OrthogonalLinear not in kinds
    assert nn.Conv2d in kinds and nn.Linear in kinds
    assert not plain.training
    x = torch.rand(6, 3, 8, 8, generator=generator)
    with torch.no_grad():
        assert torch.allclose(plain(x), network(x), atol=1e-5)
    plain_bound = lipschitz_upper_bound(plain, (3, 8, 8))
    assert plain_bound <= 1.0 + 1e-3
    estimate = lipschitz_lower_estimate(plain, (3, 8, 8), num_points=4, iterations=20, generator=generator)
    assert estimate <= plain_bound
    assert isinstance(network[0], OrthogonalConv2d)  # the original is untouched


def test_export_plain_of_a_single_layer_and_of_nested_modules(generator):
    layer = OrthogonalLinear(5, 7, bias=True, generator=generator)
    plain = export_plain(layer)
    assert type(plain) is nn.Linear
    x = torch.randn(3, 5, generator=generator)
    assert torch.allclose(plain(x), layer(x), atol=1e-6)

    class Holder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = OrthogonalConv2d(2, 2, 3, padding_mode="circular", generator=generator)

        def forward(self, x):
            return self.conv(x)

    holder = Holder()
    exported = export_plain(holder)
    assert isinstance(exported.conv, nn.Conv2d) and exported.conv.padding_mode == "circular"
    x = torch.randn(2, 2, 5, 5, generator=generator)
    assert torch.allclose(exported(x), holder(x), atol=1e-6)
