"""The retrain guard under real concurrency: two gunicorn workers, 50 simultaneous alerts, a killed retrain."""

from __future__ import annotations

import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from app.ml.data import Corpus
from app.ml.registry import ModelRegistry
from app.storage.database import Database
from app.storage.predictions import PredictionRepository
from tests.integration.services import Service, start_service, wait_for
from tests.traffic import log_predictions

pytestmark = pytest.mark.integration

PAYLOAD = json.loads(
    (Path(__file__).resolve().parents[1] / "fixtures" / "payloads" / "alertmanager-firing.json").read_text()
)
HOOK = {"Authorization": "Bearer integration-webhook-token"}
ADMIN = {"Authorization": "Bearer integration-admin-token"}


def jobs(service: Service) -> list[dict[str, object]]:
    return httpx.get(f"{service.url}/v1/retrain/jobs", headers=ADMIN, timeout=10).json()  # type: ignore[no-any-return]


def in_progress(service: Service) -> float:
    for line in httpx.get(f"{service.url}/metrics", timeout=10).text.splitlines():
        if line.startswith("sentiment_retrain_in_progress "):
            return float(line.split()[1])
    raise AssertionError("sentiment_retrain_in_progress missing")


def test_fifty_concurrent_identical_alerts_start_exactly_one_retrain(store: ModelRegistry, tmp_path: Path) -> None:
    service = start_service(store, tmp_path / "service.log", SENTIMENT_ADMIN_TOKEN="integration-admin-token")
    try:

        def post(_: int) -> str:
            response = httpx.post(f"{service.url}/v1/webhooks/alertmanager", json=PAYLOAD, headers=HOOK, timeout=30)
            assert response.status_code == 202
            return str(response.json()["status"])

        with ThreadPoolExecutor(50) as pool:
            statuses = list(pool.map(post, range(50)))
        assert statuses.count("retrain_started") == 1, statuses
        # A late one may find the retrain over (no labels: it released the firing) and meet the cooldown.
        assert set(statuses) <= {"retrain_started", "already_running", "duplicate", "cooldown"}
        assert len(jobs(service)) == 1
        served_by = {
            e["pid"]
            for e in service.logs()
            if e.get("event") == "request" and e.get("route") == "/v1/webhooks/alertmanager"
        }
        assert len(served_by) == 2  # both workers took part in the race
    finally:
        service.stop()


def test_a_killed_retrain_frees_the_lock_leaves_no_version_and_is_marked_failed(
    full_store: tuple[Path, str], tmp_path: Path, rotten_tomatoes: Corpus
) -> None:
    import shutil

    from app.ml.data import load_tweets

    root = tmp_path / "model_store"
    shutil.copytree(full_store[0], root)
    store = ModelRegistry(root)
    service = start_service(
        store,
        tmp_path / "service.log",
        SENTIMENT_ADMIN_TOKEN="integration-admin-token",
        SENTIMENT_RETRAIN_COOLDOWN_SECONDS="0",
    )
    try:
        # Enough real labels that the retrain trains for a while.
        database = Database(f"sqlite:///{Path(service.env['SENTIMENT_STATE_DIR']) / 'predictions.db'}")
        log_store = PredictionRepository(database)
        tweets = load_tweets()
        model = store.load(full_store[1])
        log_predictions(log_store, model.model, model.version, tweets.texts[:1500], tweets.labels[:1500])
        started = httpx.post(f"{service.url}/v1/retrain", headers=ADMIN, timeout=10).json()
        assert started["status"] == "retrain_started"
        job_pid = wait_for(
            lambda: next((pid for pid, (_, cmd) in service.descendants().items() if "app.retrain.job" in cmd), None),
            30,
            every=0.1,
        )
        assert job_pid and in_progress(service) == 1.0
        time.sleep(2)  # mid-training
        os.kill(job_pid, signal.SIGKILL)
        assert wait_for(lambda: in_progress(service) == 0.0, 20, every=0.2)
        (job,) = jobs(service)
        assert job["status"] == "failed" and job["outcome"] == "failed"
        assert [v.version for v in store.versions()] == [full_store[1]]
        assert store.current_version() == full_store[1]
        # The lock is free: the next retrain starts (and this time finishes).
        again = httpx.post(f"{service.url}/v1/retrain", headers=ADMIN, timeout=10).json()
        assert again["status"] == "retrain_started"
    finally:
        service.stop()
