"""The database on a real PostgreSQL: the same rows, windows and labels as on SQLite, the timeouts, the threads."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from app.migrations import upgrade
from app.storage.database import Database
from app.storage.predictions import LabelOutcome, PredictionRepository
from tests.postgres import PostgresCluster, postgres, postgres_url  # noqa: F401  fixtures
from tests.storage.test_predictions import row

pytestmark = pytest.mark.integration


@pytest.fixture
def store(postgres_url: str) -> Iterator[PredictionRepository]:  # noqa: F811
    database = Database(postgres_url, statement_timeout=0.5)
    upgrade(postgres_url)
    yield PredictionRepository(database)
    database.dispose()


def test_rows_windows_and_labels_round_trip(store: PredictionRepository) -> None:
    """Predictions written in one batch come back as windows, counts and labelled rows."""
    store.insert_predictions([row(i) for i in range(10)] + [row(100 + i, "v2", sentiment="negative") for i in range(3)])
    assert [r.text for r in store.window(4, "v1")] == [f"text number {i}" for i in (6, 7, 8, 9)]
    assert store.count_predictions("v1") == 10 and store.count_predictions("v2") == 3
    assert store.count_predictions("v1", since=1007.0) == 2

    assert store.set_label("p00001", "positive", now=2000.0).outcome is LabelOutcome.STORED
    assert store.set_label("p00100", "positive", now=2001.0).outcome is LabelOutcome.STORED
    assert store.set_label("p00001", "positive").outcome is LabelOutcome.UNCHANGED
    conflict = store.set_label("p00001", "negative")
    assert conflict.outcome is LabelOutcome.CONFLICT and conflict.label == "positive"
    assert store.set_label("nope", "positive").outcome is LabelOutcome.NOT_FOUND
    assert store.live_accuracy(10) == (0.5, 2)  # p00001 right, p00100 (predicted negative) wrong
    assert [r.id for r in store.labelled()] == ["p00001", "p00100"]


def test_upgrading_again_keeps_the_rows(store: PredictionRepository) -> None:
    """A second `db upgrade` (another release's start) finds the schema at head and keeps the rows."""
    store.insert_predictions([row(1)])
    upgrade(store.database.url)
    assert store.count_predictions() == 1


def test_statements_are_cancelled_at_the_statement_timeout(store: PredictionRepository) -> None:
    """The server cancels a statement that runs past the timeout instead of holding a thread."""
    started = time.monotonic()
    with pytest.raises(OperationalError, match="statement timeout"), store.engine.connect() as conn:
        conn.execute(text("SELECT pg_sleep(5)"))
    assert time.monotonic() - started < 2


def test_calls_run_on_the_databases_own_threads(store: PredictionRepository) -> None:
    """Async callers reach the database through its bounded pool, not the loop's default executor."""

    def where() -> str:
        store.count_predictions()
        return threading.current_thread().name

    assert asyncio.run(store.call(where)).startswith("prediction-log")


def test_an_unresponsive_server_fails_at_the_connect_timeout() -> None:
    """A server that accepts TCP but never answers fails the call after the connect timeout, not never."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()  # the kernel completes handshakes; nobody ever speaks the protocol
        port = silent.getsockname()[1]
        database = Database(f"postgresql+psycopg://postgres@127.0.0.1:{port}/x", connect_timeout=2)
        started = time.monotonic()
        with pytest.raises(OperationalError):
            PredictionRepository(database).count_predictions()
        elapsed = time.monotonic() - started
        database.dispose()
    assert 1.5 < elapsed < 5


def test_the_database_recovers_after_a_restart(store: PredictionRepository, postgres: PostgresCluster) -> None:  # noqa: F811
    """Pooled connections killed by a restart are replaced, so the first call after it succeeds."""
    store.insert_predictions([row(1)])
    with postgres.outage(), pytest.raises(OperationalError):
        store.insert_predictions([row(2)])
    store.insert_predictions([row(3)])
    assert store.count_predictions() == 2
