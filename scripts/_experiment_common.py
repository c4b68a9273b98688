"""Shared machinery of the thesis experiments (scripts/mnist_experiment.py, scripts/cifar10_experiment.py).

Training of a Lipschitz network with one of the margin losses of :mod:`painwatch.robust.losses`, then an
evaluation of the trained network with every certificate of :mod:`painwatch.robust`:

- clean accuracy of the bare network;
- Lipschitz-margin certified accuracy curve (``L`` from :func:`lipschitz_upper_bound`, sound);
- smoothed-margin certified accuracy curve (``SM_low / (sqrt(2) L)``, certifies the expected-logit
  classifier ``h``);
- randomized smoothing certified accuracy curve (Cohen et al., certifies the vote classifier ``g``);
- accuracy of the bare network under Gaussian noise;
- the PGD-L2 check (:func:`painwatch.robust.attacks.attack_certificates`) that no certified point is
  broken at ``0.99 r``: exact for the Lipschitz certificates (the bare network), statistical for the
  smoothed ones (a Monte Carlo surrogate is attacked, the smoothed prediction re-estimated with fresh
  samples).

"Certified accuracy at radius r" is the fraction of evaluated test points whose certificate predicts the
true label (no abstention) with a radius ``>= r``; it is non-increasing in ``r`` by construction. Radii
and noise levels are L2 norms in [0, 1] pixel units. Every random draw comes from a seeded
``torch.Generator``; results are written atomically (temp file in the same folder, then ``os.replace``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from painwatch.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from painwatch.robust import attacks, evaluation, losses, smoothing
from painwatch.robust.certificate import Certificate
from painwatch.robust.layers import export_plain
from painwatch.robust.lipschitz import lipschitz_upper_bound
from painwatch.robust.margin import lipschitz_certify_batch, smoothed_margin_certify

# Loss name -> the hyper-parameters make_loss receives (filled from the command line).
LOSS_CHOICES: tuple[str, ...] = ("sce", "sc-sce", "mh", "mcr", "mscr", "zhen")


# --------------------------------------------------------------------------------------------- files
def atomic_save_figure(figure: Any, path: Path) -> None:
    """Save a matplotlib figure as PNG atomically."""
    import io

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    atomic_write_bytes(path, buffer.getvalue())


# --------------------------------------------------------------------------------------------- set-up
def machine_description(device: torch.device) -> dict[str, Any]:
    """What ran the experiment (for the results' provenance)."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def stratified_split(labels: np.ndarray, num_test: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(train, test)``: ``num_test`` test points drawn evenly over the classes, seeded.

    The test indices are disjoint from the training indices (training never sees them). Classes that
    run short give their remainder to the others, so exactly ``num_test`` points are returned.
    """
    labels = np.asarray(labels)
    if not 0 < num_test < labels.shape[0]:
        raise ValueError(f"the held-out split needs 0 < num_test < {labels.shape[0]} points, got {num_test}")
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    per_class = {c: rng.permutation(np.flatnonzero(labels == c)) for c in classes}
    quota = {c: num_test // len(classes) for c in classes}
    for c in classes[: num_test - sum(quota.values())]:
        quota[c] += 1
    test = np.concatenate([per_class[c][: quota[c]] for c in classes])
    if test.shape[0] < num_test:  # a class was too small: fill from the remaining points
        rest = np.setdiff1d(np.arange(labels.shape[0]), test)
        test = np.concatenate([test, rng.choice(rest, num_test - test.shape[0], replace=False)])
    test = rng.permutation(test)
    train = rng.permutation(np.setdiff1d(np.arange(labels.shape[0]), test))
    return train, test


# --------------------------------------------------------------------------------------------- training
@dataclass
class TrainSettings:
    """Optimisation settings (the thesis: Adam, lr 0.01, cosine schedule, batch 128)."""

    epochs: int
    batch_size: int = 128
    lr: float = 0.01
    seed: int = 0


def build_loss(name: str, margin: float, input_variance: float, zhen_variance: float) -> nn.Module:
    """The loss module for ``name`` with the experiment's hyper-parameters.

    ``margin`` is ``d`` of MH, MCR, MSCR and Zhen; ``input_variance`` is ``sigma_x^2`` of SC-SCE and MSCR;
    ``zhen_variance`` is ``sigma^2`` of Zhen's loss.
    """
    if name == "sce":
        return losses.make_loss("sce")
    if name == "sc-sce":
        return losses.make_loss("sc-sce", input_variance=input_variance)
    if name in ("mh", "mcr"):
        return losses.make_loss(name, margin=margin)
    if name == "mscr":
        return losses.make_loss("mscr", margin=margin, input_variance=input_variance)
    if name == "zhen":
        return losses.make_loss("zhen", margin=margin, input_variance=zhen_variance)
    raise ValueError(f"unknown loss {name!r}; choose from {', '.join(LOSS_CHOICES)}")


def train_model(
    model: nn.Module,
    loss_fn: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    settings: TrainSettings,
    device: torch.device,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train ``model`` in place with Adam and a cosine learning-rate schedule over all steps.

    ``images`` ``(N, C, H, W)`` in [0, 1] and ``labels`` ``(N,)`` stay on the CPU; batches move to
    ``device``. Shuffling is seeded by ``settings.seed``. Returns the per-epoch mean loss and the time.
    """
    if settings.epochs < 1 or settings.batch_size < 1 or not settings.lr > 0:
        raise ValueError(f"bad training settings {settings}")
    model.to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr)
    steps_per_epoch = math.ceil(images.shape[0] / settings.batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=settings.epochs * steps_per_epoch)
    shuffle = torch.Generator().manual_seed(settings.seed)
    history: list[float] = []
    start = time.perf_counter()
    for epoch in range(settings.epochs):
        order = torch.randperm(images.shape[0], generator=shuffle)
        total, count = 0.0, 0
        for batch_index in order.split(settings.batch_size):
            x = images[batch_index].to(device)
            y = labels[batch_index].to(device)
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model, x, y)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss became {loss.item()} at epoch {epoch + 1}")
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += float(loss.detach()) * x.shape[0]
            count += x.shape[0]
        history.append(total / count)
        log(f"  epoch {epoch + 1}/{settings.epochs}: loss {history[-1]:.4f}")
    model.eval()
    return {"loss_per_epoch": history, "train_seconds": time.perf_counter() - start}


