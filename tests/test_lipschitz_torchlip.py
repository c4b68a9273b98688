"""lipschitz_upper_bound on deel-torchlip layers and networks: the true bound of what each layer computes
(never its declared coefficient), sound against power iteration and exact operator norms."""

from __future__ import annotations

import math

import deel.torchlip as tl
import pytest
import torch
from torch import nn

from painwatch.robust.lipschitz import UnsupportedLayerError, lipschitz_lower_estimate, lipschitz_upper_bound

# A 1-Lipschitz torchlip network is bounded within this of 1. Its dense weights are orthonormalised by
# Björck iterations stopped at a Frobenius step of 1e-3 (torchlip's default eps), which leaves every
# singular value within about 1e-3 of 1 (in practice ~1e-6); over the three or four constrained layers
# of the networks below that stays under 1%, while any missed factor (a coefficient, a padding, an
# activation) would move the bound by far more.
DECLARED_TOLERANCE = 0.01


def exact_operator_norm(layer: nn.Module, shape: tuple[int, ...]) -> float:
    """Spectral norm of an affine layer, from its full matrix on the standard basis (float64)."""
    layer = layer.double().eval()
    size = math.prod(shape)
    basis = torch.eye(size, dtype=torch.float64).reshape(size, *shape)
    with torch.no_grad():
        matrix = (layer(basis) - layer(torch.zeros(1, *shape, dtype=torch.float64))).reshape(size, -1)
    return float(torch.linalg.matrix_norm(matrix, ord=2))


def estimate(module: nn.Module, shape: tuple[int, ...], spread: float = 3.0) -> float:
    points = spread * (2 * torch.rand((16, *shape), generator=torch.Generator().manual_seed(1)) - 1)
    return lipschitz_lower_estimate(
        module.eval(), shape, iterations=40, inputs=points, generator=torch.Generator().manual_seed(0)
    )


LAYERS = [
    # (name, factory, sample shape, true Lipschitz constant)
    ("SpectralLinear", lambda: tl.SpectralLinear(16, 16), (16,), 1.0),
    ("SpectralLinear-k2", lambda: tl.SpectralLinear(16, 8, k_coef_lip=2.0), (16,), 2.0),
    ("FrobeniusLinear", lambda: tl.FrobeniusLinear(16, 1), (16,), 1.0),
    ("GroupSort2", lambda: tl.GroupSort2(), (4, 3, 3), 1.0),
    ("FullSort", lambda: tl.FullSort(), (6,), 1.0),
    ("GroupSort-k2", lambda: tl.GroupSort(3, k_coef_lip=2.0), (6,), 2.0),
    ("MaxMin", lambda: tl.MaxMin(), (4,), 1.0),
    ("LPReLU", lambda: tl.LPReLU(1, init=-3.0, k_coef_lip=2.0), (4,), 2.0),  # slope clamped to -2
    ("HouseHolder", lambda: tl.HouseHolder(4), (4, 3, 3), 1.0),
    ("ScaledAvgPool2d", lambda: tl.ScaledAvgPool2d(2), (2, 6, 6), 1.0),
    ("ScaledAdaptiveAvgPool2d", lambda: tl.ScaledAdaptiveAvgPool2d((1, 1)), (2, 6, 6), 1.0),
    ("ScaledL2NormPool2d", lambda: tl.ScaledL2NormPool2d(2), (2, 6, 6), 1.0),
    ("ScaledAdaptativeL2NormPool2d", lambda: tl.ScaledAdaptativeL2NormPool2d(), (2, 6, 6), 1.0),
    ("InvertibleDownSampling", lambda: tl.InvertibleDownSampling(2), (2, 6, 6), 1.0),
    ("InvertibleUpSampling", lambda: tl.InvertibleUpSampling(2), (4, 6, 6), 1.0),
    ("LayerCentering", lambda: tl.LayerCentering(2), (2, 6, 6), 1.0),
    ("ScaleBiasLayer", lambda: tl.ScaleBiasLayer(3.0, 2), (2, 6, 6), 3.0),
]


@pytest.mark.parametrize(("name", "factory", "shape", "constant"), LAYERS, ids=[row[0] for row in LAYERS])
def test_torchlip_layer_bound_is_sound_and_tight(name, factory, shape, constant):
    torch.manual_seed(0)
    layer = factory()
    bound = lipschitz_upper_bound(layer.eval(), shape)
    lower = estimate(layer, shape)
    assert lower <= bound * (1 + 1e-6), name
    assert bound == pytest.approx(constant, rel=1e-4), name
    assert lower >= constant * (1 - 1e-3), name  # power iteration reaches it: the bound is tight


