"""Benchmark the certification methods side by side on one small model.

Trains a small network on scikit-learn's 8x8 digits (pixels in [0, 1], input (1, 8, 8)) for a few
seconds, then certifies the same test images with every method of ``painwatch.robust`` and prints,
per method: forward passes and wall time per certificate, how many images were certified (and correctly,
with the 95 % Clopper-Pearson interval [CP34] of that certified accuracy over the images), the mean
certified radius, and the ratios of passes and time to Cohen et al.'s reference ``n = 100 000``. The
clean accuracy it prints is on the same images; ``--points N`` picks them from the held-out digits,
stratified by class and seeded. Each method certifies its own classifier (the bare network for
``lipschitz``, the expected-logit classifier for ``smoothed_margin``, argmax of the expected softmax for
``soft_smoothing``, the vote for ``randomized_smoothing``), so the radii answer different questions.

    python scripts/bench_certify.py                       # defaults: about a minute on one CPU core
    python scripts/bench_certify.py --points 50 --n 2000 --model mlp --json bench.json
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _experiment_evaluation import accuracy_with_interval, stratified_order

from painwatch.io import atomic_write_json
from painwatch.robust import (
    Certificate,
    SmoothedClassifier,
    evaluation,
    lipschitz_certify,
    smoothed_margin_certify,
    soft_smoothing_certify,
)
from painwatch.robust.layers import MaxMin, OrthogonalLinear
from painwatch.robust.lipschitz import lipschitz_upper_bound

INPUT_SHAPE = (1, 8, 8)
COHEN_REFERENCE_N = 100_000


@dataclass
class Row:
    """One method's results over all points."""

    method: str
    n0: int
    n: int
    forward_passes: float
    seconds: float
    certified: int
    certified_correct: int
    certified_accuracy_interval: tuple[float, float]
    mean_radius: float
    median_certified_radius: float


class LogitScale(nn.Module):
    """Multiply the logits by a fixed temperature-like factor (its Lipschitz constant is that factor).

    A 1-Lipschitz net has logits within a small range, so cross-entropy training and the softmax scores
    of soft smoothing need them scaled; the margin certificates and Cohen's votes do not change with it.
    """

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = float(scale)

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return self.scale * logits

    def lipschitz_upper_bound(self, input_shape: tuple[int, ...]) -> float:
        return abs(self.scale)


def build_model(kind: str, seed: int) -> nn.Module:
    """A small digits classifier: a ReLU MLP, or a 1-Lipschitz net (orthogonal layers + MaxMin) whose
    logits are scaled by 10 (so its Lipschitz bound is 10)."""
    torch.manual_seed(seed)
    if kind == "mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                             nn.Linear(128, 10))
    generator = torch.Generator().manual_seed(seed)
    return nn.Sequential(nn.Flatten(), OrthogonalLinear(64, 128, generator=generator), MaxMin(),
                         OrthogonalLinear(128, 128, generator=generator), MaxMin(),
                         OrthogonalLinear(128, 10, generator=generator), LogitScale(10.0))


