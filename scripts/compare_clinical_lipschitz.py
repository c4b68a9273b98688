"""The clinical comparison: a Lipschitz network certified in one forward pass against the demo ResNet
certified by randomized smoothing, on the same held-out individuals (docs/design.md, "Lipschitz networks
for face crops").

1. The ResNet bundle (``--resnet``, e.g. the demo bundle of ``painwatch demo-bundle``) names the
   individuals it was trained on (``model.json`` -> ``training.individuals``); every other individual of
   ``--data`` is held out.
2. The Lipschitz bundle (``--lipschitz``) is trained on exactly the ResNet's training individuals with
   :func:`painwatch.training.bundle.train_bundle` (the same inner validation split, by seed), unless it
   exists already and was trained on them (``--retrain`` trains it again).
3. Both answer by the same rule, the in-distribution check (docs/design.md, "The in-distribution
   check"): a bundle saved without one (e.g. a demo bundle built before bundles carried it) gets one
   fitted here exactly as training fits it (:func:`painwatch.training.in_distribution.fit_check` on the
   bundle's recorded fit and inner-validation individuals), held in memory only; ``--no-check`` runs
   both without any. A refused frame is an abstention (an error in answer and certified accuracy).
4. Every held-out frame (or ``--max-frames`` of them, spread over individuals and classes) goes through
   each bundle's :class:`painwatch.inference.Predictor` as the page sends it, with the bundle's default
   certificate: randomized smoothing [Cohen19] for the ResNet (64 + 936 noise draws, alpha 0.001), the
   Lipschitz margin [Tsuzuku18] for the Lipschitz network (one pass, exact; the check's score comes
   from the same pass).

Measured per model: clean accuracy (the bare network's argmax on clean frames), the accuracy of the
answers the page gives (abstentions count as errors), certified accuracy (correct and certified) at the
default gate's radius (``painwatch/evaluation/gates/default.toml``: 0.1 grey levels, L2 0.0435 at 64 px)
and against radius, seconds per frame (``Predictor.predict`` of one frame, wall clock and CPU time of
the process, ``--threads`` torch threads; on a shared machine the CPU time is the steadier of the two)
and forward passes per frame (``FrameResult.forward_passes``). Radii are L2 norms in
[0, 1] pixel units at the models' input size.

Outputs in ``--out``: ``summary.json`` (keys ``lipschitz`` and ``smoothing``, each with
``clean_accuracy``, ``certified_accuracy_at_gate_radius``, ``seconds_per_frame``,
``forward_passes_per_frame`` and more; the goal's checks; the machine and the command),
``frames.json`` (every frame's answers), ``table.md`` and ``certified_accuracy.png``. With ``--cache``
each model's frame results are kept there and reused by a later run with the same weights, settings,
check and frames (``--smoothing-only`` certifies the ResNet alone, e.g. while the Lipschitz network
trains).

Usage (results/README.md; on a loaded 2-core machine about 20 min for the ResNet's 100 frames and
15 min for the Lipschitz training, which the defaults below reproduce when the bundle is missing):

    painwatch demo-data data/demo
    painwatch demo-bundle --data data/demo --out data/demo-bundle
    python scripts/compare_clinical_lipschitz.py --data data/demo --resnet data/demo-bundle \
        --lipschitz data/demo-lipschitz-bundle --out results/clinical_lipschitz \
        --cache results/clinical_lipschitz/cache --max-frames 100
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from painwatch.data import FrameRecord, dataset_hash, load_frame, load_records
from painwatch.evaluation.certify import select_frames
from painwatch.evaluation.gate import DEFAULT_GATE, load_gate
from painwatch.evaluation.report import new_figure, save_figure
from painwatch.inference import Predictor
from painwatch.io import atomic_write_json, atomic_write_text
from painwatch.models import read_metadata
from painwatch.robust import certified_accuracy_at, certified_accuracy_curve
from painwatch.training import TrainConfig
from painwatch.training.bundle import train_bundle
from painwatch.training.in_distribution import fit_check

GOAL_SPEEDUP = 100.0
"""The Lipschitz model must take at least this many times less time per frame..."""
GOAL_CLEAN_POINTS = 5.0
"""...and lose at most this many points of clean accuracy; its certified accuracy at the gate radius
must be at least the smoothed ResNet's."""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="frames (folder or manifest)")
    parser.add_argument("--resnet", type=Path, required=True, help="the smoothing-certified bundle")
    parser.add_argument("--lipschitz", type=Path, required=True,
                        help="the Lipschitz bundle (trained if missing)")
    parser.add_argument("--out", type=Path, required=True, help="results folder")
    parser.add_argument("--retrain", action="store_true", help="train the Lipschitz bundle even if it exists")
    parser.add_argument("--max-frames", type=int, default=None, help="held-out frames to certify (all)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for both models' timing")
    parser.add_argument("--seed", type=int, default=0, help="frames, smoothing noise and training seed")
    parser.add_argument("--cache", type=Path, default=None,
                        help="folder of per-model frame results: a model's results are reused when its "
                        "weights, certificate settings, check and frames are those of an earlier run")
    parser.add_argument("--smoothing-only", action="store_true",
                        help="certify the smoothed ResNet into --cache and stop (no Lipschitz bundle needed)")
    parser.add_argument("--no-check", action="store_true",
                        help="answer without in-distribution checks (neither model refuses a frame)")
    training = parser.add_argument_group("Lipschitz training (see painwatch train --help)")
    training.add_argument("--arch", default="lip-sll-small")
    training.add_argument("--epochs", type=int, default=20)
    training.add_argument("--loss", default="ce")
    training.add_argument("--margin", type=float, default=1.0)
    training.add_argument("--lr", type=float, default=3e-3)
    training.add_argument("--batch-size", type=int, default=32)
    training.add_argument("--noise-sigma", type=float, default=0.0)
    training.add_argument("--augment", type=float, default=0.5)
    training.add_argument("--weight-decay", type=float, default=0.0)
    return parser.parse_args(argv)


