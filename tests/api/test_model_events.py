"""``GET /v1/models/{version}/events``: a version's audit trail, read like the other model routes."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from app.settings import Settings
from app.storage.model_events import ModelEvent
from app.storage.repositories import Repositories


@pytest.fixture
def storage(settings: Settings) -> Iterator[Repositories]:
    repositories = Repositories.from_settings(settings)
    yield repositories
    repositories.dispose()


def test_a_versions_events_are_listed_oldest_first_without_credentials(
    client: TestClient, storage: Repositories, versions: list[str]
) -> None:
    gate = {"decision": "promote", "candidate": {"base": 0.8}}
    storage.events.record(ModelEvent(versions[1], "gated", "retrain:j1", "alertmanager", gate, occurred_at=100.0))
    storage.events.record(
        ModelEvent(versions[1], "promoted", "retrain:j1", "alertmanager", {"previous": versions[0]}, occurred_at=101.0)
    )
    storage.events.record(ModelEvent(versions[0], "rolled_back", "cli", "manual", {}, occurred_at=50.0))
    response = client.get(f"/v1/models/{versions[1]}/events")
    assert response.status_code == 200
    body = response.json()
    assert body["version"] == versions[1]
    assert [(e["event"], e["actor"], e["trigger"]) for e in body["events"]] == [
        ("gated", "retrain:j1", "alertmanager"),
        ("promoted", "retrain:j1", "alertmanager"),
    ]
    assert body["events"][0]["details"] == gate and body["events"][0]["occurred_at"] == "1970-01-01T00:01:40Z"


def test_a_version_without_events_has_an_empty_trail(client: TestClient, versions: list[str]) -> None:
    assert client.get(f"/v1/models/{versions[0]}/events").json() == {"version": versions[0], "events": []}


@pytest.mark.parametrize("name", ["v-nope", "a%00b", "v" * 300])
def test_an_unknown_or_impossible_version_is_404_json(client: TestClient, name: str) -> None:
    response = client.get(f"/v1/models/{name}/events")
    assert response.status_code == 404 and response.json()["error"]["code"] == "version_not_found"
    assert "vvvvvvvv" not in response.text
