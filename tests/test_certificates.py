"""Certificates on models whose decision boundaries are known exactly (linear models).

For ``f(x) = W x + b`` the distance from ``x`` to the boundary of the predicted class c is
``min_{j != c} (f_c - f_j)(x) / ||w_c - w_j||``; every sound radius is at most that distance.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import allowed_failures
from scipy.stats import norm
from torch import nn

from painwatch.robust import (
    ABSTAIN,
    Certificate,
    lipschitz_certify,
    lipschitz_certify_batch,
    logit_margin,
    margin_for_class,
    smoothed_margin_certify,
    smoothed_margin_slack,
    smoothed_robustness,
)

SHAPE = (1, 4, 4)
DIM = 16



def linear_model(weight: torch.Tensor, bias: torch.Tensor) -> nn.Module:
    """``x (B, 1, 4, 4) -> W vec(x) + b`` as an ordinary network."""
    layer = nn.Linear(weight.shape[1], weight.shape[0], dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
    return nn.Sequential(nn.Flatten(), layer).double()


def spectral_norm(weight: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(weight, ord=2))


def boundary_distance(weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor) -> tuple[int, float]:
    """Predicted class and exact L2 distance to its decision boundary for a linear model."""
    logits = weight @ x.flatten() + bias
    c = int(logits.argmax())
    distances = [
        float((logits[c] - logits[j]) / torch.linalg.vector_norm(weight[c] - weight[j]))
        for j in range(weight.shape[0]) if j != c
    ]
    return c, min(distances)


def antisymmetric_pair(generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Two classes with ``w_1 = -w_0``, ``b_1 = -b_0``: there ``||W||_2 = ||w_0 - w_1|| / sqrt(2)``."""
    w = torch.randn(DIM, generator=generator, dtype=torch.float64)
    b = torch.randn(1, generator=generator, dtype=torch.float64)
    return torch.stack([w, -w]), torch.cat([b, -b])


# --- Certificate record and margins -----------------------------------------------------------------

def test_certificate_record_checks_its_fields() -> None:
    cert = Certificate(1, 0.5, "lipschitz", 0.0, 0, 0.0, 1.2, forward_passes=1)
    assert not cert.abstained and cert.to_dict()["abstained"] is False
    assert Certificate(ABSTAIN, 0.0, "randomized_smoothing", 0.25, 100, 0.001, 0.3).abstained
    assert cert.radius_rms((3, 2, 2)) == pytest.approx(0.5 / math.sqrt(12))
    assert cert.radius_grey_levels((3, 2, 2)) == pytest.approx(255 * 0.5 / math.sqrt(12))
    with pytest.raises(ValueError, match="unknown certificate method 'cohen'"):
        Certificate(0, 0.1, "cohen", 0.1, 10, 0.1, 0.0)
    with pytest.raises(ValueError, match=r"abstaining certificate must have radius 0\.0"):
        Certificate(ABSTAIN, 0.1, "soft_smoothing", 0.1, 10, 0.1, 0.0)
    with pytest.raises(ValueError, match="radius must be >= 0"):
        Certificate(0, -0.1, "soft_smoothing", 0.1, 10, 0.1, 0.0)
    with pytest.raises(ValueError, match="alpha must be in"):
        Certificate(0, 0.1, "soft_smoothing", 0.1, 10, 1.5, 0.0)
    with pytest.raises(ValueError, match="prediction must be a class index"):
        Certificate(-2, 0.0, "soft_smoothing", 0.1, 10, 0.1, 0.0)
    with pytest.raises(AttributeError):
        cert.radius = 2.0  # frozen
    with pytest.raises(TypeError, match=r"Certificate\.prediction must be an integer"):
        Certificate(0.5, 0.1, "soft_smoothing", 0.1, 10, 0.1, 0.0)
    # numpy scalars become Python numbers (JSON-ready, comparable).
    converted = Certificate(np.int64(2), np.float32(0.25), "soft_smoothing", 0.1, np.int64(10), 0.1, 0.9)
    assert type(converted.prediction) is int and type(converted.radius) is float
    assert converted == Certificate(2, 0.25, "soft_smoothing", 0.1, 10, 0.1, 0.9)
    assert Certificate(0, 0.1, "soft_smoothing", 0.1, 10, 0.1, math.nan).to_dict()["bound"] is None


