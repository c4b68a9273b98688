"""AOL and SLL layers [Prach22; Araujo23]: each declared bound is at least the exact operator norm
(explicit matrices and Jacobians at small sizes), holds between any two inputs, does not rely on the
construction being exact; export to plain layers; moment propagation."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from painwatch.robust import (
    AOLConv2d,
    AOLLinear,
    ChannelPad,
    InvertibleDownsampling,
    MaxMin,
    OrthogonalLinear,
    PlainSLL,
    SLLConv2d,
    SLLLinear,
    UnsupportedLayerError,
    aol_rescale,
    export_plain,
    lipschitz_lower_estimate,
    lipschitz_upper_bound,
    propagate_moments,
    sdp_residual_bound,
)


def _matrix(layer: nn.Module, shape: tuple[int, ...]) -> torch.Tensor:
    """The matrix of a linear layer (no bias) on samples of ``shape``, built column by column."""
    size = math.prod(shape)
    basis = torch.eye(size, dtype=torch.float64).reshape(size, *shape)
    with torch.no_grad():
        return (layer(basis) - layer(torch.zeros(1, *shape, dtype=torch.float64))).reshape(size, -1).T


def _jacobian_norm(layer: nn.Module, x: torch.Tensor) -> float:
    jacobian = torch.autograd.functional.jacobian(lambda z: layer(z.unsqueeze(0)).flatten(), x)
    return float(torch.linalg.matrix_norm(jacobian.reshape(-1, x.numel()), ord=2))


def _scrambled(layer: nn.Module, factor: float, generator: torch.Generator) -> nn.Module:
    """``layer`` in float64 with every parameter replaced by a random one ``factor`` times larger."""
    layer = layer.double()
    with torch.no_grad():
        for parameter in layer.parameters():
            parameter.copy_(factor * torch.randn(parameter.shape, generator=generator, dtype=torch.float64))
    return layer


AOL_CASES = [
    (lambda g: AOLConv2d(3, 5, 3, generator=g), (3, 5, 4)),
    (lambda g: AOLConv2d(6, 2, 1, generator=g), (6, 3, 3)),
    (lambda g: AOLConv2d(2, 2, 5, bias=False, generator=g), (2, 6, 6)),
    (lambda g: AOLLinear(7, 4, generator=g), (7,)),
    (lambda g: AOLLinear(4, 9, bias=False, generator=g), (4,)),
]


@pytest.mark.parametrize(("make", "shape"), AOL_CASES)
def test_aol_layers_are_1_lipschitz_and_their_bound_is_their_exact_norm(make, shape, generator) -> None:
    layer = _scrambled(make(generator), 2.0, generator)
    if getattr(layer, "bias", None) is not None:
        nn.init.zeros_(layer.bias)
    exact = float(torch.linalg.matrix_norm(_matrix(layer, shape), ord=2))
    bound = layer.lipschitz_upper_bound(shape)
    assert exact <= bound <= 1.0 + 1e-5  # [Prach22]: rescaling makes any weight 1-Lipschitz
    if len(shape) == 1:
        assert bound == pytest.approx(exact, rel=1e-5)  # a dense layer's bound is its exact norm
    assert lipschitz_upper_bound(layer, shape) == bound


def test_aol_rescale_leaves_a_unit_gram_weight_as_it_is(generator) -> None:
    orthogonal, _ = torch.linalg.qr(torch.randn(8, 5, generator=generator, dtype=torch.float64))
    assert torch.allclose(aol_rescale(orthogonal), orthogonal, atol=1e-6)
    # A fresh layer starts as an isometry (columns orthonormal) or a projection of disjoint blocks.
    for layer, shape in ((AOLConv2d(3, 8, 3, generator=generator), (3, 6, 6)),
                         (AOLConv2d(8, 4, 1, generator=generator), (8, 4, 4))):
        singular = torch.linalg.svdvals(_matrix(layer.double(), shape))
        assert torch.allclose(singular, torch.ones_like(singular), atol=1e-6)
    with pytest.raises(ValueError, match="weight"):
        aol_rescale(torch.ones(2, 3, 3))


SLL_CASES = [
    (lambda g: SLLConv2d(3, 5, generator=g), (3, 5, 4)),
    (lambda g: SLLConv2d(4, generator=g), (4, 3, 3)),
    (lambda g: SLLConv2d(2, 3, 5, generator=g), (2, 4, 6)),
    (lambda g: SLLLinear(6, 9, generator=g), (6,)),
    (lambda g: SLLLinear(5, generator=g), (5,)),
]


@pytest.mark.parametrize(("make", "shape"), SLL_CASES)
@pytest.mark.parametrize("factor", [0.3, 3.0])
def test_sll_bound_is_1_and_no_jacobian_or_difference_quotient_exceeds_it(make, shape, factor, generator):
    layer = _scrambled(make(generator), factor, generator)
    bound = layer.lipschitz_upper_bound(shape)
    assert bound == pytest.approx(1.0, abs=1e-5)  # [Araujo23, Thm. 3]: T dominates W^T W
    points = torch.randn((6, *shape), generator=generator, dtype=torch.float64)
    for x in points:
        assert _jacobian_norm(layer, x) <= bound
    others = points + 0.5 * torch.randn(points.shape, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        moved = (layer(points) - layer(others)).flatten(1).norm(dim=1)
    quotients = moved / (points - others).flatten(1).norm(dim=1)
    assert float(quotients.max()) <= bound
    assert lipschitz_lower_estimate(layer, shape, num_points=4, iterations=30) <= bound


@pytest.mark.parametrize(("make", "shape"), SLL_CASES[:1] + SLL_CASES[3:4])
def test_the_residual_bound_holds_when_the_scale_is_not_the_construction_s(make, shape, generator) -> None:
    """sdp_residual_bound is computed from the tensors applied: with a scale 5 times too large the map
    is no longer 1-Lipschitz, and the bound says so and still covers every Jacobian."""
    layer = _scrambled(make(generator), 1.0, generator)
    broken = PlainSLL(layer.weight.detach(), layer.bias.detach(), 5.0 * layer.scale.detach())
    bound = broken.lipschitz_upper_bound(shape)
    norms = [_jacobian_norm(broken, x) for x in torch.randn((12, *shape), generator=generator,
                                                            dtype=torch.float64)]
    assert bound > 1.5 and max(norms) <= bound and max(norms) > 1.0
    with pytest.raises(ValueError, match="scale"):
        sdp_residual_bound(layer.weight, -layer.scale, shape)


def test_layers_reject_bad_shapes_and_settings() -> None:
    with pytest.raises(ValueError, match="odd kernel_size"):
        SLLConv2d(3, kernel_size=2)
    with pytest.raises(ValueError, match="in_channels"):
        AOLConv2d(0, 3)
    with pytest.raises(ValueError, match=r"\(4, H, W\)"):
        SLLConv2d(4).lipschitz_upper_bound((3, 5, 5))
    with pytest.raises(ValueError, match="SLLLinear"):
        SLLLinear(5).lipschitz_upper_bound((6,))
    with pytest.raises(ValueError, match="AOLConv2d expects"):
        AOLConv2d(3, 4)(torch.zeros(1, 2, 5, 5))
    with pytest.raises(ValueError, match="ChannelPad"):
        ChannelPad(2)(torch.zeros(1, 3, 4, 4))


def _network(generator: torch.Generator) -> nn.Sequential:
    return nn.Sequential(
        ChannelPad(4), AOLConv2d(4, 4, 3, generator=generator), MaxMin(),
        SLLConv2d(4, 6, generator=generator), InvertibleDownsampling(2),
        AOLConv2d(16, 8, 1, generator=generator), nn.AvgPool2d(2, divisor_override=2), nn.Flatten(),
        SLLLinear(8, generator=generator), AOLLinear(8, 8, generator=generator), MaxMin(),
        OrthogonalLinear(8, 3, bias=True, generator=generator),
    ).double()


def test_export_plain_gives_the_same_outputs_and_bound_without_rescaling(generator) -> None:
    network = _scrambled(_network(generator), 0.5, generator).eval()
    plain = export_plain(network)
    kinds = {type(layer) for layer in plain.modules()}
    assert not kinds & {AOLConv2d, AOLLinear, SLLConv2d, SLLLinear, OrthogonalLinear}
    assert {nn.Conv2d, nn.Linear, PlainSLL} <= kinds
    x = torch.rand((5, 2, 4, 4), generator=generator, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(plain(x), network(x), atol=1e-12)
    shape = (2, 4, 4)
    bound = lipschitz_upper_bound(network, shape)
    assert lipschitz_upper_bound(plain, shape) == pytest.approx(bound, rel=1e-9)
    assert lipschitz_lower_estimate(network, shape, num_points=4, iterations=40) <= bound <= 1.0 + 1e-4


@pytest.mark.parametrize(
    ("make", "shape"),
    [
        (lambda g: AOLConv2d(2, 3, 3, generator=g), (2, 4, 4)),
        (lambda g: AOLLinear(6, 3, generator=g), (6,)),
        (lambda g: nn.AvgPool2d(2, divisor_override=2), (2, 4, 4)),
        (lambda g: nn.AvgPool2d(2), (2, 4, 4)),
        (lambda g: ChannelPad(4), (2, 3, 3)),
    ],
)
def test_moments_through_aol_layers_and_pooling_match_monte_carlo(make, shape, generator) -> None:
    layer = make(generator)
    if list(layer.parameters()):
        layer = _scrambled(layer, 0.7, generator)
    layer = layer.double()
    mean = torch.rand((1, *shape), generator=generator, dtype=torch.float64)
    var = 0.04 * torch.rand((1, *shape), generator=generator, dtype=torch.float64)
    out_mean, out_var = propagate_moments(layer, mean, var)
    samples = mean + var.sqrt() * torch.randn((100_000, *shape), generator=generator, dtype=torch.float64)
    with torch.no_grad():
        outputs = layer(samples)
    # One affine layer of independent Gaussian inputs: the propagated moments are exact.
    assert torch.allclose(out_mean[0], outputs.mean(0), atol=3e-3)
    assert torch.allclose(out_var[0], outputs.var(0), rtol=3e-2, atol=1e-6)


def test_sll_layers_have_no_moment_rule(generator) -> None:
    with pytest.raises(TypeError, match="SLLConv2d"):
        propagate_moments(SLLConv2d(2, generator=generator), torch.zeros(1, 2, 3, 3), torch.ones(1, 2, 3, 3))
    with pytest.raises(TypeError, match="padding"):
        propagate_moments(nn.AvgPool2d(2, padding=1), torch.zeros(1, 2, 4, 4), torch.ones(1, 2, 4, 4))


def test_a_declared_composition_is_bounded_child_by_child(generator) -> None:
    class Composite(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first = nn.Linear(4, 3)
            self.second = nn.Linear(3, 2)

        def forward(self, x):
            return self.second(self.first(x))

        def lipschitz_composition(self):
            return [("first", self.first), ("second", self.second)]

    composite = Composite()
    expected = lipschitz_upper_bound(nn.Sequential(composite.first, composite.second), (4,))
    assert lipschitz_upper_bound(composite, (4,)) == pytest.approx(expected)
    composite.second.register_forward_hook(lambda module, inputs, output: output)
    with pytest.raises(UnsupportedLayerError, match="second"):
        lipschitz_upper_bound(composite, (4,))

    class Broken(Composite):
        def lipschitz_composition(self):
            return [("first", "not a module")]

    with pytest.raises(UnsupportedLayerError, match=r"\(name, module\) pairs"):
        lipschitz_upper_bound(Broken(), (4,))
