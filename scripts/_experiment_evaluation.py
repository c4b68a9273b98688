"""Evaluation of a trained network for the experiment tables (scripts/_experiment_common.py).

One set of held-out points is evaluated for everything: clean accuracy of the bare network, the
Lipschitz-margin, smoothed-margin and randomized-smoothing certified accuracy curves, accuracy under
Gaussian noise and the PGD-L2 check of the certificates (:func:`painwatch.robust.attacks.attack_certificates`;
exact for the Lipschitz certificates, which certify the bare network; statistical for the smoothed ones).
A table that reports a clean accuracy and a certified accuracy therefore compares the same points.

"Certified accuracy at radius r" is the fraction of the evaluated points whose certificate predicts the
true label (no abstention) with a radius ``>= r`` [Cohen19; RC]; it is non-increasing in ``r``. Each
accuracy comes with its two-sided exact 95 % Clopper-Pearson interval [CP34] over the points
(:func:`painwatch.robust.evaluation.certified_accuracy_interval`), which treats the points as
independent draws from the population and says nothing about the certificates' own ``alpha``. Radii
and noise levels are L2 norms in [0, 1] pixel units. Every random draw comes from a seeded
``torch.Generator``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy.stats import norm
from torch import nn

from painwatch.robust import attacks, evaluation, smoothing
from painwatch.robust.certificate import Certificate
from painwatch.robust.layers import export_plain
from painwatch.robust.lipschitz import lipschitz_upper_bound
from painwatch.robust.margin import lipschitz_certify_batch, smoothed_margin_certify

CONFIDENCE = 0.95


@dataclass
class EvalSettings:
    """What the evaluation computes and with how many samples.

    ``num_test`` is how many held-out points were chosen for everything (``None``: all of them; see
    :func:`stratified_order`); the smoothing PGD checks attack the first ``pgd_smoothed_points`` of them.
    """

    num_test: int | None = None
    radii: Sequence[float] = field(default_factory=lambda: [round(0.05 * i, 2) for i in range(41)])
    sm_sigma: float = 0.25
    sm_n0: int = 100
    sm_n: int = 1000
    rs_sigma: float = 0.25
    rs_n0: int = 100
    rs_n: int = 2000
    alpha: float = 0.001
    noise_sigmas: Sequence[float] = (0.1, 0.25, 0.5, 1.0)
    noise_draws: int = 20
    pgd_steps: int = 50
    pgd_restarts: int = 1
    pgd_smoothed_points: int = 20
    pgd_surrogate_draws: int = 32
    pgd_classifier_draws: int = 1000
    batch_size: int = 1000
    seed: int = 0


# --------------------------------------------------------------------------------------------- points
def stratified_order(labels: np.ndarray, count: int | None, seed: int) -> np.ndarray:
    """Indices of ``count`` points (all of them for ``None``), stratified by class and seeded.

    The points are dealt class by class in rounds (a seeded shuffle within each class, and of the class
    order in each round), so that *every prefix* of the returned order is stratified: in its first ``k``
    points the counts of two classes differ by at most one, as long as neither class has run out. The
    smoothing PGD checks and the MNIST benchmark take such prefixes.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0:
        raise ValueError(f"labels must be a non-empty 1-D array, got shape {labels.shape}")
    total = labels.shape[0]
    if count is None:
        count = total
    if not 0 < count <= total:
        raise ValueError(f"--num-test must be between 1 and the {total} held-out points, got {count}")
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    per_class = [list(rng.permutation(np.flatnonzero(labels == c))) for c in classes]
    order: list[int] = []
    for round_index in range(max(len(members) for members in per_class)):
        for class_index in rng.permutation(len(classes)):
            members = per_class[class_index]
            if round_index < len(members):
                order.append(int(members[round_index]))
    return np.array(order[:count], dtype=np.int64)


# --------------------------------------------------------------------------------------------- accuracies
def accuracy_with_interval(correct: np.ndarray) -> tuple[float, list[float]]:
    """Accuracy of ``correct`` (booleans, one per point) and its 95 % Clopper-Pearson interval."""
    flags = np.asarray(correct, dtype=bool)
    # Clean accuracy is the certified accuracy at radius 0 of the bare prediction: one interval code path.
    zeros = np.zeros(flags.shape[0])
    low, high = evaluation.certified_accuracy_interval(flags, zeros, 0.0, confidence=CONFIDENCE)
    return evaluation.certified_accuracy_at(flags, zeros, 0.0), [low, high]