# --------------------------------------------------------------------------------------------- evaluation
@dataclass
class EvalSettings:
    """What the evaluation computes and with how many samples."""

    num_test: int = 200
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


def certified_accuracy_curve(
    predictions: np.ndarray, radii: np.ndarray, labels: np.ndarray, grid: Sequence[float]
) -> list[float]:
    """Fraction of points with ``prediction == label`` (abstentions never count) and ``radius >= r``."""
    correct = (np.asarray(predictions) == np.asarray(labels)) & (np.asarray(predictions) >= 0)
    return evaluation.certified_accuracy_curve(correct, radii, grid).tolist()


def value_at(grid: Sequence[float], curve: Sequence[float], radius: float) -> float:
    """Certified accuracy at ``radius`` from a curve over ``grid`` (``radius`` must be on the grid)."""
    for r, value in zip(grid, curve, strict=True):
        if math.isclose(r, radius, abs_tol=1e-9):
            return value
    raise ValueError(f"radius {radius} is not on the evaluation grid")


def _records(certs: Sequence[Certificate]) -> tuple[np.ndarray, np.ndarray]:
    return (
        np.array([c.prediction for c in certs], dtype=np.int64),
        np.array([c.radius for c in certs], dtype=np.float64),
    )


def randomized_smoothing_certificates(
    model: nn.Module,
    images: torch.Tensor,
    num_classes: int,
    sigma: float,
    n0: int,
    n: int,
    alpha: float,
    batch_size: int,
    generator: torch.Generator,
) -> list[Certificate]:
    smoothed = smoothing.SmoothedClassifier(model, num_classes, sigma)
    return [smoothed.certify(x, n0=n0, n=n, alpha=alpha, batch_size=batch_size, generator=generator)
            for x in images]


