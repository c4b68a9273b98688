"""``painwatch users add|remove|list``: the accounts that may sign in to the page served to the network.

Accounts live in a local file (PAINWATCH_ACCOUNTS, else data/painwatch-accounts.json; --accounts for
another) as argon2 password hashes, never as passwords. `add` asks for the password twice without
echoing it, or reads it from the first line of standard input with --password-stdin. Exit 0 done, 2 when
the name, the password or the file cannot be used.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys

from painwatch.cli import EXIT_OK
from painwatch.cli.options import HELP_FORMATTER, add_options, config_from_args
from painwatch.records.settings import AccountSettings, RecordsSettings

DESCRIPTION = __doc__.split("\n\n")[1].replace("\n", " ")


def _add_accounts(parser: argparse.ArgumentParser) -> None:
    add_options(parser, RecordsSettings, groups=("accounts",),
                defaults=RecordsSettings.from_environment(os.environ))


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``painwatch users`` and its sub-commands."""
    parser = subparsers.add_parser("users", formatter_class=HELP_FORMATTER, description=DESCRIPTION,
                                   help="add, remove and list the accounts that may sign in to the page")
    commands = parser.add_subparsers(dest="users_command", metavar="ACTION", required=True)
    add = commands.add_parser("add", formatter_class=HELP_FORMATTER, description=DESCRIPTION,
                              help="add an account (asks for its password)")
    add_options(add, AccountSettings, groups=("", "add"))
    _add_accounts(add)
    add.set_defaults(func=_add)
    remove = commands.add_parser("remove", formatter_class=HELP_FORMATTER, description=DESCRIPTION,
                                 help="remove an account")
    add_options(remove, AccountSettings, groups=("",))
    _add_accounts(remove)
    remove.set_defaults(func=_remove)
    listing = commands.add_parser("list", formatter_class=HELP_FORMATTER, description=DESCRIPTION,
                                  help="the user names of the accounts file")
    _add_accounts(listing)
    listing.set_defaults(func=_list)


def read_password(name: str, *, from_stdin: bool) -> str:
    """The new password of ``name``: the first line of standard input, or typed twice without echo."""
    if from_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    first = getpass.getpass(f"Password for {name}: ")
    if getpass.getpass("The same password again: ") != first:
        raise ValueError("the two passwords differ; nothing was changed")
    return first


def _add(args: argparse.Namespace) -> int:
    from painwatch.records.users import add_account, check_user_name

    settings = config_from_args(AccountSettings, args)
    accounts = config_from_args(RecordsSettings, args).accounts
    name = check_user_name(settings.name)
    account = add_account(accounts, name, read_password(name, from_stdin=settings.password_stdin),
                          replace=settings.replace)
    done = "set a new password for" if settings.replace else "added"
    print(f"{done} the account {account.name} in {accounts}")
    return EXIT_OK


def _remove(args: argparse.Namespace) -> int:
    from painwatch.records.users import remove_account

    settings = config_from_args(AccountSettings, args)
    accounts = config_from_args(RecordsSettings, args).accounts
    account = remove_account(accounts, settings.name)
    print(f"removed the account {account.name} from {accounts}")
    return EXIT_OK


def _list(args: argparse.Namespace) -> int:
    from painwatch.records.users import read_accounts

    accounts_file = config_from_args(RecordsSettings, args).accounts
    accounts = read_accounts(accounts_file)
    print(f"{len(accounts)} account(s) in {accounts_file}")
    for account in sorted(accounts.values(), key=lambda a: a.name.casefold()):
        print(f"  {account.name} (since {account.created_at or 'unknown'})")
    return EXIT_OK
