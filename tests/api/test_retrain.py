"""Alert webhooks and admin retrain endpoints over HTTP, with the real payloads and a real retrain process."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import pytest
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY

from app.main import create_app
from app.retrain.alerts import Notification, WebhookConfigurationError
from app.retrain.webhooks import SOURCES, WebhookSource, header_credentials
from app.settings import Settings
from app.storage.drift_checks import DriftCheck
from tests.conftest import ADMIN_TOKEN, WEBHOOK_TOKEN

PAYLOADS = Path(__file__).resolve().parents[1] / "fixtures" / "payloads"
HOOK = {"Authorization": f"Bearer {WEBHOOK_TOKEN}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def payload(name: str, **changes: Any) -> dict[str, Any]:
    body = json.loads((PAYLOADS / name).read_text())
    for alert in body["alerts"]:
        alert.update(changes)
    return body


def wait_job(client: TestClient, job_id: str, timeout: float = 120) -> dict[str, Any]:
    """Until the job is recorded as done and its process let go of the retrain lock."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/retrain/jobs/{job_id}", headers=ADMIN).json()
        if job["status"] != "running" and "sentiment_retrain_in_progress 0" in client.get("/metrics").text:
            return job  # type: ignore[no-any-return]
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} still running")


@pytest.fixture
def hooks(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings.model_copy(update={"retrain_cooldown_seconds": 3600}))) as client:
        yield client


def test_firing_alert_starts_one_retrain_its_resends_are_duplicates_while_it_runs(hooks: TestClient) -> None:
    first = hooks.post("/v1/webhooks/alertmanager", json=payload("alertmanager-firing.json"), headers=HOOK)
    assert first.status_code == 202 and first.json()["status"] == "retrain_started" and first.json()["job_id"]
    again = hooks.post("/v1/webhooks/alertmanager", json=payload("alertmanager-firing.json"), headers=HOOK)
    assert again.status_code == 202 and again.json()["status"] in {"duplicate"}
    job = wait_job(hooks, first.json()["job_id"])
    # No feedback was ever labelled: nothing to learn, no copy of the same model.
    assert job["status"] == "succeeded" and job["outcome"] == "skipped_no_new_labels"
    assert job["trigger"] == "alertmanager"
    # A new firing within the cooldown starts nothing.
    later = payload("alertmanager-firing.json", fingerprint="another", startsAt="2026-11-27T02:00:00Z")
    cooled = hooks.post("/v1/webhooks/alertmanager", json=later, headers=HOOK).json()
    assert cooled["status"] == "cooldown" and cooled["retry_after_seconds"] > 3000
    # The skipped retrain released its firing: the drift persists, so its next re-send may try again
    # once the cooldown has passed.
    resent = hooks.post("/v1/webhooks/alertmanager", json=payload("alertmanager-firing.json"), headers=HOOK).json()
    assert resent["status"] == "cooldown"


def test_a_firing_whose_retrain_did_not_promote_is_retried_by_its_next_resend(settings: Settings) -> None:
    with TestClient(create_app(settings.model_copy(update={"retrain_cooldown_seconds": 0}))) as client:
        body = payload("alertmanager-firing.json")
        first = client.post("/v1/webhooks/alertmanager", json=body, headers=HOOK).json()
        assert wait_job(client, first["job_id"])["outcome"] == "skipped_no_new_labels"
        again = client.post("/v1/webhooks/alertmanager", json=body, headers=HOOK).json()
        assert again["status"] == "retrain_started" and again["job_id"] != first["job_id"]
        wait_job(client, again["job_id"])
        assert len(client.get("/v1/retrain/jobs", headers=ADMIN).json()) == 2


def test_resolved_and_unconfigured_alerts_are_acknowledged_and_ignored(hooks: TestClient) -> None:
    resolved = hooks.post("/v1/webhooks/alertmanager", json=payload("alertmanager-resolved.json"), headers=HOOK)
    assert resolved.status_code == 202 and resolved.json()["status"] == "ignored"
    other = payload("alertmanager-firing.json", labels={"alertname": "HighLatency"})
    assert hooks.post("/v1/webhooks/alertmanager", json=other, headers=HOOK).json()["status"] == "ignored"
    assert hooks.get("/v1/retrain/jobs", headers=ADMIN).json() == []


@pytest.mark.parametrize(
    "headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {WEBHOOK_TOKEN}"}]
)
def test_webhooks_without_the_right_credentials_are_401_and_do_nothing(
    hooks: TestClient, headers: dict[str, str]
) -> None:
    for path, name in (("alertmanager", "alertmanager-firing.json"), ("grafana", "grafana-firing.json")):
        response = hooks.post(f"/v1/webhooks/{path}", json=payload(name), headers=headers)
        assert response.status_code == 401 and response.json()["error"]["code"] == "unauthorized"
    assert hooks.get("/v1/retrain/jobs", headers=ADMIN).json() == []