def test_logit_margin_top_two_in_float64() -> None:
    logits = torch.tensor([[1.0, 3.0, 2.5], [0.0, -1.0, -4.0], [2.0, 2.0, 1.0]], dtype=torch.float32)
    prediction, margin = logit_margin(logits)
    assert prediction.tolist() == [1, 0, 0]
    assert margin.dtype == torch.float64
    assert margin.tolist() == pytest.approx([0.5, 1.0, 0.0])
    assert margin_for_class(logits, 2).tolist() == pytest.approx([-0.5, -4.0, -1.0])
    assert margin_for_class(logits, torch.tensor([1, 0, 1])).tolist() == pytest.approx([0.5, 1.0, 0.0])
    with pytest.raises(ValueError, match="K >= 2"):
        logit_margin(torch.ones(3, 1))
    with pytest.raises(ValueError, match="label must be in"):
        margin_for_class(logits, 3)


# --- Lipschitz margin -------------------------------------------------------------------------------

def test_lipschitz_radius_never_exceeds_the_distance_to_the_boundary(generator: torch.Generator) -> None:
    for num_classes in (2, 3, 7):
        weight = torch.randn(num_classes, DIM, generator=generator, dtype=torch.float64)
        bias = torch.randn(num_classes, generator=generator, dtype=torch.float64)
        model = linear_model(weight, bias)
        lipschitz = spectral_norm(weight)
        for _ in range(20):
            x = torch.rand(SHAPE, generator=generator, dtype=torch.float64)
            cert = lipschitz_certify(model, x, lipschitz)
            label, distance = boundary_distance(weight, bias, x)
            assert cert.prediction == label and cert.method == "lipschitz" and cert.forward_passes == 1
            assert 0.0 <= cert.radius <= distance * (1 + 1e-9)
            assert cert.radius == pytest.approx(cert.bound / (math.sqrt(2) * lipschitz))


def test_lipschitz_radius_is_tight_for_two_classes(generator: torch.Generator) -> None:
    weight, bias = antisymmetric_pair(generator)
    model = linear_model(weight, bias)
    lipschitz = spectral_norm(weight)
    normal = (weight[0] - weight[1]) / torch.linalg.vector_norm(weight[0] - weight[1])
    for _ in range(20):
        x = torch.rand(SHAPE, generator=generator, dtype=torch.float64)
        cert = lipschitz_certify(model, x, lipschitz)
        _, distance = boundary_distance(weight, bias, x)
        assert cert.radius == pytest.approx(distance, rel=1e-9)
        # 1% beyond the radius towards the boundary the prediction changes: nothing is left on the table.
        toward = (-1.0 if cert.prediction == 0 else 1.0) * normal.reshape(SHAPE)
        with torch.no_grad():
            inside = model((x + 0.99 * cert.radius * toward)[None]).argmax().item()
            outside = model((x + 1.01 * cert.radius * toward)[None]).argmax().item()
        assert inside == cert.prediction and outside != cert.prediction


def test_lipschitz_batch_matches_single_and_restores_training_mode(generator: torch.Generator) -> None:
    weight = torch.randn(3, DIM, generator=generator, dtype=torch.float64)
    model = nn.Sequential(linear_model(weight, torch.zeros(3, dtype=torch.float64)), nn.Dropout(0.5))
    model.train()
    xs = torch.rand((5, *SHAPE), generator=generator, dtype=torch.float64)
    batch = lipschitz_certify_batch(model, xs, spectral_norm(weight))
    assert model.training and all(m.training for m in model.modules())
    singles = [lipschitz_certify(model, x, spectral_norm(weight)) for x in xs]
    # Same answers one by one (dropout was off in both); batched BLAS may differ in the last bit.
    assert [c.prediction for c in batch] == [c.prediction for c in singles]
    assert [c.radius for c in batch] == pytest.approx([c.radius for c in singles], rel=1e-12)


