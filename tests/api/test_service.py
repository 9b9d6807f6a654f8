"""Health, readiness, model listing, request ids, access logs and errors that are not the client's."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient
from structlog.testing import capture_logs

from app.api.deps import (
    DatabaseDep,
    DriftChecksDep,
    DriftStatusDep,
    FeedbackDep,
    LauncherDep,
    ModelsDep,
    PredictorDep,
    RegistryDep,
    RetrainJobsDep,
    ServicesDep,
    SettingsDep,
    WebhooksDep,
)
from app.main import create_app
from app.migrations import upgrade
from app.ml.registry import ModelRegistry
from app.monitoring.status import DriftStatus
from app.services import Services
from app.settings import Settings


def test_health_and_readiness_with_a_model(client: TestClient, versions: list[str]) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready", "model_version": versions[0]}


def test_without_a_verified_model_the_service_lives_but_is_not_ready(empty_store: ModelRegistry) -> None:
    settings = Settings(model_store=empty_store.root, state_dir=empty_store.root / "var", webhook_token="t")
    upgrade(settings.prediction_log_url)
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


@pytest.mark.parametrize("method", ["PROPFIND", "MKCOL", "PUT", "PATCH", "DELETE"])
def test_a_method_the_route_does_not_have_is_405_even_with_a_body_that_is_not_utf8(
    client: TestClient, method: str
) -> None:
    """Any other method on /v1/predict, body or not, is 405 method_not_allowed with ``Allow``, never a 422."""
    for content in (None, b"\xff\xfe not json"):
        response = client.request(method, "/v1/predict", content=content, headers={"Content-Type": "application/json"})
        assert response.status_code == 405 and response.json()["error"]["code"] == "method_not_allowed"
        assert response.headers["allow"] == "POST"


def test_request_metrics_label_only_known_methods(client: TestClient) -> None:
    """The ``method`` label takes the standard methods; a WebDAV verb is counted as ``other``."""
    client.request("PROPFIND", "/v1/predict")
    client.request("MKCOL", "/healthz")
    exposition = client.get("/metrics").text
    assert 'method="other"' in exposition
    assert "PROPFIND" not in exposition and "MKCOL" not in exposition


def test_one_version_by_name_and_unknown_or_unsafe_names_are_404(client: TestClient, versions: list[str]) -> None:
    assert client.get(f"/v1/models/{versions[1]}").json()["version"] == versions[1]
    for name in ("v-nope", "..%2F..%2Fetc", ".staging-x"):
        response = client.get(f"/v1/models/{name}")
        assert response.status_code == 404, name
        assert response.json()["error"]["code"] in {"version_not_found", "not_found"}


@pytest.mark.parametrize("name", ["a%00b", "v" * 300, "v%C3%A9" * 60, "a%5Cb", "%01", "a%0Ab"])
def test_a_version_name_the_store_cannot_hold_is_404_without_echo(
    client: TestClient, settings: Settings, name: str
) -> None:
    """NUL, control bytes, backslashes or a 300-character name: 404 version_not_found, never a 500, and
    neither the name nor the store's path comes back."""
    response = client.get(f"/v1/models/{name}")
    assert response.status_code == 404 and response.json()["error"]["code"] == "version_not_found"
    assert str(settings.model_store) not in response.text and "vvvvvvvv" not in response.text


def test_an_unreadable_secret_file_stops_the_start_naming_the_setting(settings: Settings, tmp_path: Path) -> None:
    """A ``*_FILE`` secret that cannot be read fails ``create_app`` (gunicorn does not boot) with the setting's
    name, instead of a 500 on every call that needs it."""
    missing = settings.model_copy(update={"admin_token": None, "admin_token_file": tmp_path / "absent"})
    with capture_logs() as logs, pytest.raises(ValueError, match="SENTIMENT_ADMIN_TOKEN_FILE"):
        create_app(missing)
    assert [e["setting"] for e in logs if e["event"] == "secret_unreadable"] == ["SENTIMENT_ADMIN_TOKEN_FILE"]


def test_secrets_from_the_environment_are_stripped_like_secrets_from_files(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``SENTIMENT_ADMIN_TOKEN="tok\\n"`` (a shell heredoc, a copied line) works as ``tok``, as a file would."""
    monkeypatch.setenv("SENTIMENT_ADMIN_TOKEN", "  env-admin-token\n")
    (tmp_path / "webhook_token").write_text("file-token\n")
    monkeypatch.setenv("SENTIMENT_WEBHOOK_TOKEN_FILE", str(tmp_path / "webhook_token"))
    from_env = Settings(model_store=settings.model_store, state_dir=settings.state_dir)
    assert from_env.secret("admin_token") == "env-admin-token"
    assert from_env.secret("webhook_token") == "file-token"
    with TestClient(create_app(from_env)) as client:
        jobs = client.get("/v1/retrain/jobs", headers={"Authorization": "Bearer env-admin-token"})
    assert jobs.status_code == 200


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


def _add_probe(app: FastAPI) -> None:
    @app.get("/probe")
    async def probe(  # one parameter per dependency alias
        *,
        request: Request,
        services: ServicesDep,
        settings: SettingsDep,
        registry: RegistryDep,
        models: ModelsDep,
        predictor: PredictorDep,
        database: DatabaseDep,
        drift_checks: DriftChecksDep,
        jobs: RetrainJobsDep,
        drift_status: DriftStatusDep,
        feedback: FeedbackDep,
        webhooks: WebhooksDep,
        launcher: LauncherDep,
    ) -> dict[str, bool]:
        container = request.app.state.services
        got = {
            "settings": settings,
            "registry": registry,
            "models": models,
            "predictor": predictor,
            "drift_status": drift_status,
            "feedback": feedback,
            "webhooks": webhooks,
            "launcher": launcher,
        }
        stored = {"database": database, "drift_checks": drift_checks, "jobs": jobs}
        return (
            {"services": services is container}
            | {k: v is getattr(container, k) for k, v in got.items()}
            | {k: v is getattr(container.storage, k) for k, v in stored.items()}
        )


def test_every_dependency_resolves_from_the_one_services_container(settings: Settings) -> None:
    app = create_app(settings)
    _add_probe(app)
    with TestClient(app) as client:
        services = client.app.state.services  # type: ignore[attr-defined]
        assert isinstance(services, Services) and services.settings is settings
        assert client.get("/probe").json() == dict.fromkeys(
            [
                "services",
                *(
                    f.name
                    for f in dataclasses.fields(Services)
                    if f.name not in {"recorder", "batcher", "admin_token", "storage"}
                ),
                "database",
                "drift_checks",
                "jobs",
            ],
            True,
        )
        # Routes read the container at request time: swap one collaborator and the next request uses it.
        swapped = DriftStatus(services.storage.drift_checks, refresh=3600)
        swapped.summary = {**swapped.summary, "status": "drift", "drift": True}
        client.app.state.services = dataclasses.replace(services, drift_status=swapped)  # type: ignore[attr-defined]
        assert client.post("/v1/predict", json={"text": "fine"}).json()["drift"]["status"] == "drift"
