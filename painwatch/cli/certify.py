"""``painwatch certify BUNDLE DATA --out REPORT [--gate gate.toml]``: the pre-deployment gate.

Measures a model bundle on individuals it was not trained on, writes a report (HTML, Markdown, JSON and
PNG plots), records the gate file's verdict in the bundle and exits 0 when every threshold holds, 1 when
one fails (each failing check is named), 2 for a usage error.
"""

from __future__ import annotations

import argparse

from painwatch.cli import EXIT_FAILED, EXIT_OK
from painwatch.cli.options import HELP_FORMATTER, add_options, config_from_args
from painwatch.evaluation.settings import CertifySettings
from painwatch.inference.bulk_settings import DistributedSettings, EngineSettings


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``painwatch certify``."""
    parser = subparsers.add_parser(
        "certify",
        formatter_class=HELP_FORMATTER,
        help="measure a model bundle on held-out individuals, write a report, pass/fail a gate",
        description=__doc__.split("\n\n")[1].replace("\n", " "),
    )
    add_options(parser, CertifySettings)
    add_options(parser.add_argument_group("Engine (what computes the answers and noise draws)"),
                EngineSettings)
    add_options(parser.add_argument_group("Ray (frames shared by actors; same per-frame results for the same "
                                          "seeds)"), DistributedSettings, groups=("", "frames"))
    parser.set_defaults(func=_certify)


def _certify(args: argparse.Namespace) -> int:
    from painwatch.evaluation.certify import run_certification

    settings = config_from_args(CertifySettings, args)
    run = run_certification(settings, cluster=config_from_args(DistributedSettings, args),
                            engine=config_from_args(EngineSettings, args))
    for result in run.gate_results:
        value = "not measurable" if result["value"] is None else f"{result['value']:.4g}"
        print(f"{'PASS' if result['passed'] else 'FAIL'}  {result['detail']}: {value}")
    print(f"report: {run.files['html']}")
    print(f"gate {run.verdict.gate_file} {'PASSED' if run.passed else 'FAILED'}; verdict written into "
          f"{settings.bundle / 'model.json'}")
    return EXIT_OK if run.passed else EXIT_FAILED
