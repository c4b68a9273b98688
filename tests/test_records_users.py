"""Accounts and sign-in: argon2 hashes in a file only its owner reads, failed attempts recorded and
waiting twice as long each time, the same answer for unknown names, and ``painwatch users``."""

from __future__ import annotations

import io
import json
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from painwatch.cli import main
from painwatch.records.database import open_database
from painwatch.records.tables import SignInAttempt
from painwatch.records.users import (
    MAX_DELAY_S,
    AccountsError,
    add_account,
    failure_delay,
    read_accounts,
    remove_account,
    sign_in,
)

PASSWORD = "correct horse battery"


@pytest.fixture
def accounts(tmp_path: Path) -> Path:
    path = tmp_path / "accounts.json"
    add_account(path, "vet1", PASSWORD)
    return path


@pytest.fixture
def database(tmp_path: Path):
    database = open_database(f"sqlite:///{tmp_path / 'records.db'}")
    yield database
    database.close()


def test_the_accounts_file_holds_argon2_hashes_never_passwords(accounts: Path) -> None:
    text = accounts.read_text()
    assert PASSWORD not in text and "$argon2id$" in text
    assert stat.S_IMODE(accounts.stat().st_mode) == 0o600
    assert list(read_accounts(accounts)) == ["vet1"]
    with pytest.raises(AccountsError, match=r"already an account 'vet1'.*--replace"):
        add_account(accounts, "VET1", "another long password")
    add_account(accounts, "vet1", "another long password", replace=True)
    with pytest.raises(AccountsError, match="has 5 characters; use at least 10"):
        add_account(accounts, "vet2", "short")
    with pytest.raises(AccountsError, match="cannot be a user name"):
        add_account(accounts, "dr smith", PASSWORD)
    remove_account(accounts, "Vet1")
    assert read_accounts(accounts) == {}
    with pytest.raises(AccountsError, match="no account 'vet1'"):
        remove_account(accounts, "vet1")
    accounts.write_text(json.dumps({"format": "painwatch-accounts", "format_version": 1,
                                    "accounts": [{"name": "eve", "password_hash": "plain text!"}]}))
    with pytest.raises(AccountsError, match=r"accounts\[0\] must have a name and an argon2"):
        read_accounts(accounts)


def test_failures_wait_twice_as_long_each_time_and_are_recorded(accounts: Path, database) -> None:
    assert [failure_delay(k) for k in range(5)] == [0, 1, 2, 4, 8] and failure_delay(40) == MAX_DELAY_S
    now = datetime(2026, 12, 2, 9, 0, tzinfo=UTC)
    first = sign_in(database, accounts, name="vet1", password="wrong", session="s1", now=now)
    assert not first.succeeded and first.wait_s == 1 and "wrong" in first.message
    # Within the wait the right password is not even looked at.
    early = sign_in(database, accounts, name="vet1", password=PASSWORD, session="s2",
                    now=now + timedelta(seconds=0.5))
    assert not early.succeeded and "Too many failed sign-ins" in early.message
    second = sign_in(database, accounts, name="vet1", password="wrong again", session="s1",
                     now=now + timedelta(seconds=1.5))
    assert second.wait_s == 2
    third = sign_in(database, accounts, name="vet1", password="still wrong", session="s3",
                    now=now + timedelta(seconds=4))
    assert third.wait_s == 4
    assert not sign_in(database, accounts, name="vet1", password=PASSWORD, session="s4",
                       now=now + timedelta(seconds=6)).succeeded  # 2 s after the third failure: too early
    good = sign_in(database, accounts, name="VET1", password=PASSWORD, session="s4",
                   now=now + timedelta(seconds=9))
    assert good.succeeded and good.user == "vet1"
    # A success starts the count again.
    after = sign_in(database, accounts, name="vet1", password="wrong", session="s5",
                    now=now + timedelta(seconds=10))
    assert after.wait_s == 1
    with database.read() as session:
        attempts = session.scalars(select(SignInAttempt).order_by(SignInAttempt.id)).all()
    assert [(a.user_name, a.session, a.succeeded) for a in attempts] == [
        ("vet1", "s1", False), ("vet1", "s1", False), ("vet1", "s3", False), ("vet1", "s4", True),
        ("vet1", "s5", False)]


def test_unknown_names_get_the_answer_of_a_wrong_password_and_sessions_wait_too(accounts: Path,
                                                                                database) -> None:
    now = datetime(2026, 12, 2, 9, 0, tzinfo=UTC)
    unknown = sign_in(database, accounts, name="mallory", password=PASSWORD, session="s1", now=now)
    wrong = sign_in(database, accounts, name="vet1", password="nope", session="s2", now=now)
    assert unknown.message == wrong.message and unknown.wait_s == wrong.wait_s == 1
    # One browser session trying many names waits as one user would.
    for index, name in enumerate(("a1", "a2", "a3")):
        outcome = sign_in(database, accounts, name=name, password="x", session="sprayer",
                          now=now + timedelta(seconds=10 * (index + 1)))
        assert outcome.wait_s == 2 ** index
    blocked = sign_in(database, accounts, name="a9", password="x", session="sprayer",
                      now=now + timedelta(seconds=31))
    assert "Too many failed sign-ins" in blocked.message
    empty = sign_in(database, accounts, name="", password="", session="s9", now=now)
    assert not empty.succeeded


def test_painwatch_users_add_list_remove(tmp_path: Path, monkeypatch, capsys) -> None:
    accounts = tmp_path / "team" / "accounts.json"
    monkeypatch.setattr("sys.stdin", io.StringIO(PASSWORD + "\n"))
    assert main(["users", "add", "vet2", "--password-stdin", "--accounts", str(accounts)]) == 0
    assert "added the account vet2" in capsys.readouterr().out
    monkeypatch.setattr("getpass.getpass", lambda prompt: "typed without echo")
    monkeypatch.setenv("PAINWATCH_ACCOUNTS", str(accounts))  # the default, as on the page
    assert main(["users", "add", "vet3"]) == 0
    assert main(["users", "list"]) == 0
    out = capsys.readouterr().out
    assert "2 account(s)" in out and "vet2" in out and "vet3" in out
    answers = iter(["first password", "second password"])
    monkeypatch.setattr("getpass.getpass", lambda prompt: next(answers))
    assert main(["users", "add", "vet4"]) == 2
    assert "the two passwords differ" in capsys.readouterr().err
    monkeypatch.setattr("sys.stdin", io.StringIO("short\n"))
    assert main(["users", "add", "vet5", "--password-stdin"]) == 2
    assert "use at least 10" in capsys.readouterr().err
    assert main(["users", "remove", "vet3"]) == 0
    assert sorted(read_accounts(accounts)) == ["vet2"]
