"""``painwatch loio DATA --out RUN``: leave-one-individual-out evaluation."""

from __future__ import annotations

import argparse

from painwatch.cli.options import HELP_FORMATTER, add_options, config_from_args
from painwatch.cli.train import add_training_options
from painwatch.evaluation.settings import LoioSettings
from painwatch.inference.bulk_settings import DistributedSettings
from painwatch.training.config import TrainConfig


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``painwatch loio``: its own options plus every training option of ``painwatch train``."""
    parser = subparsers.add_parser(
        "loio",
        formatter_class=HELP_FORMATTER,
        help="leave-one-individual-out evaluation with per-fold checkpoints, metrics and a report",
        description=(
            "Leave-one-individual-out evaluation on DATA (folder DATA/<individual>/<label>/* or a manifest "
            "CSV): one fold per individual, an inner validation split by individual for early stopping "
            "and temperature scaling. Writes predictions.csv, metrics.json and report.md/.html with PNGs "
            "into RUN. Resumable with --resume. With --ray the folds run as Ray tasks. Each fold trains "
            "with the training options below, the same as `painwatch train`'s."
        ),
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in RUN, skipping finished folds; refused when a setting that can change a "
        "fold differs from the run's",
    )
    add_options(parser, LoioSettings)
    add_training_options(parser, head=True)
    add_options(parser.add_argument_group("Ray (each fold a Ray task; results as on one machine)"),
                DistributedSettings, groups=("", "folds"))
    parser.set_defaults(func=_loio)


def settings_from_args(args: argparse.Namespace) -> LoioSettings:
    """The :class:`LoioSettings` of parsed ``painwatch loio`` arguments; the training options go through
    the same :class:`TrainConfig` as ``painwatch train``'s, so they mean exactly what they mean there."""
    return config_from_args(LoioSettings, args, train=config_from_args(TrainConfig, args))


def _loio(args: argparse.Namespace) -> int:
    from painwatch.evaluation.loio import run_loio

    outcome = run_loio(settings_from_args(args), resume=bool(args.resume),
                       cluster=config_from_args(DistributedSettings, args))
    if outcome.complete:
        for name in ("html", "metrics", "predictions"):
            label = "report" if name == "html" else name
            print(f"{label}: {outcome.outputs[name]}")
    return 0


