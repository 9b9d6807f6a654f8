"""Copying the prediction database into another (SQLite into PostgreSQL): every row of every table, in batches,
idempotently.

Each table (:data:`TABLES`: predictions with their labels and label sources, purged and revoked feedback token
names, drift checks, retrain jobs, webhook alerts, model events) is read in primary-key order, a batch at a time;
each batch is one transaction in the target that inserts the rows whose key the target lacks (``ON CONFLICT DO
NOTHING`` as well, where the dialect has it) and checks that they are there afterwards. A row whose key the
target already holds is compared with the source's: the same row (an earlier, perhaps interrupted, copy) is
counted as present, another one as differing. So a copy can run again at any point and copies nothing twice.
Both databases must be at this code's schema head (the caller checks), so both have the columns of
:mod:`app.storage.database`'s tables.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
from sqlalchemy import Table, create_engine, func, insert, select, text
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.pool import NullPool
from sqlalchemy.sql.expression import Executable

from app.storage.database import (
    INSERT_IGNORING_DUPLICATES,
    drift_checks,
    feedback_sources,
    model_events,
    predictions,
    retrain_jobs,
    webhook_alerts,
)

log = structlog.get_logger(__name__)

TABLES: tuple[Table, ...] = (predictions, feedback_sources, drift_checks, retrain_jobs, webhook_alerts, model_events)
"""The prediction database's tables a copy carries (the model store's versions and pointer: app/ml/store_copy.py)."""
BATCH_ROWS = 1000
DIFFERING_SHOWN = 5
"""How many keys of differing rows a summary names."""


@dataclass
class TableCopy:
    """What :func:`copy_rows` did to one table."""

    table: str
    source_rows: int = 0
    copied: int = 0
    present: int = 0
    """Rows the target already held, identical (an earlier copy)."""
    differing: list[str] = field(default_factory=list)
    """Keys the target holds with other values, or whose insert it refused (a unique index): not copied."""

    @property
    def ok(self) -> bool:
        return not self.differing

    def describe(self) -> str:
        text = f"{self.source_rows} rows: {self.copied} copied, {self.present} already present"
        if self.differing:
            shown = ", ".join(self.differing[:DIFFERING_SHOWN])
            more = f" and {len(self.differing) - DIFFERING_SHOWN} more" if len(self.differing) > DIFFERING_SHOWN else ""
            text += f", {len(self.differing)} differ in the target (not copied: {shown}{more})"
        return text


def open_database(url: str) -> Engine:
    """An engine for a copy: no statement timeout (a batch may be large), no pool kept."""
    return create_engine(url, poolclass=NullPool)


def database_exists(url: str) -> bool:
    """False for a SQLite file that is not there (connecting would create an empty one); True otherwise."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        return True
    return Path(parsed.database).is_file()


def _insert_new(table: Table, dialect: str) -> Executable:
    ignoring = INSERT_IGNORING_DUPLICATES.get(dialect)
    # Any conflict: a key inserted meanwhile, or a second running retrain job (the unique partial index).
    return insert(table) if ignoring is None else ignoring(table).on_conflict_do_nothing()


def _copy_batch(connection: Connection, table: Table, rows: Sequence[dict[str, Any]], result: TableCopy) -> None:
    key = table.primary_key.columns.values()[0]
    keys = [row[key.name] for row in rows]
    held = {row[key.name]: dict(row) for row in connection.execute(select(table).where(key.in_(keys))).mappings()}
    new = [row for row in rows if row[key.name] not in held]
    for row in rows:
        if row[key.name] in held:
            if held[row[key.name]] == row:
                result.present += 1
            else:
                result.differing.append(str(row[key.name]))
    if not new:
        return
    connection.execute(_insert_new(table, connection.dialect.name), list(new))
    stored = set(connection.execute(select(key).where(key.in_([row[key.name] for row in new]))).scalars())
    for row in new:
        if row[key.name] in stored:
            result.copied += 1
        else:
            result.differing.append(str(row[key.name]))


def _advance_sequences(connection: Connection) -> None:
    """PostgreSQL: move each serial key's sequence past the copied ids, so the next insert (a drift check, a
    model event) does not collide with a copied row."""
    if connection.dialect.name != "postgresql":
        return  # SQLite gives a new row max(id) + 1
    for table in TABLES:
        key = table.primary_key.columns.values()[0]
        if key.autoincrement is True:
            connection.execute(
                text(
                    f"SELECT setval(pg_get_serial_sequence(:table, :column), "  # noqa: S608  names from our tables
                    f'(SELECT COALESCE(MAX("{key.name}"), 0) + 1 FROM "{table.name}"), false)'
                ),
                {"table": table.name, "column": key.name},
            )


def copy_rows(
    source: Engine, target: Engine, batch_rows: int = BATCH_ROWS, echo: Callable[[str], None] = lambda _line: None
) -> list[TableCopy]:
    """Copy every row of :data:`TABLES` from ``source`` into ``target``, ``batch_rows`` per transaction, and
    return what each table got; ``echo`` gets a line per table. Safe to run again (see the module)."""
    results = []
    for table in TABLES:
        result = TableCopy(table.name)
        key = table.primary_key.columns.values()[0]
        with source.connect() as connection:
            result.source_rows = int(connection.execute(select(func.count()).select_from(table)).scalar_one())
        last: Any = None
        while True:
            query = select(table).order_by(key).limit(batch_rows)
            if last is not None:
                query = query.where(key > last)
            with source.connect() as connection:
                rows = [dict(row) for row in connection.execute(query).mappings()]
            if not rows:
                break
            last = rows[-1][key.name]
            with target.begin() as connection:
                _copy_batch(connection, table, rows, result)
        log.info(
            "rows_copied",
            table=table.name,
            source_rows=result.source_rows,
            copied=result.copied,
            present=result.present,
            differing=len(result.differing),
        )
        echo(f"{table.name:17} {result.describe()}")
        results.append(result)
    with target.begin() as connection:
        _advance_sequences(connection)
    return results