def certified_accuracy_with_intervals(
    predictions: np.ndarray, radii: np.ndarray, labels: np.ndarray, grid: Sequence[float]
) -> tuple[list[float], list[list[float]]]:
    """Certified accuracy at every radius of ``grid`` and its 95 % Clopper-Pearson interval.

    A point counts at ``r`` when ``prediction == label`` (abstentions, -1, never count) and its radius
    is ``>= r``. Returns ``(curve, [[low, high], ...])``, both of ``len(grid)``.
    """
    predictions = np.asarray(predictions)
    correct = (predictions == np.asarray(labels)) & (predictions >= 0)
    curve = evaluation.certified_accuracy_curve(correct, radii, grid).tolist()
    intervals = [
        list(evaluation.certified_accuracy_interval(correct, radii, r, confidence=CONFIDENCE)) for r in grid
    ]
    return curve, intervals


def value_at(grid: Sequence[float], values: Sequence[Any], radius: float) -> Any:
    """The entry of ``values`` (a curve or its intervals over ``grid``) at ``radius``, which must be on it."""
    for r, value in zip(grid, values, strict=True):
        if math.isclose(r, radius, abs_tol=1e-9):
            return value
    raise ValueError(f"radius {radius} is not on the evaluation grid")


def records(certs: Sequence[Certificate]) -> tuple[np.ndarray, np.ndarray]:
    """``(predictions, radii)`` arrays of a list of certificates."""
    return (
        np.array([c.prediction for c in certs], dtype=np.int64),
        np.array([c.radius for c in certs], dtype=np.float64),
    )


def max_certifiable_radius(sigma: float, n: int, alpha: float) -> float:
    """Cohen's cap ``sigma PhiInv(alpha^(1/n))``: no randomized-smoothing radius from n draws exceeds it."""
    return sigma * float(norm.ppf(alpha ** (1.0 / n)))


# --------------------------------------------------------------------------------------------- certificates
def randomized_smoothing_certificates(
    model: nn.Module,
    images: torch.Tensor,
    *,
    num_classes: int,
    sigma: float,
    n0: int,
    n: int,
    alpha: float,
    batch_size: int,
    generator: torch.Generator,
) -> list[Certificate]:
    """Cohen's CERTIFY [Cohen19] for every image of ``images`` ``(B, C, H, W)``, one seeded stream."""
    smoothed = smoothing.SmoothedClassifier(model, num_classes, sigma)
    return [smoothed.certify(x, n0=n0, n=n, alpha=alpha, batch_size=batch_size, generator=generator)
            for x in images]


def smoothed_margin_certificates(
    model: nn.Module,
    images: torch.Tensor,
    *,
    sigma: float,
    lipschitz_constant: float,
    n0: int,
    n: int,
    alpha: float,
    batch_size: int,
    generator: torch.Generator,
) -> list[Certificate]:
    """The smoothed-margin certificate [RC, Ch. 3] for every image of ``images``, one seeded stream."""
    return [
        smoothed_margin_certify(
            model, x, sigma=sigma, lipschitz_constant=lipschitz_constant, n0=n0, n=n, alpha=alpha,
            batch_size=batch_size, generator=generator,
        )
        for x in images
    ]


def noise_accuracy(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    sigmas: Sequence[float],
    draws: int,
    generator: torch.Generator,
) -> dict[str, float]:
    """Accuracy of the bare network on ``x + N(0, sigma^2 I)`` (unclipped), averaged over ``draws``."""
    device = images.device
    result: dict[str, float] = {}
    with torch.no_grad():
        for sigma in sigmas:
            correct = 0
            for _ in range(draws):
                noise = torch.randn(images.shape, generator=generator, device=generator.device).to(device)
                correct += int((model(images + sigma * noise).argmax(dim=1) == labels).sum())
            result[f"{sigma:g}"] = correct / (draws * images.shape[0])
    return result


