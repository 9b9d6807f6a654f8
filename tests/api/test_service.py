"""Health, readiness, model listing, request ids, access logs and errors that are not the client's."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from structlog.testing import capture_logs

from app.main import create_app
from app.ml.registry import ModelRegistry
from app.settings import Settings


def test_health_and_readiness_with_a_model(client: TestClient, versions: list[str]) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready", "model_version": versions[0]}


def test_without_a_verified_model_the_service_lives_but_is_not_ready(empty_store: ModelRegistry) -> None:
    settings = Settings(model_store=empty_store.root, state_dir=empty_store.root / "var", webhook_token="t")
    with TestClient(create_app(settings)) as client:
        assert client.get("/healthz").status_code == 200
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["status"] == "not_ready"
        response = client.post("/v1/predict", json={"text": "hello"})
        assert response.status_code == 503 and response.json()["error"]["code"] == "model_not_ready"


def test_models_lists_every_version_and_marks_the_current_one(client: TestClient, versions: list[str]) -> None:
    body = client.get("/v1/models").json()
    assert body["current"] == versions[0]
    listed = {v["version"]: v for v in body["versions"]}
    assert listed.keys() == set(versions)
    assert listed[versions[0]]["current"] and listed[versions[0]]["stage"] == "production"
    assert listed[versions[1]]["stage"] == "candidate"
    assert 0.5 < listed[versions[0]]["metrics"]["accuracy"] <= 1
    assert "model.joblib" in listed[versions[0]]["artifacts"]


def test_current_model_is_the_one_this_worker_serves(client: TestClient, versions: list[str]) -> None:
    body = client.get("/v1/models/current").json()
    assert body["version"] == versions[0] and body["current"] is True


def test_a_promoted_version_is_served_without_restart(
    client: TestClient, store: ModelRegistry, versions: list[str]
) -> None:
    import time

    store.promote(versions[1])
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if client.post("/v1/predict", json={"text": "fine"}).json()["model_version"] == versions[1]:
            break
        time.sleep(0.05)
    assert client.get("/v1/models/current").json()["version"] == versions[1]


@pytest.mark.parametrize(
    ("sent", "echoed"), [("abc-123.X_y:z", True), ("bad id with spaces", False), ("x" * 200, False), (None, False)]
)
def test_request_id_is_echoed_when_sane_and_generated_otherwise(
    client: TestClient, sent: str | None, echoed: bool
) -> None:
    headers = {"X-Request-ID": sent} if sent else {}
    got = client.get("/healthz", headers=headers).headers["X-Request-ID"]
    assert (got == sent) is echoed
    if not echoed:
        assert len(got) == 32


def test_one_access_log_line_per_request_without_the_body(client: TestClient, versions: list[str]) -> None:
    with capture_logs() as logs:
        client.post("/v1/predict", json={"text": "my secret review"}, headers={"X-Request-ID": "req-1"})
    (line,) = [e for e in logs if e["event"] == "request"]
    assert line["method"] == "POST" and line["route"] == "/v1/predict" and line["status"] == 200
    assert line["model_version"] == versions[0] and line["latency_ms"] > 0
    assert "my secret review" not in str(logs)


def test_unknown_routes_and_methods_get_json_errors(client: TestClient) -> None:
    missing = client.get("/v1/nope")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    wrong = client.get("/v1/predict")
    assert wrong.status_code == 405 and wrong.json()["error"]["code"] == "method_not_allowed"


def test_one_version_by_name_and_unknown_or_unsafe_names_are_404(client: TestClient, versions: list[str]) -> None:
    assert client.get(f"/v1/models/{versions[1]}").json()["version"] == versions[1]
    for name in ("v-nope", "..%2F..%2Fetc", ".staging-x"):
        response = client.get(f"/v1/models/{name}")
        assert response.status_code == 404, name
        assert response.json()["error"]["code"] in {"version_not_found", "not_found"}


def test_a_bug_becomes_a_json_500_without_traceback(settings: Settings) -> None:
    app = create_app(settings)

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("internal detail")

    with TestClient(app, raise_server_exceptions=False) as client, capture_logs() as logs:
        response = client.get("/boom")
    assert response.status_code == 500
    assert response.json()["error"]["code"] == "internal_error"
    assert "internal detail" not in response.text and "X-Request-ID" in response.headers
    assert any(e["event"] == "unhandled_error" for e in logs)


def test_openapi_documents_examples_and_error_shapes(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    predict = spec["paths"]["/v1/predict"]["post"]
    assert {"200", "413", "415", "422", "503"} <= predict["responses"].keys()
    assert spec["components"]["schemas"]["PredictRequest"]["examples"]
    assert client.get("/docs").status_code == 200
