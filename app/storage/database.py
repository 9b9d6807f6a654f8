"""The service's database: its tables, the engine (SQLite pragmas, PostgreSQL driver timeouts) and the threads
that run its calls.

One :class:`Database` per process holds the engine every repository shares: predictions and their labels
(:mod:`app.storage.predictions`), purged and revoked feedback token names (:mod:`app.storage.feedback_sources`),
drift checks (:mod:`app.storage.drift_checks`), retrain jobs (:mod:`app.storage.retrain_jobs`), webhook alert
firings (:mod:`app.storage.alerts`) and the model versions' audit trail (:mod:`app.storage.model_events`). SQLite
in WAL mode by default (one file under the data dir, safe for several processes); any SQLAlchemy URL
(PostgreSQL) by setting.
"""

from __future__ import annotations

import asyncio
import contextvars
import math
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from sqlalchemy import (
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine, make_url

from app.settings import Settings

metadata = MetaData()
"""The tables below and the model registry's (:mod:`app.ml.registry_db`): the schema this code needs. Only the
migrations (:mod:`app.migrations`) create or change them: a change here needs a revision
(``tests/migrations/test_migrations.py`` fails while the two differ)."""

predictions = Table(
    "predictions",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("created_at", Float, nullable=False),
    Column("text", Text, nullable=False),
    Column("text_length", Integer, nullable=False),
    Column("sentiment", String(8), nullable=False),
    Column("confidence", Float, nullable=False),
    Column("p_positive", Float, nullable=False),
    Column("model_version", String(64), nullable=False),
    Column("latency_ms", Float, nullable=False),
    Column("label", String(8), nullable=True),
    Column("labelled_at", Float, nullable=True),
    Column("label_source", String(64), nullable=True),  # the name of the feedback token that sent the label
    Index("ix_predictions_version_time", "model_version", "created_at"),
    Index("ix_predictions_time", "created_at"),
)

LABELLED = predictions.c.labelled_at.is_not(None)
"""Whether a prediction carries a feedback label. Its label, label time and source are set and cleared
together; testing the time lets every query of labelled rows read the partial ``ix_predictions_labelled_at``
(the labelled rows) instead of walking every row of the log, as ``label IS NOT NULL`` made it do
(``tests/storage/test_predictions.py`` checks the query plans)."""

# Labelled rows only, by the same condition: predictions are written unlabelled, and no query reads the NULL
# entry a full index would add for each.
Index("ix_predictions_labelled_at", predictions.c.labelled_at, sqlite_where=LABELLED, postgresql_where=LABELLED)

# INSERT ... ON CONFLICT (id) DO NOTHING, by SQLAlchemy dialect name.
INSERT_IGNORING_DUPLICATES: dict[str, Callable[[Table], sqlite.Insert | postgresql.Insert]] = {
    "sqlite": sqlite.insert,
    "postgresql": postgresql.insert,
}

drift_checks = Table(
    "drift_checks",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("checked_at", Float, nullable=False),
    Column("model_version", String(64), nullable=False),
    Column("status", String(24), nullable=False),
    Column("drift", Boolean, nullable=False),
    Column("score", Float, nullable=True),
    Column("p_value", Float, nullable=True),
    Column("threshold", Float, nullable=True),
    Column("window_size", Integer, nullable=False),
    Column("confidence_mean", Float, nullable=True),
    Column("details", Text, nullable=False),
    # The label-free accuracy estimate of the window and its 95 % band (app.monitoring.performance).
    Column("estimated_accuracy", Float, nullable=True),
    Column("estimated_accuracy_low", Float, nullable=True),
    Column("estimated_accuracy_high", Float, nullable=True),
    # A flagged check's explanation (app.monitoring.explain.DriftExplanation as JSON); null otherwise.
    Column("explanation", Text, nullable=True),
    Index("ix_drift_checks_time", "checked_at"),
)


retrain_jobs = Table(
    "retrain_jobs",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("trigger", String(32), nullable=False),
    Column("reason", Text, nullable=False),
    Column("status", String(16), nullable=False),  # queued, running, succeeded, failed
    Column("outcome", String(32), nullable=True),  # promoted, rejected, skipped_*, failed
    Column("started_at", Float, nullable=False),
    Column("finished_at", Float, nullable=True),
    Column("candidate_version", String(64), nullable=True),
    Column("details", Text, nullable=False),
    Index("ix_retrain_jobs_started", "started_at"),
)
# At most one job is running: the database, not a process, decides which of many concurrent starts (workers,
# instances) records the one retrain.
Index(
    "uq_retrain_jobs_running",
    retrain_jobs.c.status,
    unique=True,
    sqlite_where=retrain_jobs.c.status == "running",
    postgresql_where=retrain_jobs.c.status == "running",
)
# At most one job waits for a retrain worker (SENTIMENT_RETRAIN_MODE=queue): concurrent requests queue one retrain.
Index(
    "uq_retrain_jobs_queued",
    retrain_jobs.c.status,
    unique=True,
    sqlite_where=retrain_jobs.c.status == "queued",
    postgresql_where=retrain_jobs.c.status == "queued",
)

# The audit trail of every model version: registered, gated, shadowed, promoted, rolled back, rejected, ...
model_events = Table(
    "model_events",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("model_version", String(64), nullable=False),
    Column("occurred_at", Float, nullable=False),
    Column("event", String(24), nullable=False),
    Column("trigger", String(64), nullable=True),  # what caused it: a retrain job, an alert, the watch
    Column("actor", String(128), nullable=False),  # who did it: retrain:<job id>, cli, monitor, api
    Column("details", Text, nullable=False),  # the figures behind it, JSON
    Index("ix_model_events_version_time", "model_version", "occurred_at"),
)

# Feedback token names an operator purged or revoked (python -m app.cli feedback purge|revoke NAME): a revoked
# name's token is refused, and a retrain fitted on a name purged while it ran is not promoted.
feedback_sources = Table(
    "feedback_sources",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("purged_at", Float, nullable=False),  # the latest purge of its labels (a revocation purges too)
    Column("revoked_at", Float, nullable=True),  # null: its token is still accepted
)

webhook_alerts = Table(
    "webhook_alerts",
    metadata,
    Column("identity", String(255), primary_key=True),  # fingerprint@startsAt: one firing of one alert
    Column("source", String(16), nullable=False),
    Column("received_at", Float, nullable=False),
    Column("job_id", String(32), nullable=True),  # the retrain it started; released unless that promotes
)


P = ParamSpec("P")
T = TypeVar("T")


def _sqlite_connect_args(_connect_timeout: float, _statement_timeout: float) -> dict[str, Any]:
    # A local file: no connection to wait for. The driver's timeout is how long a write waits for another
    # process's lock (busy_timeout, set again by _sqlite_pragmas).
    return {"timeout": 5}


def _postgresql_connect_args(connect_timeout: float, statement_timeout: float) -> dict[str, Any]:
    # libpq counts the connect timeout in whole seconds and treats 1 as 2. tcp_user_timeout drops a
    # connection whose sent data the network stops acknowledging (a partition), which no server-side
    # timeout can see.
    return {
        "connect_timeout": max(2, math.ceil(connect_timeout)),
        "options": f"-c statement_timeout={math.ceil(statement_timeout * 1000)}",
        "tcp_user_timeout": math.ceil((connect_timeout + statement_timeout) * 1000),
    }


# The driver options that bound a call to the database, by SQLAlchemy dialect name; a dialect missing
# here gets only the pool timeout.
CONNECT_ARGS: dict[str, Callable[[float, float], dict[str, Any]]] = {
    "sqlite": _sqlite_connect_args,
    "postgresql": _postgresql_connect_args,
}


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets the monitor read while workers write; NORMAL sync is durable across process crashes
    # (only an OS crash can lose the last transactions); busy_timeout waits out other writers.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.close()


class Database:
    """One process's connection to the service's database: the engine the repositories share, and the few
    threads async code runs their blocking methods on (:meth:`call`). Safe to use from several processes."""

    def __init__(
        self, url: str, *, connect_timeout: float = 3.0, statement_timeout: float = 5.0, threads: int = 4
    ) -> None:
        self.url = url
        parsed = make_url(url)
        is_sqlite = parsed.get_backend_name() == "sqlite"
        if is_sqlite and parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        connect_args = CONNECT_ARGS.get(parsed.get_backend_name())
        # A server database: test pooled connections before use (they die with a restart) and wait for a
        # free one no longer than for a new one. (SQLite's in-memory pool takes no timeout.)
        pooling: dict[str, Any] = {} if is_sqlite else {"pool_pre_ping": True, "pool_timeout": connect_timeout}
        self.engine: Engine = create_engine(
            url,
            connect_args=connect_args(connect_timeout, statement_timeout) if connect_args else {},
            **pooling,
        )
        if is_sqlite:
            event.listen(self.engine, "connect", _sqlite_pragmas)
        # Not the event loop's default executor: while the database hangs, only these threads wait on it,
        # and /metrics, model reloads and webhooks keep theirs. Threads start on first use.
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="prediction-log")
        self._running: set[Future[Any]] = set()  # calls in flight: dispose() lets them end first
        self._statement_timeout = statement_timeout

    @classmethod
    def from_settings(cls, settings: Settings) -> Database:
        return cls(
            settings.prediction_log_url,
            connect_timeout=settings.database_connect_timeout_seconds,
            statement_timeout=settings.database_statement_timeout_seconds,
            threads=settings.database_threads,
        )

    async def call(self, method: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Await a blocking call (a repository's method), run on the database's threads (with the caller's
        context variables, as ``asyncio.to_thread`` does, so log lines keep their ``request_id``)."""
        context = contextvars.copy_context()
        future: Future[T] = self._executor.submit(lambda: context.run(method, *args, **kwargs))
        self._running.add(future)
        future.add_done_callback(self._running.discard)
        return await asyncio.wrap_future(future)

    def dispose(self) -> None:
        """Cancel queued calls, give the ones in flight up to a statement timeout to end (their connections go
        back to the pool and are closed with it, not left to the garbage collector), then close the pool."""
        self._executor.shutdown(wait=False, cancel_futures=True)
        wait(list(self._running), timeout=self._statement_timeout)
        self.engine.dispose()


class Repository:
    """Base of the repositories: the :class:`Database` they read and write, shared with the others."""

    def __init__(self, database: Database) -> None:
        self.database = database
        self.engine = database.engine

    async def call(self, method: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """:meth:`Database.call`: await a blocking method on the database's threads."""
        return await self.database.call(method, *args, **kwargs)
