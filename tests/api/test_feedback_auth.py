"""Feedback needs a feedback token: without one nothing is stored, each label records its token's name, and a
token revoked with the command line is refused by the running service."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.exc import OperationalError
from structlog.testing import capture_logs

from app.cli import main as cli
from app.main import create_app
from app.services import Services
from app.settings import Settings
from app.storage.predictions import PredictionRow
from tests.conftest import FEEDBACK, FEEDBACK_TOKEN


def services(client: TestClient) -> Services:
    container: Services = client.app.state.services  # type: ignore[attr-defined]
    return container


def predict(client: TestClient, text: str = "A gripping, beautifully acted film.") -> str:
    response = client.post("/v1/predict", json={"text": text})
    assert response.status_code == 200
    return str(response.json()["id"])


def logged(client: TestClient, prediction_id: str) -> PredictionRow:
    """The prediction's row, once its worker has written it."""
    log = services(client).storage.predictions
    deadline = time.monotonic() + 5
    while (row := log.get_prediction(prediction_id)) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert row is not None
    return row


@pytest.fixture
def named_client(settings: Settings) -> Iterator[TestClient]:
    named = settings.model_copy(update={"feedback_token": "web:web-token-1\n# a comment\nmobile:mobile-token-2"})
    with TestClient(create_app(named), raise_server_exceptions=False) as client:
        yield client


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer not-the-feedback-token"},
        {"Authorization": f"Bearer {FEEDBACK_TOKEN}x"},
        {"Authorization": f"Basic {FEEDBACK_TOKEN}"},
        {"Authorization": "Bearer test-admin-token"},  # another endpoint's credential
    ],
    ids=["none", "wrong", "longer", "basic-scheme", "admin-token"],
)
def test_feedback_without_a_valid_token_is_401_and_stores_nothing(client: TestClient, headers: dict[str, str]) -> None:
    prediction_id = predict(client)
    with capture_logs() as logs:
        response = client.post(
            "/v1/feedback", json={"prediction_id": prediction_id, "label": "negative"}, headers=headers
        )
    assert response.status_code == 401 and response.json()["error"]["code"] == "unauthorized"
    row = logged(client, prediction_id)
    assert (row.label, row.labelled_at, row.label_source) == (None, None, None)
    assert services(client).storage.predictions.labelled() == []
    (event,) = [e for e in logs if e["event"] == "feedback_unauthorized"]
    assert FEEDBACK_TOKEN not in str(event) and "not-the-feedback-token" not in str(event)


def test_feedback_with_the_token_records_the_token_name(client: TestClient) -> None:
    """A single plain token is named ``default``."""
    prediction_id = predict(client)
    response = client.post("/v1/feedback", json={"prediction_id": prediction_id, "label": "negative"}, headers=FEEDBACK)
    assert response.status_code == 200, response.text
    assert logged(client, prediction_id).label_source == "default"


def test_each_named_token_records_its_own_name(named_client: TestClient) -> None:
    first, second = predict(named_client), predict(named_client, "A dull, tedious mess.")
    for prediction_id, token in ((first, "mobile-token-2"), (second, "web-token-1")):
        response = named_client.post(
            "/v1/feedback",
            json={"prediction_id": prediction_id, "label": "positive"},
            headers={"Authorization": f"Bearer {token}"},
        )
        assert response.status_code == 200, response.text
    assert logged(named_client, first).label_source == "mobile"
    assert logged(named_client, second).label_source == "web"
    refused = named_client.post(
        "/v1/feedback", json={"prediction_id": first, "label": "positive"}, headers={"Authorization": "Bearer web"}
    )
    assert refused.status_code == 401  # a name is not a token


def test_without_a_configured_token_feedback_is_refused(settings: Settings) -> None:
    unset = settings.model_copy(update={"feedback_token": None})
    with TestClient(create_app(unset), raise_server_exceptions=False) as client:
        prediction_id = predict(client)
        for headers in ({}, FEEDBACK, {"Authorization": "Bearer "}):
            response = client.post(
                "/v1/feedback", json={"prediction_id": prediction_id, "label": "positive"}, headers=headers
            )
            assert response.status_code == 401 and response.json()["error"]["code"] == "unauthorized"
        assert logged(client, prediction_id).label is None


