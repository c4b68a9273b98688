"""Tests of painwatch.robust.moments against exact integrals and Monte Carlo.

Tolerances are stated where used. Monte Carlo estimates use N draws, so a mean has standard error
std/sqrt(N) and a variance relative standard error about sqrt(2/N); "exact" cases allow 5 standard
errors, which makes a false failure a < 1e-6 event per check, and fixed seeds make them deterministic.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats
from torch import nn

from painwatch.robust import layers, moments


def orthonormal(rows: int, cols: int, seed: int) -> torch.Tensor:
    """A (rows, cols) float64 matrix with orthonormal rows (rows <= cols) or columns."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(max(rows, cols), min(rows, cols), generator=gen, dtype=torch.float64))
    return q if rows >= cols else q.T


def linear(weight: torch.Tensor, bias: torch.Tensor | None = None) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None).double()
    layer.weight.data = weight.clone()
    if bias is not None:
        layer.bias.data = bias.clone()
    return layer


def monte_carlo(net: nn.Module, x: torch.Tensor, variance: float, draws: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(draws, *x.shape, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        out = net((x.unsqueeze(0) + math.sqrt(variance) * noise).reshape(-1, *x.shape[1:]))
    out = out.reshape(draws, x.shape[0], -1)
    return out.mean(0), out.var(0)


# ----------------------------------------------------------------------------- ReLU moments
@pytest.mark.parametrize(("mu", "var"), [(0.0, 1.0), (1.3, 0.2), (-0.7, 2.0), (-6.0, 0.5), (9.0, 1.0)])
def test_relu_moments_match_numerical_integration(mu: float, var: float) -> None:
    std = math.sqrt(var)
    density = stats.norm(mu, std).pdf
    exact_mean = integrate.quad(lambda t: t * density(t), 0, np.inf, epsabs=1e-13)[0]
    exact_second = integrate.quad(lambda t: t * t * density(t), 0, np.inf, epsabs=1e-13)[0]
    as_tensor = lambda value: torch.tensor([value], dtype=torch.float64)  # noqa: E731
    mean, variance = moments.relu_moments(as_tensor(mu), as_tensor(var))
    # Closed form vs quadrature: both accurate to ~1e-10; 1e-8 allows for quad's own error.
    assert mean.item() == pytest.approx(exact_mean, abs=1e-8)
    assert variance.item() == pytest.approx(exact_second - exact_mean**2, abs=1e-8)


def test_relu_moments_zero_variance_and_far_tails_are_finite_with_finite_gradients() -> None:
    mu = torch.tensor([-3.0, 0.0, 2.0, -60.0, 60.0], requires_grad=True)
    var = torch.tensor([0.0, 0.0, 0.0, 1e-3, 1e-3], requires_grad=True)
    mean, variance = moments.relu_moments(mu, var)
    assert mean.detach().tolist()[:3] == [0.0, 0.0, 2.0]
    assert variance.detach().tolist()[:3] == [0.0, 0.0, 0.0]
    assert mean[3].item() == pytest.approx(0.0, abs=1e-30) and mean[4].item() == pytest.approx(60.0)
    assert variance[4].item() == pytest.approx(1e-3, rel=1e-6)
    (mean.sum() + variance.sum()).backward()
    assert torch.isfinite(mu.grad).all() and torch.isfinite(var.grad).all()
    assert mean.dtype == torch.float32  # returned in the input's dtype


def test_relu_moments_reject_negative_variance() -> None:
    with pytest.raises(ValueError, match="var must be >= 0"):
        moments.relu_moments(torch.zeros(2), torch.tensor([0.1, -0.2]))


# ----------------------------------------------------------------------------- Clark
@pytest.mark.parametrize(
    ("m1", "v1", "m2", "v2", "rho"),
    [
        (0.0, 1.0, 0.0, 1.0, 0.0),
        (1.0, 0.5, -0.5, 2.0, 0.0),
        (2.0, 1.0, 1.5, 0.3, 0.6),
        (0.3, 1.0, 0.0, 1.0, -0.9),
    ],
)
def test_clark_max_moments_match_monte_carlo(m1: float, v1: float, m2: float, v2: float, rho: float) -> None:
    # Clark's first two moments are exact for a bivariate Gaussian: 5 standard errors of slack.
    draws = 400_000
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(2, draws, generator=gen, dtype=torch.float64)
    s1, s2 = math.sqrt(v1), math.sqrt(v2)
    x1 = m1 + s1 * z[0]
    x2 = m2 + s2 * (rho * z[0] + math.sqrt(1 - rho * rho) * z[1])
    sample = torch.maximum(x1, x2)
    t = lambda value: torch.tensor([value], dtype=torch.float64)  # noqa: E731
    mean, var = moments.clark_max_moments(t(m1), t(v1), t(m2), t(v2), correlation=rho)
    std_error = sample.std().item() / math.sqrt(draws)
    assert abs(mean.item() - sample.mean().item()) < 5 * std_error
    assert var.item() == pytest.approx(sample.var().item(), rel=5 * math.sqrt(2 / draws) * 2)


def test_clark_max_of_two_iid_standard_normals_is_one_over_sqrt_pi() -> None:
    zero, one = torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    mean, var = moments.clark_max_moments(zero, one, zero, one)
    assert mean.item() == pytest.approx(1 / math.sqrt(math.pi), rel=1e-12)
    assert var.item() == pytest.approx(1 - 1 / math.pi, rel=1e-12)


def test_clark_degenerate_cases() -> None:
    t = lambda *values: torch.tensor(values, dtype=torch.float64)  # noqa: E731
    mean, var = moments.clark_max_moments(t(1.0, 0.0), t(0.0, 0.0), t(0.5, 2.0), t(0.0, 0.0))
    assert mean.tolist() == [1.0, 2.0] and var.tolist() == [0.0, 0.0]
    # Perfectly correlated with equal variances: X1 - X2 is constant, the max is the larger-mean one.
    mean, var = moments.clark_max_moments(t(1.0), t(0.7), t(0.0), t(0.7), correlation=1.0)
    assert mean.item() == 1.0 and var.item() == pytest.approx(0.7)
    with pytest.raises(ValueError, match="correlation"):
        moments.clark_max_moments(t(1.0), t(1.0), t(0.0), t(1.0), correlation=1.5)


# ----------------------------------------------------------------------------- propagation
def test_affine_layer_moments_are_exact() -> None:
    weight = torch.randn(4, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    layer = linear(weight, torch.arange(4.0, dtype=torch.float64))
    x = torch.rand(3, 6, dtype=torch.float64)
    var_in = torch.rand(3, 6, dtype=torch.float64)
    mean, var = moments.propagate_moments(layer, x, var_in)
    torch.testing.assert_close(mean, layer(x))
    torch.testing.assert_close(var, var_in @ (weight**2).T)


def test_one_hidden_layer_orthogonal_net_is_exact_against_monte_carlo() -> None:
    # Orthonormal rows + isotropic input noise make the pre-activations independent Gaussians, the
    # ReLU moments are exact and the outputs of the ReLUs independent: the logit mean and variance are
    # exact, so the only error is Monte Carlo's (5 standard errors / 5 relative standard errors).
    net = nn.Sequential(linear(orthonormal(16, 16, 1)), nn.ReLU(), linear(2.0 * orthonormal(5, 16, 2)))
    x = torch.rand(4, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    draws = 50_000
    for variance in (0.01, 0.2):
        mean, var = moments.gaussian_logit_moments(net, x, variance)
        mc_mean, mc_var = monte_carlo(net, x, variance, draws)
        assert ((mean - mc_mean).abs() / (mc_var / draws).sqrt()).max() < 5
        assert ((var - mc_var).abs() / mc_var).max() < 5 * math.sqrt(2 / draws)


def test_deeper_net_mean_is_close_and_variance_is_the_diagonal_approximation() -> None:
    # Two hidden layers: the second layer's inputs are correlated and non-Gaussian, which the
    # diagonal propagation ignores. Measured on this net: mean error <= 0.02 logit standard
    # deviations, variance within a factor ~2 either way. The test allows 0.1 std for the mean and a
    # factor 3 for the variance: loose, because it is an approximation, but it fails on a wrong rule
    # (e.g. variance through the unsquared weights or a missing ReLU correction).
    net = nn.Sequential(
        linear(orthonormal(20, 20, 1)), nn.ReLU(), linear(orthonormal(20, 20, 2)), nn.ReLU(),
        linear(3.0 * orthonormal(5, 20, 3)),
    )
    x = torch.rand(4, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    mean, var = moments.gaussian_logit_moments(net, x, 0.1)
    mc_mean, mc_var = monte_carlo(net, x, 0.1, 100_000)
    assert ((mean - mc_mean).abs() / mc_var.sqrt()).max() < 0.1
    ratio = var / mc_var
    assert ratio.min() > 1 / 3 and ratio.max() < 3


@pytest.mark.parametrize("padding_mode", ["zeros", "circular"])
def test_conv_layer_moments_are_exact(padding_mode: str) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, padding=1, stride=2, padding_mode=padding_mode).double()
    net = nn.Sequential(conv, nn.Flatten())
    x = torch.rand(2, 2, 6, 6, dtype=torch.float64)
    draws = 8_000
    mean, var = moments.gaussian_logit_moments(net, x, 0.05)
    mc_mean, mc_var = monte_carlo(net, x, 0.05, draws)
    assert mean.shape == (2, 27)
    assert ((mean - mc_mean).abs() / (mc_var / draws).sqrt()).max() < 5
    assert ((var - mc_var).abs() / mc_var).max() < 5 * math.sqrt(2 / draws)


def test_permutation_layers_move_variances_with_their_pixels() -> None:
    x = torch.rand(1, 1, 4, 4)
    var = torch.arange(16.0).reshape(1, 1, 4, 4)
    mean_out, var_out = moments.propagate_moments(nn.Sequential(nn.PixelUnshuffle(2), nn.Flatten()), x, var)
    assert sorted(var_out.flatten().tolist()) == list(range(16))
    torch.testing.assert_close(mean_out, nn.PixelUnshuffle(2)(x).flatten(1))


def test_unsupported_layer_is_named() -> None:
    with pytest.raises(TypeError, match="Tanh"):
        net = nn.Sequential(nn.Linear(3, 3), nn.Tanh())
        moments.propagate_moments(net, torch.zeros(1, 3), torch.ones(1, 3))


def test_subclass_with_its_own_forward_is_not_given_the_parent_rule() -> None:
    class Shifted(nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) + 1.0

    class Plain(nn.Linear):
        pass

    with pytest.raises(TypeError, match="Shifted"):
        moments.propagate_moments(Shifted(2, 2), torch.zeros(1, 2), torch.ones(1, 2))
    layer = Plain(2, 2)
    mean, _ = moments.propagate_moments(layer, torch.ones(1, 2), torch.ones(1, 2))
    torch.testing.assert_close(mean, layer(torch.ones(1, 2)))


def test_register_moment_rule_extends_propagation() -> None:
    class Double(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * x

    moments.register_moment_rule(Double, lambda _m, mean, var: (2 * mean, 4 * var))
    mean, var = moments.propagate_moments(nn.Sequential(Double()), torch.ones(1, 2), torch.ones(1, 2))
    assert mean.tolist() == [[2.0, 2.0]] and var.tolist() == [[4.0, 4.0]]


def test_dropout_in_training_mode_is_refused() -> None:
    with pytest.raises(TypeError, match="eval"):
        moments.propagate_moments(nn.Dropout(0.5), torch.zeros(1, 2), torch.ones(1, 2))
    mean, _ = moments.propagate_moments(nn.Dropout(0.5).eval(), torch.ones(1, 2), torch.ones(1, 2))
    assert mean.tolist() == [[1.0, 1.0]]


# ----------------------------------------------------------------------------- expected margin
def test_expected_margin_three_classes_matches_monte_carlo() -> None:
    # K = 3: "top two incorrect" is every incorrect class, Clark's mean is exact for independent
    # logits, so SM matches Monte Carlo within 5 standard errors.
    mean = torch.tensor([[2.0, 1.0, 0.5], [0.0, 0.2, 0.1]], dtype=torch.float64)
    var = torch.tensor([[0.5, 1.0, 0.3], [0.2, 0.4, 0.9]], dtype=torch.float64)
    y = torch.tensor([0, 2])
    draws = 400_000
    gen = torch.Generator().manual_seed(0)
    logits = mean + var.sqrt() * torch.randn(draws, 2, 3, generator=gen, dtype=torch.float64)
    true = logits[:, torch.arange(2), y]
    wrong = logits.scatter(2, y.view(1, 2, 1).expand(draws, 2, 1), float("-inf")).amax(2)
    sample = true - wrong
    sm = moments.expected_margin(mean, var, y)
    assert ((sm - sample.mean(0)).abs() / (sample.std(0) / math.sqrt(draws))).max() < 5


def test_expected_margin_many_classes_top2_and_all_modes() -> None:
    # K = 10 with several close incorrect logits: top2 ignores the rest and overestimates SM; the
    # full Clark recursion is closer. Against Monte Carlo of the true SM (2e5 draws, standard error
    # 0.002) the measured errors are top2 0.48, all 0.002; asserted: all within 0.05, top2 worse.
    gen = torch.Generator().manual_seed(1)
    mean = torch.tensor([[3.0, 1.0, 1.0, 0.9, 0.9, 0.8, 0.8, 0.7, 0.6, 0.5]], dtype=torch.float64)
    var = torch.full_like(mean, 0.5)
    y = torch.tensor([0])
    logits = mean + var.sqrt() * torch.randn(200_000, 1, 10, generator=gen, dtype=torch.float64)
    sample = (logits[..., 0] - logits[..., 1:].amax(-1)).mean().item()
    top2 = moments.expected_margin(mean, var, y, mode="top2").item()
    full = moments.expected_margin(mean, var, y, mode="all").item()
    assert abs(full - sample) < 0.05
    assert abs(top2 - sample) >= abs(full - sample)
    assert top2 <= 3.0 - 1.0  # noise only costs margin: SM <= clean margin of the means


def test_expected_margin_tends_to_the_plain_margin_as_variance_vanishes() -> None:
    mean = torch.tensor([[1.0, 3.0, 2.5, -1.0]], dtype=torch.float64)
    y = torch.tensor([1])
    for variance, tolerance in ((0.0, 0.0), (1e-8, 1e-4)):
        sm = moments.expected_margin(mean, torch.full_like(mean, variance), y)
        assert sm.item() == pytest.approx(0.5, abs=tolerance)
    two = moments.expected_margin(torch.tensor([[0.3, 1.0]]), torch.tensor([[5.0, 5.0]]), torch.tensor([0]))
    assert two.item() == pytest.approx(-0.7)  # K = 2: SM = mu_y - mu_other exactly, whatever the noise


def test_expected_margin_rejects_bad_labels() -> None:
    with pytest.raises(ValueError, match="label 4 is outside"):
        moments.expected_margin(torch.zeros(1, 3), torch.ones(1, 3), torch.tensor([4]))
    with pytest.raises(ValueError, match="mode"):
        moments.expected_margin(torch.zeros(1, 3), torch.ones(1, 3), torch.tensor([0]), mode="top3")


# ----------------------------------------------------------------------------- 1-Lipschitz layers
def test_orthogonal_mlp_moments_are_exact_with_one_hidden_layer() -> None:
    # OrthogonalLinear with orthonormal rows (20 -> 16) and isotropic noise: independent Gaussian
    # pre-activations, exact ReLU moments, exact logit moments (5 standard errors of MC).
    gen = torch.Generator().manual_seed(0)
    net = nn.Sequential(
        layers.OrthogonalLinear(20, 16, generator=gen),
        nn.ReLU(),
        layers.OrthogonalLinear(16, 4, generator=gen),
    ).double()
    x = torch.rand(3, 20, dtype=torch.float64, generator=gen)
    draws = 50_000
    mean, var = moments.gaussian_logit_moments(net, x, 0.05)
    mc_mean, mc_var = monte_carlo(net, x, 0.05, draws)
    assert ((mean - mc_mean).abs() / (mc_var / draws).sqrt()).max() < 5
    assert ((var - mc_var).abs() / mc_var).max() < 5 * math.sqrt(2 / draws)


@pytest.mark.parametrize("activation", ["maxmin", "groupsort"])
def test_maxmin_and_groupsort_moments_are_exact_after_an_orthogonal_layer(activation: str) -> None:
    # Independent Gaussian pairs: Clark's max and min moments are exact (MC: 5 standard errors).
    gen = torch.Generator().manual_seed(1)
    layer = layers.MaxMin() if activation == "maxmin" else layers.GroupSort(2)
    net = nn.Sequential(layers.OrthogonalLinear(8, 8, generator=gen), layer).double()
    x = torch.rand(2, 8, dtype=torch.float64, generator=gen)
    draws = 50_000
    mean, var = moments.gaussian_logit_moments(net, x, 0.3)
    mc_mean, mc_var = monte_carlo(net, x, 0.3, draws)
    assert ((mean - mc_mean).abs() / (mc_var / draws).sqrt()).max() < 5
    assert ((var - mc_var).abs() / mc_var).max() < 5 * math.sqrt(2 / draws)
    with pytest.raises(TypeError, match="group_size=4"):
        moments.propagate_moments(layers.GroupSort(4), torch.zeros(1, 8), torch.ones(1, 8))


@pytest.mark.parametrize(("stride", "padding_mode"), [(1, "zeros"), (2, "zeros"), (1, "circular")])
def test_orthogonal_conv_moments_are_exact(stride: int, padding_mode: str) -> None:
    gen = torch.Generator().manual_seed(2)
    conv = layers.OrthogonalConv2d(2, 4, 3, stride=stride, padding_mode=padding_mode, generator=gen)
    net = nn.Sequential(conv, nn.Flatten()).double()
    x = torch.rand(2, 2, 6, 6, dtype=torch.float64, generator=gen)
    draws = 8_000
    mean, var = moments.gaussian_logit_moments(net, x, 0.1)
    mc_mean, mc_var = monte_carlo(net, x, 0.1, draws)
    assert ((mean - mc_mean).abs() / (mc_var / draws).sqrt()).max() < 5
    assert ((var - mc_var).abs() / mc_var).max() < 5 * math.sqrt(2 / draws)
    torch.testing.assert_close(mean, net(x))  # an affine layer keeps the mean where the input is
