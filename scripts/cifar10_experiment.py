"""The CIFAR-10 experiment of [RC, Ch. 3]: margin losses on an orthogonal (BCOP) conv net.

Network (no bias, every layer 1-Lipschitz by construction)::

    OrthogonalConv2d(3, c1, 3) -> ReLU -> OrthogonalConv2d(c1, c2, 3, stride=2) -> ReLU ->
    OrthogonalConv2d(c2, c3, 3) -> ReLU -> OrthogonalConv2d(c3, c4, 3, stride=2) -> ReLU -> Flatten ->
    OrthogonalLinear(c4 * 8 * 8, w) -> ReLU -> OrthogonalLinear(w, w) -> ReLU ->
    OrthogonalLinear(w, w) -> ReLU -> OrthogonalLinear(w, 10)

with ``(c1, c2, c3, c4) = (8, 8, 16, 16)`` and ``w = 512`` in [RC] ("4 BCOP conv layers + 3x512
dense"; the three dense layers of 512 are read as hidden layers, as in the MNIST "3x512" MLP). Stride 2
is BCOP's invertible downsampling (pixel unshuffle) followed by a stride-1 orthogonal convolution.
Training and evaluation are those of :mod:`_experiment_common` (Adam lr 0.01, cosine, batch 128; clean,
Lipschitz-margin, smoothed-margin and randomized-smoothing certified accuracy, accuracy under noise,
PGD check), every figure of a table on the same test points: all 10 000 by default, or ``--num-test N``
of them, stratified by class and seeded, with the 95 % Clopper-Pearson interval of each accuracy.

Data (``--data``, required; nothing is downloaded):

- a folder in torchvision's CIFAR-10 layout (``ROOT/cifar-10-batches-py/...``): read with
  ``torchvision.datasets.CIFAR10(ROOT, train=..., download=False)``. Those batches are Python pickles;
  torchvision checks their MD5 sums against the official release before it unpickles them, and this
  script never unpickles anything itself;
- an ``.npz`` with ``x_train (N, 32, 32, 3) uint8, y_train (N,), x_test, y_test`` (read with
  ``allow_pickle=False``), e.g. a stand-in with CIFAR-10's shapes for tests.

On a CPU, shrink the run with ``--num-train``, ``--epochs``, ``--num-test``, ``--n`` (and
``--dense-width`` / ``--channels`` for smoke tests). Outputs under ``--out`` (default results/cifar10).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _experiment_common as common

from painwatch.robust.layers import OrthogonalConv2d, OrthogonalLinear
from painwatch.runtime import resolve_device

NUM_CLASSES = 10
IMAGE_SHAPE = (3, 32, 32)
THESIS_CHANNELS = (8, 8, 16, 16)


class Cifar10DataError(ValueError):
    """The CIFAR-10 data given with ``--data`` is missing or malformed (the message names the problem)."""


def _check_split(
    name: str, images: np.ndarray, labels: np.ndarray, source: str
) -> tuple[np.ndarray, np.ndarray]:
    images, labels = np.asarray(images), np.asarray(labels)
    if images.ndim != 4 or images.shape[1:] != (32, 32, 3):
        raise Cifar10DataError(f"{source}: {name} images must be (N, 32, 32, 3), got shape {images.shape}")
    if images.dtype != np.uint8:
        raise Cifar10DataError(f"{source}: {name} images must be uint8 (0..255), got dtype {images.dtype}")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise Cifar10DataError(
            f"{source}: {name} labels must be (N,) with N = {images.shape[0]}, got shape {labels.shape}"
        )
    if not np.issubdtype(labels.dtype, np.integer):
        raise Cifar10DataError(f"{source}: {name} labels must be integers, got dtype {labels.dtype}")
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        bad = labels[(labels < 0) | (labels >= NUM_CLASSES)][0]
        raise Cifar10DataError(f"{source}: {name} label {bad} is outside 0..9")
    tensor_images = images.astype(np.float32).transpose(0, 3, 1, 2) / 255.0
    return tensor_images, labels.astype(np.int64)


def load_cifar10(path: str | Path) -> dict[str, np.ndarray]:
    """CIFAR-10 from a torchvision-format folder or an ``.npz``: ``x_train, y_train, x_test, y_test``.

    Images come back ``(N, 3, 32, 32)`` float32 in [0, 1]. Raises :class:`Cifar10DataError` naming the
    path and the problem (missing folder or file, corrupted batches, wrong shapes or labels).
    """
    source = Path(path)
    if source.is_file() and source.suffix == ".npz":
        try:
            with np.load(source, allow_pickle=False) as archive:
                missing = [
                    key for key in ("x_train", "y_train", "x_test", "y_test") if key not in archive.files
                ]
                if missing:
                    raise Cifar10DataError(f"{source}: missing arrays {missing} (has {archive.files})")
                arrays = {key: archive[key] for key in ("x_train", "y_train", "x_test", "y_test")}
        except Cifar10DataError:
            raise
        except (OSError, ValueError) as error:
            raise Cifar10DataError(f"{source}: cannot read as .npz without pickles ({error})") from error
    elif source.is_dir():
        from torchvision.datasets import CIFAR10

        arrays = {}
        for split, train in (("train", True), ("test", False)):
            try:
                dataset = CIFAR10(str(source), train=train, download=False)
            except RuntimeError as error:  # torchvision: "Dataset not found or corrupted."
                raise Cifar10DataError(
                    f"{source}: no valid CIFAR-10 in torchvision's format (expected "
                    f"{source}/cifar-10-batches-py with the official batches): {error}"
                ) from error
            arrays[f"x_{split}"] = np.asarray(dataset.data)
            arrays[f"y_{split}"] = np.asarray(dataset.targets, dtype=np.int64)
    else:
        raise Cifar10DataError(
            f"{source}: not found; pass a torchvision-format CIFAR-10 folder or an .npz "
            "(nothing is downloaded)"
        )
    x_train, y_train = _check_split("train", arrays["x_train"], arrays["y_train"], str(source))
    x_test, y_test = _check_split("test", arrays["x_test"], arrays["y_test"], str(source))
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}


def cifar_bcop_net(
    channels: tuple[int, int, int, int] = THESIS_CHANNELS,
    dense_width: int = 512,
    bjorck_iters: int = 20,
    seed: int = 0,
) -> nn.Sequential:
    """[RC]'s orthogonal conv net for 32x32 RGB inputs (see the module docstring); seeded init."""
    if len(channels) != 4 or min(channels) < 1 or dense_width < 1:
        raise ValueError(
            f"need four positive channel counts and dense_width >= 1, got {channels}, {dense_width}"
        )
    generator = torch.Generator().manual_seed(seed)
    c1, c2, c3, c4 = channels

    def conv(fan_in: int, fan_out: int, stride: int = 1) -> OrthogonalConv2d:
        return OrthogonalConv2d(
            fan_in, fan_out, 3, stride=stride, bjorck_iters=bjorck_iters, generator=generator
        )

    def dense(fan_in: int, fan_out: int) -> OrthogonalLinear:
        return OrthogonalLinear(fan_in, fan_out, bjorck_iters=bjorck_iters, generator=generator)

    return nn.Sequential(
        conv(3, c1), nn.ReLU(),
        conv(c1, c2, stride=2), nn.ReLU(),
        conv(c2, c3), nn.ReLU(),
        conv(c3, c4, stride=2), nn.ReLU(),
        nn.Flatten(),
        dense(c4 * 8 * 8, dense_width), nn.ReLU(),
        dense(dense_width, dense_width), nn.ReLU(),
        dense(dense_width, dense_width), nn.ReLU(),
        dense(dense_width, NUM_CLASSES),
    )  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, required=True, help="torchvision-format CIFAR-10 folder or .npz")
    parser.add_argument("--num-train", type=int, default=None, help="use the first N training images")
    parser.add_argument("--channels", default="8,8,16,16", help="the four conv widths ([RC]: 8,8,16,16)")
    parser.add_argument("--dense-width", type=int, default=512, help="hidden dense width ([RC]: 512)")
    common.add_common_arguments(parser, default_out="results/cifar10")
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the experiment; returns the summary also written to ``--out/summary.json``."""
    args = build_parser().parse_args(argv)
    names = common.check_common_arguments(args)
    try:
        channels = tuple(int(c) for c in args.channels.split(","))
    except ValueError as error:
        raise ValueError(f"--channels must be four comma-separated ints, got {args.channels!r}") from error
    if len(channels) != 4 or min(channels) < 1:
        raise ValueError(f"--channels must be four positive ints, got {args.channels!r}")
    if args.dense_width < 1 or (args.num_train is not None and args.num_train < 1):
        raise ValueError("--dense-width and --num-train must be >= 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    log = print
    started = (time.perf_counter(), time.process_time())

    data = load_cifar10(args.data)
    x_train, y_train = torch.from_numpy(data["x_train"]), torch.from_numpy(data["y_train"])
    if args.num_train is not None:
        x_train, y_train = x_train[: args.num_train], y_train[: args.num_train]
    x_test = torch.from_numpy(data["x_test"]).to(device)
    y_test = torch.from_numpy(data["y_test"]).to(device)
    x_eval, y_eval, points = common.choose_evaluation_points(x_test, y_test, args.num_test, args.seed)
    description = f"CIFAR-10 from {args.data}"
    log(
        f"data: {description}; train {len(x_train)}, test {len(x_test)}, {len(points)} of them evaluated; "
        f"device {device}"
    )

    train_settings, eval_settings = common.settings_from_arguments(args)
    config = common.settings_dict(
        train_settings,
        eval_settings,
        data=description,
        channels=list(channels),
        dense_width=args.dense_width,
        bjorck_iters=args.bjorck_iters,
        margin=args.margin,
        input_variance=args.input_variance,
        zhen_sigma=args.zhen_sigma,
        num_train=len(x_train),
        num_test_total=len(x_test),
        evaluation_points=points.tolist(),
    )

    def make_model(name: str) -> nn.Module:
        return cifar_bcop_net(
            channels, args.dense_width, args.bjorck_iters, common.model_seed(args.seed, name)
        )

    results, _ = common.run_losses(
        names, make_model=make_model, train_data=(x_train, y_train), test_data=(x_eval, y_eval),
        num_classes=NUM_CLASSES, args=args, config=config, device=device, log=log,
    )
    return common.write_report(
        results,
        args=args,
        argv=argv,
        script="scripts/cifar10_experiment.py",
        title="CIFAR-10: margin losses on an orthogonal (BCOP) conv net",
        config=config,
        device=device,
        started=started,
        log=log,
    )


if __name__ == "__main__":
    main()