# --- Smoothed margin --------------------------------------------------------------------------------

def test_smoothed_margin_radius_below_distance_and_slack_formula(generator: torch.Generator) -> None:
    # For a linear model E[f(x + xi)] = f(x): h is f itself and its boundaries are known.
    weight = torch.randn(4, DIM, generator=generator, dtype=torch.float64)
    bias = torch.randn(4, generator=generator, dtype=torch.float64)
    model = linear_model(weight, bias)
    lipschitz = spectral_norm(weight)
    for seed in range(15):
        x = torch.rand(SHAPE, generator=generator, dtype=torch.float64)
        cert = smoothed_margin_certify(model, x, sigma=0.2, lipschitz_constant=lipschitz, n0=20, n=200,
                                       alpha=0.01, batch_size=64,
                                       generator=torch.Generator().manual_seed(seed))
        label, distance = boundary_distance(weight, bias, x)
        assert cert.forward_passes == 220 and cert.n == 200 and cert.sigma == 0.2
        if not cert.abstained:
            assert cert.prediction == label
            assert cert.radius <= distance * (1 + 1e-9)
            assert cert.radius == pytest.approx(cert.bound / (math.sqrt(2) * lipschitz))
    expected_slack = 2 * 2.0 * 0.5 * math.sqrt(math.log(100) / 100)
    slack = smoothed_margin_slack(lipschitz_constant=2.0, sigma=0.5, n=100, alpha=0.01)
    assert slack == pytest.approx(expected_slack)


def test_smoothed_margin_lower_bound_fails_at_most_alpha_often() -> None:
    """Over many seeds, SM_low exceeds the true SM(x) no more often than alpha allows.

    Two antisymmetric classes: M_c(x + xi) is Gaussian with mean SM(x) = M_f(x) exactly, and its
    Lipschitz constant equals sqrt(2) L, so the concentration bound is used at full strength.
    A bound without the slack would exceed SM half of the time and fail this test.
    """
    generator = torch.Generator().manual_seed(3)
    weight, bias = antisymmetric_pair(generator)
    model = linear_model(weight, bias)
    lipschitz = spectral_norm(weight)
    x = torch.full(SHAPE, 0.5, dtype=torch.float64)
    _, true_margin = logit_margin(model(x[None]).detach())
    alpha, trials = 0.2, 300
    exceed = 0
    for seed in range(trials):
        cert = smoothed_margin_certify(model, x, sigma=0.3, lipschitz_constant=lipschitz, n0=10, n=40,
                                       alpha=alpha, batch_size=50,
                                       generator=torch.Generator().manual_seed(seed))
        exceed += cert.bound > float(true_margin[0])
    assert exceed <= allowed_failures(trials, alpha)


def test_smoothed_margin_abstains_on_the_boundary_and_is_reproducible() -> None:
    generator = torch.Generator().manual_seed(4)
    weight, _ = antisymmetric_pair(generator)
    x = torch.full(SHAPE, 0.5, dtype=torch.float64)
    # Bias that puts x exactly on the boundary: SM(x) = 0, nothing may be certified (w.p. >= 1 - alpha).
    bias0 = -float(weight[0] @ x.flatten())
    model = linear_model(weight, torch.tensor([bias0, -bias0], dtype=torch.float64))
    certs = [smoothed_margin_certify(model, x, sigma=0.25, lipschitz_constant=spectral_norm(weight), n0=10,
                                     n=100, alpha=0.05, generator=torch.Generator().manual_seed(seed))
             for seed in range(40)]
    assert sum(c.abstained for c in certs) >= 40 - allowed_failures(40, 0.05)
    assert all(c.radius == 0.0 for c in certs if c.abstained)
    shifted = x + 0.1  # off the boundary, so the certificate has a class and a radius
    first, again, other = (
        smoothed_margin_certify(model, shifted, sigma=0.25, lipschitz_constant=spectral_norm(weight), n0=10,
                                n=100, generator=torch.Generator().manual_seed(seed))
        for seed in (7, 7, 8)
    )
    assert first == again and first.bound != other.bound


