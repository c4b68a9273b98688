"""PGD-L2 (ART) at 0.99 x each certified radius never flips a certified prediction.

Small networks are trained for a fraction of a second on scikit-learn's 8x8 digits (pixels scaled to
[0, 1], input (1, 8, 8)). Lipschitz certificates are checked exactly on the bare network, with the
constant from :func:`painwatch.robust.lipschitz_upper_bound`. Smoothing certificates are
checked on the smoothed classifier they certify, estimated with many fresh samples at the adversarial
point, after attacking a differentiable Monte Carlo surrogate (a statistical check at fixed seeds).
Each check is paired with a control that the same attack *does* flip predictions when the radius is
inflated, so the checks can fail.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

from painwatch.robust import (
    Certificate,
    MaxMin,
    MonteCarloSurrogate,
    OrthogonalLinear,
    SmoothedClassifier,
    attack_certificates,
    lipschitz_certify_batch,
    lipschitz_upper_bound,
    monte_carlo_smoothed_classifier,
    network_classifier,
    pgd_l2,
    smoothed_margin_certify,
    soft_smoothing_certify,
)

SHAPE = (1, 8, 8)
SIGMA = 0.25



@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    data = load_digits()
    images = torch.tensor(data.data / 16.0, dtype=torch.float32).reshape(-1, *SHAPE)
    return images, torch.tensor(data.target, dtype=torch.long)


def train(model: nn.Module, digits, epochs: int, noise: float, seed: int = 0) -> nn.Module:
    """Adam with Gaussian noise augmentation on the first 1500 digits; returns the model in eval mode,
    frozen (attacks need input gradients only; frozen orthogonal layers cache their weight)."""
    images, labels = digits
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(epochs):
        order = torch.randperm(1500, generator=generator)
        for start in range(0, 1500, 100):
            index = order[start:start + 100]
            batch = images[index] + noise * torch.randn(images[index].shape, generator=generator)
            loss = nn.functional.cross_entropy(model(batch), labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval().requires_grad_(False)


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1),
                         nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 10))


def orthogonal() -> nn.Module:
    generator = torch.Generator().manual_seed(0)
    return nn.Sequential(nn.Flatten(), OrthogonalLinear(64, 64, generator=generator), MaxMin(),
                         OrthogonalLinear(64, 10, generator=generator))


@pytest.fixture(scope="module")
def noisy_mlp(digits) -> nn.Module:
    return train(mlp(), digits, epochs=12, noise=SIGMA)


def test_accuracy_of_the_test_networks(digits, noisy_mlp) -> None:
    images, labels = digits
    with torch.no_grad():
        accuracy = (noisy_mlp(images[1500:]).argmax(1) == labels[1500:]).float().mean()
    assert accuracy > 0.85  # a real classifier, not a constant one


# --- the attack itself ------------------------------------------------------------------------------

def test_pgd_l2_stays_in_the_ball_and_the_box(digits, noisy_mlp) -> None:
    images, labels = digits
    x, y = images[1500:1510], labels[1500:1510]
    eps = torch.linspace(0.0, 1.5, 10)
    noisy_mlp.train()
    first = pgd_l2(noisy_mlp, x, y, eps=eps, steps=20, restarts=1, generator=torch.Generator().manual_seed(0))
    again = pgd_l2(noisy_mlp, x, y, eps=eps, steps=20, restarts=1, generator=torch.Generator().manual_seed(0))
    assert noisy_mlp.training  # flags restored
    noisy_mlp.eval()
    assert torch.equal(first, again)  # seeded restarts: reproducible
    norms = (first - x).flatten(1).norm(dim=1)
    assert (norms <= eps * (1 + 1e-6) + 1e-7).all()
    assert torch.equal(first[0], x[0])  # eps = 0 leaves the image unchanged
    assert float(first.min()) >= 0.0 and float(first.max()) <= 1.0
    with torch.no_grad():
        assert (noisy_mlp(first[5:]).argmax(1) != y[5:]).float().mean() >= 0.8  # large budgets succeed
    with pytest.raises(ValueError, match=r"eps must be a number or have shape \(10,\)"):
        pgd_l2(noisy_mlp, x, y, eps=torch.ones(3))
    with pytest.raises(ValueError, match="eps must be finite and >= 0"):
        pgd_l2(noisy_mlp, x, y, eps=-0.1)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 10\)"):
        pgd_l2(noisy_mlp, x, y + 10, eps=0.1)
    with pytest.raises(ValueError, match=r"labels must be an integer tensor of shape \(10,\)"):
        pgd_l2(noisy_mlp, x, y[:3], eps=0.1)


def test_attack_finds_the_exact_boundary_of_a_linear_model() -> None:
    """Two antisymmetric linear classes: the Lipschitz radius is the exact distance to the boundary.

    PGD at 0.99 r flips nothing; at 1.01 r it flips every point: the attack reaches the boundary.
    """
    generator = torch.Generator().manual_seed(1)
    w = torch.randn(64, generator=generator)
    layer = nn.Linear(64, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.stack([w, -w]) * 2.0)
        layer.bias.zero_()
    model = nn.Sequential(nn.Flatten(), layer)
    x = 0.4 + 0.2 * torch.rand((12, *SHAPE), generator=generator)
    # Shift each image along w so that its distance to the boundary is between 0.05 and 0.3.
    unit = (w / w.norm()).reshape(SHAPE)
    distance = (x.flatten(1) @ w / w.norm())
    target = torch.linspace(0.05, 0.3, 12) * torch.where(torch.arange(12) % 2 == 0, 1.0, -1.0)
    x = x + (target - distance)[:, None, None, None] * unit
    certificates = lipschitz_certify_batch(model, x, lipschitz_upper_bound(model, SHAPE))
    assert [c.radius for c in certificates] == pytest.approx(target.abs().tolist(), rel=1e-4)
    report = attack_certificates(model, network_classifier(model), x, certificates, fraction=0.99,
                                 steps=30, restarts=0, generator=torch.Generator().manual_seed(0))
    assert report.num_attacked == 12 and report.num_flipped == 0
    assert report.max_budget_used == pytest.approx(0.99, rel=1e-5)
    inflated = [Certificate(c.prediction, 1.02 * c.radius, c.method, c.sigma, c.n, c.alpha, c.bound)
                for c in certificates]
    report = attack_certificates(model, network_classifier(model), x, inflated, fraction=0.99, steps=30,
                                 restarts=0, generator=torch.Generator().manual_seed(0))
    assert report.num_flipped == 12


# --- Lipschitz certificates: exact check on the bare network -----------------------------------------

@pytest.mark.parametrize("architecture", [mlp, cnn, orthogonal])
def test_pgd_never_breaks_a_lipschitz_certificate(digits, architecture) -> None:
    images, _ = digits
    model = train(architecture(), digits, epochs=6, noise=0.0)
    lipschitz = lipschitz_upper_bound(model, SHAPE)
    x = images[1500:1530]
    certificates = lipschitz_certify_batch(model, x, lipschitz)
    report = attack_certificates(model, network_classifier(model), x, certificates, steps=30, restarts=1,
                                 generator=torch.Generator().manual_seed(0))
    assert report.num_attacked >= 25
    assert report.num_flipped == 0, f"certificates broken at {report.flipped}"
    # Control: the same attack flips predictions once the radii are inflated far enough.
    factor = 4.0 if architecture is orthogonal else 40.0
    inflated = [Certificate(c.prediction, factor * c.radius, c.method, 0.0, 0, 0.0, c.bound)
                for c in certificates]
    control = attack_certificates(model, network_classifier(model), x, inflated, steps=30, restarts=0,
                                  generator=torch.Generator().manual_seed(0))
    assert control.num_flipped > 0


# --- smoothing certificates: statistical check on the smoothed classifier ----------------------------

def certify_points(method: str, model: nn.Module, x: torch.Tensor) -> list[Certificate]:
    certificates = []
    for index, image in enumerate(x):
        generator = torch.Generator().manual_seed(100 + index)
        if method == "smoothed_margin":
            lipschitz = lipschitz_upper_bound(model, SHAPE)
            certificates.append(smoothed_margin_certify(
                model, image, sigma=SIGMA, lipschitz_constant=lipschitz, n0=64, n=1000, alpha=0.001,
                batch_size=1000, generator=generator))
        elif method == "randomized_smoothing":
            certificates.append(SmoothedClassifier(model, 10, SIGMA).certify(
                image, n0=64, n=1000, alpha=0.001, batch_size=1000, generator=generator))
        else:
            certificates.append(soft_smoothing_certify(model, image, sigma=SIGMA, n0=64, n=1000, alpha=0.001,
                                                       batch_size=1000, generator=generator))
    return certificates


KINDS = {"smoothed_margin": "logits", "randomized_smoothing": "counts", "soft_smoothing": "softmax"}


@pytest.mark.parametrize("method", list(KINDS))
def test_pgd_does_not_break_smoothing_certificates(digits, noisy_mlp, method) -> None:
    images, _ = digits
    x = images[1500:1520]
    certificates = certify_points(method, noisy_mlp, x)
    kind = KINDS[method]
    surrogate = MonteCarloSurrogate(noisy_mlp, sigma=SIGMA, input_shape=SHAPE, num_draws=64, kind=kind,
                                    generator=torch.Generator().manual_seed(1))
    classify = monte_carlo_smoothed_classifier(noisy_mlp, sigma=SIGMA, kind=kind, num=2000, num_classes=10,
                                               generator=torch.Generator().manual_seed(2))
    report = attack_certificates(surrogate, classify, x, certificates, steps=30, restarts=1,
                                 generator=torch.Generator().manual_seed(3))
    assert report.num_attacked >= 10
    assert report.num_flipped == 0, f"{method}: certificates broken at {report.flipped}"
    # Control: far beyond the certified radii the attack on the surrogate does change the smoothed class.
    inflated = [Certificate(c.prediction, 6.0 * c.radius, c.method, c.sigma, c.n, c.alpha, c.bound)
                for c in certificates]
    control = attack_certificates(surrogate, classify, x, inflated, steps=30, restarts=0,
                                  generator=torch.Generator().manual_seed(3))
    assert control.num_flipped > 0


@pytest.mark.slow
@pytest.mark.parametrize("method", list(KINDS))
def test_pgd_does_not_break_smoothing_certificates_over_many_points(digits, noisy_mlp, method) -> None:
    """180 points, three seeds for the noise of certification, surrogate and classification."""
    images, _ = digits
    flipped, attacked = 0, 0
    for seed in range(3):
        x = images[1500 + 60 * seed:1560 + 60 * seed]
        certificates = certify_points(method, noisy_mlp, x)
        kind = KINDS[method]
        surrogate = MonteCarloSurrogate(noisy_mlp, sigma=SIGMA, input_shape=SHAPE, num_draws=128, kind=kind,
                                        generator=torch.Generator().manual_seed(seed))
        classify = monte_carlo_smoothed_classifier(noisy_mlp, sigma=SIGMA, kind=kind, num=5000,
                                                   num_classes=10,
                                                   generator=torch.Generator().manual_seed(10 + seed))
        report = attack_certificates(surrogate, classify, x, certificates, steps=60, restarts=2,
                                     generator=torch.Generator().manual_seed(20 + seed))
        flipped += report.num_flipped
        attacked += report.num_attacked
    assert attacked >= 100
    assert flipped == 0


def test_attack_certificates_checks_its_inputs(digits, noisy_mlp) -> None:
    images, _ = digits
    x = images[:2]
    certificate = Certificate(0, 0.1, "lipschitz", 0.0, 0, 0.0, 1.0)
    with pytest.raises(ValueError, match="got 1 certificates for 2 images"):
        attack_certificates(noisy_mlp, network_classifier(noisy_mlp), x, [certificate])
    with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\]"):
        attack_certificates(noisy_mlp, network_classifier(noisy_mlp), x, [certificate] * 2, fraction=1.5)
    abstain = Certificate(-1, 0.0, "randomized_smoothing", 0.25, 100, 0.001, 0.2)
    report = attack_certificates(noisy_mlp, network_classifier(noisy_mlp), x, [abstain] * 2)
    assert report.num_attacked == 0 and report.num_flipped == 0 and report.flip_rate == 0.0
    with pytest.raises(ValueError, match="kind must be one of"):
        MonteCarloSurrogate(noisy_mlp, sigma=SIGMA, input_shape=SHAPE, kind="median")
    with pytest.raises(ValueError, match="needs num_classes"):
        monte_carlo_smoothed_classifier(noisy_mlp, sigma=SIGMA, kind="counts", num=100)
    surrogate = MonteCarloSurrogate(noisy_mlp, sigma=SIGMA, input_shape=SHAPE, num_draws=8, kind="softmax",
                                    generator=torch.Generator().manual_seed(0))
    log_scores = surrogate(x)
    assert log_scores.shape == (2, 10)
    assert np.allclose(log_scores.exp().sum(1).detach().numpy(), 1.0, atol=1e-5)  # log of a mean softmax
