"""How often the in-distribution check refuses held-out face crops and pictures that are not face crops.

Builds the set of real pictures that are not macaque face crops from photos that ship with installed
packages (``skimage.data``: cats, people, objects and scenes, textures; ``skimage.data.lfw_subset()``
human faces), drawn frames (noise, blank colours, black, white and tiny pictures) and the whole
uncropped frames of the held-out individuals of the demo set (``painwatch.data.read_image`` on their
files; their face crops come from ``load_frame`` with the manifest's boxes). Then, on a bundle's network,
it fits every variant of the check (docs/design.md, "The in-distribution check") on the bundle's fit
individuals, sets its threshold on the bundle's inner-validation individuals, and measures the share of
each group refused; the bundle's own stored check is measured too.

    python scripts/bench_ood.py --bundle data/demo-bundle --data data/demo --out results/ood

Writes ``OUT/ood.json`` and ``OUT/table.md`` (with the command, the machine and the date).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import skimage.data
import torch

from painwatch.data import eval_transform, load_frame, load_records, read_image
from painwatch.io import atomic_write_json, atomic_write_text
from painwatch.models import load_bundle
from painwatch.models.in_distribution import (
    InDistributionSpec,
    InDistributionStatistic,
    default_layers,
    descriptor_pass,
    fit_in_distribution,
)

CATS = ("cat", "chelsea")
PEOPLE = ("astronaut", "camera")
OBJECTS = ("coffee", "rocket", "hubble_deep_field", "coins", "moon", "clock", "colorwheel", "horse", "logo",
           "page", "text", "checkerboard", "immunohistochemistry", "retina", "cell", "microaneurysms",
           "shepp_logan_phantom")
TEXTURES = ("brick", "grass", "gravel")


def as_rgb(picture: np.ndarray) -> np.ndarray:
    """An ``skimage.data`` picture (bool, float in [0, 1], grey, RGB or RGBA) as uint8 RGB; transparency
    is composited on white, as ``painwatch.data.read_image`` does."""
    array = np.asarray(picture)
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    elif array.dtype != np.uint8:
        top = float(np.nanmax(array)) if array.size else 1.0
        array = np.clip(np.rint(array * 255.0 if top <= 1.0 else array), 0, 255).astype(np.uint8)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    if array.shape[2] == 4:
        alpha = array[..., 3:4] / 255.0
        array = np.rint(array[..., :3] * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)
    return np.ascontiguousarray(array)


def views(picture: np.ndarray) -> list[np.ndarray]:
    """The whole picture and five half-size squares of it (four corners and the centre)."""
    height, width = picture.shape[:2]
    side = min(height, width) // 2
    corners = [(0, 0), (0, width - side), (height - side, 0), (height - side, width - side),
               ((height - side) // 2, (width - side) // 2)]
    return [picture] + [picture[y:y + side, x:x + side] for y, x in corners]


def non_face_groups(held_out_records: Sequence[Any], seed: int) -> dict[str, list[np.ndarray]]:
    """Every group of pictures that are not macaque face crops, by name (uint8 RGB arrays)."""
    def photos(names: Sequence[str]) -> list[np.ndarray]:
        return [view for name in names for view in views(as_rgb(getattr(skimage.data, name)()))]

    rng = np.random.default_rng(seed)
    faces = skimage.data.lfw_subset()
    return {
        "cats (skimage)": photos(CATS),
        "people (astronaut, camera)": photos(PEOPLE),
        "objects and scenes (skimage)": photos(OBJECTS),
        "textures (brick, grass, gravel)": photos(TEXTURES),
        "human faces (LFW subset)": [as_rgb(cv2.resize(face.astype(np.float32), (100, 100)))
                                     for face in faces],
        "noise (uniform, Gaussian)": (
            [rng.integers(0, 256, (128, 128, 3), dtype=np.uint8) for _ in range(20)]
            + [np.clip(rng.normal(128, 40, (128, 128, 3)), 0, 255).astype(np.uint8) for _ in range(20)]
        ),
        "blank colours": (
            [np.full((96, 96, 3), level, np.uint8) for level in np.linspace(20, 235, 20).astype(np.uint8)]
            + [np.tile(rng.integers(0, 256, 3, dtype=np.uint8), (96, 96, 1)) for _ in range(20)]
        ),
        "black, white, 1x1 pictures": (
            [np.zeros((96, 96, 3), np.uint8), np.full((96, 96, 3), 255, np.uint8),
             np.zeros((1, 1, 3), np.uint8), np.full((1, 1, 3), 255, np.uint8)]
            + [rng.integers(0, 256, (1, 1, 3), dtype=np.uint8) for _ in range(6)]
        ),
        "whole uncropped demo frames": [read_image(record.path) for record in held_out_records],
    }


VARIANTS: dict[str, dict[str, Any]] = {
    "energy of the logits [Liu20]": {"score": "energy", "layers": ()},
    "kNN, pooled features [Sun22]": {"score": "knn", "layers": ("pooled",)},
    "Mahalanobis (Ledoit-Wolf), pooled features [Lee18]": {"score": "mahalanobis", "layers": ("pooled",)},
    "PCA residual, pooled features": {"score": "pca_residual", "layers": ("pooled",)},
    "Mahalanobis, moments of every stage": {"score": "mahalanobis", "layers": "moments"},
    "kNN, moments of every stage": {"score": "knn", "layers": "moments"},
    "PCA residual, moments of every stage": {"score": "pca_residual", "layers": "moments"},
    "PCA residual, 4x4 grids of the middle stages": {"score": "pca_residual", "layers": "grids"},
    "kNN, default descriptors": {"score": "knn", "layers": "default"},
    "PCA residual, default descriptors, 8x8 grid at 1/8": {"score": "pca_residual", "layers": "finer"},
    "PCA residual, default descriptors (default)": {"score": "pca_residual", "layers": "default"},
}
"""The variants measured: the name, the per-descriptor score and the descriptors (``"default"``: the
descriptors of the bundles' check, ``"moments"`` / ``"grids"`` its moments / grids only, ``"finer"``
the default with an 8 x 8 grid instead of 4 x 4 on its first gridded stage)."""


def variant_spec(layers: Any, score: str, default: Sequence[str]) -> InDistributionSpec:
    if layers == "default":
        chosen = tuple(default)
    elif layers == "finer":
        first = next(layer for layer in default if layer.endswith(":grid4"))
        chosen = tuple(layer.replace(":grid4", ":grid8") if layer == first else layer for layer in default)
    elif layers in ("moments", "grids"):
        chosen = tuple(layer for layer in default if layer.endswith(":moments") == (layers == "moments"))
    else:
        chosen = tuple(layers)
    return InDistributionSpec(layers=chosen, score=score)


def describe(images: Sequence[np.ndarray], model: torch.nn.Module, layers: Sequence[str],
             size: int) -> dict[str, np.ndarray]:
    """The descriptors of pictures as the Predictor sees them (eval transform at the model's size)."""
    transform = eval_transform(size)
    parts: dict[str, list[np.ndarray]] = {layer: [] for layer in layers}
    for start in range(0, len(images), 64):
        batch = torch.stack([transform(image) for image in images[start:start + 64]])
        _, descriptors = descriptor_pass(model, batch, layers)
        for layer in layers:
            parts[layer].append(descriptors[layer])
    return {layer: np.concatenate(chunks) for layer, chunks in parts.items()}


def refusal_rates(check: InDistributionStatistic, groups: dict[str, dict[str, np.ndarray]]) -> dict[str, Any]:
    rates = {}
    for name, descriptors in groups.items():
        refused = check.refuses(check.scores(descriptors))
        rates[name] = {"refused": int(refused.sum()), "frames": len(refused), "share": float(refused.mean())}
    return rates


def machine() -> dict[str, Any]:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "device": "cpu", "torch_threads": torch.get_num_threads()}