def split_like(records: Sequence[FrameRecord], trained_on: Sequence[str]) -> tuple[list, list]:
    """(frames of the individuals a bundle was trained on, frames of every other individual)."""
    names = set(trained_on)
    if not names:
        raise ValueError("the ResNet bundle's model.json names no training individuals "
                         "(training.individuals)")
    training = [r for r in records if r.individual in names]
    held_out = [r for r in records if r.individual not in names]
    if not held_out:
        raise ValueError(f"every individual of the data trained the ResNet bundle ({sorted(names)})")
    return training, held_out


def lipschitz_bundle(args: argparse.Namespace, training: Sequence[FrameRecord], input_size: int) -> Path:
    """The Lipschitz bundle at ``args.lipschitz``: trained now on ``training`` unless it exists and was
    trained on the same individuals (and ``--retrain`` is not given)."""
    individuals = sorted({r.individual for r in training})
    if args.lipschitz.is_dir() and not args.retrain:
        recorded = read_metadata(args.lipschitz).training.get("individuals")
        if recorded != individuals:
            raise ValueError(f"{args.lipschitz} was trained on {recorded}, not on the ResNet's "
                             f"{individuals}; pass --retrain")
        return args.lipschitz
    config = TrainConfig(arch=args.arch, input_size=input_size, epochs=args.epochs, loss=args.loss,
                         margin=args.margin, lr=args.lr, batch_size=args.batch_size,
                         noise_sigma=args.noise_sigma, augment=args.augment, weight_decay=args.weight_decay,
                         seed=args.seed, patience=None, monitor="val_balanced_accuracy", device="cpu")
    train_bundle(training, config, args.lipschitz, data_source=str(args.data), synthetic=True,
                 progress=False, log=lambda message: print(message, file=sys.stderr, flush=True))
    return args.lipschitz


def same_refusal_rule(predictor: Predictor, records: Sequence[FrameRecord], *, enabled: bool) -> str:
    """Give ``predictor`` the in-distribution check it answers with here, and say which: its bundle's
    (``"stored"``), one fitted now on the bundle's recorded fit and inner-validation individuals of
    ``records`` as training fits it (``"fitted here"``), or none (``enabled`` False, or too few frames)."""
    if not enabled:
        predictor.in_distribution = None
        return "none (--no-check)"
    if predictor.in_distribution is not None:
        return "stored in the bundle"
    training = predictor.metadata.training
    fit_names, validation_names = (set(training.get(key) or []) for key in ("fit_individuals",
                                                                            "validation_individuals"))
    check, absent = fit_check(predictor.model, [r for r in records if r.individual in fit_names],
                              [r for r in records if r.individual in validation_names],
                              device=predictor.device)
    predictor.in_distribution = check
    return absent or ("fitted here on the bundle's fit individuals, threshold on its inner-validation "
                      f"individuals ({check.calibration_frames} frames)")


