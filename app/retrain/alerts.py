"""Alert notifications from Prometheus Alertmanager and Grafana: their payloads and their credentials.

Alertmanager's webhook format is ``version: "4"``; Grafana's webhook contact point sends ``version: "1"``
with the same alert fields plus a few of its own. Both models tolerate extra fields, so newer senders
keep working. Authentication is bearer token or basic auth for both, plus Grafana's HMAC body signature;
every comparison is constant-time.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from app.errors import SentimentServiceError


class UnauthorizedError(SentimentServiceError):
    """Missing or wrong credentials."""

    code = "unauthorized"


class WebhookConfigurationError(SentimentServiceError):
    """Webhook authentication is not configured and development mode does not allow that."""

    code = "webhook_auth_unset"


class Alert(BaseModel):
    """One alert of a notification (fields common to Alertmanager and Grafana)."""

    model_config = ConfigDict(extra="allow")
    status: Literal["firing", "resolved"]
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    startsAt: str = ""
    endsAt: str = ""
    fingerprint: str = ""

    @property
    def name(self) -> str:
        return self.labels.get("alertname", "")

    @property
    def identity(self) -> str:
        """What identifies one firing of one alert across re-sends (fingerprint and start time)."""
        fingerprint = self.fingerprint or ",".join(f"{k}={v}" for k, v in sorted(self.labels.items()))
        return f"{fingerprint}@{self.startsAt}"


class _Notification(BaseModel):
    model_config = ConfigDict(extra="allow")
    receiver: str = ""
    status: Literal["firing", "resolved"]
    alerts: list[Alert] = Field(max_length=1000)
    groupKey: str = ""
    externalURL: str = ""


class AlertmanagerNotification(_Notification):
    """Alertmanager webhook body (``version: "4"``)."""

    version: Literal["4"]


class GrafanaNotification(_Notification):
    """Grafana Alerting webhook contact point body (``version: "1"``)."""

    version: Literal["1"]
    orgId: int | None = None
    title: str = ""
    state: str = ""
    message: str = ""


def bearer_matches(authorization: str, token: str | None) -> bool:
    """Whether an ``Authorization`` header value is ``Bearer <token>``, compared in constant time; never
    with no token configured."""
    scheme, _, given = authorization.partition(" ")
    if not token or scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(given.strip().encode(), token.encode())


@dataclass(frozen=True)
class WebhookAuth:
    """The credentials webhooks must present, from settings."""

    bearer_token: str | None = None
    basic_username: str | None = None
    basic_password: str | None = None
    hmac_secret: str | None = None
    signature_header: str = "X-Grafana-Alerting-Signature"
    timestamp_header: str | None = None
    replay_window_seconds: int = 300
    allow_unauthenticated: bool = False

    @property
    def header_methods(self) -> bool:
        return bool(self.bearer_token or (self.basic_username and self.basic_password))

    def check_configured(self) -> None:
        """Refuse to run with no webhook credentials at all, unless development mode allows it."""
        if not (self.header_methods or self.hmac_secret) and not self.allow_unauthenticated:
            raise WebhookConfigurationError(
                "webhook authentication is unset: set SENTIMENT_WEBHOOK_TOKEN(_FILE), basic auth or the Grafana "
                "HMAC secret, or SENTIMENT_ALLOW_UNAUTHENTICATED_WEBHOOKS=true for development"
            )

    def _header_ok(self, authorization: str) -> bool:
        if bearer_matches(authorization, self.bearer_token):
            return True
        scheme, _, credentials = authorization.partition(" ")
        if scheme.lower() == "basic" and self.basic_username and self.basic_password:
            try:
                decoded = base64.b64decode(credentials.strip(), validate=True)
            except (binascii.Error, ValueError):
                return False
            user, sep, password = decoded.partition(b":")
            expected_user, expected_password = self.basic_username.encode(), self.basic_password.encode()
            # Both compared every time, so timing does not tell which one was wrong.
            user_ok = hmac.compare_digest(user, expected_user)
            password_ok = hmac.compare_digest(password, expected_password)
            return bool(sep) and user_ok and password_ok
        return False

    def _signature_ok(self, headers: Mapping[str, str], body: bytes, now: float) -> bool:
        assert self.hmac_secret is not None
        signature = headers.get(self.signature_header.lower(), "")
        message = body
        if self.timestamp_header:
            stamp = headers.get(self.timestamp_header.lower(), "")
            if not stamp.isdigit() or abs(now - int(stamp)) > self.replay_window_seconds:
                return False
            message = stamp.encode() + b":" + body
        expected = hmac.new(self.hmac_secret.encode(), message, hashlib.sha256).hexdigest()
        return hmac.compare_digest(signature.strip().lower().encode(), expected.encode())

    def verify(
        self,
        source: Literal["alertmanager", "grafana"],
        headers: Mapping[str, str],
        body: bytes,
        now: float | None = None,
    ) -> None:
        """Raise :class:`UnauthorizedError` unless the request carries every configured credential.

        ``headers`` must have lower-case names. Header credentials (bearer or basic) are required when
        configured; Grafana's signature is required too when its secret is configured.
        """
        now = time.time() if now is None else now
        checked = False
        if self.header_methods:
            if not self._header_ok(headers.get("authorization", "")):
                raise UnauthorizedError("missing or wrong webhook credentials")
            checked = True
        if source == "grafana" and self.hmac_secret:
            if not self._signature_ok(headers, body, now):
                raise UnauthorizedError("missing, wrong or expired webhook signature")
            checked = True
        if not checked and not self.allow_unauthenticated:
            raise UnauthorizedError("no credentials are configured for this webhook")
