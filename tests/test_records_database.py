"""The records database on real SQLite files: the migrations from an empty database, what is refused and
left untouched (not SQLite, damaged, foreign tables, a newer schema), a process killed in the middle of
a write, and several writers at once."""

from __future__ import annotations

import hashlib
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from records_fixtures import fake_batch, fake_model
from sqlalchemy import func, inspect, select, text

from painwatch.records.database import (
    VERSION_TABLE,
    NewerSchemaError,
    RecordsError,
    _alembic_config,
    head_revision,
    known_revisions,
    open_database,
)
from painwatch.records.service import animal_checks, check_frames, save_check
from painwatch.records.tables import Animal, Base, Check, CheckFrame

WRITER = Path(__file__).resolve().parent / "records_fixtures.py"
REPO_ROOT = Path(__file__).resolve().parent.parent


def _url(path: Path) -> str:
    return f"sqlite:///{path}"


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_migrations_build_the_schema_of_the_tables_from_an_empty_database(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "records.db"
    database = open_database(_url(path))
    try:
        assert path.is_file() and database.revision == head_revision()
        assert head_revision() in known_revisions()
        with database.engine.connect() as connection:
            tables = set(inspect(connection).get_table_names())
            assert {"animals", "checks", "check_frames", "sign_in_attempts", VERSION_TABLE} <= tables
            # The migrations and the mapped tables describe the same schema: a table change needs a migration.
            context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE,
                                                                   "compare_type": True})
            assert compare_metadata(context, Base.metadata) == []
            assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert connection.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
    finally:
        database.close()
    again = open_database(_url(path))  # already at the newest revision: nothing to do
    assert again.revision == head_revision()
    again.close()


def test_a_database_of_an_older_revision_is_migrated_and_keeps_its_checks(tmp_path: Path) -> None:
    path = tmp_path / "records.db"
    database = open_database(_url(path))
    frames, results = fake_batch(3, abstain=(1,))
    save_check(database, frames, results, model=fake_model(), animal="M01", create_animal=True)
    with database.engine.execution_options(painwatch_write=True).begin() as connection:
        command.downgrade(_alembic_config(connection), "0001")  # as a painwatch of revision 0001 left it
    database.close()
    with sqlite3.connect(path) as connection:
        columns = {row[1] for row in connection.execute("PRAGMA table_info(check_frames)")}
        assert "in_distribution_score" not in columns and "abstain_reason" in columns
        assert connection.execute(f"SELECT version_num FROM {VERSION_TABLE}").fetchall() == [("0001",)]
    again = open_database(_url(path))
    try:
        assert again.revision == head_revision() == "0002"
        stored = check_frames(again, animal_checks(again, "M01")[0].check_id)
        assert [r.result.name for r in stored] == [r.name for r in results]
        assert [r.result.abstain_reason for r in stored] == [r.abstain_reason for r in results]
        with again.engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE,
                                                                   "compare_type": True})
            assert compare_metadata(context, Base.metadata) == []
            assert connection.exec_driver_sql(
                "SELECT count(*) FROM check_frames WHERE in_distribution_score IS NULL").scalar() == 3
    finally:
        again.close()


def test_a_file_that_is_not_sqlite_is_refused_and_left_as_it_was(tmp_path: Path) -> None:
    path = tmp_path / "painwatch.db"
    path.write_bytes(b"animal,notes\nM01,day 1\n")
    before = _digest(path)
    with pytest.raises(RecordsError, match=r"is not an SQLite database.*left untouched"):
        open_database(_url(path))
    assert _digest(path) == before
    with pytest.raises(RecordsError, match="is a folder"):
        open_database(_url(tmp_path))
    with pytest.raises(RecordsError, match="not a database URL"):
        open_database("no such scheme at all")


def test_a_database_of_a_newer_painwatch_is_refused_and_never_written(tmp_path: Path) -> None:
    path = tmp_path / "records.db"
    database = open_database(_url(path))
    frames, results = fake_batch(2)
    save_check(database, frames, results, model=fake_model(), animal="M01", create_animal=True)
    with database.engine.begin() as connection:
        connection.execute(text(f"UPDATE {VERSION_TABLE} SET version_num = '9999'"))
    database.close()
    before = _digest(path)
    with pytest.raises(NewerSchemaError, match=r"revision '9999'.*newer painwatch.*left untouched"):
        open_database(_url(path))
    assert _digest(path) == before
    with sqlite3.connect(path) as connection:  # the checks are all still there
        assert connection.execute("SELECT count(*) FROM check_frames").fetchone() == (2,)


def test_a_database_of_another_program_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE patients (id INTEGER PRIMARY KEY, name TEXT)")
        connection.execute("INSERT INTO patients (name) VALUES ('Hana')")
    before = _digest(path)
    with pytest.raises(RecordsError, match=r"tables painwatch did not make \(patients\)"):
        open_database(_url(path))
    assert _digest(path) == before
    with sqlite3.connect(path) as connection:  # still in its own journal mode: nothing was set
        assert connection.execute("PRAGMA journal_mode").fetchone() == ("delete",)


