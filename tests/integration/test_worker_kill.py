"""SIGKILL of a gunicorn worker under load: the predictions it answered still reach the prediction log."""

from __future__ import annotations

import os
import signal
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from app.ml.registry import ModelRegistry
from tests.integration.services import Service, start_service, wait_for

pytestmark = pytest.mark.integration

SECONDS = 6.0
CLIENTS = 8
FLUSH_SECONDS = 600
TEXTS = ["A brilliant, funny and deeply moving film.", "A dull, tedious and boring mess.", "not bad at all", "meh"]


@dataclass
class Load:
    """Client threads posting predictions back to back, each on a fresh connection (both workers get some)."""

    url: str
    answered: list[tuple[float, str]] = field(default_factory=list)  # (time answered, prediction id) of each 2xx
    failures: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def _run(self, offset: int) -> None:
        i = offset
        while not self._stop.is_set():
            try:
                response = httpx.post(f"{self.url}/v1/predict", json={"text": TEXTS[i % len(TEXTS)]}, timeout=10)
                if response.is_success:
                    self.answered.append((time.monotonic(), response.json()["id"]))
                else:
                    self.failures.append(str(response.status_code))
            except httpx.HTTPError as exc:  # the killed worker's requests in flight
                self.failures.append(type(exc).__name__)
            i += 1

    def __enter__(self) -> Load:
        self._threads = [threading.Thread(target=self._run, args=(n,), daemon=True) for n in range(CLIENTS)]
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(15)


@pytest.fixture
def service(store: ModelRegistry, tmp_path: Path) -> Iterator[Service]:
    # No timed flush during the test: each worker writes its rows at start (none yet) and when it stops, so
    # every row the killed worker answered is in its spool when it dies, wherever the kill falls. With the
    # default 0.5 s a kill just after a flush can find nothing to adopt (one CI run did).
    running = start_service(store, tmp_path / "gunicorn.log", SENTIMENT_PREDICTION_LOG_FLUSH_SECONDS=str(FLUSH_SECONDS))
    yield running
    running.stop()


def logged_ids(service: Service, ids: list[str]) -> set[str]:
    database = Path(service.env["SENTIMENT_STATE_DIR"]) / "predictions.db"
    found: set[str] = set()
    with sqlite3.connect(database, timeout=10) as conn:
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            found.update(r[0] for r in conn.execute(f"SELECT id FROM predictions WHERE id IN ({marks})", chunk))
    return found


def test_sigkill_of_a_worker_under_load_loses_at_most_2_percent_of_answered_predictions(service: Service) -> None:
    """>= 98 % of the ids answered 2xx are logged after one worker is SIGKILLed mid-load (its rows through its
    spool); the service keeps answering."""
    victim = service.worker_pids()[0]
    with Load(service.url) as load:
        time.sleep(SECONDS / 2)
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        time.sleep(SECONDS / 2)
    ids = [prediction_id for _, prediction_id in load.answered]
    after_kill = sum(1 for answered_at, _ in load.answered if answered_at > killed_at + 0.5)
    served_by_victim = [
        e
        for e in service.logs()
        if e.get("event") == "request" and e.get("route") == "/v1/predict" and e.get("pid") == victim
    ]

    def adoptions() -> list[dict[str, object]]:
        return [e for e in service.logs() if e.get("event") == "prediction_spool_adopted" and e.get("owner")]

    # The killed worker's replacement adopts its spool as it starts (the survivor would at its next timed flush).
    adopted = wait_for(adoptions, timeout=60)
    assert service.stop() == 0  # the survivors write their own rows as they stop
    missing = len(ids) - len(logged_ids(service, ids))
    rows = sum(int(str(e["rows"])) for e in adopted)
    print(f"answered {len(ids)}, {len(served_by_victim)} by the killed worker; adopted {rows}; not logged {missing}")
    assert len(served_by_victim) >= 10  # the killed worker was serving (a fifth to a third of the answers here)
    assert after_kill > 0.2 * len(ids)  # the service kept answering
    assert missing <= 0.02 * len(ids)
    # It wrote none of its rows to the database, so all it answered came back through its spool (rows in flight
    # when it died were spooled too, without a request line).
    assert rows >= len(served_by_victim)