def noise_accuracy(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
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


def _attack_summary(report: attacks.CertificateAttackReport, seconds: float) -> dict[str, Any]:
    return {
        "num_attacked": report.num_attacked,
        "num_flipped": report.num_flipped,
        "flipped_indices": list(report.flipped),
        "num_changed_at_clean": report.num_changed_at_clean,
        "fraction_of_radius": report.fraction,
        "max_budget_used": report.max_budget_used,
        "seconds": seconds,
    }


def evaluate_model(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    settings: EvalSettings,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Every certificate and check of the module docstring for a trained ``model``.

    ``images`` ``(N, C, H, W)`` in [0, 1] and ``labels`` are the held-out test split (on the model's
    device). Clean accuracy uses all of them; certificates, noise accuracy and attacks use the first
    ``settings.num_test``. The network is exported to plain layers first (same function, no Björck
    cost); ``L`` is the sound bound of that plain network.
    """
    plain = export_plain(model).eval()
    input_shape = tuple(images.shape[1:])
    lipschitz_constant = lipschitz_upper_bound(plain, input_shape)
    grid = list(settings.radii)
    timings: dict[str, float] = {}
    result: dict[str, Any] = {"lipschitz_constant": lipschitz_constant, "radii": grid}

    with torch.no_grad():
        result["clean_accuracy"] = float((plain(images).argmax(dim=1) == labels).float().mean())
    result["num_test_clean"] = int(images.shape[0])
    count = min(settings.num_test, images.shape[0])
    x, y = images[:count], labels[:count]
    y_np = y.cpu().numpy()
    result["num_test_certified"] = count

    start = time.perf_counter()
    lipschitz = lipschitz_certify_batch(plain, x, lipschitz_constant)
    timings["lipschitz"] = time.perf_counter() - start
    lip_pred, lip_radius = _records(lipschitz)
    result["lipschitz"] = {
        "curve": certified_accuracy_curve(lip_pred, lip_radius, y_np, grid),
        "forward_passes_per_point": 1,
        "predictions": lip_pred.tolist(),
        "certified_radii": lip_radius.tolist(),
    }
    log(
        f"  Lipschitz margin: L = {lipschitz_constant:.6f}, certified acc @0.5 = "
        f"{value_at(grid, result['lipschitz']['curve'], 0.5):.3f}"
    )

    start = time.perf_counter()
    sm_gen = torch.Generator().manual_seed(settings.seed + 101)
    smoothed_margin = [
        smoothed_margin_certify(
            plain,
            xi,
            sigma=settings.sm_sigma,
            lipschitz_constant=lipschitz_constant,
            n0=settings.sm_n0,
            n=settings.sm_n,
            alpha=settings.alpha,
            batch_size=settings.batch_size,
            generator=sm_gen,
        )
        for xi in x
    ]
    timings["smoothed_margin"] = time.perf_counter() - start
    sm_pred, sm_radius = _records(smoothed_margin)
    result["smoothed_margin"] = {
        "sigma": settings.sm_sigma,
        "n0": settings.sm_n0,
        "n": settings.sm_n,
        "alpha": settings.alpha,
        "curve": certified_accuracy_curve(sm_pred, sm_radius, y_np, grid),
        "abstentions": int((sm_pred < 0).sum()),
        "forward_passes_per_point": settings.sm_n0 + settings.sm_n,
        "predictions": sm_pred.tolist(),
        "certified_radii": sm_radius.tolist(),
    }
    log(
        f"  smoothed margin (sigma {settings.sm_sigma}, n {settings.sm_n}): certified acc @0.5 = "
        f"{value_at(grid, result['smoothed_margin']['curve'], 0.5):.3f} "
        f"({timings['smoothed_margin']:.0f} s)"
    )

    start = time.perf_counter()
    rs_gen = torch.Generator().manual_seed(settings.seed + 202)
    randomized = randomized_smoothing_certificates(
        plain,
        x,
        num_classes,
        settings.rs_sigma,
        settings.rs_n0,
        settings.rs_n,
        settings.alpha,
        settings.batch_size,
        rs_gen,
    )
    timings["randomized_smoothing"] = time.perf_counter() - start
    rs_pred, rs_radius = _records(randomized)
    result["randomized_smoothing"] = {
        "sigma": settings.rs_sigma,
        "n0": settings.rs_n0,
        "n": settings.rs_n,
        "alpha": settings.alpha,
        "curve": certified_accuracy_curve(rs_pred, rs_radius, y_np, grid),
        "abstentions": int((rs_pred < 0).sum()),
        "max_certifiable_radius": settings.rs_sigma * _norm_ppf(settings.alpha ** (1.0 / settings.rs_n)),
        "forward_passes_per_point": settings.rs_n0 + settings.rs_n,
        "predictions": rs_pred.tolist(),
        "certified_radii": rs_radius.tolist(),
    }
    result["labels"] = y_np.tolist()
    log(
        f"  randomized smoothing (sigma {settings.rs_sigma}, n {settings.rs_n}): certified acc @0.5 = "
        f"{value_at(grid, result['randomized_smoothing']['curve'], 0.5):.3f} "
        f"({timings['randomized_smoothing']:.0f} s)"
    )

    start = time.perf_counter()
    result["noise_accuracy"] = noise_accuracy(
        plain,
        x,
        y,
        settings.noise_sigmas,
        settings.noise_draws,
        torch.Generator().manual_seed(settings.seed + 303),
    )
    timings["noise_accuracy"] = time.perf_counter() - start

    result["pgd_check"] = _pgd_checks(
        plain, x, lipschitz, smoothed_margin, randomized, num_classes, settings, log, timings
    )
    result["seconds"] = timings
    return result


def _norm_ppf(probability: float) -> float:
    from scipy.stats import norm

    return float(norm.ppf(probability))


def _pgd_checks(
    plain: nn.Module,
    x: torch.Tensor,
    lipschitz: list,
    smoothed_margin: list,
    randomized: list,
    num_classes: int,
    settings: EvalSettings,
    log: Callable[[str], None],
    timings: dict[str, float],
) -> dict[str, Any]:
    """PGD at 0.99 r against every Lipschitz certificate, and against the first smoothed ones."""
    checks: dict[str, Any] = {}
    start = time.perf_counter()
    report = attacks.attack_certificates(
        plain,
        attacks.network_classifier(plain),
        x,
        lipschitz,
        steps=settings.pgd_steps,
        restarts=settings.pgd_restarts,
        generator=torch.Generator().manual_seed(settings.seed + 404),
    )
    checks["lipschitz"] = _attack_summary(report, time.perf_counter() - start)
    log(f"  PGD check, Lipschitz: {report.num_flipped} of {report.num_attacked} certified points broken")

    input_shape = tuple(x.shape[1:])
    budget = min(settings.pgd_smoothed_points, x.shape[0])
    for name, certs, kind, sigma in (
        ("smoothed_margin", smoothed_margin, "logits", settings.sm_sigma),
        ("randomized_smoothing", randomized, "counts", settings.rs_sigma),
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
            certs[:budget],
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
    timings["pgd_check"] = sum(check["seconds"] for check in checks.values())
    return checks


# --------------------------------------------------------------------------------------------- reporting
TABLE_RADII = (0.25, 0.5, 1.0)


def markdown_table(results: dict[str, dict[str, Any]]) -> str:
    """One row per loss: clean accuracy, certified accuracies, noise accuracy and the PGD check."""
    header = (
        "| loss | clean acc | Lipschitz cert. r=0.25 / 0.5 / 1.0 | smoothed-margin cert. r=0.25 / 0.5 / 1.0 "
        "| rand. smoothing cert. r=0.25 / 0.5 / 1.0 | acc. under noise sigma=0.25 / 0.5 "
        "| PGD broken (Lip / SM / RS) |"
    )
    lines = [header, "|" + "---|" * 7]
    for name, result in results.items():
        evaluation = result["evaluation"]
        grid = evaluation["radii"]

        def cells(method: str, evaluation: dict[str, Any] = evaluation, grid: list = grid) -> str:
            return " / ".join(
                f"{100 * value_at(grid, evaluation[method]['curve'], r):.1f}" for r in TABLE_RADII
            )

        noise = evaluation["noise_accuracy"]
        pgd = evaluation["pgd_check"]
        broken = " / ".join(
            f"{pgd[m]['num_flipped']}/{pgd[m]['num_attacked']}"
            for m in ("lipschitz", "smoothed_margin", "randomized_smoothing")
        )
        noise_cells = " / ".join(f"{100 * noise[key]:.1f}" for key in ("0.25", "0.5") if key in noise)
        lines.append(
            f"| {name.upper()} | {100 * evaluation['clean_accuracy']:.1f} | {cells('lipschitz')} | "
            f"{cells('smoothed_margin')} | {cells('randomized_smoothing')} | {noise_cells} | {broken} |"
        )
    caps = {
        f"{result['evaluation']['randomized_smoothing']['max_certifiable_radius']:.3f}"
        for result in results.values()
    }
    first = next(iter(results.values()))["evaluation"]
    sm, rs = first["smoothed_margin"], first["randomized_smoothing"]
    lines += [
        "",
        f"Certified accuracy in % of the first {first['num_test_certified']} held-out points "
        f"(clean accuracy: all {first['num_test_clean']}); radii are L2 in [0, 1] pixel units. "
        f"Smoothed margin: sigma {sm['sigma']}, n = {sm['n']}; randomized smoothing: sigma {rs['sigma']}, "
        f"n = {rs['n']}, which caps its radius at {' / '.join(sorted(caps))}. PGD broken: certified points "
        "whose certified classifier changed under PGD-L2 at 0.99 r / points attacked.",
    ]
    return "\n".join(lines) + "\n"


def plot_curves(results: dict[str, dict[str, Any]], out_dir: Path, title: str) -> list[str]:
    """One PNG per certificate: certified accuracy vs radius, one line per loss. Returns file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    for method, label in (
        ("lipschitz", "Lipschitz margin"),
        ("smoothed_margin", "smoothed margin"),
        ("randomized_smoothing", "randomized smoothing"),
    ):
        figure, axis = plt.subplots(figsize=(5.5, 4))
        for loss_name, result in results.items():
            evaluation = result["evaluation"]
            axis.plot(
                evaluation["radii"], [100 * v for v in evaluation[method]["curve"]], label=loss_name.upper()
            )
        axis.set_xlabel("L2 radius (pixels in [0, 1])")
        axis.set_ylabel("certified accuracy (%)")
        axis.set_title(f"{title}: {label}")
        axis.set_ylim(0, 100)
        axis.grid(alpha=0.3)
        axis.legend()
        file_name = f"certified_{method}.png"
        atomic_save_figure(figure, out_dir / file_name)
        plt.close(figure)
        names.append(file_name)

    figure, axis = plt.subplots(figsize=(5.5, 4))
    for loss_name, result in results.items():
        noise = result["evaluation"]["noise_accuracy"]
        sigmas = [float(s) for s in noise]
        axis.plot(sigmas, [100 * noise[s] for s in noise], marker="o", label=loss_name.upper())
    axis.set_xlabel("Gaussian noise sigma (L2 per pixel, [0, 1] scale)")
    axis.set_ylabel("accuracy of the bare network (%)")
    axis.set_title(f"{title}: accuracy under noise")
    axis.grid(alpha=0.3)
    axis.legend()
    atomic_save_figure(figure, out_dir / "accuracy_under_noise.png")
    plt.close(figure)
    names.append("accuracy_under_noise.png")
    return names


def settings_dict(train: TrainSettings, evaluation: EvalSettings, **extra: Any) -> dict[str, Any]:
    """The configuration stored with the results (used to decide whether ``--resume`` may reuse them)."""
    config = {"train": asdict(train), "eval": asdict(evaluation)}
    config["eval"]["radii"] = list(config["eval"]["radii"])
    config["eval"]["noise_sigmas"] = list(config["eval"]["noise_sigmas"])
    config.update(extra)
    return config


# --------------------------------------------------------------------------------------------- command line
def add_common_arguments(parser: argparse.ArgumentParser, default_out: str) -> None:
    """Options shared by the experiments: losses, optimisation, certificates, attacks, device, output."""
    add = parser.add_argument
    add("--losses", default=",".join(LOSS_CHOICES), help="comma-separated, from " + ", ".join(LOSS_CHOICES))
    add("--epochs", type=int, default=10)
    add("--batch-size", type=int, default=128)
    add("--lr", type=float, default=0.01, help="Adam learning rate (cosine schedule)")
    add("--bjorck-iters", type=int, default=20)
    add("--margin", type=float, default=1.0, help="target margin d of MH, MCR, MSCR and Zhen")
    add("--input-variance", type=float, default=0.1, help="sigma_x^2 of SC-SCE and MSCR (thesis: 0.1)")
    add("--zhen-sigma", type=float, default=0.25, help="sigma of Zhen's loss")
    add("--num-test", type=int, default=200, help="held-out points certified per loss")
    add("--sigma", type=float, default=0.25, help="noise of both smoothing certificates")
    add("--n", type=int, default=2000, help="randomized smoothing samples per point")
    add("--n0", type=int, default=100, help="selection samples of both smoothing certificates")
    add("--sm-n", type=int, default=1000, help="smoothed-margin samples per point")
    add("--alpha", type=float, default=0.001)
    add("--pgd-steps", type=int, default=50)
    add("--pgd-smoothed-points", type=int, default=20, help="certified points attacked per smoothing method")
    add("--pgd-classifier-draws", type=int, default=1000, help="fresh samples per smoothed prediction")
    add("--batch-eval", type=int, default=1000, help="noisy images per forward pass")
    add("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    add("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    add("--out", type=Path, default=Path(default_out))
    add("--seed", type=int, default=0)
    add("--resume", action="store_true", help="reuse <loss>.json results made with the same settings")


def check_common_arguments(args: argparse.Namespace) -> list[str]:
    """Validate the shared options (naming the bad one); returns the loss names, deduplicated."""
    positive = (
        "epochs",
        "batch_size",
        "num_test",
        "n",
        "n0",
        "sm_n",
        "pgd_steps",
        "batch_eval",
        "pgd_classifier_draws",
    )
    for name in positive:
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.bjorck_iters < 0 or args.pgd_smoothed_points < 0:
        raise ValueError("--bjorck-iters and --pgd-smoothed-points must be >= 0")
    for name in ("sigma", "lr", "zhen_sigma"):
        if not getattr(args, name) > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if not args.input_variance >= 0:
        raise ValueError(f"--input-variance must be >= 0, got {args.input_variance}")
    if not 0 < args.alpha < 1:
        raise ValueError(f"--alpha must be in (0, 1), got {args.alpha}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    names = [name.strip().lower().replace("_", "-") for name in args.losses.split(",") if name.strip()]
    unknown = [name for name in names if name not in LOSS_CHOICES]
    if unknown or not names:
        raise ValueError(
            f"--losses: unknown {unknown or args.losses!r}; choose from {', '.join(LOSS_CHOICES)}"
        )
    return list(dict.fromkeys(names))


def settings_from_arguments(args: argparse.Namespace) -> tuple[TrainSettings, EvalSettings]:
    train = TrainSettings(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    evaluation = EvalSettings(
        num_test=args.num_test,
        sm_sigma=args.sigma,
        sm_n0=args.n0,
        sm_n=args.sm_n,
        rs_sigma=args.sigma,
        rs_n0=args.n0,
        rs_n=args.n,
        alpha=args.alpha,
        pgd_steps=args.pgd_steps,
        pgd_smoothed_points=args.pgd_smoothed_points,
        pgd_classifier_draws=args.pgd_classifier_draws,
        batch_size=args.batch_eval,
        seed=args.seed,
    )
    return train, evaluation


def model_seed(seed: int, loss_name: str) -> int:
    """Initialisation seed of the network trained with ``loss_name`` (independent of --losses order)."""
    return seed + 1000 * LOSS_CHOICES.index(loss_name)


def largest_orthogonality_residual(model: nn.Module) -> float:
    """Largest construction residual over the orthogonal layers (0.0 when there are none)."""
    residuals = [m.orthogonality_residual() for m in model.modules() if hasattr(m, "orthogonality_residual")]
    return max(residuals, default=0.0)


def run_losses(
    names: Sequence[str],
    make_model: Callable[[str], nn.Module],
    train_data: tuple[torch.Tensor, torch.Tensor],
    test_data: tuple[torch.Tensor, torch.Tensor],
    num_classes: int,
    args: argparse.Namespace,
    config: dict[str, Any],
    device: torch.device,
    log: Callable[[str], None] = print,
) -> tuple[dict[str, dict[str, Any]], dict[str, nn.Module]]:
    """Train and evaluate one network per loss; write ``<out>/<loss>.json`` after each.

    With ``args.resume`` a loss whose JSON holds the same ``config`` is not recomputed (its network is
    then not returned). Returns ``(results, trained networks)`` keyed by loss name.
    """
    train_settings, eval_settings = settings_from_arguments(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, Any]] = {}
    trained: dict[str, nn.Module] = {}
    for name in names:
        path = out / f"{name}.json"
        if args.resume and path.is_file():
            previous = json.loads(path.read_text())
            if previous.get("config") == config:
                log(f"[{name}] reusing {path}")
                results[name] = previous
                continue
        log(f"[{name}] training ({args.epochs} epochs)")
        model = make_model(name)
        loss_fn = build_loss(name, args.margin, args.input_variance, args.zhen_sigma**2)
        history = train_model(model, loss_fn, *train_data, train_settings, device, log)
        residual = largest_orthogonality_residual(model)
        log(f"[{name}] evaluating (largest orthogonality residual {residual:.2e})")
        evaluation = evaluate_model(model, *test_data, num_classes, eval_settings, log)
        results[name] = {
            "loss": name,
            "loss_module": repr(loss_fn),
            "config": config,
            "training": history,
            "orthogonality_residual": residual,
            "evaluation": evaluation,
            "machine": machine_description(device),
        }
        trained[name] = model
        atomic_write_json(path, results[name])
    return results, trained


def write_report(
    results: dict[str, dict[str, Any]],
    args: argparse.Namespace,
    argv: Sequence[str] | None,
    script: str,
    title: str,
    config: dict[str, Any],
    device: torch.device,
    started: tuple[float, float],
    extra_markdown: str = "",
    extra_summary: dict[str, Any] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """``table.md``, the PNG plots and ``summary.json`` under ``args.out``; returns the summary."""
    out = Path(args.out)
    table = markdown_table(results)
    plots = plot_curves(results, out, title.split(":")[0])
    atomic_write_text(
        out / "table.md", f"# {title}\n\n{table}" + (f"\n{extra_markdown}" if extra_markdown else "")
    )
    summary = {
        "command": f"python {script} " + " ".join(argv if argv is not None else sys.argv[1:]),
        "config": config,
        "losses": list(results),
        "seconds": time.perf_counter() - started[0],
        "cpu_seconds": time.process_time() - started[1],
        "machine": machine_description(device),
        "table": table,
        "plots": plots,
        "results": {
            name: {
                "clean_accuracy": r["evaluation"]["clean_accuracy"],
                "pgd_broken": {m: c["num_flipped"] for m, c in r["evaluation"]["pgd_check"].items()},
            }
            for name, r in results.items()
        },
    }
    summary.update(extra_summary or {})
    atomic_write_json(out / "summary.json", summary)
    log(table)
    log(f"done in {summary['seconds']:.0f} s ({summary['cpu_seconds']:.0f} s of CPU); results in {out}")
    return summary