def test_grafana_webhook_with_bearer_and_hmac_signature_over_a_fresh_timestamp(settings: Settings) -> None:
    """With an HMAC secret the signature covers ``<timestamp>:<body>`` by default: a body-only signature (a
    captured request without its time) and a stale timestamp are refused; a fresh signed one starts a retrain."""
    signed = settings.model_copy(update={"grafana_hmac_secret": "hmac-key", "retrain_cooldown_seconds": 3600})
    body = (PAYLOADS / "grafana-firing.json").read_bytes()
    headers = {**HOOK, "Content-Type": "application/json"}

    def sign(stamp: int | None) -> dict[str, str]:
        message = body if stamp is None else f"{stamp}:".encode() + body
        signature = {"X-Grafana-Alerting-Signature": hmac.new(b"hmac-key", message, hashlib.sha256).hexdigest()}
        return {**headers, **signature, **({} if stamp is None else {"X-Grafana-Alerting-Timestamp": str(stamp)})}

    with TestClient(create_app(signed)) as client:
        for refused in (headers, sign(None), sign(int(time.time()) - 301)):
            response = client.post("/v1/webhooks/grafana", content=body, headers=refused)
            assert response.status_code == 401 and response.json()["error"]["code"] == "unauthorized"
        ok = client.post("/v1/webhooks/grafana", content=body, headers=sign(int(time.time())))
        assert ok.status_code == 202 and ok.json()["status"] == "retrain_started"
        wait_job(client, ok.json()["job_id"])


@pytest.mark.parametrize(
    "stamp", [b"abc", b"NaN", b"inf", b"-1", b"1e9", b"\xb2", b"\xb9\xb2\xb3", "١٢٣".encode(), b"9" * 5000]
)
def test_grafana_timestamp_that_is_not_unix_seconds_is_401(settings: Settings, stamp: bytes) -> None:
    """A timestamp header that is not plain ASCII digits (NaN, inf, latin-1 superscripts, Arabic-Indic digits,
    5,000 digits) is a failed credential, signed correctly or not: 401, never a 500."""
    signed = settings.model_copy(update={"grafana_hmac_secret": "hmac-key"})
    body = b"{}"
    signature = hmac.new(b"hmac-key", stamp + b":" + body, hashlib.sha256).hexdigest()
    headers = {
        **HOOK,
        "Content-Type": "application/json",
        "X-Grafana-Alerting-Signature": signature,
        "X-Grafana-Alerting-Timestamp": stamp,
    }
    with TestClient(create_app(signed), raise_server_exceptions=False) as client:
        response = client.post("/v1/webhooks/grafana", content=body, headers=headers)
    assert response.status_code == 401 and response.json()["error"]["code"] == "unauthorized"


def test_malformed_notifications_are_422(hooks: TestClient) -> None:
    wrong_version = payload("alertmanager-firing.json") | {"version": "3"}
    response = hooks.post("/v1/webhooks/alertmanager", json=wrong_version, headers=HOOK)
    assert response.status_code == 422 and response.json()["error"]["code"] == "invalid_input"
    assert hooks.post("/v1/webhooks/grafana", json={"alerts": "x"}, headers=HOOK).status_code == 422
    assert (
        hooks.post(
            "/v1/webhooks/grafana", content=b"{", headers={**HOOK, "Content-Type": "application/json"}
        ).status_code
        == 422
    )


def test_admin_endpoints_need_the_admin_token(hooks: TestClient) -> None:
    for headers in ({}, HOOK, {"Authorization": "Bearer nope"}):
        assert hooks.post("/v1/retrain", headers=headers).status_code == 401
        assert hooks.get("/v1/retrain/jobs", headers=headers).status_code == 401
    started = hooks.post("/v1/retrain", headers=ADMIN)
    assert started.status_code == 202 and started.json()["status"] == "retrain_started"
    job = wait_job(hooks, started.json()["job_id"])
    assert job["trigger"] == "manual" and job["finished_at"]
    assert [j["id"] for j in hooks.get("/v1/retrain/jobs", headers=ADMIN).json()] == [job["id"]]
    missing = hooks.get("/v1/retrain/jobs/nope", headers=ADMIN)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "job_not_found"


def test_service_refuses_to_start_without_webhook_credentials(settings: Settings) -> None:
    with pytest.raises(WebhookConfigurationError):
        create_app(settings.model_copy(update={"webhook_token": None}))
    create_app(settings.model_copy(update={"webhook_token": None, "allow_unauthenticated_webhooks": True}))


