"""``painwatch train DATA --out BUNDLE``: train the clinical model on the chosen individuals."""

from __future__ import annotations

import argparse
import sys

from painwatch.cli.options import HELP_FORMATTER, add_options, config_from_args
from painwatch.training.config import TrainConfig

TRAINING_OPTIONS_TITLE = "training options"


def add_training_options(parser: argparse.ArgumentParser, *, head: bool = False) -> None:
    """The options of every :class:`TrainConfig` field, in one group shared by ``train`` and ``loio``
    (``head``: also the linear-head options of ``loio --cache-features``)."""
    group = parser.add_argument_group(
        TRAINING_OPTIONS_TITLE,
        "the same for `painwatch train` and `painwatch loio` (each LOIO fold trains with them); noise sigma "
        "is in [0, 1] pixel units at --input-size",
    )
    add_options(group, TrainConfig, groups=("", "head") if head else ("",))


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``painwatch train``."""
    parser = subparsers.add_parser(
        "train",
        formatter_class=HELP_FORMATTER,
        help="train the clinical model on all individuals and save a model bundle",
        description=(
            "Fine-tune a timm backbone on DATA (folder DATA/<individual>/<label>/* or a manifest CSV) and "
            "write a model bundle (weights.safetensors + model.json). An inner validation split by "
            "individual drives early stopping and temperature scaling."
        ),
    )
    parser.add_argument("data", help="data folder or manifest CSV")
    parser.add_argument("--out", required=True, help="bundle folder to write")
    parser.add_argument(
        "--val-fraction", type=float, default=0.2,
        help="fraction of individuals held out for validation; 0 for none",
    )
    parser.add_argument(
        "--individuals", default=None, help="comma-separated individuals to use; all in DATA when omitted"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    add_training_options(parser)
    parser.set_defaults(func=_train)


def _train(args: argparse.Namespace) -> int:
    from painwatch.data import is_synthetic, load_records
    from painwatch.training.bundle import train_bundle

    config = config_from_args(TrainConfig, args)
    records = load_records(args.data)
    if args.individuals:
        wanted = [name.strip() for name in args.individuals.split(",") if name.strip()]
        present = sorted({r.individual for r in records})
        unknown = sorted(set(wanted) - set(present))
        if unknown:
            raise ValueError(f"--individuals {unknown} are not in {args.data} (present: {present})")
        records = [r for r in records if r.individual in set(wanted)]
    train_bundle(records, config, args.out, val_fraction=args.val_fraction, data_source=str(args.data),
                 synthetic=is_synthetic(args.data), progress=not args.quiet,
                 log=lambda message: print(message, file=sys.stderr))
    return 0
