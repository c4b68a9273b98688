"""Benchmark painwatch's training/inference loops against a bare timm loop, and the LOIO feature cache.

Three figures (all on the same machine, same thread count, same batches):

1. Training throughput (images/s) of ``painwatch.training.loops.fit`` against a bare loop (timm model, AdamW,
   cross-entropy, no schedule, no clipping, no normalisation layer) over the same in-memory batches.
   The loops alternate epoch by epoch after a warm-up; the best of ``--repeats`` epochs is kept.
   Ratio = painwatch / bare (1.0 = no overhead).
2. Inference throughput of ``painwatch.training.batches.predict_logits`` against ``model(x)`` under
   ``torch.inference_mode`` over the same batches. Ratio as above.
3. A 21-individual ``painwatch loio --cache-features`` run on a small SYNTHETIC demo set: wall time
   of the whole run against the one feature-extraction pass it contains (ratio = how many extraction
   passes the whole LOIO costs; the head is trained on cached features in every fold).

Usage: ``python scripts/bench_pipeline.py [--arch resnet18] [--input-size 64] [--threads 1] ...``.
The defaults finish in a few minutes on a laptop CPU. Prints the figures and, with ``--json PATH``,
writes them as JSON. Randomness is seeded; timings are wall-clock (``time.perf_counter``).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # benchmarks never download anything

import torch
from torch import nn
from torch.utils.data import TensorDataset

from painwatch.io import atomic_write_json


def _batches(
    num_images: int, input_size: int, batch_size: int, seed: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(num_images, 3, input_size, input_size, generator=generator)
    labels = torch.randint(0, 2, (num_images,), generator=generator)
    return [
        (images[i : i + batch_size], labels[i : i + batch_size]) for i in range(0, num_images, batch_size)
    ]


def bench_training(args: argparse.Namespace) -> dict[str, float]:
    """Images per second of painwatch's fit against a bare timm loop: best epoch of ``--repeats``.

    The two loops alternate epoch by epoch (after one warm-up epoch each), so that load changes on a
    shared machine hit both alike; the fastest epoch of each is kept.
    """
    import timm

    from painwatch.models import create_model
    from painwatch.training import TrainConfig
    from painwatch.training.loops import fit

    batches = _batches(args.train_images, args.input_size, args.batch_size, args.seed)
    images = torch.cat([b[0] for b in batches])
    labels = torch.cat([b[1] for b in batches])
    dataset = TensorDataset(images, labels)

    # Bare loop: the same backbone and a 2-class head, no normalisation layer, schedule or clipping.
    torch.manual_seed(args.seed)
    bare = timm.create_model(args.arch, pretrained=False, num_classes=2)
    optimizer = torch.optim.AdamW(bare.parameters(), lr=3e-4, weight_decay=0.05)
    loss_fn = nn.CrossEntropyLoss()
    bare.train()

    def bare_epoch() -> float:
        started = time.perf_counter()
        for x, y in batches:
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(bare(x), y)
            loss.backward()
            optimizer.step()
        return time.perf_counter() - started

    # painwatch's loop over the same images (its DataLoader batches them; shuffling only reorders).
    model = create_model(args.arch, num_classes=2, input_size=args.input_size, seed=args.seed)
    config = TrainConfig(
        arch=args.arch,
        input_size=args.input_size,
        epochs=1,
        batch_size=args.batch_size,
        patience=None,
        seed=args.seed,
        device="cpu",
        warmup_epochs=0.0,
    )

    def painwatch_epoch() -> float:
        return fit(model, dataset, None, config=config, progress=False).history[0]["seconds"]

    bare_epoch()
    painwatch_epoch()
    best_bare = best_painwatch = float("inf")
    for _ in range(args.repeats):
        best_bare = min(best_bare, bare_epoch())
        best_painwatch = min(best_painwatch, painwatch_epoch())
    count = images.shape[0]
    return {
        "bare_images_per_s": count / best_bare,
        "painwatch_images_per_s": count / best_painwatch,
        "ratio": best_bare / best_painwatch,
        "images_per_epoch": count,
    }


def bench_inference(args: argparse.Namespace) -> dict[str, float]:
    """Images per second of painwatch's predict_logits against a bare inference loop (best of repeats)."""
    from painwatch.models import create_model
    from painwatch.training.batches import predict_logits

    batches = _batches(args.infer_images, args.input_size, args.batch_size, args.seed + 1)
    images = torch.cat([b[0] for b in batches])
    labels = torch.cat([b[1] for b in batches])
    model = create_model(args.arch, num_classes=2, input_size=args.input_size, seed=args.seed).eval()
    dataset = TensorDataset(images, labels)

    def bare_pass() -> None:
        with torch.inference_mode():
            for x, _ in batches:
                model(x)

    def painwatch_pass() -> None:
        predict_logits(model, dataset, batch_size=args.batch_size, device="cpu")

    # Alternate the two loops so that load changes on a shared machine hit both alike; keep the best.
    bare_pass()
    painwatch_pass()
    best = {"bare": float("inf"), "painwatch": float("inf")}
    for _ in range(args.repeats):
        for name, function in (("bare", bare_pass), ("painwatch", painwatch_pass)):
            started = time.perf_counter()
            function()
            best[name] = min(best[name], time.perf_counter() - started)
    timings = {name: images.shape[0] / seconds for name, seconds in best.items()}
    return {
        "bare_images_per_s": timings["bare"],
        "painwatch_images_per_s": timings["painwatch"],
        "ratio": timings["painwatch"] / timings["bare"],
        "images": int(images.shape[0]),
    }


