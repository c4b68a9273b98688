"""The animal records: pain checks of each animal over days, kept in a database (docs/design.md,
"Records and sign-in").

- :mod:`~painwatch.records.settings`: where the database and the accounts are, what is kept of frames;
- :mod:`~painwatch.records.tables`: the tables (SQLAlchemy), changed only by the Alembic migrations in
  ``migrations/``;
- :mod:`~painwatch.records.database`: opening a database (checked before anything is written, migrated on
  start, WAL mode for SQLite), one transaction per write;
- :mod:`~painwatch.records.service`: animals and checks, saved whole or not at all;
- :mod:`~painwatch.records.history`: an animal's checks in words and tables;
- :mod:`~painwatch.records.report`: printable PDF reports of a check and of an animal;
- :mod:`~painwatch.records.transfer`: JSON export and import between machines, the history as CSV;
- :mod:`~painwatch.records.users`: accounts (argon2 hashes) and sign-in attempts.

The records sit beside :mod:`painwatch.evaluation`, above :mod:`painwatch.inference`: they know answers
and models, never how models are trained. This package imports nothing on its own, so that the command
line builds its options from :mod:`~painwatch.records.settings` without loading torch.
"""