def test_development_mode_accepts_unauthenticated_feedback_as_anonymous(settings: Settings) -> None:
    dev = settings.model_copy(update={"feedback_token": None, "allow_unauthenticated_feedback": True})
    with TestClient(create_app(dev), raise_server_exceptions=False) as client:
        prediction_id = predict(client)
        response = client.post("/v1/feedback", json={"prediction_id": prediction_id, "label": "positive"})
        assert response.status_code == 200, response.text
        assert logged(client, prediction_id).label_source == "anonymous"


def test_development_mode_still_requires_a_token_once_one_is_configured(settings: Settings) -> None:
    both = settings.model_copy(update={"allow_unauthenticated_feedback": True})
    with TestClient(create_app(both), raise_server_exceptions=False) as client:
        prediction_id = predict(client)
        response = client.post("/v1/feedback", json={"prediction_id": prediction_id, "label": "positive"})
        assert response.status_code == 401


def test_a_malformed_token_list_stops_the_start(settings: Settings) -> None:
    duplicated = settings.model_copy(update={"feedback_token": "web:one\nweb:two"})
    with pytest.raises(ValueError, match="given twice") as raised:
        create_app(duplicated)
    assert "one" not in str(raised.value).replace("given", "")


def test_openapi_documents_the_bearer_credential_and_the_401(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    operation = schema["paths"]["/v1/feedback"]["post"]
    assert operation["security"] == [{"feedbackToken": []}]
    assert schema["components"]["securitySchemes"]["feedbackToken"] | {"description": ""} == {
        "type": "http",
        "scheme": "bearer",
        "description": "",
    }
    assert "401" in operation["responses"]


def send(client: TestClient, prediction_id: str, token: str) -> int:
    response = client.post(
        "/v1/feedback",
        json={"prediction_id": prediction_id, "label": "positive"},
        headers={"Authorization": f"Bearer {token}"},
    )
    return response.status_code


@pytest.fixture
def revocable(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    """Two named tokens, revoked names reread every 0.2 s, and the command line on the same database."""
    named = settings.model_copy(
        update={"feedback_token": "web:web-token-1,mobile:mobile-token-2", "feedback_revocation_refresh_seconds": 0.2}
    )
    monkeypatch.setenv("SENTIMENT_DATABASE_URL", settings.prediction_log_url)
    with TestClient(create_app(named), raise_server_exceptions=False) as client:
        yield client


def test_a_token_revoked_with_the_cli_is_refused_within_the_refresh_time(
    revocable: TestClient, settings: Settings
) -> None:
    """`feedback revoke web` on a running service: web's token answers 401 (reason revoked), mobile's still works."""
    assert send(revocable, predict(revocable), "web-token-1") == 200  # the revoked names are read: none yet
    assert cli(["--store", str(settings.model_store), "feedback", "revoke", "web"]) == 0
    time.sleep(0.25)
    prediction_id = predict(revocable)
    with capture_logs() as logs:
        refused = revocable.post(
            "/v1/feedback",
            json={"prediction_id": prediction_id, "label": "positive"},
            headers={"Authorization": "Bearer web-token-1"},
        )
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "unauthorized"
    assert [e["reason"] for e in logs if e["event"] == "feedback_unauthorized"] == ["revoked"]
    assert logged(revocable, prediction_id).label is None
    assert send(revocable, prediction_id, "mobile-token-2") == 200


def test_a_purge_alone_keeps_the_token_working(revocable: TestClient, settings: Settings) -> None:
    first = predict(revocable)
    assert send(revocable, first, "web-token-1") == 200
    assert cli(["--store", str(settings.model_store), "feedback", "purge", "web"]) == 0
    assert logged(revocable, first).label is None  # purged
    time.sleep(0.25)
    second = predict(revocable)
    assert send(revocable, second, "web-token-1") == 200
    assert logged(revocable, second).label_source == "web"


def test_while_the_revoked_names_cannot_be_read_the_last_ones_read_still_refuse(
    revocable: TestClient, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failed reread keeps the known revocations: a revoked token gets 401, never a 500 or a pass."""
    assert cli(["--store", str(settings.model_store), "feedback", "revoke", "web"]) == 0
    prediction_id = predict(revocable)
    assert send(revocable, prediction_id, "web-token-1") == 401
    revoked = services(revocable).feedback.revoked

    def unavailable() -> frozenset[str]:
        raise OperationalError("SELECT", {}, Exception("database is down"))

    monkeypatch.setattr(revoked.repository, "revoked", unavailable)
    time.sleep(0.25)
    with capture_logs() as logs:
        assert send(revocable, prediction_id, "web-token-1") == 401
    assert "feedback_revocations_unavailable" in [e["event"] for e in logs]
