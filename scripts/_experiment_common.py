"""Shared machinery of the [RC] experiments (scripts/mnist_experiment.py, scripts/cifar10_experiment.py).

Training of a Lipschitz network with one of the margin losses of :mod:`painwatch.robust.losses`, the
choice of the held-out points to evaluate (:func:`choose_evaluation_points`: all of them by default,
or a stratified, seeded subset) and the report: per-loss JSON, ``table.md``, ``summary.json`` and
plots. What is measured on those points is :mod:`_experiment_evaluation`: clean accuracy, the three
certified-accuracy curves with their 95 % Clopper-Pearson intervals [CP34], accuracy under noise and
the PGD check, all on the same points. Radii and noise levels are L2 norms in [0, 1] pixel units.
Results are written atomically (temp file in the same folder, then ``os.replace``).
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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _experiment_evaluation import EvalSettings, evaluate_model, stratified_order, value_at
from torch import nn

from painwatch.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from painwatch.robust import losses

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


def choose_evaluation_points(
    images: torch.Tensor, labels: torch.Tensor, num_test: int | None, seed: int
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """The held-out points that every figure of a results table is measured on.

    ``num_test`` of them (all for ``None``), stratified by class and seeded, in the order of
    :func:`stratified_order` (every prefix is stratified too). Returns ``(images, labels, indices)``,
    the indices into the held-out split, so that the results can name the points they are about.
    """
    points = stratified_order(labels.cpu().numpy(), num_test, seed)
    index = torch.from_numpy(points).to(labels.device)
    return images[index], labels[index], points


# --------------------------------------------------------------------------------------------- training
@dataclass
class TrainSettings:
    """Optimisation settings ([RC]: Adam, lr 0.01, cosine schedule, batch 128)."""

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


# --------------------------------------------------------------------------------------------- reporting
TABLE_RADII = (0.25, 0.5, 1.0)


METHOD_LABELS = (
    ("lipschitz", "Lipschitz"),
    ("smoothed_margin", "smoothed margin"),
    ("randomized_smoothing", "rand. smoothing"),
)


def percent_with_interval(value: float, interval: Sequence[float]) -> str:
    """``90.7 (88.7-92.4)``: a proportion and its interval, in per cent with one decimal."""
    low, high = interval
    return f"{100 * value:.1f} ({100 * low:.1f}-{100 * high:.1f})"


def evaluated_points_description(results: dict[str, dict[str, Any]]) -> str:
    """Which held-out points the results were measured on, in words; raises if the losses differ."""
    evaluations = [result["evaluation"] for result in results.values()]
    first = evaluations[0]
    for name, evaluation in zip(results, evaluations, strict=True):
        if evaluation["labels"] != first["labels"] or evaluation["num_points"] != first["num_points"]:
            raise ValueError(
                f"loss {name!r} was evaluated on other points than {next(iter(results))!r}: a table must "
                "compare the same points (rerun without --resume)"
            )
    config = next(iter(results.values()))["config"]
    count, total = first["num_points"], config.get("num_test_total", first["num_points"])
    if count == total:
        return f"all {count} held-out points"
    return f"{count} of the {total} held-out points (stratified by class, seed {config['eval']['seed']})"


def markdown_table(results: dict[str, dict[str, Any]]) -> str:
    """One row per loss, every figure on the same points: clean accuracy, certified accuracies (each with
    its 95 % Clopper-Pearson interval [CP34]), accuracy under noise and the PGD check."""
    columns = [
        "loss",
        "clean acc",
        *(f"{label} r={r}" for _, label in METHOD_LABELS for r in TABLE_RADII),
        "acc. under noise sigma=0.25 / 0.5",
        "PGD broken (Lip / SM / RS)",
    ]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for name, result in results.items():
        evaluation = result["evaluation"]
        grid = evaluation["radii"]
        cells = [name.upper(), percent_with_interval(evaluation["clean_accuracy"],
                                                     evaluation["clean_accuracy_interval"])]
        for method, _ in METHOD_LABELS:
            cells += [
                percent_with_interval(value_at(grid, evaluation[method]["curve"], r),
                                      value_at(grid, evaluation[method]["curve_interval"], r))
                for r in TABLE_RADII
            ]
        noise = evaluation["noise_accuracy"]
        cells.append(" / ".join(f"{100 * noise[key]:.1f}" for key in ("0.25", "0.5") if key in noise))
        pgd = evaluation["pgd_check"]
        cells.append(
            " / ".join(f"{pgd[m]['num_flipped']}/{pgd[m]['num_attacked']}" for m, _ in METHOD_LABELS)
        )
        lines.append("| " + " | ".join(cells) + " |")
    caps = {
        f"{result['evaluation']['randomized_smoothing']['max_certifiable_radius']:.3f}"
        for result in results.values()
    }
    first = next(iter(results.values()))
    sm, rs = first["evaluation"]["smoothed_margin"], first["evaluation"]["randomized_smoothing"]
    smoothed_attacked = min(first["config"]["eval"]["pgd_smoothed_points"], first["evaluation"]["num_points"])
    lines += [
        "",
        f"Every figure is in % of the same points, {evaluated_points_description(results)}; in brackets the "
        "two-sided "
        "95 % Clopper-Pearson interval over the points. Certified accuracy counts abstentions as wrong; "
        f"radii are L2 in [0, 1] pixel units. Smoothed margin: sigma {sm['sigma']}, n = {sm['n']}; "
        f"randomized smoothing: sigma {rs['sigma']}, n = {rs['n']}, which caps its radius at "
        f"{' / '.join(sorted(caps))}. PGD broken: certified points whose certified classifier changed under "
        "PGD-L2 at 0.99 r / points attacked (Lipschitz: every certified point; smoothing: the certified ones "
        f"among the first {smoothed_attacked} evaluated points, a stratified prefix).",
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
    add("--input-variance", type=float, default=0.1, help="sigma_x^2 of SC-SCE and MSCR ([RC]: 0.1)")
    add("--zhen-sigma", type=float, default=0.25, help="sigma of Zhen's loss")
    add(
        "--num-test",
        type=int,
        default=None,
        help="held-out points evaluated, clean and certified alike (stratified by class, seeded; "
        "default: all)",
    )
    add("--sigma", type=float, default=0.25, help="noise of both smoothing certificates")
    add("--n", type=int, default=2000, help="randomized smoothing samples per point")
    add("--n0", type=int, default=100, help="selection samples of both smoothing certificates")
    add("--sm-n", type=int, default=1000, help="smoothed-margin samples per point")
    add("--alpha", type=float, default=0.001)
    add("--pgd-steps", type=int, default=50)
    add(
        "--pgd-smoothed-points",
        type=int,
        default=20,
        help="the first N evaluated points (a stratified prefix) whose smoothing certificates PGD attacks",
    )
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
    if args.num_test is not None and args.num_test < 1:
        raise ValueError(f"--num-test must be >= 1, got {args.num_test}")
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
    *,
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

    ``test_data`` are the points to evaluate (:func:`choose_evaluation_points`): every figure of a loss
    is measured on all of them.

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
        evaluation = evaluate_model(
            model, *test_data, num_classes=num_classes, settings=eval_settings, log=log
        )
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


def headline_figures(evaluation: dict[str, Any]) -> dict[str, Any]:
    """The table's figures of one loss with their intervals, all on ``evaluation['num_points']`` points."""
    grid = evaluation["radii"]
    return {
        "num_points": evaluation["num_points"],
        "clean_accuracy": evaluation["clean_accuracy"],
        "clean_accuracy_interval": evaluation["clean_accuracy_interval"],
        "certified_accuracy": {
            method: {
                f"{r}": {
                    "value": value_at(grid, evaluation[method]["curve"], r),
                    "interval": value_at(grid, evaluation[method]["curve_interval"], r),
                }
                for r in TABLE_RADII
            }
            for method, _ in METHOD_LABELS
        },
        "pgd_broken": {m: c["num_flipped"] for m, c in evaluation["pgd_check"].items()},
    }


def write_report(
    results: dict[str, dict[str, Any]],
    *,
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
        "evaluated_points": evaluated_points_description(results),
        "results": {name: headline_figures(r["evaluation"]) for name, r in results.items()},
    }
    summary.update(extra_summary or {})
    atomic_write_json(out / "summary.json", summary)
    log(table)
    log(f"done in {summary['seconds']:.0f} s ({summary['cpu_seconds']:.0f} s of CPU); results in {out}")
    return summary
