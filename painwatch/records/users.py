"""Who may open the page when it is served to the network: accounts in a local file with argon2
password hashes, and sign-in attempts recorded in the records database, repeated failures waiting
twice as long each time (docs/design.md, "Records and sign-in").

- The accounts file (``painwatch users add NAME``) holds user names and argon2id hashes [Argon2],
  never a password; it is rewritten atomically under a lock and readable by its owner only.
- :func:`sign_in` checks a name and password in one write transaction that also records the attempt,
  so that parallel attempts queue. After ``k`` failures in a row (of a user name, or of a browser
  session, whichever waits longer) the next attempt is refused, without looking at the password, until
  ``min(2^(k-1), 900)`` seconds have passed since the last failure. An unknown name costs the same
  work and gets the same answer as a wrong password, so the page does not tell which names exist.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from sqlalchemy import func, select

from painwatch.io import atomic_write_text, to_json_text
from painwatch.records.database import Database, RecordsError
from painwatch.records.tables import USER_NAME_LENGTH, SignInAttempt

ACCOUNTS_FORMAT = "painwatch-accounts"
ACCOUNTS_FORMAT_VERSION = 1
USER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]*")
"""A user name: letters, digits and, after the first character, . _ @ -; at most 64 characters."""
MIN_PASSWORD_LENGTH = 10
FIRST_DELAY_S = 1.0
MAX_DELAY_S = 900.0
"""The longest wait after failed sign-ins, in seconds (15 minutes)."""

_HASHER = PasswordHasher()
# Checked against when the name is unknown, so that unknown names cost what wrong passwords cost.
_UNKNOWN_USER_HASH = _HASHER.hash("painwatch: no such user")


class AccountsError(RecordsError):
    """The accounts file, a user name or a password cannot be used; the message says which and why."""


@dataclass(frozen=True)
class Account:
    name: str
    password_hash: str
    created_at: str


@dataclass(frozen=True)
class SignInOutcome:
    """What a sign-in attempt gave: the signed-in user's name (None when refused), a message for the page,
    and how many seconds to wait before the next attempt is looked at (0 when none)."""

    user: str | None
    message: str
    wait_s: float = 0.0

    @property
    def succeeded(self) -> bool:
        return self.user is not None


# --------------------------------------------------------------------------- the accounts file


def check_user_name(name: str) -> str:
    """``name`` without surrounding spaces, or ``AccountsError`` naming it when it cannot be a user name."""
    name = str(name).strip()
    if not name or len(name) > USER_NAME_LENGTH or not USER_NAME.fullmatch(name):
        raise AccountsError(f"{name!r} cannot be a user name: use 1 to {USER_NAME_LENGTH} letters, digits "
                            "and, after the first character, . _ @ -")
    return name


def read_accounts(path: Path) -> dict[str, Account]:
    """The accounts of the file at ``path`` by case-folded name (none when the file does not exist).

    Raises ``AccountsError`` naming the file and the entry when it cannot be read.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as error:
        raise AccountsError(f"cannot read the accounts file {path}: {error.strerror or error}") from error
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        raise AccountsError(f"the accounts file {path} is not JSON: {error}") from error
    if not isinstance(document, Mapping) or document.get("format") != ACCOUNTS_FORMAT:
        raise AccountsError(f"{path} is not a painwatch accounts file (no \"format\": \"{ACCOUNTS_FORMAT}\")")
    version = document.get("format_version")
    if not isinstance(version, int) or version > ACCOUNTS_FORMAT_VERSION:
        raise AccountsError(f"the accounts file {path} has format version {version!r}; "
                            f"this painwatch reads version {ACCOUNTS_FORMAT_VERSION}")
    accounts: dict[str, Account] = {}
    entries = document.get("accounts")
    if not isinstance(entries, list):
        raise AccountsError(f"the accounts file {path}: \"accounts\" must be a list")
    for index, entry in enumerate(entries):
        if not (isinstance(entry, Mapping) and isinstance(entry.get("name"), str)
                and str(entry.get("password_hash") or "").startswith("$argon2")):
            raise AccountsError(f"the accounts file {path}: accounts[{index}] must have a name and an argon2 "
                                "password_hash")
        accounts[entry["name"].casefold()] = Account(entry["name"], entry["password_hash"],
                                                     str(entry.get("created_at") or ""))
    return accounts


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _write_accounts(path: Path, accounts: Mapping[str, Account]) -> None:
    document = {
        "format": ACCOUNTS_FORMAT,
        "format_version": ACCOUNTS_FORMAT_VERSION,
        "accounts": [{"name": a.name, "password_hash": a.password_hash, "created_at": a.created_at}
                     for a in sorted(accounts.values(), key=lambda a: a.name.casefold())],
    }
    atomic_write_text(path, to_json_text(document))
    os.chmod(path, 0o600)  # hashes are not passwords, but nobody else needs to read them


