"""Retrain jobs: one row per retrain requested, queued, running or ended, and the alert firings each claims.

The table decides which of many concurrent starts records the one retrain: at most one job is ``running``
and at most one ``queued`` (unique indexes, :mod:`app.storage.database`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, exists, func, insert, literal, select, update
from sqlalchemy.exc import IntegrityError

from app.storage.database import Repository, retrain_jobs, webhook_alerts


@dataclass(frozen=True)
class RetrainJob:
    """One stored retrain job."""

    id: str
    trigger: str
    reason: str
    status: str  # queued, running, succeeded, failed
    outcome: str | None  # promoted, rejected, skipped_*, failed
    started_at: float
    finished_at: float | None
    candidate_version: str | None
    details: dict[str, Any]


class RetrainJobRepository(Repository):
    """The ``retrain_jobs`` table (and the claims of ``webhook_alerts``); every method is blocking and safe to
    call from several processes."""

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
        details: dict[str, Any] | None = None,
    ) -> bool:
        """Record a started (or, with ``status="queued"``, a queued) job and, in the same transaction, claim
        the alert firings that started it.

        At most one job is ``running`` and at most one ``queued`` (unique indexes): while one is, recording
        another raises ``IntegrityError``, however many processes try at once. With ``unless_started_after``
        (the cooldown), nothing is recorded and this returns False if some job, queued ones included, started
        after that time, checked in the same statement as the insert. ``details`` starts the job's record
        (what triggered it); :meth:`finish_job` adds to it.
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
            "details": json.dumps(details or {}, sort_keys=True),
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
        """Record how a job ended; ``details`` are added to those it started with (its trigger's). Unless it
        promoted a model, the firings it claimed are released: the alert's next re-send (after the cooldown)
        may start another retrain, on the labels gathered since."""
        with self.engine.begin() as conn:
            started = conn.execute(select(retrain_jobs.c.details).where(retrain_jobs.c.id == job_id)).scalar()
            details = {**(json.loads(started) if started else {}), **details}
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
            job = self.get(job_id)
            if job is not None and job.status == "running":
                self.finish_job(job_id, "failed", "failed", {"error": reason})
            return False

    def fail_running_jobs(self, reason: str, *, started_before: float | None = None) -> int:
        """Mark jobs still 'running' (that started before ``started_before``, if given) as failed (called
        when no retrain holds the lock)."""
        query = select(retrain_jobs.c.id, retrain_jobs.c.details).where(retrain_jobs.c.status == "running")
        if started_before is not None:
            query = query.where(retrain_jobs.c.started_at < started_before)
        with self.engine.begin() as conn:
            running = {job_id: json.loads(started) for job_id, started in conn.execute(query)}
            now = time.time()
            for job_id, started in running.items():  # each keeps what it started with (its trigger)
                conn.execute(
                    update(retrain_jobs)
                    .where(retrain_jobs.c.id == job_id, retrain_jobs.c.status == "running")
                    .values(
                        status="failed",
                        outcome="failed",
                        finished_at=now,
                        details=json.dumps({**started, "error": reason}, sort_keys=True),
                    )
                )
            if running:
                conn.execute(delete(webhook_alerts).where(webhook_alerts.c.job_id.in_(list(running))))
            return len(running)

    def recent(self, limit: int = 50) -> list[RetrainJob]:
        """The latest ``limit`` jobs, newest first."""
        return self._select(limit)

    def get(self, job_id: str) -> RetrainJob | None:
        jobs = self._select(1, job_id)
        return jobs[0] if jobs else None

    def _select(self, limit: int, job_id: str | None = None) -> list[RetrainJob]:
        query = select(retrain_jobs).order_by(retrain_jobs.c.started_at.desc()).limit(limit)
        if job_id is not None:
            query = query.where(retrain_jobs.c.id == job_id)
        with self.engine.connect() as conn:
            rows = [dict(r) for r in conn.execute(query).mappings()]
        return [RetrainJob(**{**row, "details": json.loads(row["details"])}) for row in rows]
