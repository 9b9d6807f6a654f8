"""Webhook payloads as real senders write them, and every way credentials can be right or wrong."""

from __future__ import annotations

import base64
import hashlib
import hmac
from pathlib import Path

import pytest
import yaml

from app.retrain.alerts import (
    AlertmanagerNotification,
    GrafanaNotification,
    HeaderCredentials,
    HmacSignature,
    UnauthorizedError,
    Verifier,
    WebhookConfigurationError,
    require_configured,
)
from app.retrain.webhooks import grafana_signature
from app.settings import REPO_ROOT, Settings

CONTACT_POINTS = REPO_ROOT / "dashboards" / "provisioning" / "alerting" / "contact-points.yml"
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
    auth = Verifier((HeaderCredentials(bearer_token="s3cret", basic_username="am", basic_password="pw"),))
    if ok:
        auth.verify(headers, BODY)
    else:
        with pytest.raises(UnauthorizedError):
            auth.verify(headers, BODY)


def test_grafana_signature_over_the_body() -> None:
    grafana = Verifier((HeaderCredentials(), HmacSignature(secret="k")))
    grafana.verify({"x-grafana-alerting-signature": sign("k", BODY)}, BODY)
    with pytest.raises(UnauthorizedError):
        grafana.verify({"x-grafana-alerting-signature": sign("k", BODY + b" ")}, BODY)
    with pytest.raises(UnauthorizedError):
        grafana.verify({}, BODY)
    alertmanager = Verifier((HeaderCredentials(),))  # Alertmanager cannot sign: it needs header credentials
    with pytest.raises(UnauthorizedError, match="no credentials"):
        alertmanager.verify({}, BODY)


def test_grafana_signature_with_timestamp_and_replay_window() -> None:
    signature = HmacSignature(secret="k", timestamp_header="X-Grafana-Alerting-Timestamp", replay_window_seconds=300)
    auth = Verifier((HeaderCredentials(), signature))
    fresh = {"x-grafana-alerting-timestamp": "1000", "x-grafana-alerting-signature": sign("k", b"1000:" + BODY)}
    auth.verify(fresh, BODY, now=1100)
    with pytest.raises(UnauthorizedError, match="expired"):
        auth.verify(fresh, BODY, now=1400)  # replayed six minutes later
    body_only = {**fresh, "x-grafana-alerting-signature": sign("k", BODY)}
    with pytest.raises(UnauthorizedError):
        auth.verify(body_only, BODY, now=1100)


@pytest.mark.parametrize("stamp", ["", "NaN", "inf", "-1", "1e3", " 1000", "²", "¹²³", "١٠٠٠", "１０００", "9" * 5000])
def test_a_timestamp_that_is_not_ascii_unix_seconds_fails_the_check_without_raising(stamp: str) -> None:
    """Whatever the timestamp header holds (signed correctly or not), the check answers False, never raises."""
    signature = HmacSignature(secret="k", timestamp_header="X-Grafana-Alerting-Timestamp")
    headers = {
        "x-grafana-alerting-timestamp": stamp,
        "x-grafana-alerting-signature": sign("k", f"{stamp}:".encode() + BODY),
    }
    assert signature.passes(headers, BODY, now=1000.0) is False


def test_with_an_hmac_secret_the_timestamp_header_is_on_by_default_as_grafana_is_provisioned() -> None:
    """Settings and the provisioned contact point agree on the timestamp header, so signatures cannot be replayed."""
    settings = Settings(grafana_hmac_secret="k", webhook_token="t")
    assert grafana_signature(settings).timestamp_header == "X-Grafana-Alerting-Timestamp"
    provisioned = yaml.safe_load(CONTACT_POINTS.read_text())["contactPoints"][0]["receivers"][0]["settings"]
    assert provisioned["hmacConfig"]["timestampHeader"] == settings.grafana_timestamp_header


def test_header_credentials_and_signature_are_both_required_when_both_are_set() -> None:
    auth = Verifier((HeaderCredentials(bearer_token="t"), HmacSignature(secret="k")))
    good = {"authorization": "Bearer t", "x-grafana-alerting-signature": sign("k", BODY)}
    auth.verify(good, BODY)
    with pytest.raises(UnauthorizedError):
        auth.verify({"authorization": "Bearer t"}, BODY)
    with pytest.raises(UnauthorizedError):
        auth.verify({"x-grafana-alerting-signature": sign("k", BODY)}, BODY)


def test_no_credentials_configured_refuses_to_start_unless_development() -> None:
    unset = (HeaderCredentials(), HmacSignature())
    with pytest.raises(WebhookConfigurationError):
        require_configured([Verifier(unset[:1]), Verifier(unset)])
    development = [Verifier(unset[:1], allow_unauthenticated=True), Verifier(unset, allow_unauthenticated=True)]
    require_configured(development)
    development[0].verify({}, BODY)
    require_configured([Verifier(unset[:1]), Verifier((HeaderCredentials(), HmacSignature(secret="k")))])
