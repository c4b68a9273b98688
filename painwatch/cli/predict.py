"""``painwatch predict BUNDLE INPUTS... --out results.csv``: bulk prediction with certificates.

Answers every frame of folders of images and clips, manifest CSVs, image files and clips (sampled at
--fps) with the bundle's certified classifier, one CSV row per frame; here, or with --ray on Ray actors
that each load the bundle once. A run continues an existing results file, skipping its frames; frames
that cannot be answered are listed in RESULTS.problems.csv. Exit 0 when every frame was answered, 1 when
some could not be, 2 for a usage error.
"""

from __future__ import annotations

import argparse

from painwatch.cli import EXIT_FAILED, EXIT_OK
from painwatch.cli.options import HELP_FORMATTER, add_options, config_from_args
from painwatch.inference.bulk_settings import BulkSettings, DistributedSettings, EngineSettings


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``painwatch predict``: its own options and the Ray options for frames."""
    parser = subparsers.add_parser(
        "predict",
        formatter_class=HELP_FORMATTER,
        help="certified answers for every frame of folders, manifests and clips, into one CSV (Ray optional)",
        description=__doc__.split("\n\n")[1].replace("\n", " "),
    )
    add_options(parser, BulkSettings)
    add_options(parser.add_argument_group("Engine (what computes the answers and noise draws)"),
                EngineSettings)
    add_options(parser.add_argument_group("Ray"), DistributedSettings, groups=("", "frames"))
    parser.set_defaults(func=_predict)


def _predict(args: argparse.Namespace) -> int:
    from painwatch.inference.bulk import predict_bulk

    outcome = predict_bulk(config_from_args(BulkSettings, args),
                           cluster=config_from_args(DistributedSettings, args),
                           engine=config_from_args(EngineSettings, args))
    print(f"results: {outcome.out} ({outcome.frames_answered} frame(s) answered now, "
          f"{outcome.frames_skipped} already there)")
    if outcome.problems_file is not None:
        print(f"problems: {outcome.problems_file} ({len(outcome.problems)})")
    return EXIT_FAILED if outcome.problems else EXIT_OK