@pytest.mark.parametrize(
    ("factory", "shape", "max_ratio"),
    [
        (lambda: tl.SpectralConv2d(2, 4, 3, padding=1), (2, 7, 6), 1.25),
        (lambda: tl.SpectralConv2d(2, 4, 3, padding=1, stride=2), (2, 8, 8), 1.25),
        (lambda: tl.FrobeniusConv2d(2, 1, 3, padding=1), (2, 6, 6), 1.25),
        (lambda: tl.SpectralConvTranspose2d(2, 4, 3, padding=1), (2, 5, 5), 1.25),
        (lambda: tl.SpectralConv1d(2, 4, 5, padding=2, padding_mode="symmetric"), (2, 9), 2.5),
        (lambda: tl.SpectralConv2d(2, 3, 5, padding=2, padding_mode="symmetric"), (2, 7, 7), 2.5),
        (lambda: tl.SpectralConv2d(2, 3, 3, padding=1, padding_mode="symmetric"), (2, 6, 6), 2.5),
    ],
)
def test_torchlip_convolution_bound_dominates_the_exact_norm(factory, shape, max_ratio):
    torch.manual_seed(0)
    layer = factory().eval()
    bound = lipschitz_upper_bound(layer, shape)
    exact = exact_operator_norm(layer, shape)
    # Copying paddings (symmetric) are bounded by sqrt(most copies of a pixel), hence the looser ratio.
    assert exact * (1 - 1e-9) <= bound <= exact * max_ratio


def test_l2_norm_pooling_with_partial_windows_is_bounded_by_what_it_computes():
    # ceil_mode on an odd size leaves 1-pixel windows, rescaled by the full window size 4: the layer
    # is 2-Lipschitz there, not the 1 its class stands for, and the bound says so.
    pool = tl.ScaledL2NormPool2d(2, ceil_mode=True)
    bound = lipschitz_upper_bound(pool, (2, 5, 5))
    assert bound == pytest.approx(2.0, rel=1e-5)
    assert estimate(pool, (2, 5, 5)) == pytest.approx(2.0, rel=1e-4)


class DoubledGroupSort(tl.GroupSort2):
    def forward(self, x):
        return 2 * super().forward(x)


def test_subclass_of_a_torchlip_layer_overriding_forward_is_refused():
    with pytest.raises(UnsupportedLayerError, match=r"'1' \(DoubledGroupSort\): overrides forward"):
        lipschitz_upper_bound(nn.Sequential(nn.Flatten(), DoubledGroupSort()), (4,))


def test_batch_lip_norm_is_refused_and_its_vanilla_export_is_bounded():
    torch.manual_seed(0)
    norm = tl.BatchLipNorm(3)
    for _ in range(3):
        norm(3 * torch.randn(16, 3, 4, 4))
    with pytest.raises(UnsupportedLayerError, match="batch statistics"):
        lipschitz_upper_bound(norm, (3, 4, 4))
    with pytest.raises(UnsupportedLayerError, match=r"\(BatchCentering\)"):
        lipschitz_upper_bound(tl.BatchCentering(3).eval(), (3, 4, 4))
    exported = norm.eval().vanilla_export()
    bound = lipschitz_upper_bound(exported, (3, 4, 4))
    assert bound == pytest.approx(float(norm.get_scaling(training=False)), rel=1e-6)
    assert bound >= estimate(exported, (3, 4, 4)) * (1 - 1e-6)


def dense_network() -> nn.Module:
    """Square orthonormalised layers with sorting activations: gradient norm preserving, so its
    Lipschitz constant is 1 and power iteration finds it."""
    return tl.Sequential(
        tl.SpectralLinear(16, 16),
        tl.GroupSort2(),
        tl.SpectralLinear(16, 16),
        tl.FullSort(),
        tl.SpectralLinear(16, 16),
        tl.GroupSort2(),
        tl.FrobeniusLinear(16, 1),
    )


def conv_network() -> nn.Module:
    return tl.Sequential(
        tl.SpectralConv2d(1, 8, 3, padding=1),
        tl.GroupSort2(),
        tl.ScaledL2NormPool2d(2),
        tl.SpectralConv2d(8, 8, 3, padding=1),
        tl.GroupSort2(),
        tl.InvertibleDownSampling(2),
        nn.Flatten(),
        tl.SpectralLinear(32 * 2 * 2, 32),
        tl.FullSort(),
        tl.FrobeniusLinear(32, 1),
    )


@pytest.mark.parametrize("seed", [0, 1])
def test_one_lipschitz_dense_torchlip_network_is_bounded_close_to_one(seed):
    torch.manual_seed(seed)
    network = dense_network().eval()
    bound = lipschitz_upper_bound(network, (16,))
    lower = estimate(network, (16,))
    assert lower <= bound * (1 + 1e-6)
    assert abs(bound - 1.0) <= DECLARED_TOLERANCE
    assert lower >= 1.0 - DECLARED_TOLERANCE


def test_one_lipschitz_conv_torchlip_network_is_bounded_below_its_declared_constant():
    torch.manual_seed(0)
    network = conv_network().eval()
    bound = lipschitz_upper_bound(network, (1, 8, 8))
    assert estimate(network, (1, 8, 8)) <= bound * (1 + 1e-6)
    # torchlip's kernel normalisation is conservative, so the exact FFT bound lies below 1.
    assert bound <= 1.0 + DECLARED_TOLERANCE


def test_bounding_a_torchlip_network_in_training_mode_leaves_its_buffers_alone():
    torch.manual_seed(0)
    network = conv_network().train()  # spectral norm and Björck recompute (and store) their weights
    state = {name: tensor.clone() for name, tensor in network.state_dict().items()}
    first = lipschitz_upper_bound(network, (1, 8, 8))
    assert all(torch.equal(state[name], tensor) for name, tensor in network.state_dict().items())
    assert lipschitz_upper_bound(network, (1, 8, 8)) == first
