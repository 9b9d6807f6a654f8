"""Drift checks: every result of the drift monitor, newest first, which ``/v1/drift`` and each worker's drift
status read."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from sqlalchemy import ColumnElement, RowMapping, delete, func, insert, or_, select, update

from app.storage.database import Repository, drift_checks


@dataclass(frozen=True)
class DriftCheck:
    """One stored drift check (see :class:`app.monitoring.drift.DriftResult`, which it records)."""

    checked_at: float
    model_version: str
    status: str  # "drift", "no_drift" or "insufficient_data"
    drift: bool
    window_size: int
    score: float | None = None
    p_value: float | None = None
    threshold: float | None = None
    confidence_mean: float | None = None
    details: dict[str, Any] = field(default_factory=dict)
    estimated_accuracy: float | None = None  # the window's label-free estimate and its 95 % band
    estimated_accuracy_low: float | None = None
    estimated_accuracy_high: float | None = None
    explanation: dict[str, Any] | None = None  # a flagged check's DriftExplanation.to_dict()
    id: int | None = None  # assigned by the database


class DriftCheckRepository(Repository):
    """The ``drift_checks`` table; every method is blocking and safe to call from several processes."""

    def insert(self, check: DriftCheck) -> int:
        """Store ``check``; returns its id."""
        row = _row(check)
        row.pop("id")
        with self.engine.begin() as conn:
            return int(conn.execute(insert(drift_checks).values(row).returning(drift_checks.c.id)).scalar_one())

    def history(self, limit: int) -> list[DriftCheck]:
        """The latest ``limit`` drift checks, newest first."""
        query = select(drift_checks).order_by(drift_checks.c.checked_at.desc(), drift_checks.c.id.desc()).limit(limit)
        with self.engine.connect() as conn:
            return [_check(r) for r in conn.execute(query).mappings()]

    def get(self, check_id: int) -> DriftCheck | None:
        """The check stored under ``check_id``, or None."""
        with self.engine.connect() as conn:
            row = conn.execute(select(drift_checks).where(drift_checks.c.id == check_id)).mappings().first()
        return None if row is None else _check(row)

    def latest_estimated(self) -> DriftCheck | None:
        """The latest check with an accuracy estimate (a full window's), or None."""
        return self._latest(drift_checks.c.estimated_accuracy.is_not(None))

    def latest_explained(self) -> DriftCheck | None:
        """The latest check that flagged drift and carries an explanation, or None."""
        return self._latest(drift_checks.c.drift.is_(True), drift_checks.c.explanation.is_not(None))

    def explaining_current_drift(self) -> DriftCheck | None:
        """The latest explained check of the current run of checks that flag drift (none has come out clear
        since it), or None: the check a firing drift alert is about."""
        last_clear = (
            select(func.max(drift_checks.c.checked_at)).where(drift_checks.c.drift.is_(False)).scalar_subquery()
        )
        return self._latest(
            drift_checks.c.drift.is_(True),
            drift_checks.c.explanation.is_not(None),
            or_(last_clear.is_(None), drift_checks.c.checked_at > last_clear),
        )

    def forget_explanations(self, before: float) -> int:
        """Drop the explanation of every check older than ``before`` (Unix time): it quotes user texts, which
        the prediction log's retention has deleted by then. Returns how many were dropped."""
        query = update(drift_checks).where(drift_checks.c.checked_at < before, drift_checks.c.explanation.is_not(None))
        with self.engine.begin() as conn:
            return int(conn.execute(query.values(explanation=None)).rowcount)

    def _latest(self, *conditions: ColumnElement[bool]) -> DriftCheck | None:
        query = (
            select(drift_checks)
            .where(*conditions)
            .order_by(drift_checks.c.checked_at.desc(), drift_checks.c.id.desc())
            .limit(1)
        )
        with self.engine.connect() as conn:
            row = conn.execute(query).mappings().first()
        return None if row is None else _check(row)

    def prune(self, keep: int) -> None:
        """Delete all but the ``keep`` latest checks."""
        with self.engine.begin() as conn:
            cutoff = conn.execute(
                select(drift_checks.c.id).order_by(drift_checks.c.id.desc()).offset(keep).limit(1)
            ).scalar()
            if cutoff is not None:
                conn.execute(delete(drift_checks).where(drift_checks.c.id <= cutoff))


def _row(check: DriftCheck) -> dict[str, Any]:
    explanation = None if check.explanation is None else json.dumps(check.explanation, sort_keys=True)
    return {**asdict(check), "details": json.dumps(check.details, sort_keys=True), "explanation": explanation}


def _check(row: RowMapping) -> DriftCheck:
    explanation = row["explanation"]
    return DriftCheck(
        **{
            **row,
            "details": json.loads(row["details"]),
            "explanation": None if explanation is None else json.loads(explanation),
        }
    )
