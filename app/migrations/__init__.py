"""Schema migrations of the prediction database (Alembic): upgrade, adopt, and the start-up schema check.

The revisions are in ``versions/``, run by ``env.py`` against the tables of
:mod:`app.storage.database` (its ``metadata``). Alembic is configured here, in code, from this
folder: it works from any working directory and from an installed image, with no ``alembic.ini``.

- ``python -m app.cli db upgrade`` (:func:`upgrade`) is the only thing that changes the schema.
  ``scripts/serve`` and the container's entrypoint run it before the service starts; on Kubernetes the
  ``sentiment-migrate`` Job does. On PostgreSQL concurrent upgrades wait for each other (an advisory lock).
- A database created by a release before migrations (its tables, no ``alembic_version``) is adopted: brought
  to the baseline revision (what older releases may lack is added, rows are kept), stamped, then upgraded.
- The web workers, the drift monitor and a retrain never change the schema: at start they call
  :func:`require_current`, which refuses (``database_schema_behind``) a reachable database whose revision is
  behind this code's head, and lets them run against one a newer release migrated (``database_schema_ahead``:
  revisions only add, so older code keeps working).
"""

from __future__ import annotations

import ast
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import structlog
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.pool import NullPool

from app.errors import SentimentServiceError

if TYPE_CHECKING:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

log = structlog.get_logger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent
UPGRADE_COMMAND = "python -m app.cli db upgrade"
BASELINE = "fd3ab7b49a99"
"""The schema of the last release before migrations (the four tables), which adoption stamps."""
BASELINE_TABLES = ("predictions", "drift_checks", "retrain_jobs", "webhook_alerts")
VERSION_TABLE = "alembic_version"
"""Where Alembic records a database's revision (its default name and schema)."""
_LOCK_KEY = 0x53454E54494D  # pg_advisory_xact_lock key of the migrations ("SENTIM")


def _not_context_chatter(record: logging.LogRecord) -> bool:
    # Alembic logs two lines each time it looks at a database (every process start's check); keep the
    # lines that say what ran ("Running upgrade ...").
    return not str(record.msg).startswith(("Context impl", "Will assume"))


logging.getLogger("alembic.runtime.migration").addFilter(_not_context_chatter)


class DatabaseSchemaBehindError(SentimentServiceError):
    """The database's schema is older than this code needs: run ``python -m app.cli db upgrade``."""

    code = "database_schema_behind"


class DatabaseSchemaAheadError(SentimentServiceError):
    """A newer release migrated the database: this code cannot upgrade (or know) its schema."""

    code = "database_schema_ahead"


def alembic_config(connection: Connection | None = None) -> Config:
    """Alembic's configuration for this package's migrations; ``env.py`` runs them on ``connection``."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["connection"] = connection
    return config


@functools.cache
def _scripts() -> ScriptDirectory:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config())


def _declared(script: Path) -> tuple[str, str | None]:
    """The ``revision`` and ``down_revision`` a migration script assigns (read, not imported)."""
    values: dict[str, object] = {}
    for node in ast.parse(script.read_text()).body:
        if isinstance(node, ast.AnnAssign | ast.Assign) and node.value is not None:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if isinstance(target, ast.Name) and target.id in {"revision", "down_revision"}:
                    values[target.id] = ast.literal_eval(node.value)
    revision, down = values.get("revision"), values.get("down_revision")
    if not isinstance(revision, str) or not (down is None or isinstance(down, str)):
        raise RuntimeError(f"{script.name}: expected revision and down_revision strings (a linear history)")
    return revision, down


@functools.cache
def revision_chain() -> tuple[str, ...]:
    """Every revision this code knows, oldest first, read from the scripts in ``versions/`` without importing
    Alembic (about 10 MB with Mako and Pygments): the start-up check of every web worker and of the drift
    monitor needs only this. The history is linear; ``tests/migrations`` holds it equal to Alembic's own."""
    down_of = dict(_declared(script) for script in sorted((MIGRATIONS_DIR / "versions").glob("*.py")))
    later = {down: revision for revision, down in down_of.items()}
    heads = sorted(set(down_of) - set(later))
    if len(heads) != 1 or len(later) != len(down_of):
        raise RuntimeError(f"the migrations have {len(heads)} heads ({', '.join(heads)}): merge them")
    chain, revision = [], later.get(None)
    while revision is not None:
        chain.append(revision)
        revision = later.get(revision)
    if len(chain) != len(down_of):
        raise RuntimeError("the migrations do not form one chain from a single base revision")
    return tuple(chain)


def head() -> str:
    """The newest revision this code knows (the schema it needs)."""
    return revision_chain()[-1]


def revisions() -> list[str]:
    """Every revision this code knows, oldest first."""
    return list(revision_chain())


def current_revision(connection: Connection) -> str | None:
    """The revision ``alembic_version`` records (None: never migrated), read as Alembic reads it."""
    if not inspect(connection).has_table(VERSION_TABLE):
        return None
    rows = connection.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalars().all()  # noqa: S608
    if len(rows) > 1:
        raise RuntimeError(f"{VERSION_TABLE} records {len(rows)} heads ({', '.join(rows)}); this history is linear")
    return rows[0] if rows else None


