"""The settings of the animal records: where the database and the accounts are, what is kept of the
frames, and when the page asks for sign-in (docs/design.md, "Records and sign-in").

Each setting is one :func:`painwatch.settings.setting` field of :class:`RecordsSettings`. The command line
builds ``--database`` and ``--accounts`` from them; the page reads every field from the environment
variable ``PAINWATCH_<FIELD>`` (``PAINWATCH_DATABASE``, ``PAINWATCH_FRAMES``, ...), which is also the
command line's default, so that ``painwatch records`` and ``painwatch users`` address what the page uses.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from painwatch.settings import setting
from painwatch.validation import check_integer

DEFAULT_DATABASE = "sqlite:///data/painwatch.db"
"""The records database when none is given: an SQLite file under ``data/`` (relative to the folder
painwatch is started in)."""
DEFAULT_ACCOUNTS = Path("data/painwatch-accounts.json")
"""The accounts file when none is given."""
ENVIRONMENT_PREFIX = "PAINWATCH_"

FRAMES_THUMBNAILS = "thumbnails"
FRAMES_NONE = "none"
FRAME_POLICIES: tuple[str, ...] = (FRAMES_THUMBNAILS, FRAMES_NONE)
"""What a saved check keeps of its frames: small JPEG thumbnails, or nothing but the answers."""

SIGN_IN_AUTO = "auto"
SIGN_IN_ALWAYS = "always"
SIGN_IN_POLICIES: tuple[str, ...] = (SIGN_IN_AUTO, SIGN_IN_ALWAYS)
"""When the page asks for sign-in: ``auto`` whenever it listens beyond this machine's loopback address,
``always`` also on 127.0.0.1 (a shared workstation, or a reverse proxy on this machine). There is no
policy that turns sign-in off for a page served to the network."""


@dataclass
class RecordsSettings:
    """Where the records live and what they keep.

    ``database`` is any SQLAlchemy URL (``sqlite:///PATH`` for a file, ``postgresql+psycopg://...``);
    ``frames`` says whether a saved check keeps ``thumbnail_side``-pixel JPEG thumbnails of its frames;
    ``accounts`` is the file of sign-in accounts (argon2 hashes); ``sign_in`` when the page asks for them.
    """

    database: str = setting(
        DEFAULT_DATABASE, metavar="URL", group="database",
        help="records database, any SQLAlchemy URL: sqlite:///PATH (a file, created when missing) or e.g. "
        "postgresql+psycopg://USER@HOST/DB; default from PAINWATCH_DATABASE",
    )
    frames: str = setting(
        FRAMES_THUMBNAILS, choices=FRAME_POLICIES, cli=False,
        help="what a saved check keeps of its frames: small thumbnails, or none (only the answers)",
    )
    thumbnail_side: int = setting(
        160, cli=False, help="longest side of a kept thumbnail, in pixels",
    )
    accounts: Path = setting(
        DEFAULT_ACCOUNTS, metavar="FILE", group="accounts",
        help="accounts file (user names and argon2 password hashes); default from PAINWATCH_ACCOUNTS",
    )
    sign_in: str = setting(
        SIGN_IN_AUTO, choices=SIGN_IN_POLICIES, cli=False,
        help="when the page asks for sign-in: auto (whenever it listens beyond 127.0.0.1) or always",
    )

    def __post_init__(self) -> None:
        self.database = str(self.database).strip()
        if not self.database:
            raise ValueError("the records database URL is empty (PAINWATCH_DATABASE / --database)")
        if self.frames not in FRAME_POLICIES:
            raise ValueError(f"frames must be one of {', '.join(FRAME_POLICIES)}, got {self.frames!r}")
        check_integer(self.thumbnail_side, "thumbnail_side", minimum=16, maximum=1024)
        self.accounts = Path(self.accounts).expanduser()
        if self.sign_in not in SIGN_IN_POLICIES:
            raise ValueError(f"sign_in must be one of {', '.join(SIGN_IN_POLICIES)}, got {self.sign_in!r}")

    @property
    def keep_thumbnails(self) -> bool:
        return self.frames == FRAMES_THUMBNAILS

    @classmethod
    def from_environment(cls, environ: Mapping[str, str]) -> RecordsSettings:
        """The settings with every field taken from ``PAINWATCH_<FIELD>`` when set (else its default).

        Raises ``ValueError`` naming the variable and its value when one cannot be used.
        """
        hints = typing.get_type_hints(cls)
        values: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            name = environment_variable(field.name)
            text = environ.get(name, "").strip()
            if not text:
                continue
            kind = hints[field.name]
            try:
                values[field.name] = int(text) if kind is int else Path(text) if kind is Path else text
            except ValueError as error:
                raise ValueError(f"{name}={text!r}: {error}") from error
        try:
            return cls(**values)
        except ValueError as error:
            raise ValueError(f"{error} (from the PAINWATCH_* environment variables)") from error


def environment_variable(field_name: str) -> str:
    """The environment variable of a :class:`RecordsSettings` field: ``PAINWATCH_<FIELD>``."""
    return ENVIRONMENT_PREFIX + field_name.upper()


@dataclass
class ExportSettings:
    """``painwatch records export``: which animals go into the export file, with or without thumbnails."""

    out: Path = setting(positional=True, metavar="OUT.json",
                        help="export file to write (JSON; replaced atomically when it exists)")
    animals: tuple[str, ...] = setting(
        (), separator=",", metavar="ID[,ID...]", help="export only these animals (default: every animal)"
    )
    thumbnails: bool = setting(True, negated_by="--no-thumbnails", help="leave the frames' thumbnails out")

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        self.animals = tuple(str(a) for a in self.animals)


@dataclass
class ImportSettings:
    """``painwatch records import``: the export file to add to the records."""

    file: Path = setting(positional=True, metavar="FILE.json",
                         help="a file written by painwatch records export")

    def __post_init__(self) -> None:
        self.file = Path(self.file)


@dataclass
class ReportSettings:
    """``painwatch records report``: print an animal's record, or one of its checks, to a PDF file."""

    animal: str = setting(positional=True, metavar="ANIMAL", help="the animal's ID")
    out: Path = setting(required=True, metavar="REPORT.pdf", help="PDF file to write")
    check: int | None = setting(None, metavar="NUMBER",
                                help="print only this check (its number, #N on the animal page)")
    time_zone: str | None = setting(None, metavar="ZONE",
                                    help="show times in this time zone, e.g. Asia/Tokyo (default: UTC)")

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        if self.out.suffix.lower() != ".pdf":
            raise ValueError(f"--out must name a .pdf file, got {str(self.out)!r}")
        if self.check is not None:
            check_integer(self.check, "--check", minimum=1)


@dataclass
class AccountSettings:
    """``painwatch users add|remove``: one account of the accounts file."""

    name: str = setting(positional=True, metavar="NAME", help="user name (letters, digits, . _ @ -)")
    password_stdin: bool = setting(
        False, group="add",
        help="read the password from the first line of standard input instead of asking for it (scripts)",
    )
    replace: bool = setting(False, group="add", help="set a new password for an existing account")


__all__ = [
    "DEFAULT_ACCOUNTS",
    "DEFAULT_DATABASE",
    "FRAMES_NONE",
    "FRAMES_THUMBNAILS",
    "FRAME_POLICIES",
    "SIGN_IN_ALWAYS",
    "SIGN_IN_AUTO",
    "SIGN_IN_POLICIES",
    "AccountSettings",
    "ExportSettings",
    "ImportSettings",
    "RecordsSettings",
    "ReportSettings",
    "environment_variable",
]
