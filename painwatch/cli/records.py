"""``painwatch records export|import|list|report``: move, back up, list and print the animal records.

The records database is the page's (PAINWATCH_DATABASE, else data/painwatch.db) unless --database names
another; any SQLAlchemy URL works. An export file holds every check with every frame's answer (and the
thumbnails unless --no-thumbnails); importing it adds what is missing, in one transaction, and skips the
checks already there, so importing a file twice changes nothing. Exit 0 done, 2 when the database, the
file or an animal cannot be used (nothing is written then).
"""

from __future__ import annotations

import argparse
import os

from painwatch.cli import EXIT_OK
from painwatch.cli.options import HELP_FORMATTER, add_options, config_from_args
from painwatch.records.settings import ExportSettings, ImportSettings, RecordsSettings, ReportSettings

DESCRIPTION = __doc__.split("\n\n")[1].replace("\n", " ")


def _add_database(parser: argparse.ArgumentParser) -> None:
    add_options(parser, RecordsSettings, groups=("database",),
                defaults=RecordsSettings.from_environment(os.environ))


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``painwatch records`` and its sub-commands."""
    parser = subparsers.add_parser("records", formatter_class=HELP_FORMATTER, description=DESCRIPTION,
                                   help="export, import, list and print the animal records")
    commands = parser.add_subparsers(dest="records_command", metavar="ACTION", required=True)

    export = commands.add_parser("export", formatter_class=HELP_FORMATTER, description=DESCRIPTION,
                                 help="write animals and their checks to a JSON file")
    add_options(export, ExportSettings)
    _add_database(export)
    export.set_defaults(func=_export)

    load = commands.add_parser("import", formatter_class=HELP_FORMATTER, description=DESCRIPTION,
                               help="add the animals and checks of an export file to the records")
    add_options(load, ImportSettings)
    _add_database(load)
    load.set_defaults(func=_import)

    listing = commands.add_parser("list", formatter_class=HELP_FORMATTER, description=DESCRIPTION,
                                  help="every animal, its number of checks and its last check")
    _add_database(listing)
    listing.set_defaults(func=_list)

    printing = commands.add_parser("report", formatter_class=HELP_FORMATTER, description=DESCRIPTION,
                                   help="print an animal's record, or one of its checks, to a PDF file")
    add_options(printing, ReportSettings)
    _add_database(printing)
    printing.set_defaults(func=_report)


def _database(args: argparse.Namespace):
    from painwatch.records.database import open_database

    return open_database(config_from_args(RecordsSettings, args).database)


def _export(args: argparse.Namespace) -> int:
    from painwatch.io import atomic_write_bytes, to_json_text
    from painwatch.records.transfer import export_records

    settings = config_from_args(ExportSettings, args)
    database = _database(args)
    document = export_records(database, animals=settings.animals, thumbnails=settings.thumbnails)
    atomic_write_bytes(settings.out, to_json_text(document).encode("utf-8"))
    checks = sum(len(animal["checks"]) for animal in document["animals"])
    print(f"exported {len(document['animals'])} animal(s) with {checks} check(s) from {database.url} to "
          f"{settings.out}")
    return EXIT_OK


def _import(args: argparse.Namespace) -> int:
    from painwatch.records.transfer import import_file

    settings = config_from_args(ImportSettings, args)
    database = _database(args)
    outcome = import_file(database, settings.file)
    print(f"imported {settings.file} into {database.url}: {outcome.checks_added} check(s) added, "
          f"{outcome.checks_skipped} already there, {outcome.animals_created} new animal(s)")
    return EXIT_OK


def _list(args: argparse.Namespace) -> int:
    from painwatch.records.history import format_time
    from painwatch.records.service import list_animals

    database = _database(args)
    animals = list_animals(database)
    print(f"{len(animals)} animal(s) in {database.url}")
    for animal in animals:
        last = "no checks" if animal.last_check is None else f"last {format_time(animal.last_check)} UTC"
        print(f"  {animal.code}: {animal.checks} check(s), {last}")
    return EXIT_OK


def _report(args: argparse.Namespace) -> int:
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    from painwatch.io import atomic_write_bytes
    from painwatch.records.database import RecordsError
    from painwatch.records.report import animal_report_pdf, check_report_pdf
    from painwatch.records.service import animal_checks, check_frames

    settings = config_from_args(ReportSettings, args)
    try:
        zone = ZoneInfo(settings.time_zone) if settings.time_zone else None
    except (ZoneInfoNotFoundError, ValueError) as error:
        raise ValueError(f"--time-zone {settings.time_zone!r} is not a time zone (e.g. Asia/Tokyo)") \
            from error
    database = _database(args)
    checks = animal_checks(database, settings.animal)
    if settings.check is not None:
        chosen = [c for c in checks if c.check_id == settings.check]
        if not chosen:
            numbers = ", ".join(f"#{c.check_id}" for c in checks) or "none"
            raise RecordsError(f"the animal {checks[0].animal if checks else settings.animal!r} has no check "
                               f"#{settings.check} (its checks: {numbers})")
        pdf = check_report_pdf(chosen[0], check_frames(database, settings.check), zone=zone)
    else:
        pdf = animal_report_pdf(settings.animal, checks, {c.check_id: check_frames(database, c.check_id)
                                                          for c in checks}, zone=zone)
    atomic_write_bytes(settings.out, pdf)
    print(f"report: {settings.out}")
    return EXIT_OK
