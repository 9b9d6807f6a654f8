"""Model events: the audit trail of every model version (registered, gated, shadowed, promoted, rejected, ...).

Each lifecycle step of a version is one row of ``model_events``: what happened (:data:`EVENTS`), what caused it
(``trigger``: the retrain's trigger, ``watch``, ``rollback``), who did it (``actor``: ``retrain:<job id>``,
``cli``, ``monitor``) and the figures behind it (``details``, JSON). ``GET /v1/models/{version}/events`` and
``python -m app.cli show`` read it; the promotion watch (:mod:`app.monitoring.watch`) reads a version's latest
``promoted`` event to know what it watches.

Writing an event never decides an outcome: a promotion or rollback whose event cannot be written still
happens, and callers use :meth:`ModelEventRepository.record_safely`, which logs ``model_event_unrecorded``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import structlog
from sqlalchemy import RowMapping, insert, select

from app.storage.database import Repository, model_events

log = structlog.get_logger(__name__)

EVENTS = (
    "registered",  # a version was stored (train, retrain)
    "gated",  # a retrain's promotion gate scored it (details: the gate figures and decision)
    "shadowed",  # it scored the latest live window beside the current model (details: the shadow figures)
    "promoted",  # it became current (details: previous, watch)
    "rejected",  # the gate or the shadow refused it (details: reason)
    "superseded",  # its parent was no longer current when its retrain would have promoted it
    "rolled_back",  # it stopped being current by a rollback (details: reason, restored, figures)
    "watch_passed",  # the promotion watch ended without rolling it back (details: the last figures)
)
"""Every event kind, in lifecycle order."""


@dataclass(frozen=True)
class ModelEvent:
    """One lifecycle event of one model version."""

    model_version: str
    event: str  # one of EVENTS
    actor: str  # who: retrain:<job id>, cli, monitor
    trigger: str | None = None  # what caused it: a retrain's trigger (alertmanager, manual, ...), watch, rollback
    details: dict[str, Any] = field(default_factory=dict)
    occurred_at: float = field(default_factory=time.time)
    id: int | None = None  # assigned by the database

    def __post_init__(self) -> None:
        if self.event not in EVENTS:
            raise ValueError(f"unknown model event {self.event!r}; one of {EVENTS}")


class ModelEventRepository(Repository):
    """The ``model_events`` table; every method is blocking and safe to call from several processes."""

    def record(self, event: ModelEvent) -> int:
        """Store ``event``; returns its id. Raises SQLAlchemy's errors (see :meth:`record_safely`)."""
        row = {
            "model_version": event.model_version,
            "occurred_at": event.occurred_at,
            "event": event.event,
            "trigger": event.trigger,
            "actor": event.actor,
            "details": json.dumps(event.details, sort_keys=True, default=str),
        }
        with self.engine.begin() as conn:
            return int(conn.execute(insert(model_events).values(row).returning(model_events.c.id)).scalar_one())

    def record_safely(self, event: ModelEvent) -> int | None:
        """:meth:`record`, but a failure (database down, schema behind) is logged as ``model_event_unrecorded``
        and returns None: the step the event describes has happened and stays done."""
        try:
            return self.record(event)
        except Exception as exc:
            log.error(
                "model_event_unrecorded",
                model_version=event.model_version,
                model_event=event.event,
                reason=str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__,
            )
            return None

    def for_version(self, version: str, limit: int = 1000) -> list[ModelEvent]:
        """The events of ``version``, oldest first (at most the latest ``limit``)."""
        query = (
            select(model_events)
            .where(model_events.c.model_version == version)
            .order_by(model_events.c.occurred_at.desc(), model_events.c.id.desc())
            .limit(limit)
        )
        with self.engine.connect() as conn:
            events = [_event(r) for r in conn.execute(query).mappings()]
        events.reverse()
        return events


def _event(row: RowMapping) -> ModelEvent:
    return ModelEvent(
        model_version=row["model_version"],
        event=row["event"],
        actor=row["actor"],
        trigger=row["trigger"],
        details=json.loads(row["details"]),
        occurred_at=row["occurred_at"],
        id=row["id"],
    )
