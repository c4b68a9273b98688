"""Benchmark: forward passes and certified radius of the Predictor's certificate, against Cohen et al.'s
CERTIFY at n = 100 000 with the same network, sigma and alpha.

Target (issue 5): median forward passes per certified frame <= 1 000 with a radius >= 0.9x Cohen's.

For every frame it runs, with seeded generators (radii: L2, pixels in [0, 1] at the model's input size):

- ``predictor``: ``Predictor.certify_tensor`` with the bundle's own settings (bundle mode only);
- ``hard_fixed``: hard votes with the fixed-budget bound: Cohen's Clopper-Pearson bound over all
  ``--budget`` - ``--n0`` draws, sampling stopped early only to abstain (the default of new bundles);
- ``hard``: the anytime sequential certificate on hard votes (the classifier is Cohen's ``g``), at most
  ``--budget`` forward passes in all (``--n0`` selection draws included);
- ``sharp``: the sequential certificate on soft scores sharpened with ``softmax(f / 0.1)``, same budget;
- ``soft``: the sequential certificate on plain soft scores ``softmax(f)``, same budget;
- ``cohen_budget``: Cohen's fixed-n CERTIFY with the same budget (``--n0`` + the rest), Clopper-Pearson;
- ``cohen``: Cohen's CERTIFY at n0 = 100, n = ``--cohen-n`` (the reference);
- with ``--matched``: ``hard_matched`` / ``soft_matched``, sequential with Cohen's budget that stop
  within ``--rel-tol`` of the best that budget allows (what it costs to come close to the reference).

The black-box limit
-------------------
On a frame where all ``m`` noisy draws vote for class A, no certificate that is valid at level alpha for
*every* network and only evaluates the network on Gaussian draws around x can certify a radius above
``sigma * PhiInv(alpha ** (1 / m))``. Proof: take the half-space classifier f' that answers B on
``{z : <z - x, u> > t}`` with ``Phi(-t / sigma) = eps``, and A elsewhere. Its smoothed classifier flips at
distance exactly ``t`` along u, and with probability ``(1 - eps) ** m`` its m draws are indistinguishable
from all-A draws. A method that certified R > t on all-A draws would be wrong for f' with probability
``(1 - eps) ** m > alpha`` whenever ``eps < 1 - alpha ** (1 / m)``. Cohen's CERTIFY at n = 100 000 reaches
its cap ``sigma * PhiInv(alpha ** (1 / 100 000))`` on such frames (3.81 sigma at alpha = 0.001), so at a
budget of 1 000 draws no valid method exceeds ``PhiInv(alpha ** 0.001) / PhiInv(alpha ** 1e-5)`` = 0.646x
of it there. The summary prints this limit (``black_box_limit_ratio``) and splits every figure into
frames at Cohen's cap and frames below it.

Usage (CPU: about 4 minutes per frame with one thread, nearly all of it Cohen at n = 100 000):

    .venv/bin/python scripts/bench_certify_clinical.py --bundle data/demo-bundle --data data/demo --frames 20
    .venv/bin/python scripts/bench_certify_clinical.py --toy --frames 8      # no bundle needed

Bundle mode takes frames only from individuals the bundle was not trained on (``model.json`` ->
``training.individuals``), spread over individuals and classes, unless ``--allow-overlap``. ``--toy``
builds a tiny timm ResNet (32 px) whose head separates dark from bright frames, so that frames range
from very confident to borderline. Results go to ``--out`` (JSON, rewritten atomically after every
frame; ``--resume`` continues a run with the same settings), the table to the same name with ``.md``,
and both to stdout. ``--reuse-cohen FILE`` takes the n = 100 000 reference from an earlier run on the
same frames, network, sigma, alpha and seed (it is seeded per frame, so it would come out the same) and
reruns only the budgeted methods: minutes, not hours.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import norm

from painwatch.io import atomic_write_json, atomic_write_text

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TARGET_PASSES = 1000
TARGET_RATIO = 0.9


def _toy_model_and_frames(frames: int, seed: int) -> tuple[torch.nn.Module, list[torch.Tensor], list[int]]:
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
    return model, images, [int(level > 125) for level in levels]


def _bundle_frames(
    bundle: Path, data: Path, frames: int, seed: int, allow_overlap: bool
) -> tuple[Any, list, list]:
    from painwatch.data import load_frame, load_records
    from painwatch.evaluation.certify import select_frames
    from painwatch.inference import Predictor

    predictor = Predictor.load(bundle)
    trained_on = set(predictor.metadata.training.get("individuals") or [])
    records = load_records(data)
    if not allow_overlap:
        records = [r for r in records if r.individual not in trained_on]
        if not records:
            sys.exit(f"error: every individual in {data} was used to train {bundle}; pass --allow-overlap")
    records = select_frames(records, frames, seed)
    images = [predictor.preprocess(load_frame(r), str(r.path)) for r in records]
    return predictor, images, [int(r.label) for r in records]


def _limit(sigma: float, alpha: float, draws: int) -> float:
    """``sigma * PhiInv(alpha ** (1 / draws))``: the largest radius ``draws`` unanimous draws can justify."""
    return sigma * float(norm.ppf(alpha ** (1.0 / draws)))


def _entry(certificate: Any, passes: int, started: float, stop: str | None = None) -> dict[str, Any]:
    return {
        "prediction": int(certificate.prediction),
        "radius": float(certificate.radius),
        "forward_passes": int(passes),
        "stop_reason": stop,
        "seconds": time.perf_counter() - started,
    }


def _summarise(rows: list[dict[str, Any]], name: str, at_cap: bool | None) -> dict[str, Any]:
    """Median forward passes and radius ratios against Cohen for one method over a subset of frames."""
    subset = [r for r in rows if at_cap is None or r["cohen_at_cap"] == at_cap]
    certified = [r for r in subset if r[name]["prediction"] >= 0]
    compared = [r for r in subset if r["cohen"]["prediction"] >= 0 and r["cohen"]["radius"] > 0]
    ratios = [r[name]["radius"] / r["cohen"]["radius"] for r in compared]
    passes = [r[name]["forward_passes"] for r in certified]
    return {
        "frames": len(subset),
        "certified_frames": len(certified),
        "median_forward_passes_certified": float(np.median(passes)) if passes else None,
        "median_radius_ratio_vs_cohen": float(np.median(ratios)) if ratios else None,
        "share_ratio_at_least_0.9": float(np.mean([q >= TARGET_RATIO for q in ratios])) if ratios else None,
        "min_radius_ratio": float(min(ratios)) if ratios else None,
        "certified_accuracy": float(np.mean([r[name]["prediction"] == r["label"] for r in subset]))
        if subset
        else None,
    }


def _round(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, dict):
        return {k: _round(v) for k, v in value.items()}
    return value


def _table(summary: dict[str, Any], methods: list[str]) -> str:
    """The summary as a markdown table (the full figures are in the JSON)."""

    def cell(value: Any, digits: int = 3) -> str:
        return "-" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)

    lines = [
        f"{summary['frames']} frames ({summary['source']}), "
        f"sigma {summary['sigma']:g}, alpha {summary['alpha']:g}; "
        f"Cohen n={summary['cohen_n']}: {summary['cohen_certified_frames']} certified, "
        f"{summary['frames_at_cohen_cap']} at its cap {summary['cohen_radius_cap']:.4f}; "
        f"black-box limit at the cap with {summary['budget']} draws: {summary['black_box_limit_ratio']:.3f}x",
        "",
        "| method | median passes | median ratio | share >= 0.9 | ratio at cap | ratio below cap "
        "| certified accuracy | target met |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in methods:
        entry = summary[name]
        lines.append(
            f"| {name} | {cell(entry['median_forward_passes_certified'], 0)} "
            f"| {cell(entry['median_radius_ratio_vs_cohen'])} | {cell(entry['share_ratio_at_least_0.9'], 2)} "
            f"| {cell(entry['at_cohen_cap']['median_radius_ratio_vs_cohen'])} "
            f"| {cell(entry['below_cohen_cap']['median_radius_ratio_vs_cohen'])} "
            f"| {cell(entry['certified_accuracy'])} | {'yes' if entry['target_met'] else 'no'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, default=None)
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--toy", action="store_true", help="use the built-in toy network and frames")
    parser.add_argument(
        "--allow-overlap", action="store_true", help="also use the bundle's training individuals"
    )
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--sigma", type=float, default=None, help="default: the bundle's (0.25 for --toy)")
    parser.add_argument("--alpha", type=float, default=0.001)
    parser.add_argument(
        "--budget", type=int, default=TARGET_PASSES, help="forward passes per frame, n0 included"
    )
    parser.add_argument("--n0", type=int, default=64, help="selection draws of the budgeted methods")
    parser.add_argument("--cohen-n", type=int, default=100_000)
    parser.add_argument(
        "--matched", action="store_true", help="also run sequential methods with Cohen's budget"
    )
    parser.add_argument("--rel-tol", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("data/bench_certify_clinical.json"))
    parser.add_argument(
        "--resume", action="store_true", help="keep the frames already in --out (same settings)"
    )
    parser.add_argument(
        "--reuse-cohen", type=Path, default=None, metavar="FILE",
        help="take Cohen's n = --cohen-n reference from an earlier run's JSON on the same frames",
    )
    args = parser.parse_args(argv)
    if not 0 < args.n0 < args.budget:
        parser.error(f"--n0 must be between 1 and --budget - 1, got {args.n0} with --budget {args.budget}")
    torch.set_num_threads(args.threads)

    from painwatch.robust import SmoothedClassifier, sequential_certify

    predictor = None
    if args.toy or args.bundle is None:
        model, images, labels = _toy_model_and_frames(args.frames, args.seed)
        source = "toy test_resnet 32 px (dark vs bright frames)"
        sigma = 0.25 if args.sigma is None else args.sigma
    else:
        if args.data is None:
            parser.error("--bundle needs --data")
        predictor, images, labels = _bundle_frames(
            args.bundle, args.data, args.frames, args.seed, args.allow_overlap
        )
        model = predictor.model
        source = f"bundle {args.bundle} on {args.data}"
        if args.allow_overlap:
            source += " (training individuals allowed)"
        sigma = predictor.settings.sigma if args.sigma is None else args.sigma
        if not math.isclose(sigma, predictor.settings.sigma):
            predictor = type(predictor).load(args.bundle, sigma=sigma)
    alpha = args.alpha
    draws = args.budget - args.n0
    settings = {
        "source": source,
        "sigma": sigma,
        "alpha": alpha,
        "budget": args.budget,
        "n0": args.n0,
        "cohen_n": args.cohen_n,
        "seed": args.seed,
        "frames_requested": args.frames,  # the frame selection depends on it
        "matched": args.matched,
        "predictor": predictor.settings.to_dict() if predictor is not None else None,
    }

    def generator(index: int, salt: int) -> torch.Generator:
        return torch.Generator().manual_seed(args.seed * 1_000_003 + index * 17 + salt)

    # name -> (generator salt, options of sequential_certify beyond the shared ones).
    budgeted = {"max_n": draws, "n0": args.n0}
    variants: dict[str, tuple[int, dict[str, Any]]] = {
        "hard_fixed": (8, {**budgeted, "scores": "hard", "bound": "fixed"}),
        "hard": (3, {**budgeted, "scores": "hard"}),
        "sharp": (6, {**budgeted, "score_temperature": 0.1}),
        "soft": (1, budgeted),
    }
    if args.matched:
        matched = {"max_n": args.cohen_n, "n0": args.n0, "rel_tol": args.rel_tol, "max_batch": 8192}
        variants["hard_matched"] = (7, {**matched, "scores": "hard"})
        variants["soft_matched"] = (2, matched)

    reference: list[dict[str, Any]] = []
    if args.reuse_cohen is not None:
        earlier = json.loads(args.reuse_cohen.read_text())
        same = ("source", "sigma", "alpha", "cohen_n", "seed", "frames_requested")
        different = [k for k in same if earlier["settings"].get(k) != json.loads(json.dumps(settings))[k]]
        if different:
            sys.exit(f"error: {args.reuse_cohen} was run with other {', '.join(different)}; cannot reuse it")
        reference = [frame["cohen"] for frame in earlier["frames"]]
        settings["cohen_reused_from"] = str(args.reuse_cohen)

    rows: list[dict[str, Any]] = []
    if args.resume and args.out.exists():
        previous = json.loads(args.out.read_text())
        if previous.get("settings") != json.loads(json.dumps(settings)):
            sys.exit(f"error: {args.out} was written with other settings; drop --resume or change --out")
        rows = previous["frames"]
        print(f"resuming: {len(rows)} of {len(images)} frames already in {args.out}", flush=True)

    cap = _limit(sigma, alpha, args.cohen_n)
    for index in range(len(rows), len(images)):
        x = images[index]
        row: dict[str, Any] = {"frame": index, "label": labels[index]}


        if predictor is not None:
            started = time.perf_counter()
            certificate, _, passes, stop = predictor.certify_tensor(x)
            row["predictor"] = _entry(certificate, passes, started, stop)
        for name, (salt, options) in variants.items():
            started = time.perf_counter()
            outcome = sequential_certify(
                model,
                x,
                sigma=sigma,
                alpha=alpha,
                batch_size=args.batch_size,
                min_radius=0.01 * sigma,
                generator=generator(index, salt),
                **options,
            )
            row[name] = _entry(outcome.certificate, outcome.forward_passes, started, outcome.stop_reason)
        smoothed = SmoothedClassifier(model, 2, sigma)
        started = time.perf_counter()
        fixed = smoothed.certify(
            x, n0=args.n0, n=draws, alpha=alpha, batch_size=args.batch_size, generator=generator(index, 4)
        )
        row["cohen_budget"] = _entry(fixed, fixed.forward_passes, started)
        if index < len(reference):
            row["cohen"] = reference[index]
        else:
            started = time.perf_counter()
            cohen = smoothed.certify(
                x, n0=100, n=args.cohen_n, alpha=alpha, batch_size=args.batch_size,
                generator=generator(index, 5),
            )
            row["cohen"] = _entry(cohen, cohen.forward_passes, started)
        row["cohen_at_cap"] = row["cohen"]["prediction"] >= 0 and math.isclose(
            row["cohen"]["radius"], cap, rel_tol=1e-9
        )
        rows.append(row)
        print(json.dumps(_round(row)), flush=True)
        atomic_write_json(args.out, {"settings": settings, "frames": rows})

    methods = (["predictor"] if predictor is not None else []) + list(variants) + ["cohen_budget"]
    summary: dict[str, Any] = {
        **settings,
        "frames": len(rows),
        "cohen_radius_cap": cap,
        "frames_at_cohen_cap": sum(r["cohen_at_cap"] for r in rows),
        "cohen_certified_frames": sum(r["cohen"]["prediction"] >= 0 for r in rows),
        "cohen_certified_accuracy": float(np.mean([r["cohen"]["prediction"] == r["label"] for r in rows])),
        # The best any valid black-box method can do with `budget` draws on a frame at Cohen's cap.
        "black_box_limit_ratio": _limit(sigma, alpha, args.budget) / cap,
        "target": f"median forward passes <= {TARGET_PASSES} and median radius ratio >= {TARGET_RATIO}",
    }
    for name in methods:
        overall = _summarise(rows, name, None)
        summary[name] = {
            **overall,
            "at_cohen_cap": _summarise(rows, name, True),
            "below_cohen_cap": _summarise(rows, name, False),
            "target_met": overall["median_forward_passes_certified"] is not None
            and overall["median_forward_passes_certified"] <= TARGET_PASSES
            and (overall["median_radius_ratio_vs_cohen"] or 0.0) >= TARGET_RATIO,
        }
    table = _table(summary, methods)
    print(table)
    atomic_write_text(args.out.with_suffix(".md"), table + "\n")
    everything = {"settings": settings, "summary": summary, "frames": rows}
    atomic_write_json(args.out, everything)
    return 0


if __name__ == "__main__":
    sys.exit(main())
