"""A PostgreSQL outage under load: predictions never fail, feedback says 503, and no logged row is lost."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, select

from app.ml.registry import ModelRegistry
from app.storage.database import predictions
from tests.integration.services import FEEDBACK, Service, start_service, wait_for
from tests.postgres import PostgresCluster, postgres, postgres_url  # noqa: F401  fixtures

pytestmark = pytest.mark.integration

OUTAGE_SECONDS = 30
RATE = 60  # predictions per second, from one client thread
CONNECT_TIMEOUT = 2.0
STATEMENT_TIMEOUT = 2.0
TEXTS = ["A brilliant, funny and deeply moving film.", "A dull, tedious and boring mess.", "not bad at all", "meh"]


@dataclass
class Load:
    """Posts one prediction every ``1 / RATE`` s from a thread; keeps the id of every 2xx and every failure."""

    url: str
    answered: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    slowest: float = 0.0  # seconds, the longest prediction round trip
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _run(self) -> None:
        next_at = time.monotonic()
        i = 0
        # No keep-alive: a fresh connection each time, so the kernel spreads them over both workers.
        with httpx.Client(timeout=10, limits=httpx.Limits(max_keepalive_connections=0)) as client:
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    response = client.post(f"{self.url}/v1/predict", json={"text": TEXTS[i % len(TEXTS)]})
                    if response.is_success:
                        self.answered.append(response.json()["id"])
                    else:
                        self.failures.append(f"{response.status_code} {response.text[:200]}")
                except httpx.HTTPError as exc:
                    self.failures.append(repr(exc))
                self.slowest = max(self.slowest, time.monotonic() - started)
                i += 1
                next_at += 1 / RATE
                self._stop.wait(max(0.0, next_at - time.monotonic()))

    def __enter__(self) -> Load:
        self._thread = threading.Thread(target=self._run, name="load", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(15)


@pytest.fixture
def pg_service(store: ModelRegistry, tmp_path: Path, postgres_url: str) -> Iterator[Service]:  # noqa: F811
    running = start_service(
        store,
        tmp_path / "gunicorn.log",
        SENTIMENT_DATABASE_URL=postgres_url,
        SENTIMENT_DATABASE_CONNECT_TIMEOUT_SECONDS=str(CONNECT_TIMEOUT),
        SENTIMENT_DATABASE_STATEMENT_TIMEOUT_SECONDS=str(STATEMENT_TIMEOUT),
        SENTIMENT_PREDICTION_LOG_FLUSH_SECONDS="0.2",
    )
    yield running
    running.stop()


def _timed(method: str, url: str, **kwargs: object) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    response = httpx.request(method, url, timeout=30, **kwargs)  # type: ignore[arg-type]
    return response, time.monotonic() - started


def test_a_database_outage_loses_no_prediction_and_no_logged_row(
    pg_service: Service,
    postgres: PostgresCluster,  # noqa: F811
    postgres_url: str,  # noqa: F811
) -> None:
    """Stopping PostgreSQL for 30 s under load: every prediction answered, feedback a prompt 503, health and
    metrics prompt, and every answered prediction in the log a few seconds after the database returns."""
    engine = create_engine(postgres_url, pool_pre_ping=True)  # its pooled connections die with the outage

    def logged() -> set[str]:
        with engine.connect() as conn:
            return set(conn.scalars(select(predictions.c.id)))

    url = pg_service.url
    with Load(url) as load:
        assert wait_for(lambda: len(load.answered) >= RATE and load.answered[0] in logged(), timeout=15)
        labelled_later = load.answered[0]

        slowest: dict[str, float] = {"healthz": 0.0, "metrics": 0.0, "feedback": 0.0}
        feedback_codes: set[tuple[int, str]] = set()
        during = 0
        with postgres.outage():
            down_since = time.monotonic()
            while time.monotonic() - down_since < OUTAGE_SECONDS:
                for name, method, path in (("healthz", "GET", "/healthz"), ("metrics", "GET", "/metrics")):
                    response, took = _timed(method, f"{url}{path}")
                    assert response.status_code == 200, (name, response.text[:200])
                    slowest[name] = max(slowest[name], took)
                response, took = _timed(
                    "POST",
                    f"{url}/v1/feedback",
                    json={"prediction_id": labelled_later, "label": "positive"},
                    headers=FEEDBACK,
                )
                feedback_codes.add((response.status_code, response.json()["error"]["code"]))
                slowest["feedback"] = max(slowest["feedback"], took)
                time.sleep(1)
            during = len(load.answered)
        back_at = time.monotonic()
        # The load keeps going while the workers write out what they buffered during the outage.
        recovered = wait_for(lambda: set(load.answered[:during]) <= logged(), timeout=10, every=0.2)
        recovery_seconds = time.monotonic() - back_at
        time.sleep(1)
    answered = list(load.answered)
    assert load.failures == [], load.failures[:5]
    assert len(answered) > RATE * OUTAGE_SECONDS * 0.8, load.slowest  # the load really ran through the outage

    assert feedback_codes == {(503, "storage_unavailable")}
    assert slowest["feedback"] < 2 * CONNECT_TIMEOUT + STATEMENT_TIMEOUT
    assert slowest["healthz"] < 1 and slowest["metrics"] < 1, slowest

    assert recovered, f"{len(set(answered[:during]) - logged())} of {during} answered rows never reached the log"
    assert recovery_seconds < 5
    assert wait_for(lambda: set(answered) <= logged(), timeout=5, every=0.2)
    with engine.connect() as conn:
        rows = conn.execute(select(predictions.c.id)).all()
    assert len(rows) == len(set(answered)), "a buffered row was written twice"

    response = httpx.post(
        f"{url}/v1/feedback", json={"prediction_id": labelled_later, "label": "positive"}, headers=FEEDBACK, timeout=10
    )
    assert response.status_code == 200, response.text
    events = [e.get("event") for e in pg_service.logs()]
    assert "prediction_log_write_failed" in events and "prediction_log_recovered" in events
    engine.dispose()
