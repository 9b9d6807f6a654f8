"""The prediction log: every prediction, its feedback label, every drift check and retrain job, in one database.

It is the rolling buffer the workers share: each worker appends its predictions (batched, off the request
path, see :class:`PredictionRecorder`), the drift monitor reads the latest window, feedback labels
predictions, and retraining reads the labelled rows. SQLite in WAL mode by default (one file under the
data dir, safe for several processes); any SQLAlchemy URL (PostgreSQL) by setting.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    func,
    insert,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import OperationalError, SQLAlchemyError

from app.monitoring.metrics import PREDICTION_LOG_ERRORS

log = structlog.get_logger(__name__)

metadata = MetaData()

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
    Index("ix_predictions_version_time", "model_version", "created_at"),
    Index("ix_predictions_time", "created_at"),
    Index("ix_predictions_labelled_at", "labelled_at"),
)

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
    Column("status", String(16), nullable=False),  # running, succeeded, failed
    Column("outcome", String(32), nullable=True),  # promoted, rejected, skipped_*, failed
    Column("started_at", Float, nullable=False),
    Column("finished_at", Float, nullable=True),
    Column("candidate_version", String(64), nullable=True),
    Column("details", Text, nullable=False),
    Index("ix_retrain_jobs_started", "started_at"),
)

webhook_alerts = Table(
    "webhook_alerts",
    metadata,
    Column("identity", String(255), primary_key=True),  # fingerprint@startsAt: one firing of one alert
    Column("source", String(16), nullable=False),
    Column("received_at", Float, nullable=False),
    Column("job_id", String(32), nullable=True),  # the retrain it started; released unless that promotes
)


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


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets the monitor read while workers write; NORMAL sync is durable across process crashes
    # (only an OS crash can lose the last transactions); busy_timeout waits out other writers.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.close()


class PredictionLog:
    """Synchronous access to the log's tables; every method is safe to call from several processes."""

    def __init__(self, url: str) -> None:
        self.url = url
        is_sqlite = url.startswith("sqlite")
        database = make_url(url).database
        if is_sqlite and database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        self.engine: Engine = create_engine(
            url,
            pool_pre_ping=not is_sqlite,
            connect_args={"timeout": 5} if is_sqlite else {},
        )
        if is_sqlite:
            event.listen(self.engine, "connect", _sqlite_pragmas)

    def create_tables(self) -> None:
        """Create missing tables; tolerates another process creating them at the same moment."""
        for attempt in range(5):
            try:
                metadata.create_all(self.engine, checkfirst=True)
                self._add_missing_columns()
                return
            except OperationalError:
                if attempt == 4:
                    raise
                time.sleep(0.1 * (attempt + 1))

    def _add_missing_columns(self) -> None:
        """Columns added since a table was first created (``create_all`` never alters a table)."""
        present = {c["name"] for c in inspect(self.engine).get_columns(webhook_alerts.name)}
        if "job_id" not in present:
            with contextlib.suppress(OperationalError), self.engine.begin() as conn:  # another process won
                conn.execute(text(f"ALTER TABLE {webhook_alerts.name} ADD COLUMN job_id VARCHAR(32)"))

    def dispose(self) -> None:
        self.engine.dispose()

    # -- predictions -------------------------------------------------------------------------------
    def insert_predictions(self, rows: Sequence[dict[str, Any]]) -> None:
        if rows:
            with self.engine.begin() as conn:
                conn.execute(insert(predictions), list(rows))

    def get_prediction(self, prediction_id: str) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(predictions).where(predictions.c.id == prediction_id)).mappings().first()
        return dict(row) if row else None

    def set_label(self, prediction_id: str, label: str, now: float | None = None) -> LabelResult:
        """Record the true label of a prediction: idempotent for the same label, refused for another."""
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
                .values(label=label, labelled_at=now or time.time())
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
        """Every labelled prediction (text, label, labelled_at), oldest label first."""
        query = select(predictions.c.id, predictions.c.text, predictions.c.label, predictions.c.labelled_at).where(
            predictions.c.label.is_not(None)
        )
        if since is not None:
            query = query.where(predictions.c.labelled_at > since)
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(query.order_by(predictions.c.labelled_at)).mappings()]

    def enforce_retention(self, max_rows: int, max_age_seconds: float, now: float | None = None) -> int:
        """Delete unlabelled predictions older than the age limit or beyond the newest ``max_rows``.

        Labelled rows are kept: they are the training data of the next retrain.
        """
        now = now or time.time()
        unlabelled = predictions.c.label.is_(None)
        with self.engine.begin() as conn:
            deleted = conn.execute(
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
        self, job_id: str, trigger: str, reason: str, now: float | None = None, alerts: Sequence[str] = ()
    ) -> None:
        """Record a started job and, in the same transaction, claim the alert firings that started it."""
        now = now or time.time()
        with self.engine.begin() as conn:
            conn.execute(
                insert(retrain_jobs).values(
                    id=job_id, trigger=trigger, reason=reason, status="running", started_at=now, details="{}"
                )
            )
            for identity in alerts:
                conn.execute(delete(webhook_alerts).where(webhook_alerts.c.identity == identity))
                conn.execute(
                    insert(webhook_alerts).values(identity=identity, source=trigger, received_at=now, job_id=job_id)
                )

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

    def fail_running_jobs(self, reason: str) -> int:
        """Mark jobs still 'running' as failed (called when no retrain holds the lock)."""
        with self.engine.begin() as conn:
            running = [r[0] for r in conn.execute(select(retrain_jobs.c.id).where(retrain_jobs.c.status == "running"))]
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