def add_account(path: Path, name: str, password: str, *, replace: bool = False) -> Account:
    """Add the account ``name`` with an argon2id hash of ``password`` to the file at ``path`` (created
    when missing); ``replace`` sets a new password for an existing account.

    Raises ``AccountsError`` when the name cannot be a user name, the password is shorter than
    :data:`MIN_PASSWORD_LENGTH` characters, or the account exists and ``replace`` is False.
    """
    name = check_user_name(name)
    if len(password) < MIN_PASSWORD_LENGTH:
        raise AccountsError(f"the password for {name!r} has {len(password)} characters; use at least "
                            f"{MIN_PASSWORD_LENGTH}")
    path = Path(path)
    with _locked(path):
        accounts = read_accounts(path)
        if name.casefold() in accounts and not replace:
            raise AccountsError(f"there is already an account {accounts[name.casefold()].name!r} in {path} "
                                "(give --replace to set a new password)")
        account = Account(name, _HASHER.hash(password), datetime.now(UTC).isoformat(timespec="seconds"))
        accounts[name.casefold()] = account
        _write_accounts(path, accounts)
    return account


def remove_account(path: Path, name: str) -> Account:
    """Remove the account ``name`` from the file at ``path``; ``AccountsError`` when there is none."""
    path = Path(path)
    with _locked(path):
        accounts = read_accounts(path)
        account = accounts.pop(str(name).strip().casefold(), None)
        if account is None:
            raise AccountsError(f"there is no account {name!r} in {path}")
        _write_accounts(path, accounts)
    return account


def password_matches(accounts: Mapping[str, Account], name: str, password: str) -> Account | None:
    """The account ``name`` when ``password`` is its password, else None (the same work either way)."""
    account = accounts.get(str(name).strip().casefold())
    try:
        _HASHER.verify(account.password_hash if account else _UNKNOWN_USER_HASH, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return None
    return account


# --------------------------------------------------------------------------- sign-in attempts


def failure_delay(failures: int) -> float:
    """Seconds to wait after ``failures`` failed sign-ins in a row: 0, then 1, 2, 4, ... up to 900."""
    if failures <= 0:
        return 0.0
    return min(FIRST_DELAY_S * 2.0 ** (failures - 1), MAX_DELAY_S)


def _wait_for(session: object, column: object, key: str, now: datetime) -> tuple[float, int]:
    last_success = session.scalar(select(func.max(SignInAttempt.at))
                                  .where(column == key, SignInAttempt.succeeded.is_(True)))
    failed = select(func.count(SignInAttempt.id), func.max(SignInAttempt.at)).where(
        column == key, SignInAttempt.succeeded.is_(False))
    if last_success is not None:
        failed = failed.where(SignInAttempt.at > _aware(last_success))
    count, last_failure = session.execute(failed).one()
    if not count:
        return 0.0, 0
    elapsed = (now - _aware(last_failure)).total_seconds()
    return max(failure_delay(int(count)) - elapsed, 0.0), int(count)


def _aware(value: datetime | str) -> datetime:
    # Aggregates bypass the column type: SQLite hands back text or a naive datetime in UTC.
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def sign_in(
    database: Database,
    accounts_file: Path,
    *,
    name: str,
    password: str,
    session: str,
    now: datetime | None = None,
) -> SignInOutcome:
    """Check ``name`` and ``password`` against the accounts file and record the attempt of the browser
    ``session`` (unless it came too early and was not looked at).

    The accounts file is read at every attempt, so accounts added while the page runs work at once.
    Raises ``AccountsError`` when the accounts file cannot be read.
    """
    now = now or datetime.now(UTC)
    typed = " ".join(str(name).split())[:USER_NAME_LENGTH]
    key = typed.casefold()
    accounts = read_accounts(accounts_file)
    with database.write() as db:
        by_user, _ = _wait_for(db, SignInAttempt.user_name, key, now)
        by_session, _ = _wait_for(db, SignInAttempt.session, str(session), now)
        wait = max(by_user, by_session)
        if wait > 0:
            return SignInOutcome(None, f"Too many failed sign-ins: wait {wait:.0f} s before trying again.",
                                 wait)
        account = password_matches(accounts, typed, password) if typed and password else None
        db.add(SignInAttempt(at=now, user_name=key, session=str(session)[:64], succeeded=account is not None))
        if account is not None:
            return SignInOutcome(account.name, f"Signed in as {account.name}.")
        failures = max(_wait_for(db, SignInAttempt.user_name, key, now)[1],
                       _wait_for(db, SignInAttempt.session, str(session), now)[1])
    delay = failure_delay(failures)
    return SignInOutcome(None, f"The user name or the password is wrong. The next attempt is possible in "
                         f"{delay:.0f} s.", delay)


__all__ = ["MAX_DELAY_S", "MIN_PASSWORD_LENGTH", "Account", "AccountsError", "SignInOutcome",
           "add_account", "check_user_name", "failure_delay", "password_matches", "read_accounts",
           "remove_account", "sign_in"]
