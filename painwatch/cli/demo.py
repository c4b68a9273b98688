"""``painwatch demo-bundle --data DATA --out BUNDLE``: a small model bundle for trying the page.

Trains a small backbone on most individuals of DATA, certifies it on the others with the default gate and
writes the verdict into the bundle (BUNDLE-report/ holds the report). Exit 0 when the bundle was built
and certified, whatever the verdict (the page shows it); 2 for a usage error; 1 when training failed.
"""

from __future__ import annotations

import argparse
import sys

from painwatch.cli.options import HELP_FORMATTER, add_options, config_from_args
from painwatch.evaluation.settings import DemoSettings


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``painwatch demo-bundle``."""
    parser = subparsers.add_parser(
        "demo-bundle",
        formatter_class=HELP_FORMATTER,
        help="train a small demo model on part of DATA, certify it on the rest, write the bundle",
        description=__doc__.split("\n\n")[1].replace("\n", " "),
    )
    add_options(parser, DemoSettings)
    parser.set_defaults(func=_demo_bundle)


def _demo_bundle(args: argparse.Namespace) -> int:
    from painwatch.evaluation.demo import build_demo_bundle

    settings = config_from_args(DemoSettings, args)
    def say(message: str) -> None:
        if settings.progress:
            print(message, file=sys.stderr)

    made = build_demo_bundle(settings, log=say)
    run = made.certification
    for result in run.gate_results:
        value = "not measurable" if result["value"] is None else f"{result['value']:.3g}"
        say(f"  {'PASS' if result['passed'] else 'FAIL'}  {result['detail']}: {value}")
    print(f"demo bundle {settings.out}: gate {'PASSED' if run.passed else 'FAILED'} on held-out individuals "
          f"{', '.join(made.held_out)}; report {run.files['html']}")
    return 0
