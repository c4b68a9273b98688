"""``painwatch demo-bundle --data DATA --out BUNDLE``: a small model bundle for trying the app.

It trains a small backbone (fast on CPU) on most individuals of DATA with Gaussian noise
augmentation (``painwatch train``), then certifies it on the held-out individuals with the default
gate (``painwatch certify``) and writes the verdict into the bundle, so the app can show a real gate
status. The certification report goes next to the bundle (``BUNDLE-report/``).

Exit codes: 0 when the bundle was built and certified (whatever the verdict: the verdict is recorded
in the bundle and shown by the app; a demo model trained in a minute on synthetic frames may well fail
the deployment gate), 2 for a usage error (bad DATA, settings, an existing non-bundle OUT folder),
1 when training failed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXIT_OK = 0
EXIT_TRAIN_FAILED = 1
EXIT_USAGE = 2

DEMO_ARCH = "resnet10t"
DEMO_INPUT_SIZE = 64
# Measured on the default demo set (painwatch demo-data): a from-scratch resnet10t stays at chance for
# ~10 epochs, then learns the cues; 20 epochs at half-strength augmentation reach ~74% on held-out
# individuals. Noise sigma 0.06 (about 15 grey levels per pixel) leaves the small facial cues visible;
# 0.12 drowned them at 64 px.
DEMO_EPOCHS = 20
DEMO_NOISE_SIGMA = 0.06
DEMO_AUGMENT = 0.5
DEMO_HELD_OUT = 5
# The gate certifies with the budget the app uses (None: the bundle's default n), so it judges the
# classifier people get; 300 draws gave ~10% smaller radii than the app's.
DEMO_CERTIFY_N: int | None = None


def build_demo_bundle(
    data: str | Path,
    out: str | Path,
    *,
    held_out: int = DEMO_HELD_OUT,
    arch: str = DEMO_ARCH,
    input_size: int = DEMO_INPUT_SIZE,
    epochs: int = DEMO_EPOCHS,
    noise_sigma: float = DEMO_NOISE_SIGMA,
    max_frames: int | None = 30,
    n: int | None = DEMO_CERTIFY_N,
    seed: int = 0,
    gate: str | Path | None = None,
    quiet: bool = False,
) -> int:
    """Train, certify, record the verdict; returns the exit code (see the module docstring)."""
    from painwatch.certify import UsageError, run_certification
    from painwatch.cli import main as cli_main
    from painwatch.data import held_out_individuals, load_records

    data, out = Path(data), Path(out)
    records = load_records(data)
    evaluation = held_out_individuals([r.individual for r in records], held_out, seed)
    training = sorted({r.individual for r in records} - set(evaluation))
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, file=sys.stderr))
    say(
        f"demo bundle: training {arch} ({input_size} px, {epochs} epochs, noise sigma {noise_sigma}) on "
        f"{len(training)} individuals; certifying on {', '.join(evaluation)}"
    )
    argv = [
        "train",
        str(data),
        "--out",
        str(out),
        "--arch",
        arch,
        "--input-size",
        str(input_size),
        "--epochs",
        str(epochs),
        "--noise-sigma",
        str(noise_sigma),
        "--individuals",
        ",".join(training),
        "--seed",
        str(seed),
        "--lr",
        "2e-3",
        "--augment",
        str(DEMO_AUGMENT),
        "--patience",
        "0",
    ]
    if quiet:
        argv.append("--quiet")
    code = cli_main(argv)
    if code != 0:
        print(f"painwatch demo-bundle: training failed (exit code {code})", file=sys.stderr)
        return EXIT_USAGE if code == 2 else EXIT_TRAIN_FAILED
    report_dir = out.parent / f"{out.name}-report"
    try:
        run = run_certification(
            out,
            data,
            report_dir,
            gate_path=gate,
            individuals=evaluation,
            max_frames=max_frames,
            n=n,
            noise_draws=8,
            bootstrap_reps=500,
            seed=seed,
            progress=not quiet,
            main_method_only=True,
        )
    except (UsageError, ValueError) as error:
        print(f"painwatch demo-bundle: certification error: {error}", file=sys.stderr)
        return EXIT_USAGE
    verdict = "PASSED" if run.passed else "FAILED"
    for result in run.gate_results:
        value = "not measurable" if result["value"] is None else f"{result['value']:.3g}"
        say(f"  {'PASS' if result['passed'] else 'FAIL'}  {result['detail']}: {value}")
    print(
        f"demo bundle {out}: gate {verdict} on held-out individuals {', '.join(evaluation)}; "
        f"report {run.files['html']}"
    )
    return EXIT_OK


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``painwatch demo-bundle``."""
    parser = subparsers.add_parser(
        "demo-bundle",
        help="train a small demo model on part of DATA, certify it on the rest, write the bundle",
        description=__doc__.split("\n\n")[1],
    )
    parser.add_argument("--data", type=Path, required=True, help="data folder or manifest (e.g. data/demo)")
    parser.add_argument("--out", type=Path, required=True, help="bundle folder to write")
    parser.add_argument(
        "--held-out", type=int, default=DEMO_HELD_OUT, help="individuals kept for certification"
    )
    parser.add_argument("--arch", default=DEMO_ARCH, help="timm architecture (default: %(default)s)")
    parser.add_argument("--input-size", type=int, default=DEMO_INPUT_SIZE)
    parser.add_argument("--epochs", type=int, default=DEMO_EPOCHS)
    parser.add_argument("--noise-sigma", type=float, default=DEMO_NOISE_SIGMA)
    parser.add_argument(
        "--max-frames", type=int, default=30, help="frames certified (spread over individuals)"
    )
    parser.add_argument(
        "--n",
        type=int,
        default=DEMO_CERTIFY_N,
        help="noise-draw budget per frame for certification (default: the bundle's, as the app uses)",
    )
    parser.add_argument("--gate", type=Path, default=None, help="gate TOML (default: the packaged gate)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true")
    parser.set_defaults(func=_command)


def _command(args: argparse.Namespace) -> int:
    try:
        return build_demo_bundle(
            args.data,
            args.out,
            held_out=args.held_out,
            arch=args.arch,
            input_size=args.input_size,
            epochs=args.epochs,
            noise_sigma=args.noise_sigma,
            max_frames=args.max_frames,
            n=args.n,
            seed=args.seed,
            gate=args.gate,
            quiet=args.quiet,
        )
    except ValueError as error:  # bad data (DataValidationError), bad --held-out, ...
        print(f"painwatch demo-bundle: error: {error}", file=sys.stderr)
        return EXIT_USAGE
