"""``painwatch validate`` and ``painwatch demo-data``: check a data source, draw the synthetic demo set."""

from __future__ import annotations

import argparse

EXIT_OK = 0
EXIT_PROBLEMS = 1


def _validate(args: argparse.Namespace) -> int:
    from painwatch.data.validation import validate_source

    report = validate_source(
        args.data,
        check_images=not args.no_decode,
        require_both_classes=not args.allow_single_class,
    )
    if args.json:
        print(report.to_json())
    else:
        print(report.format())
        print(
            "OK: the data are ready to use"
            if report.ok
            else f"FAILED: {len(report.problems)} problem(s) to fix"
        )
    return EXIT_OK if report.ok else EXIT_PROBLEMS


def _demo_data(args: argparse.Namespace) -> int:
    import time

    from painwatch.data.synthetic import make_demo_dataset

    started = time.perf_counter()
    manifest = make_demo_dataset(
        args.out,
        individuals=args.individuals,
        frames_per_class=args.frames_per_class,
        seed=args.seed,
        image_size=args.size,
        overwrite=args.overwrite,
        progress=args.verbose,
    )
    frames = 2 * args.individuals * args.frames_per_class
    print(
        f"wrote {frames} SYNTHETIC frames ({args.individuals} individuals x 2 classes x "
        f"{args.frames_per_class}, "
        f"{args.size} px) in {time.perf_counter() - started:.1f} s\nmanifest: {manifest}"
    )
    return EXIT_OK


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``validate`` and ``demo-data`` to the ``painwatch`` command line."""
    from painwatch.data.synthetic import DEMO_FRAMES_PER_CLASS, DEMO_IMAGE_SIZE, DEMO_INDIVIDUALS

    validate = subparsers.add_parser(
        "validate",
        help="check a data folder or manifest CSV and report every problem",
        description=(
            "Check DATA (a folder DATA/<individual>/<label>/*.jpg, a folder holding manifest.csv, "
            "or a manifest CSV with columns path, individual, label [, x0, y0, x1, y1] "
            "[, video, time_s]). Reports every problem at once with file and row, a table of frames "
            "per individual and class, and how many frames are usable. "
            "Exit code 0 when clean, 1 when there are problems."
        ),
    )
    validate.add_argument("data", help="data folder or manifest CSV")
    validate.add_argument("--json", action="store_true", help="print the report as JSON")
    validate.add_argument(
        "--no-decode",
        action="store_true",
        help="do not decode images that have no face box (faster; truncated files may then go unnoticed)",
    )
    validate.add_argument(
        "--allow-single-class",
        action="store_true",
        help="do not report individuals that have frames of one class only",
    )
    validate.set_defaults(func=_validate)

    demo = subparsers.add_parser(
        "demo-data",
        help="write a SYNTHETIC set of macaque-like face frames",
        description=(
            "Draw a SYNTHETIC demo set (not photographs) of macaque-like faces: pain frames show "
            "grimace-scale cues at varying intensity, no-pain frames relaxed faces. Writes "
            "OUT/<individual>/<label>/*.jpg, OUT/manifest.csv (face boxes) and OUT/README.md. "
            "Deterministic for a seed."
        ),
    )
    demo.add_argument("out", help="output folder (missing or empty)")
    demo.add_argument(
        "--individuals", type=int, default=DEMO_INDIVIDUALS, help="number of individuals (%(default)s)"
    )
    demo.add_argument(
        "--frames-per-class",
        type=int,
        default=DEMO_FRAMES_PER_CLASS,
        help="frames per individual and class (%(default)s)",
    )
    demo.add_argument("--seed", type=int, default=0, help="random seed (%(default)s)")
    demo.add_argument("--size", type=int, default=DEMO_IMAGE_SIZE, help="frame size in pixels (%(default)s)")
    demo.add_argument("--overwrite", action="store_true", help="replace an earlier demo set in OUT")
    demo.add_argument("-v", "--verbose", action="store_true", help="print progress per individual")
    demo.set_defaults(func=_demo_data)
