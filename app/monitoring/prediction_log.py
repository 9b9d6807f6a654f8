"""The prediction log: every prediction, its feedback label, every drift check and retrain job, in one database.

It is the rolling buffer the workers share: each worker appends its predictions (batched, off the request
path, see :class:`PredictionRecorder`), the drift monitor reads the latest window, feedback labels
predictions, and retraining reads the labelled rows. SQLite in WAL mode by default (one file under the
data dir, safe for several processes); any SQLAlchemy URL (PostgreSQL) by setting.

What a crash can lose. Each prediction is in its worker's spool (:mod:`app.monitoring.spool`, kernel page
cache) before its response is sent, so a worker killed by SIGKILL or the OOM killer loses none of the
predictions it answered: a surviving worker (within one flush interval) or the killed one's replacement
(when it starts) writes them. ``tests/integration/test_worker_kill.py`` SIGKILLs a worker under load and
requires at least 98 % of the ids answered 2xx in the log; it finds all of them. What can still be lost:
on an OS crash or power loss, spool writes not yet on disk and (SQLite ``synchronous=NORMAL``) the last
committed transactions; without a usable spool folder (``prediction_spool_unavailable``, or a failed
append, ``prediction_spool_write_failed``), the rows of the last flush interval, as before the spool
(0.5 s of a worker's traffic). Every row that never reaches the log is counted in
``sentiment_prediction_log_dropped_total{reason}`` (``buffer_full``, ``rejected_row``, ``shutdown``); a
row written twice is not duplicated (inserts skip existing ids).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import enum
import functools
import hashlib
import json
import math
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import structlog
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
    delete,
    event,
    exists,
    func,
    insert,
    literal,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, SQLAlchemyError, StatementError
from sqlalchemy.sql.expression import Executable

from app.monitoring.metrics import PREDICTION_LOG_DROPPED, PREDICTION_LOG_ERRORS, PREDICTION_LOG_PENDING
from app.monitoring.spool import NOT_SPOOLED, PredictionSpool
from app.settings import Settings

log = structlog.get_logger(__name__)

metadata = MetaData()
"""The tables below and the model registry's (:mod:`app.ml.registry_db`): the schema this code needs. Only the
migrations (:mod:`app.migrations`) create or change them: a change here needs a revision
(``tests/test_migrations.py`` fails while the two differ)."""

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
    Index("ix_predictions_labelled_at", "labelled_at"),
)

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

webhook_alerts = Table(
    "webhook_alerts",
    metadata,
    Column("identity", String(255), primary_key=True),  # fingerprint@startsAt: one firing of one alert
    Column("source", String(16), nullable=False),
    Column("received_at", Float, nullable=False),
    Column("job_id", String(32), nullable=True),  # the retrain it started; released unless that promotes
)

LEGACY_SOURCE = "legacy"
"""The source name of labels recorded before labels carried one (``label_source`` NULL)."""


class LabelOutcome(enum.Enum):
    """What recording a feedback label did."""

    STORED = "stored"
    UNCHANGED = "unchanged"  # the same label was already recorded
    CONFLICT = "conflict"  # a different label was already recorded
    NOT_FOUND = "not_found"


@dataclass(frozen=True)
class LabelResult:
    outcome: LabelOutcome
    sentiment: str | None = None  # what the model predicted
    label: str | None = None  # the label on record after the call


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


class PredictionLog:
    """Synchronous access to the log's tables; every method is safe to call from several processes.

    Async code runs these methods through :meth:`call`, on the log's own few threads.
    """

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

    @classmethod
    def from_settings(cls, settings: Settings) -> PredictionLog:
        return cls(
            settings.prediction_log_url,
            connect_timeout=settings.database_connect_timeout_seconds,
            statement_timeout=settings.database_statement_timeout_seconds,
            threads=settings.database_threads,
        )

    async def call(self, method: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Await one of this log's blocking methods, run on the log's threads (with the caller's context
        variables, as ``asyncio.to_thread`` does, so log lines keep their ``request_id``)."""
        context = contextvars.copy_context()
        job = functools.partial(context.run, method, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self._executor, job)

    def dispose(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self.engine.dispose()

    # -- predictions -------------------------------------------------------------------------------
    def insert_predictions(self, rows: Sequence[dict[str, Any]]) -> None:
        """Insert rows, skipping any whose id is already there: writing a batch twice (after a commit
        whose outcome was unknown, or a dead worker's spool) is harmless."""
        if rows:
            with self.engine.begin() as conn:
                conn.execute(self._insert_new_predictions(), list(rows))

    def _insert_new_predictions(self) -> Executable:
        dialect = INSERT_IGNORING_DUPLICATES.get(self.engine.dialect.name)
        if dialect is None:  # another database: plain inserts, a duplicate fails its row alone
            return insert(predictions)
        return dialect(predictions).on_conflict_do_nothing(index_elements=[predictions.c.id])

    def get_prediction(self, prediction_id: str) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(predictions).where(predictions.c.id == prediction_id)).mappings().first()
        return dict(row) if row else None

    def set_label(
        self, prediction_id: str, label: str, now: float | None = None, *, source: str = "default"
    ) -> LabelResult:
        """Record the true label of a prediction, sent by the feedback token named ``source``: idempotent
        for the same label (the first sender stays on record), refused for another."""
        with self.engine.begin() as conn:
            row = conn.execute(
                select(predictions.c.sentiment, predictions.c.label).where(predictions.c.id == prediction_id)
            ).first()
            if row is None:
                return LabelResult(LabelOutcome.NOT_FOUND)
            if row.label is not None:
                outcome = LabelOutcome.UNCHANGED if row.label == label else LabelOutcome.CONFLICT
                return LabelResult(outcome, row.sentiment, row.label)
            # The WHERE on label IS NULL makes a concurrent second labelling a no-op, never an overwrite.
            done = conn.execute(
                update(predictions)
                .where(predictions.c.id == prediction_id, predictions.c.label.is_(None))
                .values(label=label, labelled_at=now or time.time(), label_source=source)
            )
            if done.rowcount == 0:
                current = conn.execute(select(predictions.c.label).where(predictions.c.id == prediction_id)).scalar()
                outcome = LabelOutcome.UNCHANGED if current == label else LabelOutcome.CONFLICT
                return LabelResult(outcome, row.sentiment, current)
        return LabelResult(LabelOutcome.STORED, row.sentiment, label)

    def live_accuracy(self, last: int) -> tuple[float | None, int]:
        """Accuracy over the ``last`` most recently labelled predictions, and how many there were."""
        recent = (
            select(predictions.c.sentiment, predictions.c.label)
            .where(predictions.c.label.is_not(None))
            .order_by(predictions.c.labelled_at.desc())
            .limit(last)
            .subquery()
        )
        with self.engine.connect() as conn:
            total, correct = conn.execute(
                select(func.count(), func.sum((recent.c.sentiment == recent.c.label).cast(Integer)))
            ).one()
        return (correct / total if total else None), int(total)

    def window(self, size: int, model_version: str) -> list[dict[str, Any]]:
        """The latest ``size`` predictions of ``model_version``, oldest first."""
        query = (
            select(
                predictions.c.text,
                predictions.c.confidence,
                predictions.c.p_positive,
                predictions.c.sentiment,
                predictions.c.created_at,
            )
            .where(predictions.c.model_version == model_version)
            .order_by(predictions.c.created_at.desc())
            .limit(size)
        )
        with self.engine.connect() as conn:
            rows = [dict(r) for r in conn.execute(query).mappings()]
        rows.reverse()
        return rows

    def count_predictions(self, model_version: str | None = None, since: float | None = None) -> int:
        query = select(func.count()).select_from(predictions)
        if model_version is not None:
            query = query.where(predictions.c.model_version == model_version)
        if since is not None:
            query = query.where(predictions.c.created_at > since)
        with self.engine.connect() as conn:
            return int(conn.execute(query).scalar_one())

    def labelled(self, since: float | None = None) -> list[dict[str, Any]]:
        """Every labelled prediction (id, text, label, labelled_at, source: the name of the feedback token
        that sent the label, :data:`LEGACY_SOURCE` for labels older than that record), oldest label first."""
        source = func.coalesce(predictions.c.label_source, LEGACY_SOURCE).label("source")
        query = select(
            predictions.c.id, predictions.c.text, predictions.c.label, predictions.c.labelled_at, source
        ).where(predictions.c.label.is_not(None))
        if since is not None:
            query = query.where(predictions.c.labelled_at > since)
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(query.order_by(predictions.c.labelled_at)).mappings()]

    def label_sources(self) -> list[dict[str, Any]]:
        """Per feedback token name: how many labels it sent that the log holds, and the first and last time."""
        source = func.coalesce(predictions.c.label_source, LEGACY_SOURCE)
        query = (
            select(
                source.label("source"),
                func.count().label("labels"),
                func.min(predictions.c.labelled_at).label("first_labelled_at"),
                func.max(predictions.c.labelled_at).label("last_labelled_at"),
            )
            .where(predictions.c.label.is_not(None))
            .group_by(source)
            .order_by(source)
        )
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(query).mappings()]

    def purge_labels(self, source: str) -> int:
        """Forget every label the feedback token named ``source`` sent (label, time and source become NULL;
        the predictions stay, as unlabelled rows) and return how many. ``legacy`` purges the labels recorded
        before labels carried their source."""
        column = predictions.c.label_source
        sent_by = column.is_(None) if source == LEGACY_SOURCE else column == source
        with self.engine.begin() as conn:
            done = conn.execute(
                update(predictions)
                .where(predictions.c.label.is_not(None), sent_by)
                .values(label=None, labelled_at=None, label_source=None)
            )
        return int(done.rowcount)

    def enforce_retention(
        self,
        max_rows: int,
        max_age_seconds: float,
        now: float | None = None,
        *,
        max_labelled_rows: int | None = None,
        max_labelled_age_seconds: float | None = None,
    ) -> int:
        """Delete unlabelled predictions older than the age limit or beyond the newest ``max_rows``, and
        labelled ones (the next retrain's training data, so bounded apart and more generously) whose label is
        older than ``max_labelled_age_seconds`` or beyond the newest ``max_labelled_rows`` labels; ``None``:
        no such bound. Returns how many rows went.
        """
        now = now or time.time()
        unlabelled = predictions.c.label.is_(None)
        deleted = self._enforce_labelled_retention(max_labelled_rows, max_labelled_age_seconds, now)
        with self.engine.begin() as conn:
            deleted += conn.execute(
                delete(predictions).where(unlabelled, predictions.c.created_at < now - max_age_seconds)
            ).rowcount
            cutoff = conn.execute(
                select(predictions.c.created_at)
                .where(unlabelled)
                .order_by(predictions.c.created_at.desc())
                .offset(max_rows)
                .limit(1)
            ).scalar()
            if cutoff is not None:
                deleted += conn.execute(
                    delete(predictions).where(unlabelled, predictions.c.created_at <= cutoff)
                ).rowcount
        return int(deleted)

    def _enforce_labelled_retention(self, max_rows: int | None, max_age_seconds: float | None, now: float) -> int:
        labelled = predictions.c.label.is_not(None)
        deleted = 0
        with self.engine.begin() as conn:
            if max_age_seconds is not None:
                deleted += conn.execute(
                    delete(predictions).where(labelled, predictions.c.labelled_at < now - max_age_seconds)
                ).rowcount
            if max_rows is not None:
                cutoff = conn.execute(
                    select(predictions.c.labelled_at)
                    .where(labelled)
                    .order_by(predictions.c.labelled_at.desc())
                    .offset(max_rows)
                    .limit(1)
                ).scalar()
                if cutoff is not None:
                    deleted += conn.execute(
                        delete(predictions).where(labelled, predictions.c.labelled_at <= cutoff)
                    ).rowcount
        return int(deleted)

    # -- drift checks ------------------------------------------------------------------------------
    def insert_drift_check(self, record: dict[str, Any]) -> None:
        row = {**record, "details": json.dumps(record.get("details", {}), sort_keys=True)}
        with self.engine.begin() as conn:
            conn.execute(insert(drift_checks), [row])

    def drift_history(self, limit: int) -> list[dict[str, Any]]:
        """The latest ``limit`` drift checks, newest first."""
        query = select(drift_checks).order_by(drift_checks.c.checked_at.desc(), drift_checks.c.id.desc()).limit(limit)
        with self.engine.connect() as conn:
            rows = [dict(r) for r in conn.execute(query).mappings()]
        for row in rows:
            row["details"] = json.loads(row["details"])
            row.pop("id", None)
        return rows

    def prune_drift_checks(self, keep: int) -> None:
        with self.engine.begin() as conn:
            cutoff = conn.execute(
                select(drift_checks.c.id).order_by(drift_checks.c.id.desc()).offset(keep).limit(1)
            ).scalar()
            if cutoff is not None:
                conn.execute(delete(drift_checks).where(drift_checks.c.id <= cutoff))

    # -- retrain bookkeeping ---------------------------------------------------------------------
    def unseen_alerts(self, identities: Sequence[str]) -> list[str]:
        """The alert firings no running or promoting retrain has claimed."""
        with self.engine.connect() as conn:
            seen = {
                r[0]
                for r in conn.execute(
                    select(webhook_alerts.c.identity).where(webhook_alerts.c.identity.in_(list(identities)))
                )
            }
        return [i for i in identities if i not in seen]

    def create_job(
        self,
        job_id: str,
        trigger: str,
        reason: str,
        now: float | None = None,
        alerts: Sequence[str] = (),
        *,
        unless_started_after: float | None = None,
        status: str = "running",
    ) -> bool:
        """Record a started (or, with ``status="queued"``, a queued) job and, in the same transaction, claim
        the alert firings that started it.

        At most one job is ``running`` and at most one ``queued`` (unique indexes): while one is, recording
        another raises ``IntegrityError``, however many processes try at once. With ``unless_started_after``
        (the cooldown), nothing is recorded and this returns False if some job, queued ones included, started
        after that time, checked in the same statement as the insert.
        """
        if status not in ("running", "queued"):
            raise ValueError(f"a new job is running or queued, not {status!r}")
        now = now or time.time()
        row = {
            "id": job_id,
            "trigger": trigger,
            "reason": reason,
            "status": status,
            "started_at": now,
            "details": "{}",
        }
        statement = insert(retrain_jobs).values(**row)
        if unless_started_after is not None:
            recent = select(retrain_jobs.c.id).where(retrain_jobs.c.started_at > unless_started_after)
            values = select(*(literal(value, retrain_jobs.c[name].type).label(name) for name, value in row.items()))
            statement = insert(retrain_jobs).from_select(list(row), values.where(~exists(recent)))
        with self.engine.begin() as conn:
            conn.execute(statement)
            # Not ``rowcount``: psycopg reports -1 for an INSERT ... SELECT.
            if conn.execute(select(retrain_jobs.c.id).where(retrain_jobs.c.id == job_id)).first() is None:
                return False
            for identity in alerts:
                conn.execute(delete(webhook_alerts).where(webhook_alerts.c.identity == identity))
                conn.execute(
                    insert(webhook_alerts).values(identity=identity, source=trigger, received_at=now, job_id=job_id)
                )
        return True

    def finish_job(
        self,
        job_id: str,
        status: str,
        outcome: str,
        details: dict[str, Any],
        *,
        candidate_version: str | None = None,
        now: float | None = None,
    ) -> None:
        """Record how a job ended. Unless it promoted a model, the firings it claimed are released: the
        alert's next re-send (after the cooldown) may start another retrain, on the labels gathered since."""
        with self.engine.begin() as conn:
            conn.execute(
                update(retrain_jobs)
                .where(retrain_jobs.c.id == job_id)
                .values(
                    status=status,
                    outcome=outcome,
                    finished_at=now or time.time(),
                    candidate_version=candidate_version,
                    details=json.dumps(details, sort_keys=True),
                )
            )
            if outcome != "promoted":
                conn.execute(delete(webhook_alerts).where(webhook_alerts.c.job_id == job_id))

    def claim_job(self, now: float | None = None) -> tuple[str, str] | None:
        """Move the oldest queued job to ``running`` (its ``started_at`` becomes now): its (id, trigger), or
        None when none is queued or one is running already (the unique index refuses a second).

        One statement: on PostgreSQL the queued row is locked with ``FOR UPDATE SKIP LOCKED``, so concurrent
        workers never claim the same job nor wait on each other; SQLite runs one write at a time, and the
        ``status = 'queued'`` condition makes a claim of a row another worker took a no-op.
        """
        oldest = (
            select(retrain_jobs.c.id)
            .where(retrain_jobs.c.status == "queued")
            .order_by(retrain_jobs.c.started_at, retrain_jobs.c.id)
            .limit(1)
            .with_for_update(skip_locked=True)
            .scalar_subquery()
        )
        statement = (
            update(retrain_jobs)
            .where(retrain_jobs.c.id == oldest, retrain_jobs.c.status == "queued")
            .values(status="running", started_at=now or time.time())
            .returning(retrain_jobs.c.id, retrain_jobs.c.trigger)
        )
        try:
            with self.engine.begin() as conn:
                claimed = conn.execute(statement).first()
        except IntegrityError:  # a job is running: it goes first
            return None
        return None if claimed is None else (claimed[0], claimed[1])

    def queued_jobs(self) -> int:
        """How many jobs wait for a retrain worker."""
        with self.engine.connect() as conn:
            count = conn.execute(select(func.count()).where(retrain_jobs.c.status == "queued")).scalar()
        return int(count or 0)

    def requeue_job(self, job_id: str, reason: str) -> bool:
        """Put a running job back in the queue (its retrain process was stopped before it ended, and is gone).
        False if it is no longer running, or if another job was queued meanwhile: then it is failed with
        ``reason``, as a retrain that died (the queued one will retrain on the same labels and newer)."""
        back = update(retrain_jobs).where(retrain_jobs.c.id == job_id, retrain_jobs.c.status == "running")
        try:
            with self.engine.begin() as conn:
                return bool(conn.execute(back.values(status="queued")).rowcount)
        except IntegrityError:
            rows = self.jobs(job_id=job_id)
            if rows and rows[0]["status"] == "running":
                self.finish_job(job_id, "failed", "failed", {"error": reason})
            return False

    def fail_running_jobs(self, reason: str, *, started_before: float | None = None) -> int:
        """Mark jobs still 'running' (that started before ``started_before``, if given) as failed (called
        when no retrain holds the lock)."""
        query = select(retrain_jobs.c.id).where(retrain_jobs.c.status == "running")
        if started_before is not None:
            query = query.where(retrain_jobs.c.started_at < started_before)
        with self.engine.begin() as conn:
            running = [r[0] for r in conn.execute(query)]
            if not running:
                return 0
            conn.execute(
                update(retrain_jobs)
                .where(retrain_jobs.c.id.in_(running))
                .values(
                    status="failed", outcome="failed", finished_at=time.time(), details=json.dumps({"error": reason})
                )
            )
            conn.execute(delete(webhook_alerts).where(webhook_alerts.c.job_id.in_(running)))
            return len(running)

    def jobs(self, limit: int = 50, job_id: str | None = None) -> list[dict[str, Any]]:
        query = select(retrain_jobs).order_by(retrain_jobs.c.started_at.desc()).limit(limit)
        if job_id is not None:
            query = query.where(retrain_jobs.c.id == job_id)
        with self.engine.connect() as conn:
            rows = [dict(r) for r in conn.execute(query).mappings()]
        for row in rows:
            row["details"] = json.loads(row["details"])
        return rows


