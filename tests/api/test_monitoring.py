"""Feedback, drift status and the metrics page over HTTP."""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY

from app.main import create_app
from app.services import Services
from app.settings import Settings
from tests.conftest import FEEDBACK


def services(client: TestClient) -> Services:
    """The running app's services container."""
    container: Services = client.app.state.services  # type: ignore[attr-defined]
    return container


def predict(client: TestClient, text: str) -> dict[str, object]:
    response = client.post("/v1/predict", json={"text": text})
    assert response.status_code == 200
    return response.json()  # type: ignore[no-any-return]


def test_feedback_is_stored_idempotent_and_conflicts_are_refused(client: TestClient) -> None:
    prediction = predict(client, "A dull, tedious and boring mess.")
    assert prediction["sentiment"] == "negative"
    first = client.post("/v1/feedback", json={"prediction_id": prediction["id"], "label": "negative"}, headers=FEEDBACK)
    assert first.status_code == 200, first.text
    assert first.json() | {"live_accuracy": None} == {
        "prediction_id": prediction["id"],
        "label": "negative",
        "predicted": "negative",
        "correct": True,
        "already_recorded": False,
        "live_accuracy": None,
    }
    assert first.json()["live_accuracy"] == 1.0
    again = client.post("/v1/feedback", json={"prediction_id": prediction["id"], "label": "negative"}, headers=FEEDBACK)
    assert again.status_code == 200 and again.json()["already_recorded"] is True
    other = client.post("/v1/feedback", json={"prediction_id": prediction["id"], "label": "positive"}, headers=FEEDBACK)
    assert other.status_code == 409 and other.json()["error"]["code"] == "feedback_conflict"


def test_feedback_for_an_unknown_prediction_is_404(client: TestClient) -> None:
    response = client.post("/v1/feedback", json={"prediction_id": "0" * 32, "label": "positive"}, headers=FEEDBACK)
    assert response.status_code == 404 and response.json()["error"]["code"] == "prediction_not_found"


@pytest.mark.parametrize(
    "body",
    [
        {"prediction_id": "x", "label": "neutral"},
        {"prediction_id": "../x", "label": "positive"},
        {"label": "positive"},
        {"prediction_id": "x", "label": "positive", "extra": 1},
    ],
)
def test_bad_feedback_is_422(client: TestClient, body: dict[str, object]) -> None:
    assert client.post("/v1/feedback", json=body, headers=FEEDBACK).status_code == 422


def test_feedback_updates_live_accuracy_and_the_counters(client: TestClient) -> None:
    before = REGISTRY.get_sample_value("sentiment_feedback_total", {"sentiment": "positive"}) or 0.0
    ids = [predict(client, t)["id"] for t in ("Loved every minute of it.", "A dull, tedious and boring mess.")]
    for prediction_id in ids:
        client.post("/v1/feedback", json={"prediction_id": prediction_id, "label": "positive"}, headers=FEEDBACK)
    assert REGISTRY.get_sample_value("sentiment_feedback_total", {"sentiment": "positive"}) == before + 2
    assert REGISTRY.get_sample_value("sentiment_live_accuracy") == 0.5


def test_predictions_reach_the_log_and_count_in_the_metrics(client: TestClient, settings: Settings) -> None:
    labels = {"model_version": client.get("/readyz").json()["model_version"], "sentiment": "positive"}
    before = REGISTRY.get_sample_value("sentiment_predictions_total", labels) or 0.0
    client.post("/v1/predict/batch", json={"texts": ["Loved every minute of it."] * 3})
    page = client.get("/metrics")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/plain")
    assert REGISTRY.get_sample_value("sentiment_predictions_total", labels) == before + 3
    for name in (
        "sentiment_request_duration_seconds_bucket",
        "sentiment_inference_duration_seconds_bucket",
        "sentiment_prediction_confidence_bucket",
        "sentiment_text_length_chars_bucket",
        "sentiment_model_info",
    ):
        assert name in page.text
    predictions = services(client).predictions
    deadline = time.monotonic() + 2
    while predictions.count_predictions() < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert predictions.count_predictions() >= 3


def test_drift_endpoint_reports_current_status_and_history(client: TestClient) -> None:
    predictions = services(client).predictions
    for i, status in enumerate(["insufficient_data", "no_drift", "drift"]):
        predictions.insert_drift_check(
            {
                "checked_at": 1_800_000_000.0 + i,
                "model_version": "v",
                "status": status,
                "drift": status == "drift",
                "score": 0.1 * i,
                "p_value": 0.5 - 0.2 * i,
                "threshold": 0.01,
                "window_size": 500,
                "details": {},
            }
        )
    body = client.get("/v1/drift", params={"limit": 2}).json()
    assert body["current"]["status"] == "drift" and body["current"]["drift"] is True
    assert [c["status"] for c in body["history"]] == ["drift", "no_drift"]
    assert body["history"][0]["checked_at"].startswith("2027-01-15T")
    time.sleep(0.3)
    assert predict(client, "fine")["drift"]["status"] == "drift"  # type: ignore[index]
    assert client.get("/v1/drift", params={"limit": 0}).status_code == 422


def test_monitoring_off_serves_without_logging(settings: Settings) -> None:
    quiet = settings.model_copy(update={"monitoring_enabled": False})
    with TestClient(create_app(quiet)) as client:
        assert client.post("/v1/predict", json={"text": "fine"}).status_code == 200
        time.sleep(0.2)
        assert services(client).predictions.count_predictions() == 0
