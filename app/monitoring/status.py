"""Each worker's cached view of the latest drift check, added to every prediction response."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import structlog
from sqlalchemy.exc import SQLAlchemyError

from app.storage.drift_checks import DriftCheck, DriftCheckRepository

log = structlog.get_logger(__name__)

UNKNOWN: dict[str, Any] = {"drift": False, "p_value": None, "score": None, "checked_at": None, "status": "unknown"}


def utc(timestamp: float | None) -> datetime | None:
    """A stored Unix time as an aware UTC datetime (JSON renders it ISO-8601 with ``Z``)."""
    return datetime.fromtimestamp(timestamp, UTC) if timestamp is not None else None


def summarise(check: DriftCheck | None) -> dict[str, Any]:
    """The short form of a drift check that predictions carry."""
    if check is None:
        return dict(UNKNOWN)
    return {
        "drift": bool(check.drift),
        "p_value": check.p_value,
        "score": check.score,
        "checked_at": utc(check.checked_at),
        "status": check.status,
    }


class DriftStatus:
    """Refreshes the latest check from the database every ``refresh`` seconds; requests never query it."""

    def __init__(self, drift_checks: DriftCheckRepository, refresh: float) -> None:
        self.drift_checks = drift_checks
        self.refresh = refresh
        self.summary: dict[str, Any] = dict(UNKNOWN)

    async def update(self) -> None:
        try:
            latest = await self.drift_checks.call(self.drift_checks.history, 1)
        except SQLAlchemyError as exc:
            log.warning("drift_status_unavailable", reason=type(exc).__name__)
            return
        self.summary = summarise(latest[0] if latest else None)

    async def watch(self) -> None:
        while True:
            await self.update()
            await asyncio.sleep(self.refresh)