def table(report: dict[str, Any]) -> str:
    groups = list(next(iter(report["variants"].values()))["refusal"])
    short = [name.split(" (")[0] for name in groups]
    lines = [
        "# In-distribution check: share of pictures refused",
        "",
        f"Command: `{report['command']}`  ",
        f"Machine: {report['machine']['platform']}, {report['machine']['cpu_count']} CPUs, "
        f"torch {report['machine']['torch']} on CPU  ",
        f"Date: {report['date']}  ",
        f"Bundle: {report['bundle']} ({report['architecture']}, {report['input_size']} px); fit on "
        f"{report['fit_frames']} frames of {len(report['fit_individuals'])} individuals, threshold on "
        f"{report['validation_frames']} frames of {len(report['validation_individuals'])} inner-validation "
        f"individuals (refusal level {report['level']:g}).",
        "",
        "Goals: held-out face crops refused <= 10 %; every picture of the other groups refused.",
        "",
        "| variant | validation | " + " | ".join(short) + " |",
        "|---|---|" + "---|" * len(groups),
    ]
    for name, variant in report["variants"].items():
        cells = [f"{100 * variant['refusal'][group]['share']:.0f} %" for group in groups]
        lines.append(f"| {name} | {100 * variant['validation_share']:.1f} % | " + " | ".join(cells) + " |")
    lines += ["", "Groups (frames): " + "; ".join(
        f"{name}: {count}" for name, count in report["group_sizes"].items()) + "."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, default=Path("data/demo-bundle"))
    parser.add_argument("--data", type=Path, default=Path("data/demo"))
    parser.add_argument("--out", type=Path, default=Path("results/ood"))
    parser.add_argument("--variants", nargs="*", default=None, help="variant names (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    bundle = load_bundle(args.bundle)
    model, training = bundle.model, bundle.metadata.training
    records = load_records(args.data)
    fit_ids, val_ids = set(training["fit_individuals"]), set(training["validation_individuals"])
    held_out = [r for r in records if r.individual not in set(training["individuals"])]
    if not held_out or not val_ids:
        parser.error(f"{args.bundle} has no held-out individuals in {args.data} or no validation individuals")
    stored = bundle.in_distribution
    default = default_layers(model)
    chosen = {name: VARIANTS[name] for name in (args.variants or VARIANTS)}
    specs = {name: variant_spec(v["layers"], v["score"], default) for name, v in chosen.items()}
    layers = sorted({layer for spec in specs.values() for layer in spec.descriptors}
                    | set(stored.spec.descriptors if stored else ()))
    size = bundle.metadata.input_size
    fit_records = [r for r in records if r.individual in fit_ids]
    pictures = {"held-out face crops": [load_frame(r) for r in held_out],
                **non_face_groups(held_out, args.seed)}
    fit = describe([load_frame(r) for r in fit_records], model, layers, size)
    validation = describe([load_frame(r) for r in records if r.individual in val_ids], model, layers, size)
    groups = {name: describe(images, model, layers, size) for name, images in pictures.items()}
    variants: dict[str, Any] = {}
    checks = {name: fit_in_distribution(fit, [r.individual for r in fit_records], validation, spec=spec)
              for name, spec in specs.items()}
    if stored is not None:
        checks["the bundle's stored check"] = stored
    for name, check in checks.items():
        validation_share = float(check.refuses(check.scores(validation)).mean())
        variants[name] = {"score": check.spec.name, "layers": list(check.spec.layers),
                          "threshold": check.threshold, "validation_share": validation_share,
                          "refusal": refusal_rates(check, groups)}
        shares = ", ".join(f"{group.split(' (')[0]} {100 * rate['share']:.0f}%"
                           for group, rate in variants[name]["refusal"].items())
        print(f"{name}: validation {100 * validation_share:.1f}%; {shares}", file=sys.stderr)
    report = {
        "command": "python scripts/bench_ood.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "bundle": str(args.bundle), "architecture": bundle.metadata.architecture, "input_size": size,
        "data": str(args.data),
        "fit_individuals": sorted(fit_ids), "validation_individuals": sorted(val_ids),
        "held_out_individuals": sorted({r.individual for r in held_out}),
        "fit_frames": len(fit_records), "validation_frames": len(next(iter(validation.values()))),
        "level": next(iter(specs.values())).level if specs else 0.05,
        "default_layers": list(default),
        "group_sizes": {name: len(images) for name, images in pictures.items()},
        "variants": variants,
        "seconds": time.perf_counter() - started,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "ood.json", report)
    atomic_write_text(args.out / "table.md", table(report))
    print(f"wrote {args.out / 'ood.json'} and {args.out / 'table.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