class PredictionRecorder:
    """Per-worker write-behind buffer in front of the prediction log.

    Requests only append to an in-memory deque; a background task writes it out every ``flush_interval``
    seconds on a thread, so database latency never reaches a request and a failing database never
    fails a prediction: each failed flush counts ``reason="write_failed"`` and its rows are re-queued,
    up to ``max_buffer`` rows; rows beyond that are dropped and counted as ``reason="dropped"``.
    On graceful shutdown the buffer is flushed. A crash loses at most the rows of the last interval.
    """

    def __init__(self, log_store: PredictionLog, flush_interval: float, max_buffer: int) -> None:
        self.store = log_store
        self.flush_interval = flush_interval
        self.max_buffer = max_buffer
        self._buffer: deque[dict[str, Any]] = deque()
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._failing = False

    def record(self, rows: Iterable[dict[str, Any]]) -> None:
        self._buffer.extend(rows)
        overflow = len(self._buffer) - self.max_buffer
        if overflow > 0:
            for _ in range(overflow):
                self._buffer.popleft()
            PREDICTION_LOG_ERRORS.labels(reason="dropped").inc(overflow)

    @property
    def pending(self) -> int:
        return len(self._buffer)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="prediction-log-flush")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.flush_interval)
            await self.flush()

    async def flush(self) -> None:
        """Write out everything buffered so far (serialised: one flush at a time per worker)."""
        async with self._lock:
            if not self._buffer:
                return
            rows = list(self._buffer)
            self._buffer.clear()
            try:
                await asyncio.to_thread(self.store.insert_predictions, rows)
            except SQLAlchemyError as exc:
                PREDICTION_LOG_ERRORS.labels(reason="write_failed").inc()
                if not self._failing:  # one line per outage, not one per flush
                    log.error("prediction_log_write_failed", rows=len(rows), reason=type(exc).__name__)
                self._failing = True
                self._buffer.extendleft(reversed(rows))
                self.record([])  # re-apply the bound
            else:
                if self._failing:
                    log.info("prediction_log_recovered", rows=len(rows))
                self._failing = False

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.flush()
        if self._buffer:
            log.error("prediction_log_rows_lost", rows=len(self._buffer))