def _method_result(certs: Sequence[Certificate], labels: np.ndarray, grid: Sequence[float]) -> dict[str, Any]:
    predictions, radii = records(certs)
    curve, intervals = certified_accuracy_with_intervals(predictions, radii, labels, grid)
    return {
        "curve": curve,
        "curve_interval": intervals,
        "abstentions": int((predictions < 0).sum()),
        "predictions": predictions.tolist(),
        "certified_radii": radii.tolist(),
    }


def evaluate_model(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    num_classes: int,
    settings: EvalSettings,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Every accuracy, certificate and check of the module docstring on all of ``images``.

    ``images`` ``(N, C, H, W)`` in [0, 1] and ``labels`` ``(N,)`` are the chosen held-out points (on the
    model's device). Clean accuracy, the three certified-accuracy curves and the noise accuracy are all
    on these N points, with the per-point clean predictions and certificates in the result; the
    Lipschitz PGD check attacks every Lipschitz-certified point, the smoothing checks the certified
    points among the first ``settings.pgd_smoothed_points``. The network is exported to plain layers
    first (same function, no Björck cost); ``L`` is the sound bound of that plain network.
    """
    plain = export_plain(model).eval()
    lipschitz_constant = lipschitz_upper_bound(plain, tuple(images.shape[1:]))
    grid = list(settings.radii)
    timings: dict[str, float] = {}
    y_np = labels.cpu().numpy()
    result: dict[str, Any] = {
        "lipschitz_constant": lipschitz_constant,
        "radii": grid,
        "num_points": int(images.shape[0]),
        "confidence": CONFIDENCE,
        "labels": y_np.tolist(),
    }

    with torch.no_grad():
        clean_predictions = plain(images).argmax(dim=1).cpu().numpy()
    clean_accuracy, clean_interval = accuracy_with_interval(clean_predictions == y_np)
    result["clean_accuracy"], result["clean_accuracy_interval"] = clean_accuracy, clean_interval
    result["clean_predictions"] = clean_predictions.tolist()

    start = time.perf_counter()
    lipschitz = lipschitz_certify_batch(plain, images, lipschitz_constant)
    timings["lipschitz"] = time.perf_counter() - start
    result["lipschitz"] = {**_method_result(lipschitz, y_np, grid), "forward_passes_per_point": 1}
    log(
        f"  clean accuracy {clean_accuracy:.3f} on {images.shape[0]} points; Lipschitz margin: "
        f"L = {lipschitz_constant:.6f}, certified acc @0.5 = "
        f"{value_at(grid, result['lipschitz']['curve'], 0.5):.3f}"
    )

    start = time.perf_counter()
    smoothed_margin = smoothed_margin_certificates(
        plain, images, sigma=settings.sm_sigma, lipschitz_constant=lipschitz_constant, n0=settings.sm_n0,
        n=settings.sm_n, alpha=settings.alpha, batch_size=settings.batch_size,
        generator=torch.Generator().manual_seed(settings.seed + 101),
    )
    timings["smoothed_margin"] = time.perf_counter() - start
    result["smoothed_margin"] = {
        "sigma": settings.sm_sigma,
        "n0": settings.sm_n0,
        "n": settings.sm_n,
        "alpha": settings.alpha,
        "forward_passes_per_point": settings.sm_n0 + settings.sm_n,
        **_method_result(smoothed_margin, y_np, grid),
    }
    log(
        f"  smoothed margin (sigma {settings.sm_sigma}, n {settings.sm_n}): certified acc @0.5 = "
        f"{value_at(grid, result['smoothed_margin']['curve'], 0.5):.3f} ({timings['smoothed_margin']:.0f} s)"
    )

    start = time.perf_counter()
    randomized = randomized_smoothing_certificates(
        plain, images, num_classes=num_classes, sigma=settings.rs_sigma, n0=settings.rs_n0, n=settings.rs_n,
        alpha=settings.alpha, batch_size=settings.batch_size,
        generator=torch.Generator().manual_seed(settings.seed + 202),
    )
    timings["randomized_smoothing"] = time.perf_counter() - start
    result["randomized_smoothing"] = {
        "sigma": settings.rs_sigma,
        "n0": settings.rs_n0,
        "n": settings.rs_n,
        "alpha": settings.alpha,
        "max_certifiable_radius": max_certifiable_radius(settings.rs_sigma, settings.rs_n, settings.alpha),
        "forward_passes_per_point": settings.rs_n0 + settings.rs_n,
        **_method_result(randomized, y_np, grid),
    }
    log(
        f"  randomized smoothing (sigma {settings.rs_sigma}, n {settings.rs_n}): certified acc @0.5 = "
        f"{value_at(grid, result['randomized_smoothing']['curve'], 0.5):.3f} "
        f"({timings['randomized_smoothing']:.0f} s)"
    )

    start = time.perf_counter()
    result["noise_accuracy"] = noise_accuracy(
        plain, images, labels, sigmas=settings.noise_sigmas, draws=settings.noise_draws,
        generator=torch.Generator().manual_seed(settings.seed + 303),
    )
    timings["noise_accuracy"] = time.perf_counter() - start

    result["pgd_check"] = _pgd_checks(
        plain, images, {"lipschitz": lipschitz, "smoothed_margin": smoothed_margin,
                        "randomized_smoothing": randomized},
        num_classes=num_classes, settings=settings, log=log,
    )
    timings["pgd_check"] = sum(check["seconds"] for check in result["pgd_check"].values())
    result["seconds"] = timings
    return result


# --------------------------------------------------------------------------------------------- PGD check
def _attack_summary(report: attacks.CertificateAttackReport, seconds: float) -> dict[str, Any]:
    return {
        "num_points": report.num_points,
        "num_attacked": report.num_attacked,
        "num_flipped": report.num_flipped,
        "flipped_indices": list(report.flipped),
        "num_changed_at_clean": report.num_changed_at_clean,
        "fraction_of_radius": report.fraction,
        "max_budget_used": report.max_budget_used,
        "seconds": seconds,
    }


def _pgd_checks(
    plain: nn.Module,
    x: torch.Tensor,
    certificates: dict[str, list[Certificate]],
    *,
    num_classes: int,
    settings: EvalSettings,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """PGD at 0.99 r against every Lipschitz certificate, and against the first smoothed ones."""
    checks: dict[str, Any] = {}
    start = time.perf_counter()
    report = attacks.attack_certificates(
        plain,
        attacks.network_classifier(plain),
        x,
        certificates["lipschitz"],
        steps=settings.pgd_steps,
        restarts=settings.pgd_restarts,
        generator=torch.Generator().manual_seed(settings.seed + 404),
    )
    checks["lipschitz"] = _attack_summary(report, time.perf_counter() - start)
    log(f"  PGD check, Lipschitz: {report.num_flipped} of {report.num_attacked} certified points broken")

    input_shape = tuple(x.shape[1:])
    budget = min(settings.pgd_smoothed_points, x.shape[0])
    for name, kind, sigma in (
        ("smoothed_margin", "logits", settings.sm_sigma),
        ("randomized_smoothing", "counts", settings.rs_sigma),
    ):
        start = time.perf_counter()
        generator = torch.Generator().manual_seed(settings.seed + 505)
        surrogate = attacks.MonteCarloSurrogate(
            plain, sigma=sigma, input_shape=input_shape, num_draws=settings.pgd_surrogate_draws, kind=kind,
            generator=generator,
        )
        classify = attacks.monte_carlo_smoothed_classifier(
            plain, sigma=sigma, kind=kind, num=settings.pgd_classifier_draws, batch_size=settings.batch_size,
            generator=generator, num_classes=num_classes,
        )
        report = attacks.attack_certificates(
            surrogate,
            classify,
            x[:budget],
            certificates[name][:budget],
            steps=settings.pgd_steps,
            restarts=settings.pgd_restarts,
            generator=generator,
        )
        checks[name] = _attack_summary(report, time.perf_counter() - start)
        checks[name]["statistical"] = True
        checks[name]["classifier_draws"] = settings.pgd_classifier_draws
        log(
            f"  PGD check, {name}: {report.num_flipped} of {report.num_attacked} certified points flipped "
            f"({report.num_changed_at_clean} already at the clean point)"
        )
    return checks