def train(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, epochs: int, sigma: float,
          seed: int) -> nn.Module:
    """Adam (cosine schedule) with Gaussian noise augmentation at ``sigma`` and cross-entropy."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(images), 128):
            index = order[start:start + 128]
            batch = images[index] + sigma * torch.randn(images[index].shape, generator=generator)
            loss = nn.functional.cross_entropy(model(batch), labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        scheduler.step()
    return model.eval().requires_grad_(False)


def run_method(name: str, certify: Callable[[torch.Tensor, int], Certificate], images: torch.Tensor,
               labels: torch.Tensor, n0: int, n: int) -> Row:
    certify(images[0], -1)  # warm-up: first-call allocations are not part of the cost
    certificates, start = [], time.perf_counter()
    for index, image in enumerate(images):
        certificates.append(certify(image, index))
    seconds = (time.perf_counter() - start) / len(images)
    radii = np.array([c.radius for c in certificates])
    certified = [c for c in certificates if not c.abstained]
    correct = np.array([not c.abstained and c.prediction == int(y)
                        for c, y in zip(certificates, labels, strict=True)])
    # Certified with the true label at any radius >= 0: the certified accuracy at r = 0.
    interval = evaluation.certified_accuracy_interval(correct, radii, 0.0)
    return Row(
        method=name, n0=n0, n=n,
        forward_passes=float(np.mean([c.forward_passes for c in certificates])),
        seconds=seconds, certified=len(certified), certified_correct=int(correct.sum()),
        certified_accuracy_interval=interval,
        mean_radius=float(radii.mean()),
        median_certified_radius=float(np.median([c.radius for c in certified])) if certified else 0.0,
    )


def format_table(rows: list[Row], reference: Row, points: int) -> str:
    header = (f"{'method':<28} {'n0':>5} {'n':>7} {'passes/cert':>11} {'ms/cert':>9} {'certified':>9} "
              f"{'correct':>7} {'cert. acc. % (95% CI)':>21} {'mean r':>7} {'median r':>8} "
              f"{'passes vs ref':>13} {'time vs ref':>11}")
    lines = [header, "-" * len(header)]
    for row in rows:
        low, high = row.certified_accuracy_interval
        accuracy = f"{100 * row.certified_correct / points:.1f} ({100 * low:.1f}-{100 * high:.1f})"
        lines.append(
            f"{row.method:<28} {row.n0:>5} {row.n:>7} {row.forward_passes:>11.0f} {1000 * row.seconds:>9.2f} "
            f"{row.certified:>4}/{points:<4} {row.certified_correct:>7} {accuracy:>21} "
            f"{row.mean_radius:>7.3f} "
            f"{row.median_certified_radius:>8.3f} {row.forward_passes / reference.forward_passes:>13.2e} "
            f"{row.seconds / reference.seconds:>11.2e}"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--points", type=int, default=20, help="test images to certify (default 20)")
    parser.add_argument("--n", type=int, default=1000, help="estimation samples of the cheap smoothing runs")
    parser.add_argument("--n0", type=int, default=100, help="selection samples of every smoothing method")
    parser.add_argument("--cohen-n", type=int, default=COHEN_REFERENCE_N,
                        help="estimation samples of the reference Cohen run (default 100000)")
    parser.add_argument("--sigma", type=float, default=0.25, help="noise std in [0, 1] pixel units")
    parser.add_argument("--alpha", type=float, default=0.001, help="failure probability")
    parser.add_argument("--batch-size", type=int, default=10_000, help="noisy images per forward pass")
    parser.add_argument("--model", choices=("orthogonal", "mlp"), default="orthogonal")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    for name in ("points", "n", "n0", "cohen_n", "batch_size", "epochs", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.n < 2:
        parser.error("--n must be >= 2 (the empirical Bernstein bound of soft smoothing needs two samples)")
    if not args.sigma > 0 or not 0 < args.alpha < 1:
        parser.error(f"need --sigma > 0 and 0 < --alpha < 1, got {args.sigma} and {args.alpha}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    digits = load_digits()
    images = torch.tensor(digits.data / 16.0, dtype=torch.float32).reshape(-1, *INPUT_SHAPE)
    labels = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(args.seed))
    train_index, test_index = order[:1500], order[1500:]
    if args.points > len(test_index):
        print(f"--points {args.points} exceeds the {len(test_index)} held-out digits", file=sys.stderr)
        return 2

    start = time.perf_counter()
    model = train(build_model(args.model, args.seed), images[train_index], labels[train_index], args.epochs,
                  args.sigma, args.seed)
    # The clean accuracy and every certificate are on the same held-out digits, stratified by class.
    picked = stratified_order(labels[test_index].numpy(), args.points, args.seed)
    chosen = test_index[torch.from_numpy(picked)]
    x, y = images[chosen], labels[chosen]
    with torch.no_grad():
        accuracy, accuracy_interval = accuracy_with_interval((model(x).argmax(1) == y).numpy())
    lipschitz = lipschitz_upper_bound(model, INPUT_SHAPE)
    print(f"model: {args.model}, trained in {time.perf_counter() - start:.1f} s, clean accuracy on the "
          f"{args.points} test digits certified below {accuracy:.3f} (95% CI {accuracy_interval[0]:.3f}-"
          f"{accuracy_interval[1]:.3f}), Lipschitz upper bound {lipschitz:.6g}, sigma {args.sigma}, "
          f"alpha {args.alpha}, {torch.get_num_threads()} thread(s)")
    smoothed = SmoothedClassifier(model, 10, args.sigma)

    def seeded(index: int) -> torch.Generator:
        return torch.Generator().manual_seed(args.seed * 1_000_003 + index + 1)

    runs = [
        ("lipschitz", 0, 0, lambda image, _: lipschitz_certify(model, image, lipschitz)),
        ("smoothed_margin", args.n0, args.n, lambda image, i: smoothed_margin_certify(
            model, image, sigma=args.sigma, lipschitz_constant=lipschitz, n0=args.n0, n=args.n,
            alpha=args.alpha, batch_size=args.batch_size, generator=seeded(i))),
        ("soft_smoothing", args.n0, args.n, lambda image, i: soft_smoothing_certify(
            model, image, sigma=args.sigma, n0=args.n0, n=args.n, alpha=args.alpha,
            batch_size=args.batch_size, generator=seeded(i))),
        ("randomized_smoothing", args.n0, args.n, lambda image, i: smoothed.certify(
            image, n0=args.n0, n=args.n, alpha=args.alpha, batch_size=args.batch_size, generator=seeded(i))),
        ("randomized_smoothing (ref)", args.n0, args.cohen_n, lambda image, i: smoothed.certify(
            image, n0=args.n0, n=args.cohen_n, alpha=args.alpha, batch_size=args.batch_size,
            generator=seeded(i))),
    ]
    rows = [run_method(name, certify, x, y, n0, n) for name, n0, n, certify in runs]
    reference = rows[-1]
    print(f"\n{args.points} test digits; ratios are to Cohen et al. with n = {args.cohen_n}:\n")
    print(format_table(rows, reference, args.points))
    print("\nradii are L2 in [0, 1] pixel units (input 1x8x8); 'correct' = certified with the true label; "
          "cert. acc. = correct / points with its two-sided 95% Clopper-Pearson interval")
    if args.json is not None:
        atomic_write_json(args.json, {
            "model": args.model, "accuracy": accuracy, "accuracy_interval": accuracy_interval,
            "test_indices": chosen.tolist(), "lipschitz_upper_bound": lipschitz,
            "sigma": args.sigma, "alpha": args.alpha, "points": args.points,
            "threads": torch.get_num_threads(),
            "rows": [row.__dict__ for row in rows],
        })
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