# --- Smoothed robustness ----------------------------------------------------------------------------

def test_smoothed_robustness_limits_and_broadcasting() -> None:
    eps = np.linspace(0.0, 1.0, 5)[:, None]
    sigma = np.array([0.0, 0.1, 0.5, 1.0])[None, :]
    surface = smoothed_robustness(1.0, lipschitz_constant=0.5, eps=eps, sigma=sigma)
    assert surface.shape == (5, 4) and surface.dtype == np.float64
    assert ((surface >= 0) & (surface <= 1)).all()
    # sigma = 0: worst case, 1 exactly where the margin exceeds sqrt(2) L eps (here up to eps = 1.41).
    assert surface[:, 0].tolist() == [1.0] * 5
    assert smoothed_robustness(1.0, lipschitz_constant=1.0, eps=[0.5, 0.75], sigma=0.0).tolist() == [1.0, 0.0]
    # Non-increasing in eps and in sigma, 0 where nothing is certified.
    assert (np.diff(surface, axis=0) <= 1e-15).all() and (np.diff(surface, axis=1) <= 1e-15).all()
    assert smoothed_robustness(-0.3, lipschitz_constant=1.0, eps=0.0, sigma=0.5).item() == 0.0
    expected = 1 - math.exp(-((1.0 - math.sqrt(2) * 0.5 * 0.25) ** 2) / (4 * 0.25 * 0.1**2))
    assert smoothed_robustness(1.0, lipschitz_constant=0.5, eps=0.25, sigma=0.1).item() == pytest.approx(
        expected
    )
    # margin_lower_bound broadcasts too (one bound per sigma).
    per_sigma = smoothed_robustness(np.array([1.0, 0.2]), lipschitz_constant=1.0, eps=0.0,
                                    sigma=np.array([0.3, 0.3]))
    assert per_sigma.shape == (2,)


def test_smoothed_robustness_is_below_the_exact_probability_for_a_linear_model() -> None:
    """Two antisymmetric classes, worst shift eps: P[predict c] = Phi((M - ||dw|| eps) / (||dw|| sigma))."""
    generator = torch.Generator().manual_seed(5)
    weight, _ = antisymmetric_pair(generator)
    lipschitz = spectral_norm(weight)
    scale = float(torch.linalg.vector_norm(weight[0] - weight[1]))
    margin = 0.8 * scale  # M_f(x) for some x at distance 0.8 from the boundary
    eps, sigma = np.meshgrid(np.linspace(0, 1, 11), np.linspace(0.01, 2, 12))
    bound = smoothed_robustness(margin, lipschitz_constant=lipschitz, eps=eps, sigma=sigma)
    exact = norm.cdf((margin - scale * eps) / (scale * sigma))
    assert (bound <= exact + 1e-12).all()
    assert bound.max() > 0.99  # the bound is not vacuous


