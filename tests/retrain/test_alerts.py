"""Webhook payloads as real senders write them, and every way credentials can be right or wrong."""

from __future__ import annotations

import base64
import hashlib
import hmac
from pathlib import Path

import pytest

from app.retrain.alerts import (
    AlertmanagerNotification,
    GrafanaNotification,
    UnauthorizedError,
    WebhookAuth,
    WebhookConfigurationError,
)

PAYLOADS = Path(__file__).resolve().parents[1] / "fixtures" / "payloads"  # copied from shared/payloads


def payload(name: str) -> bytes:
    return (PAYLOADS / name).read_bytes()


def test_real_alertmanager_payloads_parse() -> None:
    firing = AlertmanagerNotification.model_validate_json(payload("alertmanager-firing.json"))
    assert firing.status == "firing" and firing.alerts[0].name == "SentimentDriftDetected"
    assert firing.alerts[0].identity == "13631153d00bc537@2026-11-27T00:57:59.324Z"
    resolved = AlertmanagerNotification.model_validate_json(payload("alertmanager-resolved.json"))
    assert resolved.alerts[0].status == "resolved" and resolved.alerts[0].identity == firing.alerts[0].identity


def test_real_grafana_payload_parses_with_its_extra_fields() -> None:
    grafana = GrafanaNotification.model_validate_json(payload("grafana-firing.json"))
    assert grafana.orgId == 1 and grafana.state == "alerting"
    assert grafana.alerts[0].model_extra["values"] == {"A": 0.003, "B": 1}  # type: ignore[index]


def test_the_versions_are_not_interchangeable() -> None:
    with pytest.raises(ValueError, match="version"):
        GrafanaNotification.model_validate_json(payload("alertmanager-firing.json"))


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def sign(secret: str, message: bytes) -> str:
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


BODY = b'{"version": "1"}'


@pytest.mark.parametrize(
    ("headers", "ok"),
    [
        ({"authorization": "Bearer s3cret"}, True),
        ({"authorization": "bearer s3cret"}, True),
        ({"authorization": "Bearer wrong"}, False),
        ({"authorization": "Bearer "}, False),
        ({}, False),
        ({"authorization": basic("am", "pw")}, True),
        ({"authorization": basic("am", "nope")}, False),
        ({"authorization": basic("other", "pw")}, False),
        ({"authorization": "Basic !!!notbase64"}, False),
        ({"authorization": "Token s3cret"}, False),
    ],
)
def test_bearer_and_basic_auth(headers: dict[str, str], ok: bool) -> None:
    auth = WebhookAuth(bearer_token="s3cret", basic_username="am", basic_password="pw")
    if ok:
        auth.verify("alertmanager", headers, BODY)
    else:
        with pytest.raises(UnauthorizedError):
            auth.verify("alertmanager", headers, BODY)


def test_grafana_signature_over_the_body() -> None:
    auth = WebhookAuth(hmac_secret="k")
    auth.verify("grafana", {"x-grafana-alerting-signature": sign("k", BODY)}, BODY)
    with pytest.raises(UnauthorizedError):
        auth.verify("grafana", {"x-grafana-alerting-signature": sign("k", BODY + b" ")}, BODY)
    with pytest.raises(UnauthorizedError):
        auth.verify("grafana", {}, BODY)
    with pytest.raises(UnauthorizedError, match="no credentials"):
        auth.verify("alertmanager", {}, BODY)  # Alertmanager cannot sign: it needs header credentials


def test_grafana_signature_with_timestamp_and_replay_window() -> None:
    auth = WebhookAuth(hmac_secret="k", timestamp_header="X-Grafana-Alerting-Timestamp", replay_window_seconds=300)
    fresh = {"x-grafana-alerting-timestamp": "1000", "x-grafana-alerting-signature": sign("k", b"1000:" + BODY)}
    auth.verify("grafana", fresh, BODY, now=1100)
    with pytest.raises(UnauthorizedError, match="expired"):
        auth.verify("grafana", fresh, BODY, now=1400)  # replayed six minutes later
    body_only = {**fresh, "x-grafana-alerting-signature": sign("k", BODY)}
    with pytest.raises(UnauthorizedError):
        auth.verify("grafana", body_only, BODY, now=1100)


def test_header_credentials_and_signature_are_both_required_when_both_are_set() -> None:
    auth = WebhookAuth(bearer_token="t", hmac_secret="k")
    good = {"authorization": "Bearer t", "x-grafana-alerting-signature": sign("k", BODY)}
    auth.verify("grafana", good, BODY)
    with pytest.raises(UnauthorizedError):
        auth.verify("grafana", {"authorization": "Bearer t"}, BODY)
    with pytest.raises(UnauthorizedError):
        auth.verify("grafana", {"x-grafana-alerting-signature": sign("k", BODY)}, BODY)


def test_no_credentials_configured_refuses_to_start_unless_development() -> None:
    with pytest.raises(WebhookConfigurationError):
        WebhookAuth().check_configured()
    WebhookAuth(allow_unauthenticated=True).check_configured()
    WebhookAuth(allow_unauthenticated=True).verify("alertmanager", {}, BODY)
