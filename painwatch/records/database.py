"""Opening the records database: checked before anything is written, migrated with Alembic, safe to
share between page sessions and processes (docs/design.md, "Records and sign-in").

:func:`open_database` takes any SQLAlchemy URL. Before it writes anything it looks at what is there:

- an SQLite file that is not an SQLite database, is damaged (``PRAGMA quick_check``), or cannot be read;
- a database whose schema revision this painwatch does not know (written by a newer painwatch);
- a database holding tables that painwatch did not make;

each raise :class:`RecordsError` (:class:`NewerSchemaError` for the second) with a message naming the
database, and the database is left exactly as it was. Otherwise the Alembic migrations of
``painwatch/records/migrations`` bring it to the newest revision, in one transaction.

SQLite files run in WAL mode (readers never block the writer), with ``synchronous=FULL`` (a committed
check survives a power cut), foreign keys on, and a busy timeout, so that several page sessions and
processes can use one file at once. Every write is one transaction opened with ``BEGIN IMMEDIATE``
(:meth:`Database.write`): it takes the write lock at its start, so two writers queue instead of failing
half-way, and a process killed mid-write leaves either the whole transaction or nothing.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, event, inspect
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import StaticPool

from painwatch.records.tables import Base

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
VERSION_TABLE = "painwatch_schema_version"
"""Alembic's version table, named for painwatch so that it cannot be taken for another program's."""
SQLITE_HEADER = b"SQLite format 3\x00"
BUSY_TIMEOUT_S = 30.0
"""How long a writer waits for another one to finish before giving up, in seconds."""
WRITE_OPTION = "painwatch_write"


class RecordsError(ValueError):
    """The records (database, accounts, an import file or an animal ID) cannot be used as they are; the
    message says which and why."""


class NewerSchemaError(RecordsError):
    """The database was written by a newer painwatch: this one does not know its schema revision."""


@dataclass
class Database:
    """An open records database: :meth:`read` and :meth:`write` give sessions in one transaction."""

    url: str
    """The URL without its password, for messages."""
    engine: Engine
    revision: str

    def __post_init__(self) -> None:
        self._reader = sessionmaker(self.engine, expire_on_commit=False)
        self._writer = sessionmaker(self.engine.execution_options(**{WRITE_OPTION: True}),
                                    expire_on_commit=False)

    @contextlib.contextmanager
    def write(self) -> Iterator[Session]:
        """A session whose work is committed as one transaction when the block ends, or rolled back
        whole when it raises (or the process dies)."""
        with self._writer() as session, session.begin():
            yield session

    @contextlib.contextmanager
    def read(self) -> Iterator[Session]:
        """A session for reading (one consistent snapshot); nothing it changes is committed, and the
        objects it loaded stay readable after the block."""
        with self._reader() as session:
            yield session

    def close(self) -> None:
        self.engine.dispose()


def head_revision() -> str:
    """The newest schema revision this painwatch knows."""
    head = _scripts().get_current_head()
    if head is None:  # pragma: no cover - the package ships its migrations
        raise RecordsError(f"no migrations found in {MIGRATIONS}")
    return head


def known_revisions() -> set[str]:
    """Every schema revision this painwatch knows (its migrations)."""
    return {script.revision for script in _scripts().walk_revisions()}


def open_database(url: str, *, migrate: bool = True) -> Database:
    """Open (creating when missing) the records database at the SQLAlchemy ``url`` and bring its schema
    to :func:`head_revision` (``migrate=False``: refuse a database that is not already there).

    Raises:
        RecordsError: the URL is malformed, the database cannot be read, is not an SQLite database, is
            damaged, holds tables painwatch did not make, or (``migrate=False``) is behind; nothing is
            written to it.
        NewerSchemaError: it was written by a newer painwatch; nothing is written to it.
    """
    parsed = _parse(url)
    shown = parsed.render_as_string(hide_password=True)
    sqlite_file = _sqlite_file(parsed)
    if sqlite_file is not None:
        _check_sqlite_file(sqlite_file, shown)
        probe = _sqlite_read_only(sqlite_file) if sqlite_file.exists() else None
    else:
        probe = _engine(parsed)
    if probe is not None:
        try:
            with probe.connect() as connection:
                _check_contents(connection, shown, integrity=sqlite_file is not None)
        except DBAPIError as error:
            raise RecordsError(f"the records database {shown} cannot be read: {error.orig}") from error
        finally:
            if sqlite_file is not None:
                probe.dispose()
    engine = probe if sqlite_file is None else _engine(parsed)
    try:
        revision = _migrate(engine, shown, migrate=migrate)
    except BaseException:
        engine.dispose()
        raise
    return Database(shown, engine, revision)


# --------------------------------------------------------------------------- checks before writing


def _parse(url: str) -> URL:
    try:
        return make_url(str(url).strip())
    except ArgumentError as error:
        raise RecordsError(f"{url!r} is not a database URL (e.g. sqlite:///data/painwatch.db): {error}") \
            from error


def _sqlite_file(url: URL) -> Path | None:
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return None
    return Path(url.database).expanduser()


def _check_sqlite_file(path: Path, shown: str) -> None:
    if path.is_dir():
        raise RecordsError(f"the records database {shown} is a folder, not a file")
    if not path.exists():
        return
    try:
        with open(path, "rb") as handle:
            header = handle.read(len(SQLITE_HEADER))
    except OSError as error:
        raise RecordsError(f"the records database {shown} cannot be read: {error}") from error
    if header and header != SQLITE_HEADER:
        raise RecordsError(
            f"{path} is not an SQLite database (it starts with {header[:8]!r}), so it cannot hold "
            "painwatch's records; it was left untouched. Give another file with PAINWATCH_DATABASE / "
            "--database, or move this one away."
        )


def _sqlite_read_only(path: Path) -> Engine:
    uri = f"file:{quote(str(path.resolve()))}?mode=ro"
    return create_engine("sqlite://", creator=lambda: sqlite3.connect(uri, uri=True), poolclass=StaticPool)


def _check_contents(connection: Connection, shown: str, *, integrity: bool) -> None:
    if integrity:
        verdict = connection.exec_driver_sql("PRAGMA quick_check").scalar()
        if verdict != "ok":
            raise RecordsError(f"the records database {shown} is damaged ({verdict}); it was left untouched. "
                               "Restore it from a backup (painwatch records import) or give another file.")
    tables = set(inspect(connection).get_table_names())
    if VERSION_TABLE not in tables:
        if tables:
            raise RecordsError(
                f"the database {shown} holds tables painwatch did not make ({', '.join(sorted(tables))}); "
                "it was left untouched. Give painwatch a database of its own."
            )
        return
    revision = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE}) \
        .get_current_revision()
    _check_revision(revision, shown)


def _check_revision(revision: str | None, shown: str) -> None:
    if revision is not None and revision not in known_revisions():
        raise NewerSchemaError(
            f"the records database {shown} has schema revision {revision!r}, which this painwatch does not "
            f"know (it knows revisions up to {head_revision()!r}): it was written by a newer painwatch. "
            "It was left untouched; open it with that painwatch or a newer one."
        )


# --------------------------------------------------------------------------- engine and migrations


def _engine(url: URL) -> Engine:
    try:
        if url.get_backend_name() != "sqlite":
            return create_engine(url, pool_pre_ping=True)
    except (ArgumentError, NoSuchModuleError, ImportError) as error:
        raise RecordsError(f"cannot open the records database {url.render_as_string(hide_password=True)}: "
                           f"{error}") from error
    path = _sqlite_file(url)
    if path is None:
        engine = create_engine(url, poolclass=StaticPool, connect_args={"check_same_thread": False})
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": BUSY_TIMEOUT_S, "check_same_thread": False})
    event.listen(engine, "connect", _sqlite_on_connect)
    event.listen(engine, "begin", _sqlite_begin)
    return engine


def _sqlite_on_connect(dbapi_connection: Any, record: Any) -> None:
    # The driver's own transaction handling would BEGIN late and COMMIT around DDL; painwatch begins
    # every transaction itself (_sqlite_begin), so that a write is atomic and takes its lock up front.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_S * 1000)}")
    finally:
        cursor.close()


def _sqlite_begin(connection: Connection) -> None:
    immediate = connection.get_execution_options().get(WRITE_OPTION, False)
    connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def _scripts() -> ScriptDirectory:
    return ScriptDirectory.from_config(_alembic_config())


def _alembic_config(connection: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    config.attributes["version_table"] = VERSION_TABLE
    config.attributes["target_metadata"] = Base.metadata
    return config


def _migrate(engine: Engine, shown: str, *, migrate: bool) -> str:
    head = head_revision()
    try:
        with engine.execution_options(**{WRITE_OPTION: True}).begin() as connection:
            # Checked again under the write lock: another process may have changed it meanwhile.
            tables = set(inspect(connection).get_table_names())
            current = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE}) \
                .get_current_revision() if VERSION_TABLE in tables else None
            if current is None and tables - {VERSION_TABLE}:
                raise RecordsError(f"the database {shown} holds tables painwatch did not make "
                                   f"({', '.join(sorted(tables))}); it was left untouched")
            _check_revision(current, shown)
            if current == head:
                return head
            if not migrate:
                raise RecordsError(f"the records database {shown} is at schema revision {current!r}, not "
                                   f"{head!r}; open it with migrate=True to bring it up to date")
            command.upgrade(_alembic_config(connection), "head")
    except DBAPIError as error:
        raise RecordsError(f"the records database {shown} cannot be opened or written: {error.orig}") \
            from error
    return head


__all__ = ["BUSY_TIMEOUT_S", "VERSION_TABLE", "Database", "NewerSchemaError", "RecordsError", "head_revision",
           "known_revisions", "open_database"]
