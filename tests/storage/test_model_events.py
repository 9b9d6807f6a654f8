"""Model events: a version's audit trail round-trips in order, and a failed write never raises from record_safely."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from app.migrations import upgrade
from app.storage.database import Database
from app.storage.model_events import ModelEvent, ModelEventRepository
from app.storage.repositories import Repositories
from tests.postgres import PostgresCluster, postgres, postgres_url  # noqa: F401  fixtures


def trail(events: ModelEventRepository) -> None:
    events.record(ModelEvent("v2", "promoted", "retrain:j1", "manual", {"previous": "v1"}, occurred_at=30.0))
    events.record(ModelEvent("v2", "registered", "retrain:j1", "manual", {"parent": "v1"}, occurred_at=10.0))
    events.record(ModelEvent("v2", "gated", "retrain:j1", "manual", {"decision": "promote"}, occurred_at=20.0))
    events.record(ModelEvent("v1", "rolled_back", "monitor", "watch", {"reason": "x"}, occurred_at=15.0))


def test_a_versions_events_come_back_oldest_first_with_their_figures(storage: Repositories) -> None:
    trail(storage.events)
    found = storage.events.for_version("v2")
    assert [e.event for e in found] == ["registered", "gated", "promoted"]
    assert found[0].actor == "retrain:j1" and found[0].trigger == "manual" and found[0].details == {"parent": "v1"}
    assert found[2].occurred_at == 30.0 and found[2].id is not None
    assert [e.event for e in storage.events.for_version("v2", limit=2)] == ["gated", "promoted"]  # the latest two
    assert storage.events.for_version("nope") == []


def test_an_unknown_event_kind_is_refused_before_it_reaches_the_table() -> None:
    with pytest.raises(ValueError, match="unknown model event"):
        ModelEvent("v1", "deployed", "cli")


def test_a_write_that_fails_is_logged_and_returns_none(tmp_path: Path) -> None:
    """A database without the table (never migrated): the caller's promotion goes on, the log says why."""
    database = Database(f"sqlite:///{tmp_path / 'bare.db'}")
    try:
        events = ModelEventRepository(database)
        with capture_logs() as logs:
            assert events.record_safely(ModelEvent("v1", "promoted", "cli")) is None
        (line,) = [e for e in logs if e["event"] == "model_event_unrecorded"]
        assert line["model_version"] == "v1" and line["model_event"] == "promoted" and line["log_level"] == "error"
    finally:
        database.dispose()


@pytest.fixture
def pg_events(postgres_url: str) -> Iterator[ModelEventRepository]:  # noqa: F811
    upgrade(postgres_url)
    database = Database(postgres_url)
    yield ModelEventRepository(database)
    database.dispose()


@pytest.mark.integration
def test_the_trail_is_the_same_on_postgresql(pg_events: ModelEventRepository) -> None:
    trail(pg_events)
    assert [e.event for e in pg_events.for_version("v2")] == ["registered", "gated", "promoted"]
    assert pg_events.for_version("v1")[0].details == {"reason": "x"}
