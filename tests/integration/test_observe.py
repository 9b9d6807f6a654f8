"""The whole service as scripts/serve runs it: supervisor, two gunicorn workers, one drift monitor."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.ml.data import Corpus, load_clothing
from app.ml.registry import ModelRegistry
from tests.integration.services import Service, start_service, wait_for

pytestmark = pytest.mark.integration

WINDOW = 200


@pytest.fixture
def full_service(store: ModelRegistry, tmp_path: Path) -> Iterator[Service]:
    running = start_service(
        store,
        tmp_path / "service.log",
        supervised=True,
        SENTIMENT_DRIFT_WINDOW_SIZE=str(WINDOW),
        SENTIMENT_DRIFT_CHECK_EVERY_PREDICTIONS="50",
        SENTIMENT_DRIFT_CHECK_INTERVAL_SECONDS="2",
        SENTIMENT_DRIFT_STATUS_REFRESH_SECONDS="0.5",
        SENTIMENT_PREDICTION_LOG_FLUSH_SECONDS="0.2",
    )
    yield running
    assert running.stop() == 0


def scrape(service: Service) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"{service.url}/metrics", timeout=10).text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def predict_all(service: Service, texts: list[str], size: int = 25) -> list[dict[str, object]]:
    out = []
    with httpx.Client(base_url=service.url, timeout=30) as client:
        for start in range(0, len(texts), size):
            response = client.post("/v1/predict/batch", json={"texts": texts[start : start + size]})
            assert response.status_code == 200, response.text
            out.append(response.json())
    return out


def fresh_connections(service: Service, n: int) -> None:
    for i in range(n):  # a new connection each time, so both workers take some
        assert httpx.post(f"{service.url}/v1/predict", json={"text": f"fine film {i}"}).status_code == 200


def test_counters_sum_across_workers_and_survive_a_killed_worker(full_service: Service) -> None:
    fresh_connections(full_service, 60)
    served_by = {
        e["pid"]
        for e in full_service.logs()
        if e.get("event") == "request" and e.get("status") == 200 and e.get("route") == "/v1/predict"
    }
    assert len(served_by) == 2  # both workers answered some
    version = httpx.get(f"{full_service.url}/readyz").json()["model_version"]

    def counted(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> tuple[float, float]:
        """(predictions, /v1/predict requests) in a scrape."""
        predicted = sum(
            value(samples, "sentiment_predictions_total", model_version=version, sentiment=s)
            for s in ("positive", "negative")
        )
        route = {"method": "POST", "route": "/v1/predict", "status": "200"}
        return predicted, value(samples, "sentiment_request_duration_seconds_count", **route)

    # The worker that does not serve the scrape writes its counts within SENTIMENT_METRICS_WRITE_SECONDS (0.25).
    wait_for(lambda: min(counted(scrape(full_service))) >= 60, timeout=5, every=0.05)
    before = scrape(full_service)
    assert counted(before) == (60, 60)
    victim = full_service.worker_pids()[0]
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: victim not in full_service.worker_pids() and len(full_service.worker_pids()) == 2)
    wait_for(lambda: httpx.get(f"{full_service.url}/readyz").status_code == 200)
    after = scrape(full_service)
    assert counted(after)[0] == 60
    assert value(after, "sentiment_model_info", version=version) == 1.0


def test_in_domain_traffic_stays_quiet_and_clothing_reviews_flip_the_drift_flag(
    full_service: Service, rotten_tomatoes: Corpus, small_corpus: Corpus
) -> None:
    used = set(small_corpus.texts)
    in_domain = random.Random(0).sample([t for t in rotten_tomatoes.texts if t not in used], WINDOW + 50)
    predict_all(full_service, in_domain)
    quiet = wait_for(
        lambda: [
            c for c in httpx.get(f"{full_service.url}/v1/drift").json()["history"] if c["status"] != "insufficient_data"
        ]
    )
    assert quiet and not quiet[0]["drift"]
    assert value(scrape(full_service), "sentiment_drift_detected") == 0.0

    clothing = load_clothing().texts[:WINDOW]
    started = time.monotonic()
    predict_all(full_service, clothing)
    flagged = wait_for(lambda: httpx.get(f"{full_service.url}/v1/drift").json()["current"]["drift"])
    assert flagged, "drift not detected"
    assert time.monotonic() - started < 60
    assert value(scrape(full_service), "sentiment_drift_detected") == 1.0
    assert value(scrape(full_service), "sentiment_drift_p_value") < 0.01
    response = wait_for(
        lambda: (
            (r := httpx.post(f"{full_service.url}/v1/predict", json={"text": "Runs small, order a size up."}).json())[
                "drift"
            ]["drift"]
            and r
        )
    )
    assert response["drift"]["status"] == "drift" and response["drift"]["checked_at"]


def test_a_killed_drift_monitor_is_restarted(full_service: Service) -> None:
    first = wait_for(full_service.monitor_pid)
    assert first
    os.kill(first, signal.SIGKILL)
    second = wait_for(lambda: (pid := full_service.monitor_pid()) and pid != first and pid)
    assert second and second != first
    events = [e.get("event") for e in full_service.logs()]
    assert "drift_monitor_exited" in events and events.count("drift_monitor_spawned") >= 2
    # The new monitor checks again.
    fresh_connections(full_service, 5)
    assert wait_for(
        lambda: [
            e
            for e in full_service.logs()
            if e.get("pid") == second and e.get("event") in {"drift_checked", "drift_detected"}
        ]
    )


def test_an_unavailable_database_never_fails_a_prediction(full_service: Service) -> None:
    db = Path(full_service.env["SENTIMENT_STATE_DIR"]) / "predictions.db"
    wait_for(db.exists)
    locker = sqlite3.connect(db, timeout=1, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")  # nobody else can write (or, in WAL mode, checkpoint) now
    try:
        started = time.monotonic()
        fresh_connections(full_service, 40)
        assert time.monotonic() - started < 20  # no request waited for the database
        failed = wait_for(
            lambda: value(scrape(full_service), "sentiment_prediction_log_errors_total", reason="write_failed"),
            timeout=30,
        )
        assert failed >= 1
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    # Once the database is back, the buffered rows are written.
    check = sqlite3.connect(db)
    try:
        assert wait_for(
            lambda: check.execute("select count(*) from predictions where text like 'fine film %'").fetchone()[0] == 40,
            timeout=30,
        )
    finally:
        check.close()