def bench_loio_cache(args: argparse.Namespace) -> dict[str, float]:
    """Wall time of a 21-fold --cache-features LOIO against its single feature-extraction pass."""
    from painwatch.data import make_demo_dataset
    from painwatch.evaluation.loio import run_loio
    from painwatch.evaluation.settings import LoioSettings
    from painwatch.training import TrainConfig

    with tempfile.TemporaryDirectory(prefix="painwatch-bench-") as folder:
        data = make_demo_dataset(
            Path(folder) / "demo",
            individuals=args.individuals,
            frames_per_class=args.frames_per_class,
            seed=args.seed,
            image_size=args.demo_image_size,
        )
        train = TrainConfig(arch=args.arch, input_size=args.input_size, batch_size=args.batch_size,
                            seed=args.seed, device="cpu")
        settings = LoioSettings(data=str(data), out=str(Path(folder) / "run"), train=train,
                                cache_features=True, bootstrap_reps=200, progress=False)
        started = time.perf_counter()
        outcome = run_loio(settings, log=lambda _: None)
        total = time.perf_counter() - started
    timing = outcome.metrics["timing"]
    extraction = timing["feature_extraction_seconds_this_call"]
    return {
        "folds": outcome.num_folds,
        "frames": outcome.metrics["frames_used"],
        "feature_extraction_s": extraction,
        "all_folds_head_training_s": timing["fold_seconds_total"],
        "loio_total_s": total,
        "other_s": total - extraction - timing["fold_seconds_total"],
        "ratio_total_to_extraction": total / extraction,
        "accuracy": outcome.metrics["evaluation"]["pooled"]["accuracy"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="resnet18", help="timm architecture (default: %(default)s)")
    parser.add_argument("--input-size", type=int, default=64, help="pixels (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--train-images", type=int, default=256, help="images per training epoch")
    parser.add_argument("--infer-images", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3, help="timed epochs / passes per loop (best kept)")
    parser.add_argument("--individuals", type=int, default=21, help="individuals of the LOIO benchmark")
    parser.add_argument("--frames-per-class", type=int, default=6, help="per individual, LOIO benchmark")
    parser.add_argument("--demo-image-size", type=int, default=64, help="pixels of the synthetic frames")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip", nargs="*", default=[], choices=["train", "infer", "loio"])
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1; got {args.repeats}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    figures: dict[str, object] = {
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(),
        },
        "settings": vars(args),
    }
    print(
        f"painwatch pipeline benchmark: {args.arch} at {args.input_size}px, batch {args.batch_size}, "
        f"{torch.get_num_threads()} torch thread(s), CPU"
    )
    if "train" not in args.skip:
        train = figures["training"] = bench_training(args)
        print(
            f"training   painwatch {train['painwatch_images_per_s']:8.1f} img/s | bare timm "
            f"{train['bare_images_per_s']:8.1f} img/s | ratio {train['ratio']:.4f}"
        )
    if "infer" not in args.skip:
        infer = figures["inference"] = bench_inference(args)
        print(
            f"inference  painwatch {infer['painwatch_images_per_s']:8.1f} img/s | bare timm "
            f"{infer['bare_images_per_s']:8.1f} img/s | ratio {infer['ratio']:.4f}"
        )
    if "loio" not in args.skip:
        loio = figures["loio_cache_features"] = bench_loio_cache(args)
        print(
            f"LOIO       {loio['folds']} folds on {loio['frames']} SYNTHETIC frames with --cache-features: "
            f"total {loio['loio_total_s']:.1f} s = {loio['ratio_total_to_extraction']:.2f} x one feature "
            f"extraction pass ({loio['feature_extraction_s']:.1f} s); head training in all folds "
            f"{loio['all_folds_head_training_s']:.1f} s; the rest (reading, validating and hashing frames, "
            f"metrics, bootstrap, report) {loio['other_s']:.1f} s"
        )
    if args.json:
        atomic_write_json(args.json, figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
