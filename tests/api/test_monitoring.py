"""Feedback, drift status and the metrics page over HTTP."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY

from app.main import create_app
from app.monitoring.metric_writes import WRITES
from app.services import Services
from app.settings import Settings
from app.storage.drift_checks import DriftCheck
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
    predictions = services(client).storage.predictions
    deadline = time.monotonic() + 2
    while predictions.count_predictions() < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert predictions.count_predictions() >= 3


def test_a_worker_writes_its_gathered_metrics_when_it_serves_a_scrape_and_when_it_stops(settings: Settings) -> None:
    """SENTIMENT_METRICS_WRITE_SECONDS: counts wait for the interval, a scrape by the same worker writes them at once,
    and a graceful stop writes what is left."""
    slow = settings.model_copy(update={"metrics_write_seconds": 30.0})
    with TestClient(create_app(slow)) as client:
        labels = {"model_version": client.get("/readyz").json()["model_version"], "sentiment": "positive"}
        before = REGISTRY.get_sample_value("sentiment_predictions_total", labels) or 0.0
        assert WRITES.interval == 30.0
        client.post("/v1/predict/batch", json={"texts": ["Loved every minute of it."] * 3})
        assert (REGISTRY.get_sample_value("sentiment_predictions_total", labels) or 0.0) == before
        client.get("/metrics")
        assert REGISTRY.get_sample_value("sentiment_predictions_total", labels) == before + 3
        client.post("/v1/predict", json={"text": "Loved every minute of it."})
    assert REGISTRY.get_sample_value("sentiment_predictions_total", labels) == before + 4
    assert WRITES.interval == 0.0  # the process's default again


def test_drift_endpoint_reports_current_status_and_history(client: TestClient) -> None:
    drift_checks = services(client).storage.drift_checks
    for i, status in enumerate(["insufficient_data", "no_drift", "drift"]):
        drift_checks.insert(
            DriftCheck(
                checked_at=1_800_000_000.0 + i,
                model_version="v",
                status=status,
                drift=status == "drift",
                score=0.1 * i,
                p_value=0.5 - 0.2 * i,
                threshold=0.01,
                window_size=500,
                details={},
            )
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
        assert services(client).storage.predictions.count_predictions() == 0


def test_drift_reports_the_estimate_next_to_the_reference_and_live_accuracy(
    client: TestClient, drift_check: Callable[[list[str]], DriftCheck], tweets: list[str]
) -> None:
    """/v1/drift: the latest full window's estimate and band, its reference, the realised accuracy from feedback."""
    empty = client.get("/v1/drift").json()
    assert empty["estimated_accuracy"] is None and empty["explanation"] is None
    assert empty["live_accuracy"] == {"accuracy": None, "labelled": 0, "window": 500}
    labelled = predict(client, "A dull, tedious and boring mess.")
    client.post("/v1/feedback", json={"prediction_id": labelled["id"], "label": "negative"}, headers=FEEDBACK)
    check = drift_check(tweets)
    body = client.get("/v1/drift").json()
    estimated = body["estimated_accuracy"]
    assert estimated["check_id"] == check.id and estimated["model_version"] == check.model_version
    assert estimated["estimate"] == check.estimated_accuracy and estimated["window_size"] == 200
    assert estimated["low"] < estimated["estimate"] < estimated["high"] and estimated["method"] == "confidence"
    reference = estimated["reference"]
    assert reference["method"] == "confidence" and reference["window_size"] > 200
    assert estimated["drop_points"] == round((reference["estimate"] - estimated["estimate"]) * 100, 2) > 2
    assert body["live_accuracy"] == {"accuracy": 1.0, "labelled": 1, "window": 500}
    (latest,) = body["history"][:1]
    assert latest["id"] == check.id and latest["estimated_accuracy"] == check.estimated_accuracy
    assert latest["explained"] is True


def test_drift_shows_the_latest_explanation_and_each_check_by_id(
    client: TestClient, drift_check: Callable[[list[str]], DriftCheck], tweets: list[str]
) -> None:
    """The explanation of the latest flagged check as stored (terms as text, live texts verbatim); 404 for no check."""
    flagged = drift_check(tweets)
    assert flagged.drift and flagged.explanation is not None
    body = client.get("/v1/drift").json()
    shown = body["explanation"]
    assert shown["check_id"] == flagged.id and shown["model_version"] == flagged.model_version
    assert shown["explanation"] == flagged.explanation
    assert {e["text"] for e in shown["explanation"]["examples"]} <= set(tweets)
    assert all(isinstance(t["term"], str) for t in shown["explanation"]["over_represented"])
    one = client.get(f"/v1/drift/checks/{flagged.id}")
    assert one.status_code == 200
    assert one.json()["explanation"] == flagged.explanation and one.json()["status"] == "drift"
    assert one.json()["id"] == flagged.id and one.json()["explained"] is True
    unexplained = services(client).storage.drift_checks.insert(
        DriftCheck(time.time(), "v", "no_drift", drift=False, window_size=500)
    )
    assert client.get(f"/v1/drift/checks/{unexplained}").json()["explanation"] is None
    missing = client.get(f"/v1/drift/checks/{unexplained + 1}")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "drift_check_not_found"
    for bad in ("0", "x", str(2**31)):
        assert client.get(f"/v1/drift/checks/{bad}").json()["error"]["code"] == "validation_error"
