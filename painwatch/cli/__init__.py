"""The ``painwatch`` command line: the only place with argparse.

Each sub-command lives in a module of this package that exposes ``register(subparsers)``: it adds its
parser, built from the settings' fields (:mod:`painwatch.cli.options`), and sets ``func`` (a callable
taking the parsed namespace and returning an exit code). Modules import the library inside ``func``,
so that ``painwatch --help`` does not pay for importing torch. Errors reach :func:`main`, which maps
each kind of exception to one exit code (:data:`EXIT_CODES`) and prints its message.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from painwatch import __version__

COMMAND_MODULES: tuple[str, ...] = (
    "painwatch.cli.data",
    "painwatch.cli.train",
    "painwatch.cli.loio",
    "painwatch.cli.certify",
    "painwatch.cli.predict",
    "painwatch.cli.demo",
    "painwatch.cli.records",
    "painwatch.cli.users",
)
"""Modules that contribute sub-commands, in the order they appear in ``--help``."""

EXIT_OK = 0
EXIT_FAILED = 1
"""A check did not pass (a gate threshold, the data validation) or a run failed (training diverged)."""
EXIT_USAGE = 2
"""What the user gave cannot be used: a missing or malformed file, bundle, data or setting."""
EXIT_INTERRUPTED = 130

#: The exit code of each kind of error, the first match wins (checked by class name so that the map
#: does not import the library; every one of them is, or derives from, the named class).
EXIT_CODES: tuple[tuple[str, int], ...] = (
    ("KeyboardInterrupt", EXIT_INTERRUPTED),
    ("FloatingPointError", EXIT_FAILED),
    ("DataValidationError", EXIT_USAGE),
    ("ValueError", EXIT_USAGE),
    ("OSError", EXIT_USAGE),
    ("LoioError", EXIT_USAGE),
    ("ModelWeightsError", EXIT_USAGE),
    ("ClusterError", EXIT_USAGE),
    ("WorkerLostError", EXIT_FAILED),
)


def exit_code_for(error: BaseException) -> int | None:
    """The exit code of ``error`` from :data:`EXIT_CODES`, or None when it is a bug (re-raised)."""
    names = {cls.__name__ for cls in type(error).__mro__}
    return next((code for name, code in EXIT_CODES if name in names), None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="painwatch",
        description="Pain detection in Japanese macaques from facial frames, with certified robustness.",
    )
    parser.add_argument("--version", action="version", version=f"painwatch {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``painwatch`` with ``argv`` (``sys.argv[1:]`` when None); returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        return int(args.func(args) or EXIT_OK)
    except BaseException as error:
        code = exit_code_for(error)
        if code is None:
            raise
        if code == EXIT_INTERRUPTED:
            print("interrupted", file=sys.stderr)
        elif type(error).__name__ == "DataValidationError":
            print(f"painwatch {args.command}: the data have problems:\n{error}", file=sys.stderr)
        else:
            print(f"painwatch {args.command}: error: {error}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