_ROW_BYTES = 700
"""Memory of one buffered row besides its text: the dict, its id, floats and the buffer's tuple (about
620 bytes measured, CPython 3.11; ``tests/monitoring/test_prediction_log.py`` checks the bound)."""

FLUSH_CHUNK_ROWS = 2000
"""Most rows one insert writes: a flush after an outage drains the buffer in chunks."""

_REJECTED, _COMMITTED = 2, 1


def _row_specific(exc: Exception) -> bool:
    """Whether a failed insert may be the fault of a row rather than of the database.

    Constraint and data errors (a NUL character on PostgreSQL, a value too long) and anything not from
    SQLAlchemy (``UnicodeEncodeError`` for a lone surrogate, raised by the driver) depend on the rows.
    Every other database error (connection lost, timeout, locked, missing table, permissions) would fail
    any row: those rows are kept and retried, never set aside.
    """
    if isinstance(exc, IntegrityError | DataError):
        return True
    if isinstance(exc, DBAPIError):
        return False
    if isinstance(exc, StatementError):  # a parameter SQLAlchemy could not bind, before the database saw it
        return True
    return not isinstance(exc, SQLAlchemyError)


def insert_setting_aside(
    prediction_db: PredictionLog, rows: Sequence[dict[str, Any]], settled: bytearray
) -> list[tuple[int, str]]:
    """Insert ``rows``; return the (index, error type) of each row the database refused on its own.

    A batch refused for a reason that may be a row's (:func:`_row_specific`) is split in halves until each
    refused row is alone: one bad row among 2,000 costs about 22 inserts. ``settled[i]`` becomes
    _COMMITTED or _REJECTED as it happens, so when a database error ends the call (it raises), the rows
    still 0 are exactly the ones to keep. Blocking: run it on the log's threads.
    """
    rejected: list[tuple[int, str]] = []
    ranges = [(0, len(rows))]
    while ranges:
        low, high = ranges.pop()
        try:
            prediction_db.insert_predictions(rows[low:high])
        except Exception as exc:
            if not _row_specific(exc):
                raise
            if high - low == 1:
                settled[low] = _REJECTED
                rejected.append((low, type(exc).__name__))
            else:
                middle = (low + high) // 2
                ranges += [(middle, high), (low, middle)]  # the first half is tried first
            continue
        settled[low:high] = bytes([_COMMITTED]) * (high - low)
    return rejected


