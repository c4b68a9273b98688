"""The ``painwatch`` command line.

Each command lives in its own module, which exposes ``register(subparsers)``: it adds its
sub-parser and sets ``func`` (a callable taking the parsed namespace and returning an exit
code). Modules keep their heavy imports (torch, timm, ...) inside ``func`` so that
``painwatch --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from painwatch import __version__

# Modules that contribute sub-commands, in the order they appear in --help.
COMMAND_MODULES: tuple[str, ...] = (
    "painwatch.data.commands",
    "painwatch.train",
    "painwatch.loio",
    "painwatch.certify",
    "painwatch.demo",
)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


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
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        return int(args.func(args) or EXIT_OK)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