def certify_frames(predictor: Predictor, records: Sequence[FrameRecord]) -> list[dict[str, Any]]:
    """Each frame through ``predictor.predict`` (timed), and the bare network's clean answer."""
    entries = []
    for record in records:
        image = load_frame(record)
        started, cpu_started = time.perf_counter(), time.process_time()
        result = predictor.predict([image], names=[record.path.name])[0]
        seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
        x = predictor.preprocess(image).unsqueeze(0).to(predictor.device)
        with torch.no_grad():
            clean = int(predictor.model(x).argmax())
        entries.append({"file": str(record.path), "individual": record.individual, "label": record.label,
                        "answer": result.class_index, "radius": result.radius, "clean_prediction": clean,
                        "refused": result.abstain_code == "not_like_training_frames",
                        "forward_passes": result.forward_passes, "seconds": seconds,
                        "cpu_seconds": cpu_seconds, "method": result.method})
    return entries


def cached_frames(key: str, predictor: Predictor, frames: Sequence[FrameRecord], *, check: str,
                  cache: Path | None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """``certify_frames(predictor, frames)``, or the results of an earlier run in ``cache`` whose
    weights, certificate settings, in-distribution rule and frames were the same (the noise is seeded,
    so the answers are the same; the times are those measured then). Returns (entries, provenance)."""
    identity = {"weights_sha256": predictor.metadata.weights_sha256, "settings": predictor.settings.to_dict(),
                "seed": predictor.seed, "check": check, "frames": [str(r.path) for r in frames]}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    path = None if cache is None else cache / f"{key}-{digest}.json"
    if path is not None and path.is_file():
        saved = json.loads(path.read_text())
        return saved["entries"], {"from_cache": str(path), "measured": saved["measured"]}
    entries = certify_frames(predictor, frames)
    measured = datetime.now(UTC).isoformat(timespec="seconds")
    if path is not None:
        atomic_write_json(path, {"identity": identity, "measured": measured, "entries": entries})
    return entries, {"from_cache": None, "measured": measured}


def summarise(entries: Sequence[dict[str, Any]], gate_radius: float, grid: np.ndarray) -> dict[str, Any]:
    labels = np.array([e["label"] for e in entries])
    correct = np.array([e["answer"] == e["label"] for e in entries])
    radii = np.array([e["radius"] for e in entries])
    return {
        "clean_accuracy": float(np.mean(np.array([e["clean_prediction"] for e in entries]) == labels)),
        "answer_accuracy": float(np.mean(correct)),
        "abstention_rate": float(np.mean([e["answer"] < 0 for e in entries])),
        "refused_by_check": float(np.mean([e["refused"] for e in entries])),
        "certified_accuracy_at_gate_radius": certified_accuracy_at(correct, radii, gate_radius),
        "seconds_per_frame": float(np.mean([e["seconds"] for e in entries])),
        "cpu_seconds_per_frame": float(np.mean([e["cpu_seconds"] for e in entries])),
        "forward_passes_per_frame": float(np.mean([e["forward_passes"] for e in entries])),
        "median_radius_of_correct_answers": float(np.median(radii[correct])) if correct.any() else 0.0,
        "curve": {"radius": grid.tolist(),
                  "certified_accuracy": certified_accuracy_curve(correct, radii, grid).tolist()},
    }


def plot_curves(summary: dict[str, Any], gate_radius: float, path: Path) -> Path:
    figure, axis = new_figure(figsize=(5.5, 4.0))
    for key, label in (("lipschitz", "Lipschitz margin (1 pass)"), ("smoothing", "randomized smoothing")):
        curve = summary[key]["curve"]
        axis.plot(curve["radius"], curve["certified_accuracy"], label=f"{summary[key]['arch']}: {label}")
    axis.axvline(gate_radius, color="grey", linestyle="--", label=f"gate radius {gate_radius:.3g}")
    axis.set_xlabel("L2 radius (pixels in [0, 1], at the input size)")
    axis.set_ylabel("certified accuracy")
    axis.set_ylim(0, 1)
    axis.set_title("Held-out individuals: certified accuracy against radius")
    axis.legend(fontsize=8)
    return save_figure(figure, path)


def table(summary: dict[str, Any]) -> str:
    rows = ["| model | certificate | clean acc. | answer acc. | refused by the check | "
            "certified acc. at gate radius | seconds per frame (CPU seconds) | forward passes per frame |",
            "|---|---|---|---|---|---|---|---|"]
    for key in ("lipschitz", "smoothing"):
        s = summary[key]
        rows.append(f"| {s['arch']} | {s['method']} | {100 * s['clean_accuracy']:.1f} | "
                    f"{100 * s['answer_accuracy']:.1f} | {100 * s['refused_by_check']:.1f} | "
                    f"{100 * s['certified_accuracy_at_gate_radius']:.1f} | "
                    f"{s['seconds_per_frame']:.4f} ({s['cpu_seconds_per_frame']:.4f}) | "
                    f"{s['forward_passes_per_frame']:.0f} |")
    return "\n".join(rows) + "\n"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    records = load_records(args.data)
    resnet_metadata = read_metadata(args.resnet)
    training, held_out = split_like(records, resnet_metadata.training.get("individuals") or [])
    frames = select_frames(held_out, args.max_frames, args.seed)
    gate_radius = load_gate(DEFAULT_GATE).certified_radii(math.prod(resnet_metadata.input_shape))[0]
    predictors = {"smoothing": Predictor.load(args.resnet, seed=args.seed)}
    checks, entries, provenance = {}, {}, {}

    def measure(key: str) -> None:
        checks[key] = same_refusal_rule(predictors[key], training, enabled=not args.no_check)
        entries[key], provenance[key] = cached_frames(key, predictors[key], frames, check=checks[key],
                                                      cache=args.cache)

    measure("smoothing")
    if args.smoothing_only:
        return {"smoothing": provenance["smoothing"]}
    lipschitz = lipschitz_bundle(args, training, resnet_metadata.input_size)
    predictors = {"lipschitz": Predictor.load(lipschitz, seed=args.seed), **predictors}
    if predictors["lipschitz"].input_shape != predictors["smoothing"].input_shape:
        raise ValueError("both bundles must take the same input size (the gate radius depends on it)")
    measure("lipschitz")
    largest = max(e["radius"] for values in entries.values() for e in values)
    grid = np.linspace(0.0, max(largest, 2 * gate_radius) * 1.05, 80)
    summary: dict[str, Any] = {}
    for key, predictor in predictors.items():
        summary[key] = summarise(entries[key], gate_radius, grid) | {
            "arch": predictor.metadata.architecture, "method": predictor.settings.method_name,
            "bundle": str(predictor.bundle_path), "weights_sha256": predictor.metadata.weights_sha256,
            "settings": predictor.settings.to_dict(), "lipschitz_constant": predictor.lipschitz_constant,
            "training_loss": predictor.metadata.training.get("loss"), "in_distribution_check": checks[key],
            **provenance[key],
        }
    lip, smooth = summary["lipschitz"], summary["smoothing"]
    speedup = smooth["seconds_per_frame"] / lip["seconds_per_frame"]
    cpu_speedup = smooth["cpu_seconds_per_frame"] / max(lip["cpu_seconds_per_frame"], 1e-9)
    certified = (lip["certified_accuracy_at_gate_radius"], smooth["certified_accuracy_at_gate_radius"])
    summary["goal"] = {
        "speedup": speedup, "cpu_speedup": cpu_speedup, "speedup_met": speedup >= GOAL_SPEEDUP,
        "certified_difference_points": 100 * (certified[0] - certified[1]),
        "certified_met": certified[0] >= certified[1],
        "clean_difference_points": 100 * (lip["clean_accuracy"] - smooth["clean_accuracy"]),
        "clean_met": lip["clean_accuracy"] >= smooth["clean_accuracy"] - GOAL_CLEAN_POINTS / 100,
    }
    summary["setup"] = {
        "gate_radius": gate_radius, "gate": str(DEFAULT_GATE.name), "frames": len(frames),
        "held_out_individuals": sorted({r.individual for r in held_out}),
        "training_individuals": sorted({r.individual for r in training}),
        "data": str(args.data), "data_hash": dataset_hash(records),
        "command": "python scripts/compare_clinical_lipschitz.py " + " ".join(sys.argv[1:] if argv is None
                                                                               else list(argv)),
        "machine": {"platform": platform.platform(), "processor": platform.machine(),
                    "cpu_count": os.cpu_count(), "torch_threads": args.threads, "torch": torch.__version__,
                    "python": platform.python_version()},
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "frames.json", entries)
    atomic_write_json(args.out / "summary.json", summary)
    atomic_write_text(args.out / "table.md", table(summary))
    plot_curves(summary, gate_radius, args.out / "certified_accuracy.png")
    print(table(summary) + f"\nspeed-up {speedup:.0f}x; goal: {summary['goal']}")
    return summary


if __name__ == "__main__":
    main()
