"""Alembic's environment for the records database.

painwatch runs the migrations itself (:func:`painwatch.records.database.open_database`), on a connection
that already holds the write lock inside one transaction, so a migration is applied whole or not at all.
There is no ``alembic.ini``: the connection, the version table and the tables' metadata come in
``config.attributes``.
"""

from __future__ import annotations

from alembic import context

config = context.config
connection = config.attributes.get("connection")
if connection is None:
    raise RuntimeError("painwatch's migrations run through painwatch.records.database.open_database")

context.configure(
    connection=connection,
    target_metadata=config.attributes["target_metadata"],
    version_table=config.attributes["version_table"],
    # SQLite cannot ALTER most things: later migrations copy and move tables ("batch" mode).
    render_as_batch=True,
    transactional_ddl=True,
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