def test_every_registered_source_has_its_route_documented_with_its_payload(hooks: TestClient) -> None:
    paths = hooks.get("/openapi.json").json()["paths"]
    for source in SOURCES:
        operation = paths[f"/v1/webhooks/{source.name}"]["post"]
        schema = operation["requestBody"]["content"]["application/json"]["schema"]
        assert schema["title"] == source.payload.__name__ and operation["summary"] == source.summary
        assert schema["properties"]["alerts"]["items"]["properties"]["status"]["enum"] == ["firing", "resolved"]
        assert {"202", "401", "422", "503"} <= operation["responses"].keys()


class ProbeNotification(Notification):
    """A test-only sender's body."""

    version: Literal["probe-1"]


PROBE = WebhookSource(
    name="probe",
    summary="Test-only source",
    payload=ProbeNotification,
    checks=lambda settings: (header_credentials(settings),),
)


def test_a_source_registered_in_a_fresh_app_reaches_the_launcher(hooks: TestClient, settings: Settings) -> None:
    body = payload("alertmanager-firing.json") | {"version": "probe-1"}
    assert hooks.post("/v1/webhooks/probe", json=body, headers=HOOK).status_code == 404  # not registered there
    with TestClient(create_app(settings, sources=(*SOURCES, PROBE))) as client:
        assert client.post("/v1/webhooks/probe", json=body).status_code == 401
        wrong = client.post("/v1/webhooks/probe", json=payload("alertmanager-firing.json"), headers=HOOK)
        assert wrong.status_code == 422 and "not a probe webhook notification" in wrong.text
        started = client.post("/v1/webhooks/probe", json=body, headers=HOOK)
        assert started.status_code == 202 and started.json()["status"] == "retrain_started"
        assert wait_job(client, started.json()["job_id"])["trigger"] == "probe"
        assert "/v1/webhooks/probe" in client.get("/openapi.json").json()["paths"]


def retrain_skips(source: str = "alertmanager") -> float:
    labels = {"trigger": source, "outcome": "skipped_harmless_drift"}
    return REGISTRY.get_sample_value("sentiment_retrain_total", labels) or 0.0


def test_with_a_drop_threshold_harmless_drift_is_acknowledged_without_a_retrain(
    settings: Settings,
    drift_check: Callable[[list[str]], DriftCheck],
    joined_reviews: list[str],
    tweets: list[str],
) -> None:
    """SENTIMENT_RETRAIN_MIN_ESTIMATED_DROP_POINTS=2: longer film reviews (drift, no estimated drop) retrain
    nothing; tweets (about 5 points below the reference) do, and the job records the check and the figures."""
    gated = settings.model_copy(update={"retrain_min_estimated_drop_points": 2.0, "retrain_cooldown_seconds": 0})
    with TestClient(create_app(gated)) as client:
        harmless = drift_check(joined_reviews)
        assert harmless.drift and harmless.explanation is not None
        before = retrain_skips()
        answer = client.post("/v1/webhooks/alertmanager", json=payload("alertmanager-firing.json"), headers=HOOK)
        assert answer.status_code == 202 and answer.json()["status"] == "skipped_harmless_drift"
        assert answer.json()["job_id"] is None and f"drift check {harmless.id}" in answer.json()["detail"]
        assert client.get("/v1/retrain/jobs", headers=ADMIN).json() == []
        assert retrain_skips() == before + 1
        harmful = drift_check(tweets)
        started = client.post("/v1/webhooks/alertmanager", json=payload("alertmanager-firing.json"), headers=HOOK)
        assert started.json()["status"] == "retrain_started"  # the firing was not claimed by the skip
        job = wait_job(client, started.json()["job_id"])
    gate = job["details"]["estimated_accuracy_gate"]
    assert gate["decision"] == "retrain" and gate["check_id"] == harmful.id and gate["drop_points"] >= 2.0
    assert gate["threshold_points"] == 2.0 and gate["estimated_accuracy"] == harmful.estimated_accuracy
    recorded = job["details"]["drift_check"]
    assert recorded["id"] == harmful.id and recorded["explanation"] == harmful.explanation
    assert job["outcome"] == "skipped_no_new_labels"  # how it ended stays next to what triggered it


def test_without_a_drop_threshold_drift_alone_retrains(
    settings: Settings, drift_check: Callable[[list[str]], DriftCheck], joined_reviews: list[str]
) -> None:
    """The default: the estimate does not hold a drift alert back; the job still records the drift check."""
    assert settings.retrain_min_estimated_drop_points is None
    with TestClient(create_app(settings)) as client:
        harmless = drift_check(joined_reviews)
        before = retrain_skips()
        started = client.post("/v1/webhooks/alertmanager", json=payload("alertmanager-firing.json"), headers=HOOK)
        assert started.json()["status"] == "retrain_started"
        job = wait_job(client, started.json()["job_id"])
    assert retrain_skips() == before
    assert "estimated_accuracy_gate" not in job["details"]
    assert job["details"]["drift_check"]["id"] == harmless.id