_Buffered = tuple[int, int, dict[str, Any]]  # (spool segment, bytes in memory, row)


class PredictionRecorder:
    """Per-worker write-behind buffer in front of the prediction log.

    Requests only append (:meth:`record`): to an in-memory deque and, when there is a spool, to the
    worker's spool file (see :mod:`app.monitoring.spool`). A background task writes the deque out every
    ``flush_interval`` seconds on the log's threads, so database latency never reaches a request and a
    failing database never fails a prediction.

    - A flush that fails for the database's sake (connection lost, timeout, locked) counts
      ``errors_total{reason="write_failed"}`` and keeps its rows for the next attempt.
    - A row the database refuses on its own is set aside without holding up the others (see
      :func:`insert_setting_aside`), counted ``dropped_total{reason="rejected_row"}`` and logged
      without its text.
    - Memory is bounded: at most ``max_buffer`` rows and ``max_buffer_bytes`` bytes (texts included)
      are held, rows being written included; beyond that the oldest buffered rows are dropped and
      counted ``dropped_total{reason="buffer_full"}`` (their spool copy goes too).
    - The task never dies: any error is logged and the next interval tries again.
    - ``close`` (graceful shutdown) writes what it can within ``shutdown_timeout`` seconds; what is
      left stays in the spool for the next worker, and rows without a spool copy are counted
      ``dropped_total{reason="shutdown"}``.
    - It adopts the spools of dead workers (while the database is healthy).
    """

    def __init__(
        self,
        prediction_db: PredictionLog,
        flush_interval: float,
        max_buffer: int,
        *,
        max_buffer_bytes: int = 64 * 2**20,
        spool: PredictionSpool | None = None,
        shutdown_timeout: float = 10.0,
    ) -> None:
        self.prediction_db = prediction_db
        self.flush_interval = flush_interval
        self.max_buffer = max_buffer
        self.max_buffer_bytes = max_buffer_bytes
        self.spool = spool
        self.shutdown_timeout = shutdown_timeout
        self._buffer: deque[_Buffered] = deque()
        self._in_flight: Sequence[_Buffered] = ()
        self._bytes = 0  # of the buffered and in-flight rows
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._failing = False
        self._dropping = False

    @classmethod
    def from_settings(cls, prediction_db: PredictionLog, settings: Settings) -> PredictionRecorder:
        """The recorder the service runs, with a spool under the settings' folder (one per database URL)."""
        root = settings.prediction_log_spool_dir or settings.state_dir / "prediction-spool"
        spool = PredictionSpool(root / hashlib.sha256(prediction_db.url.encode()).hexdigest()[:16])
        try:
            spool.open()
        except OSError as exc:  # a read-only or full disk: run without crash safety rather than not at all
            log.error("prediction_spool_unavailable", reason=type(exc).__name__, directory=str(root))
        return cls(
            prediction_db,
            settings.prediction_log_flush_seconds,
            settings.prediction_log_max_buffer,
            max_buffer_bytes=settings.prediction_log_max_buffer_bytes,
            spool=spool if spool.is_open else None,
            # Leave gunicorn's graceful timeout room for the requests in flight before the lifespan ends.
            shutdown_timeout=settings.graceful_timeout_seconds / 2,
        )

    def record(self, rows: Sequence[dict[str, Any]]) -> None:
        """Buffer the rows of one request (and spool them): on the request path, so cheap and never raising."""
        segment = self.spool.append(rows) if self.spool is not None else NOT_SPOOLED
        self._add([(segment, _ROW_BYTES + sys.getsizeof(row["text"]), row) for row in rows])

    def _add(self, items: list[_Buffered]) -> None:
        self._buffer.extend(items)
        self._bytes += sum(size for _, size, _ in items)
        self._enforce_bounds()

    def _enforce_bounds(self) -> None:
        dropped: list[int] = []
        while self._buffer and (
            len(self._buffer) + len(self._in_flight) > self.max_buffer or self._bytes > self.max_buffer_bytes
        ):
            segment, size, _ = self._buffer.popleft()
            self._bytes -= size
            dropped.append(segment)
        if dropped:
            if self.spool is not None:
                self.spool.release(dropped)
            PREDICTION_LOG_DROPPED.labels(reason="buffer_full").inc(len(dropped))
            if not self._dropping:  # one line per episode
                log.error("prediction_log_buffer_full", dropped=len(dropped), rows=self.pending, bytes=self._bytes)
            self._dropping = True

    @property
    def pending(self) -> int:
        """Rows not written yet: buffered, or being written."""
        return len(self._buffer) + len(self._in_flight)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="prediction-log-flush")

    async def _run(self) -> None:
        while True:
            try:
                await self.adopt_orphans()
                # Set here, not per request (a gauge write costs about as much as buffering a row):
                # stale by at most one flush interval, or one write while the database hangs.
                PREDICTION_LOG_PENDING.set(self.pending)
                await self.flush()
            except Exception as exc:  # a bug here must not stop the log for the rest of the worker's life
                log.error("prediction_log_flush_failed", reason=type(exc).__name__)
            await asyncio.sleep(self.flush_interval)

    async def adopt_orphans(self) -> int:
        """Buffer the spooled rows of dead workers (not while the database fails: they wait on disk)."""
        if self.spool is None or (self._failing and self._buffer):
            return 0
        claimed = await asyncio.to_thread(self.spool.claim_orphans)
        for segment, rows in claimed:
            self.spool.adopted(segment, len(rows))
            self._add([(segment, _ROW_BYTES + sys.getsizeof(row.get("text")), row) for row in rows])
        return sum(len(rows) for _, rows in claimed)

    async def flush(self) -> None:
        """Write out everything buffered so far (serialised: one flush at a time per worker)."""
        async with self._lock:
            if self.spool is not None:
                self.spool.rotate()  # rows buffered from now on go to a new segment
            todo = len(self._buffer)
            while todo > 0 and self._buffer:
                chunk = self._take(min(todo, FLUSH_CHUNK_ROWS))
                todo -= len(chunk)
                if not await self._write(chunk):
                    break
            PREDICTION_LOG_PENDING.set(self.pending)

    def _take(self, rows: int) -> list[_Buffered]:
        chunk: list[_Buffered] = []
        size = 0
        while self._buffer and len(chunk) < rows and size < self.max_buffer_bytes // 8:
            chunk.append(self._buffer.popleft())
            size += chunk[-1][1]
        self._in_flight = chunk
        return chunk

    async def _write(self, chunk: list[_Buffered]) -> bool:
        """Write one chunk; False when the database failed (the unwritten rows are back in the buffer)."""
        rows = [row for _, _, row in chunk]
        settled = bytearray(len(rows))
        try:
            rejected = await self.prediction_db.call(insert_setting_aside, self.prediction_db, rows, settled)
        except Exception as exc:
            self._settle(chunk, settled)
            PREDICTION_LOG_ERRORS.labels(reason="write_failed").inc()
            if not self._failing:  # one line per outage, not one per flush
                log.error("prediction_log_write_failed", rows=len(rows), reason=type(exc).__name__)
            self._failing = True
            return False
        except BaseException:  # cancelled (close's deadline): the thread may still commit them; idempotent
            self._settle(chunk, settled)
            raise
        self._settle(chunk, settled)
        for index, reason in rejected:
            row = rows[index]
            log.error(
                "prediction_log_row_rejected",
                prediction_id=row.get("id"),
                reason=reason,
                text_length=row.get("text_length"),
                model_version=row.get("model_version"),
            )
        if rejected:
            PREDICTION_LOG_DROPPED.labels(reason="rejected_row").inc(len(rejected))
        if self._failing:
            log.info("prediction_log_recovered", rows=len(rows))
        self._failing = self._dropping = False
        return True

    def _settle(self, chunk: list[_Buffered], settled: bytearray) -> None:
        """Forget the written and rejected rows of ``chunk``; put the others back in front of the buffer."""
        self._in_flight = ()
        done = [item for item, state in zip(chunk, settled, strict=True) if state]
        if len(done) < len(chunk):
            self._buffer.extendleft(reversed([item for item, state in zip(chunk, settled, strict=True) if not state]))
        self._bytes -= sum(size for _, size, _ in done)
        if self.spool is not None:
            self.spool.release(segment for segment, _, _ in done)
        self._enforce_bounds()

    async def close(self) -> None:
        """Stop the task and write what is buffered, for at most ``shutdown_timeout`` seconds."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        try:
            await asyncio.wait_for(self.flush(), self.shutdown_timeout)
        except TimeoutError:
            log.error("prediction_log_shutdown_flush_timed_out", seconds=self.shutdown_timeout)
        left = [*self._in_flight, *self._buffer]
        lost = sum(1 for segment, _, _ in left if segment == NOT_SPOOLED)
        if lost:
            PREDICTION_LOG_DROPPED.labels(reason="shutdown").inc(lost)
            log.error("prediction_log_rows_lost", rows=lost)
        if len(left) > lost:
            log.warning("prediction_log_rows_left_in_spool", rows=len(left) - lost)
        if self.spool is not None:
            self.spool.close()
        PREDICTION_LOG_PENDING.set(0)