# --- Validation -------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"x": torch.rand(1, 1, 4, 4)}, ValueError, r"shape \(C, H, W\).*not a batch"),
        ({"x": torch.full(SHAPE, 2.0)}, ValueError, r"pixels in \[0, 1\].*\[2, 2\]"),
        ({"x": torch.full(SHAPE, math.nan)}, ValueError, "non-finite.*NaN"),
        ({"x": torch.zeros(SHAPE, dtype=torch.uint8)}, TypeError, "floating-point"),
        ({"x": np.zeros(SHAPE)}, TypeError, "torch.Tensor"),
        ({"sigma": 0.0}, ValueError, "sigma must be a finite number > 0"),
        ({"sigma": -1.0}, ValueError, "sigma must be"),
        ({"sigma": "0.1"}, TypeError, "sigma must be a real number"),
        ({"alpha": 1.0}, ValueError, "alpha must be strictly between 0 and 1"),
        ({"alpha": 0.0}, ValueError, "alpha must be strictly between 0 and 1"),
        ({"n": 0}, ValueError, "n must be >= 1, got 0"),
        ({"n": 1e3}, TypeError, "n must be an integer"),
        ({"n0": 0}, ValueError, "n0 must be >= 1"),
        ({"batch_size": 0}, ValueError, "batch_size must be >= 1"),
        ({"lipschitz_constant": 0.0}, ValueError, "lipschitz_constant must be a finite number > 0"),
        ({"lipschitz_constant": math.inf}, ValueError, "lipschitz_constant must be a finite number > 0"),
        ({"generator": 3}, TypeError, "generator must be a torch.Generator"),
        ({"model": "net"}, TypeError, "model must be callable"),
        ({"model": lambda b: torch.zeros(b.shape[0])}, ValueError, r"shape \(B, K\)"),
        ({"model": lambda b: torch.zeros(b.shape[0] + 1, 3)}, ValueError, r"shape \(B, K\)"),
        ({"model": lambda b: torch.zeros(b.shape[0], 1)}, ValueError, "at least 2 classes"),
        ({"model": lambda b: torch.full((b.shape[0], 2), math.nan)}, ValueError, "non-finite logits"),
    ],
)
def test_smoothed_margin_validates_inputs(kwargs: dict, error: type, match: str) -> None:
    arguments = {
        "model": lambda b: b.flatten(1)[:, :3], "x": torch.rand(SHAPE), "sigma": 0.1,
        "lipschitz_constant": 1.0, "n0": 5, "n": 10, "alpha": 0.01, "batch_size": 8, "generator": None,
    }
    arguments.update(kwargs)
    with pytest.raises(error, match=match):
        smoothed_margin_certify(**arguments)


def test_lipschitz_and_robustness_validate_inputs() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(DIM, 3))
    with pytest.raises(ValueError, match=r"lipschitz_constant must be a finite number > 0 .*got -1.0"):
        lipschitz_certify(model, torch.rand(SHAPE), -1.0)
    with pytest.raises(ValueError, match=r"x must have shape \(B, C, H, W\)"):
        lipschitz_certify_batch(model, torch.rand(SHAPE), 1.0)
    with pytest.raises(ValueError, match="eps must be finite and >= 0"):
        smoothed_robustness(1.0, lipschitz_constant=1.0, eps=-0.1, sigma=0.1)
    with pytest.raises(ValueError, match="sigma must be finite and >= 0"):
        smoothed_robustness(1.0, lipschitz_constant=1.0, eps=0.1, sigma=[0.1, math.nan])
    with pytest.raises(ValueError, match="do not broadcast"):
        smoothed_robustness([1.0, 2.0], lipschitz_constant=1.0, eps=[0.1, 0.2, 0.3], sigma=0.1)
    with pytest.raises(ValueError, match="margin_lower_bound contains NaN"):
        smoothed_robustness(math.nan, lipschitz_constant=1.0, eps=0.1, sigma=0.1)


def test_package_re_exports_every_public_name_of_every_robust_module() -> None:
    import importlib
    import pkgutil

    import painwatch.robust as robust

    for info in pkgutil.iter_modules(robust.__path__):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"painwatch.robust.{info.name}")
        missing = sorted(set(getattr(module, "__all__", ())) - set(robust.__all__))
        assert not missing, f"painwatch.robust does not re-export {missing} from painwatch.robust.{info.name}"
        assert all(getattr(robust, name) is getattr(module, name) for name in module.__all__)
