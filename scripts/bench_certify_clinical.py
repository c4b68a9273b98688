"""Benchmark: how many forward passes the Predictor's sequential certificate needs, and what radius it gives,
against Cohen et al.'s CERTIFY at n = 100 000 with the same sigma and alpha.

Target (issue 5): median forward passes per certified frame <= 1 000 with a radius >= 0.9x Cohen's.

For every frame it runs, on the same network and with seeded generators:

- ``sequential_soft_fast``: the Predictor's default, soft scores, budget ``--budget`` (default 1 000);
- ``sequential_soft_matched``: soft scores, budget ``--cohen-n``, stops once within ``--rel-tol`` of the
  best the budget allows (what it costs to come close to Cohen at n = 100 000);
- ``sequential_sharp_fast``: soft scores sharpened with ``softmax(f / 0.1)``, budget ``--budget``;
- ``sequential_hard_fast``: hard votes, budget ``--budget``;
- ``sequential_hard_matched``: hard votes, budget ``--cohen-n``, stops within ``--rel-tol`` of the best;
- ``soft_fixed``: the fixed-n soft smoothing certificate of painwatch.robust at n = ``--budget``;
- ``cohen``: Cohen's CERTIFY at n0 = 100, n = ``--cohen-n``.

Usage (CPU, a few minutes per frame for the n = 100 000 reference):

    .venv/bin/python scripts/bench_certify_clinical.py --bundle data/demo-bundle --data data/demo --frames 8
    .venv/bin/python scripts/bench_certify_clinical.py --toy --frames 8      # no bundle needed

``--toy`` builds a tiny timm ResNet (32 px) whose head separates dark from bright frames, so that
frames range from very confident to borderline. Results go to ``--out`` (JSON) and stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import norm

from painwatch.atomic import atomic_write_text

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _toy_model_and_frames(frames: int, seed: int) -> tuple[torch.nn.Module, list[torch.Tensor], int]:
    from painwatch.models import create_model

    size = 32
    model = create_model("test_resnet", num_classes=2, input_size=size, seed=0).eval()
    rng = np.random.default_rng(seed)

    def batch(level: float, count: int) -> torch.Tensor:
        pixels = np.clip(rng.normal(level, 40, (count, 3, size, size)), 0, 255) / 255.0
        return torch.from_numpy(pixels).float()

    with torch.no_grad():
        dark, bright = model.features(batch(70, 16)), model.features(batch(180, 16))
        direction = bright.mean(0) - dark.mean(0)
        middle = (bright.mean(0) + dark.mean(0)) / 2
        scale = 3.0 / float(direction @ (bright.mean(0) - middle))
        model.head.weight.copy_(torch.stack([-direction, direction]) * scale)
        model.head.bias.copy_(torch.stack([middle @ direction, -(middle @ direction)]) * scale)
    levels = np.linspace(60, 190, frames)  # from clearly dark through grey to clearly bright
    images = [batch(float(level), 1)[0] for level in levels]
    labels = [int(level > 125) for level in levels]
    del labels
    return model, images, size


def _bundle_frames(
    bundle: Path, data: Path, frames: int, seed: int
) -> tuple[torch.nn.Module, list[torch.Tensor]]:
    from painwatch.certify import select_frames
    from painwatch.data import load_frame, load_records
    from painwatch.predict import Predictor

    predictor = Predictor.load(bundle)
    records = select_frames(load_records(data), frames, seed)
    return predictor.model, [predictor.preprocess(load_frame(r), str(r.path)) for r in records]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, default=None)
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--toy", action="store_true", help="use the built-in toy network and frames")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--sigma", type=float, default=0.25)
    parser.add_argument("--alpha", type=float, default=0.001)
    parser.add_argument("--budget", type=int, default=1000)
    parser.add_argument("--cohen-n", type=int, default=100_000)
    parser.add_argument("--rel-tol", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("data/bench_certify_clinical.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from painwatch.robust import SmoothedClassifier, soft_smoothing_certify
    from painwatch.robust.sequential import sequential_certify

    if args.toy or args.bundle is None:
        model, images, _ = _toy_model_and_frames(args.frames, args.seed)
        source = "toy test_resnet 32 px (dark vs bright frames)"
    else:
        if args.data is None:
            parser.error("--bundle needs --data")
        model, images = _bundle_frames(args.bundle, args.data, args.frames, args.seed)
        source = f"bundle {args.bundle} on {args.data}"
    sigma, alpha = args.sigma, args.alpha
    cap = sigma * norm.ppf(alpha ** (1 / args.cohen_n))

    def generator(index: int, salt: int) -> torch.Generator:
        return torch.Generator().manual_seed(args.seed * 1_000_003 + index * 17 + salt)

    # name -> (generator salt, options of sequential_certify beyond the shared ones). "fast" runs have the
    # Predictor's budget; "matched" ones Cohen's, stopping within --rel-tol of the best that budget allows.
    matched = {"max_n": args.cohen_n, "rel_tol": args.rel_tol, "max_batch": 8192}
    sequential_variants: dict[str, tuple[int, dict[str, object]]] = {
        "sequential_soft_fast": (1, {"max_n": args.budget}),
        "sequential_soft_matched": (2, matched),
        "sequential_sharp_fast": (6, {"max_n": args.budget, "score_temperature": 0.1}),
        "sequential_hard_matched": (7, {**matched, "scores": "hard"}),
        "sequential_hard_fast": (3, {"max_n": args.budget, "scores": "hard"}),
    }

    rows = []
    for index, x in enumerate(images):
        row: dict[str, object] = {"frame": index}
        for name, (salt, options) in sequential_variants.items():
            started = time.perf_counter()
            outcome = sequential_certify(
                model,
                x,
                sigma,
                alpha=alpha,
                n0=64,
                batch_size=args.batch_size,
                min_radius=0.01 * sigma,
                generator=generator(index, salt),
                **options,
            )
            row[name] = {
                "prediction": outcome.certificate.prediction,
                "radius": outcome.certificate.radius,
                "forward_passes": outcome.forward_passes,
                "stop_reason": outcome.stop_reason,
                "seconds": time.perf_counter() - started,
            }
        started = time.perf_counter()
        fixed = soft_smoothing_certify(
            model,
            x,
            sigma,
            n0=64,
            n=args.budget,
            alpha=alpha,
            batch_size=args.batch_size,
            generator=generator(index, 4),
        )
        row["soft_fixed"] = {
            "prediction": fixed.prediction,
            "radius": fixed.radius,
            "forward_passes": fixed.forward_passes,
            "seconds": time.perf_counter() - started,
        }
        started = time.perf_counter()
        cohen = SmoothedClassifier(model, 2, sigma).certify(
            x, n0=100, n=args.cohen_n, alpha=alpha, batch_size=args.batch_size, generator=generator(index, 5)
        )
        row["cohen"] = {
            "prediction": cohen.prediction,
            "radius": cohen.radius,
            "forward_passes": cohen.forward_passes,
            "seconds": time.perf_counter() - started,
        }
        rows.append(row)
        print(
            json.dumps(
                {
                    k: (
                        v
                        if not isinstance(v, dict)
                        else {kk: (round(vv, 4) if isinstance(vv, float) else vv) for kk, vv in v.items()}
                    )
                    for k, v in row.items()
                }
            ),
            flush=True,
        )

    summary: dict[str, object] = {
        "source": source,
        "sigma": sigma,
        "alpha": alpha,
        "budget": args.budget,
        "cohen_n": args.cohen_n,
        "cohen_radius_cap": cap,
        "frames": len(rows),
    }
    for name in (
        "sequential_soft_fast",
        "sequential_soft_matched",
        "sequential_sharp_fast",
        "sequential_hard_fast",
        "sequential_hard_matched",
        "soft_fixed",
    ):
        certified = [r for r in rows if r[name]["prediction"] >= 0]
        ratios = [
            r[name]["radius"] / r["cohen"]["radius"]
            for r in rows
            if r["cohen"]["prediction"] >= 0 and r["cohen"]["radius"] > 0
        ]
        summary[name] = {
            "certified_frames": len(certified),
            "median_forward_passes_certified": float(
                np.median([r[name]["forward_passes"] for r in certified])
            )
            if certified
            else None,
            "median_radius_ratio_vs_cohen": float(np.median(ratios)) if ratios else None,
            "share_ratio_at_least_0.9": float(np.mean([q >= 0.9 for q in ratios])) if ratios else None,
            "min_radius_ratio": float(min(ratios)) if ratios else None,
        }
    summary["cohen"] = {
        "certified_frames": sum(r["cohen"]["prediction"] >= 0 for r in rows),
        "frames_at_cap": sum(math.isclose(r["cohen"]["radius"], cap, rel_tol=1e-6) for r in rows),
    }
    print(json.dumps(summary, indent=2))
    atomic_write_text(args.out, json.dumps({"summary": summary, "frames": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