def test_a_damaged_database_is_refused_and_left_as_it_was(tmp_path: Path) -> None:
    path = tmp_path / "records.db"
    database = open_database(_url(path))
    for seed in range(6):
        frames, results = fake_batch(8, seed=seed)
        save_check(database, frames, results, model=fake_model(), animal="M01", create_animal=True)
    with database.engine.connect() as connection:  # everything into the main file
        connection.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    database.close()
    data = bytearray(path.read_bytes())
    page = 4096
    assert len(data) > 6 * page
    data[3 * page + 8: 5 * page] = bytes(range(256)) * ((2 * page - 8) // 256) + bytes((2 * page - 8) % 256)
    path.write_bytes(bytes(data))
    before = _digest(path)
    with pytest.raises(RecordsError, match=r"damaged|cannot be read|malformed"):
        open_database(_url(path))
    assert _digest(path) == before


def test_record_times_must_say_their_clock(tmp_path: Path) -> None:
    database = open_database(_url(tmp_path / "records.db"))
    with pytest.raises(Exception, match="timezone-aware"), database.write() as session:
        session.add(Animal(code="M01", code_key="m01", created_at=datetime(2026, 1, 1)))
    with database.read() as session:
        assert session.scalar(select(func.count(Animal.id))) == 0


def _consistent(path: Path) -> tuple[int, int]:
    """(checks, frames) after checking that every check holds exactly the frames it counts."""
    database = open_database(_url(path))
    try:
        with database.read() as session:
            assert session.execute(text("PRAGMA integrity_check")).scalar() == "ok"
            counted = session.execute(
                select(Check.id, Check.frame_count, func.count(CheckFrame.id))
                .outerjoin(CheckFrame, CheckFrame.check_id == Check.id).group_by(Check.id)
            ).all()
            assert all(expected == found for _, expected, found in counted), counted
            orphans = session.scalar(select(func.count(CheckFrame.id)).where(
                CheckFrame.check_id.not_in(select(Check.id))))
            assert orphans == 0
            return len(counted), sum(found for *_, found in counted)
    finally:
        database.close()


def _writer(url: str, mode: str, count: int) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(WRITER), url, mode, str(count)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=REPO_ROOT)


def _wait_for_line(process: subprocess.Popen[str], prefix: str, timeout_s: float = 120) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if line.startswith(prefix):
            return line
        if not line and process.poll() is not None:
            raise AssertionError(f"the writer exited with {process.returncode}: "
                                 f"{process.stderr.read()[-3000:]}")
    raise AssertionError(f"the writer did not print {prefix!r} within {timeout_s} s")


def test_a_process_killed_in_the_middle_of_a_check_leaves_nothing_of_it(tmp_path: Path) -> None:
    path = tmp_path / "records.db"
    open_database(_url(path)).close()
    writer = _writer(_url(path), "hold", 12)
    try:
        _wait_for_line(writer, "FLUSHED")  # the animal, the check and its 12 frames are written, uncommitted
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=30)
    finally:
        if writer.poll() is None:
            writer.kill()
    assert writer.returncode == -signal.SIGKILL
    assert _consistent(path) == (0, 0)
    database = open_database(_url(path))
    with database.read() as session:
        assert session.scalar(select(func.count(Animal.id))) == 0  # not even the new animal
    frames, results = fake_batch(3)
    save_check(database, frames, results, model=fake_model(), animal="HELD", create_animal=True)  # usable
    database.close()
    assert _consistent(path) == (1, 3)


@pytest.mark.slow
def test_a_writer_killed_at_any_moment_leaves_whole_checks_only(tmp_path: Path) -> None:
    path = tmp_path / "records.db"
    open_database(_url(path)).close()
    saved_before = 0
    for delay in (0.05, 0.3, 0.9):
        writer = _writer(_url(path), "loop", 10_000)
        try:
            _wait_for_line(writer, "SAVED")
            time.sleep(delay)
            writer.send_signal(signal.SIGKILL)
            writer.wait(timeout=30)
        finally:
            if writer.poll() is None:
                writer.kill()
        checks, frames = _consistent(path)
        assert checks > saved_before and frames >= 3 * checks
        saved_before = checks


def test_page_sessions_write_to_one_file_at_once(tmp_path: Path) -> None:
    # Page sessions are threads sharing one Database; a second Database on the file stands for a second
    # server process. Every writer waits for the lock instead of failing, and every check is whole.
    path = tmp_path / "records.db"
    first, second = open_database(_url(path)), open_database(_url(path))
    errors: list[BaseException] = []

    def save(database, seed: int) -> None:
        try:
            for index in range(4):
                frames, results = fake_batch(3 + index, seed=seed * 10 + index)
                save_check(database, frames, results, model=fake_model(), animal="M01", create_animal=True,
                           notes=f"session {seed}")
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=save, args=(first if i % 2 else second, i)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    first.close()
    second.close()
    assert errors == []
    assert _consistent(path) == (16, 4 * (3 + 4 + 5 + 6))
    database = open_database(_url(path))
    with database.read() as session:
        assert session.scalar(select(func.count(Animal.id))) == 1  # created once, by whoever came first
    database.close()


@pytest.mark.slow
def test_two_processes_write_to_one_file_at_once(tmp_path: Path) -> None:
    path = tmp_path / "records.db"
    open_database(_url(path)).close()
    writers = [_writer(_url(path), "loop", 6) for _ in range(2)]
    for writer in writers:
        out, err = writer.communicate(timeout=240)
        assert writer.returncode == 0, err[-3000:]
        assert out.split() == [word for i in range(6) for word in ("SAVED", str(i))]
    assert _consistent(path)[0] == 12
