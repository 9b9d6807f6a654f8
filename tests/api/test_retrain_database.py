"""The webhooks and admin retrain endpoints on a real PostgreSQL: input it cannot take is a 4xx before any query,
and a database that cannot be reached is a 503, never a 500."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, func, select
from structlog.testing import capture_logs

from app.main import create_app
from app.migrations import upgrade
from app.retrain.alerts import IDENTITY_MAX_CHARS
from app.settings import Settings
from app.storage.database import retrain_jobs, webhook_alerts
from tests.conftest import ADMIN_TOKEN, WEBHOOK_TOKEN, free_port
from tests.postgres import postgres, postgres_url  # noqa: F401  fixtures

pytestmark = pytest.mark.integration

PAYLOADS = Path(__file__).resolve().parents[1] / "fixtures" / "payloads"
HOOK = {"Authorization": f"Bearer {WEBHOOK_TOKEN}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def firing(**changes: Any) -> dict[str, Any]:
    """Alertmanager's firing drift alert with ``changes`` applied to its one alert."""
    body: dict[str, Any] = json.loads((PAYLOADS / "alertmanager-firing.json").read_text())
    body["alerts"][0].update(changes)
    return body


@pytest.fixture
def on_postgres(settings: Settings, postgres_url: str) -> Iterator[tuple[TestClient, str]]:  # noqa: F811
    """The service on a migrated PostgreSQL database, and that database's URL."""
    upgrade(postgres_url)
    with TestClient(create_app(settings.model_copy(update={"database_url": postgres_url}))) as client:
        yield client, postgres_url


def stored_rows(url: str) -> tuple[int, int]:
    """(claimed alert firings, retrain jobs) in the database."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            alerts = conn.execute(select(func.count()).select_from(webhook_alerts)).scalar_one()
            jobs = conn.execute(select(func.count()).select_from(retrain_jobs)).scalar_one()
    finally:
        engine.dispose()
    return alerts, jobs


_LONG_LABELS = {"alertname": "SentimentDriftDetected", "team": "x" * IDENTITY_MAX_CHARS}


@pytest.mark.parametrize(
    "changes",
    [
        pytest.param({"fingerprint": "1363\u00001153d00bc537"}, id="nul-fingerprint"),
        pytest.param({"startsAt": "2026-11-27T00:57:59\u0000Z"}, id="nul-startsAt"),
        pytest.param({"labels": {"alertname": "SentimentDriftDetected", "team": "a\u0000b"}}, id="nul-label-value"),
        pytest.param({"labels": {"alertname": "SentimentDriftDetected", "t\u0000": "a"}}, id="nul-label-name"),
        pytest.param({"fingerprint": "f" * 300}, id="300-char-fingerprint"),
        pytest.param({"startsAt": "2" * 300}, id="300-char-startsAt"),
        pytest.param({"fingerprint": "", "labels": _LONG_LABELS}, id="identity-from-labels-too-long"),
    ],
)
def test_a_webhook_alert_whose_identity_postgresql_cannot_store_is_422_and_stores_nothing(
    on_postgres: tuple[TestClient, str], changes: dict[str, Any]
) -> None:
    """NUL (which psycopg refuses even in a SELECT) or more than the identity column's 255 characters in the
    fields that identify a firing: the documented 422 ``invalid_input``, no query, no claim, no job."""
    client, url = on_postgres
    response = client.post("/v1/webhooks/alertmanager", json=firing(**changes), headers=HOOK)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_input" and error["details"][0]["loc"][:2] == ["alerts", 0]
    assert "x" * 50 not in response.text  # values are not echoed (a label's name is, in the error's loc)
    assert stored_rows(url) == (0, 0)


@pytest.mark.parametrize("job_id", ["a%00b", "%00" * 16, "0" * 33, "A" * 32, "nope", "x" * 300, "%C3%A9" * 16])
def test_a_job_id_no_retrain_can_have_is_404_without_a_query(on_postgres: tuple[TestClient, str], job_id: str) -> None:
    """Job ids are 32 lowercase hex digits (uuid4().hex): anything else, NUL included, is 404 job_not_found
    without echoing it, as /v1/models/{version} answers names no version can have."""
    client, _ = on_postgres
    response = client.get(f"/v1/retrain/jobs/{job_id}", headers=ADMIN)
    assert response.status_code == 404 and response.json()["error"]["code"] == "job_not_found"
    assert "\\u0000" not in response.text and "xxxxxxxx" not in response.text


def test_a_well_formed_job_id_that_is_not_stored_is_404(on_postgres: tuple[TestClient, str]) -> None:
    """The pattern lets real ids through to the database: an unknown one is looked up and not found."""
    client, _ = on_postgres
    response = client.get(f"/v1/retrain/jobs/{'0' * 32}", headers=ADMIN)
    assert response.status_code == 404 and response.json()["error"]["code"] == "job_not_found"


@pytest.fixture
def database_down(settings: Settings) -> Iterator[TestClient]:
    """The service whose PostgreSQL cannot be reached (nothing listens on its port): it starts anyway."""
    unreachable = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/sentiment"
    with TestClient(create_app(settings.model_copy(update={"database_url": unreachable}))) as client:
        yield client


@pytest.mark.parametrize(
    ("method", "path", "headers", "body"),
    [
        pytest.param("POST", "/v1/retrain", ADMIN, None, id="retrain"),
        pytest.param("POST", "/v1/webhooks/alertmanager", HOOK, firing(), id="alertmanager"),
        pytest.param("POST", "/v1/webhooks/grafana", HOOK, None, id="grafana"),
        pytest.param("GET", "/v1/retrain/jobs", ADMIN, None, id="jobs"),
        pytest.param("GET", f"/v1/retrain/jobs/{'0' * 32}", ADMIN, None, id="job"),
    ],
)
def test_with_the_database_unreachable_retrain_and_webhooks_answer_503_json(
    database_down: TestClient, method: str, path: str, headers: dict[str, str], body: dict[str, Any] | None
) -> None:
    """A database outage is 503 ``storage_unavailable`` (Alertmanager and Grafana retry), with a fixed message:
    neither the SQL nor the server's address reaches the client."""
    if path.endswith("grafana"):
        body = json.loads((PAYLOADS / "grafana-firing.json").read_text())
    with capture_logs() as logs:
        response = database_down.request(method, path, json=body, headers=headers)
    assert response.status_code == 503, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.json()["error"] == {
        "code": "storage_unavailable",
        "message": "the database is unavailable; retry later",
        "details": None,
    }
    assert "SELECT" not in response.text and "127.0.0.1" not in response.text
    failed = [e for e in logs if e["event"] == "request_failed"]
    assert failed and failed[-1]["code"] == "storage_unavailable" and failed[-1]["reason"] == "OperationalError"
