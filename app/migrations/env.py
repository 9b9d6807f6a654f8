"""Alembic's environment for the prediction database: run by every ``app.migrations`` command, never imported.

The connection comes from :func:`app.migrations.alembic_config` (``config.attributes["connection"]``): the
caller opened it, holds its transaction and the migration lock. Without one (the ``alembic`` command line
pointed at this folder), the URL is the ``sqlalchemy.url`` option or the service's own setting.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine
from sqlalchemy.engine import Connection
from sqlalchemy.pool import NullPool

import app.ml.registry_db  # noqa: F401  the model registry's tables join the metadata
from app.settings import Settings
from app.storage.database import metadata


def run(connection: Connection) -> None:
    # render_as_batch: SQLite cannot ALTER most things in place; batch mode copies the table (a no-op
    # wrapper on PostgreSQL). compare_type: a changed column type is a difference `db check` must see.
    context.configure(connection=connection, target_metadata=metadata, render_as_batch=True, compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


def main() -> None:
    if context.is_offline_mode():
        raise SystemExit("offline (--sql) migrations are not supported: run them against the database")
    connection: Connection | None = context.config.attributes.get("connection")
    if connection is not None:
        run(connection)
        return
    url = context.config.get_main_option("sqlalchemy.url") or Settings().prediction_log_url
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as fresh:
            run(fresh)
    finally:
        engine.dispose()


main()