@dataclass(frozen=True)
class SchemaState:
    """Where a database's schema stands against this code's migrations."""

    current: str | None  # its revision (``alembic_version``); None: never migrated
    head: str  # the revision this code needs
    legacy: bool  # tables from a release before migrations, no alembic_version: ``db upgrade`` adopts it
    known: bool  # ``current`` is one of this code's revisions (False: a newer release migrated it)

    @property
    def up_to_date(self) -> bool:
        return self.current == self.head

    @property
    def behind(self) -> bool:
        """Older than this code needs (or empty): the service refuses to start until ``db upgrade``."""
        return not self.up_to_date and self.known

    @property
    def ahead(self) -> bool:
        """Migrated by a newer release: this code runs (revisions only add tables and nullable columns)."""
        return not self.known

    def describe(self) -> str:
        current = self.current or ("none (tables from a release before migrations)" if self.legacy else "none")
        if self.up_to_date:
            return f"at head {self.head}"
        if self.ahead:
            return f"at {current}, newer than this release's head {self.head}"
        return f"at {current}, behind head {self.head}: run `{UPGRADE_COMMAND}`"


def _state(connection: Connection) -> SchemaState:
    current = current_revision(connection)
    tables = set(inspect(connection).get_table_names())
    legacy = current is None and bool(tables & set(BASELINE_TABLES))
    return SchemaState(current, head(), legacy, current is None or current in revisions())


def schema_state(engine: Engine) -> SchemaState:
    """Read where ``engine``'s database stands (raises SQLAlchemy's errors when it cannot be reached)."""
    with engine.connect() as connection:
        return _state(connection)


def require_current(engine: Engine, process: str) -> SchemaState:
    """The start-up check of every process using the database: raise :class:`DatabaseSchemaBehindError`
    (after logging ``database_schema_behind`` with both revisions and the command to run) when its schema
    is behind this code. An unreachable database raises SQLAlchemy's error: the caller keeps its own
    behaviour for that (the web workers serve anyway and retry their writes)."""
    state = schema_state(engine)
    if state.behind:
        log.error(
            "database_schema_behind",
            process=process,
            current=state.current,
            head=state.head,
            legacy=state.legacy,
            command=UPGRADE_COMMAND,
        )
        raise DatabaseSchemaBehindError(
            f"the prediction database's schema is {state.describe()}", {"current": state.current, "head": state.head}
        )
    if state.ahead:
        log.warning("database_schema_ahead", process=process, current=state.current, head=state.head)
    return state


def _engine(url: str) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    # No statement timeout: a migration may rewrite a table. SQLite waits up to 30 s for the workers' locks.
    connect_args = {"timeout": 30} if parsed.get_backend_name() == "sqlite" else {}
    return create_engine(url, poolclass=NullPool, connect_args=connect_args)


def _migrating(url: str, run: Callable[[Connection], SchemaState]) -> SchemaState:
    """Run ``run`` in one transaction on ``url``, holding the migration lock (PostgreSQL: transactional
    DDL, so a failed upgrade leaves the schema as it was; SQLite applies each statement as it goes)."""
    engine = _engine(url)
    try:
        with engine.begin() as connection:
            if connection.dialect.name == "postgresql":  # a second `db upgrade` waits, then finds it done
                connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _LOCK_KEY})
            return run(connection)
    finally:
        engine.dispose()


def _baseline_module() -> ModuleType:
    module = _scripts().get_revision(BASELINE).module
    assert isinstance(module, ModuleType)
    return module


def _adopt(connection: Connection, echo: Callable[[str], None]) -> None:
    """Bring a database of a release before migrations to the baseline and stamp it there (rows kept)."""
    from alembic import command
    from alembic.operations import Operations
    from alembic.runtime.migration import MigrationContext

    context = MigrationContext.configure(connection, opts={"render_as_batch": True})
    with Operations.context(context):
        added: list[str] = _baseline_module().adopt()
    command.stamp(alembic_config(connection), BASELINE)
    echo(
        "adopted a database created before migrations (tables present, no alembic_version): "
        f"{'added ' + ', '.join(added) + '; ' if added else ''}stamped baseline {BASELINE}"
    )


def upgrade(url: str, revision: str = "head", echo: Callable[[str], None] = lambda _line: None) -> SchemaState:
    """Migrate the database at ``url`` to ``revision`` (default: head), creating its tables when it is
    empty and adopting it first when an older release created it. ``echo`` receives what was done, for
    people. Safe to run again: a database at ``revision`` is left alone."""

    def run(connection: Connection) -> SchemaState:
        before = _state(connection)
        if before.ahead:
            raise DatabaseSchemaAheadError(f"the database is {before.describe()}: nothing this release can do")
        if before.legacy:
            _adopt(connection, echo)
        start = _state(connection).current
        from alembic import command

        command.upgrade(alembic_config(connection), revision)
        after = _state(connection)
        if after.current == start:
            echo(f"already at {after.current}; nothing to do")
        else:
            echo(f"upgraded from {start or 'an empty database'} to {after.current}")
        return after

    return _migrating(url, run)


def downgrade(url: str, revision: str, echo: Callable[[str], None] = lambda _line: None) -> SchemaState:
    """Migrate the database at ``url`` back to ``revision`` (``-1``: one step; ``base``: no tables),
    for rolling a release back after its upgrade. Columns a downgrade drops lose their data."""

    def run(connection: Connection) -> SchemaState:
        start = _state(connection).current
        from alembic import command

        command.downgrade(alembic_config(connection), revision)
        after = _state(connection)
        echo(f"downgraded from {start} to {after.current or 'base (no tables)'}")
        return after

    return _migrating(url, run)


def current(url: str) -> SchemaState:
    """Where the database at ``url`` stands."""
    engine = _engine(url)
    try:
        return schema_state(engine)
    finally:
        engine.dispose()
