"""Alert notifications from Prometheus Alertmanager and Grafana: their payloads and the credential checks.

Alertmanager's webhook format is ``version: "4"``; Grafana's webhook contact point sends ``version: "1"``
with the same alert fields plus a few of its own. Both models tolerate extra fields, so newer senders
keep working. A credential check is one way a sender proves itself (``HeaderCredentials``: bearer token
or basic auth; ``HmacSignature``: Grafana's body signature, optionally over a timestamp); a ``Verifier``
requires every configured check of a source. Every comparison is constant-time.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal, Protocol

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from app.errors import SentimentServiceError


class UnauthorizedError(SentimentServiceError):
    """Missing or wrong credentials."""

    code = "unauthorized"


class WebhookConfigurationError(SentimentServiceError):
    """Webhook authentication is not configured and development mode does not allow that."""

    code = "webhook_auth_unset"


IDENTITY_MAX_CHARS = 255
"""Longest alert identity the de-duplication table stores (``webhook_alerts.identity``, ``String(255)``)."""


def _no_nul(value: str) -> str:
    # As the API's texts (app/api/schemas.py): PostgreSQL text cannot hold NUL, and psycopg refuses it even as
    # a query parameter, so a NUL reaching the alert de-duplication would be a 500 instead of a 422.
    if "\x00" in value:
        raise ValueError("must not contain NUL characters (U+0000)")
    return value


IdentityText = Annotated[str, AfterValidator(_no_nul)]
"""A string that goes into an alert's identity: no NUL (U+0000)."""


class Alert(BaseModel):
    """One alert of a notification (fields common to Alertmanager and Grafana).

    The fields that make its :attr:`identity` (``fingerprint``, ``startsAt``, ``labels``) carry no NUL and the
    identity fits the de-duplication table: anything else is not a notification either sender makes (their
    fingerprints are 16 hex digits, their times RFC 3339), and answers 422.
    """

    model_config = ConfigDict(extra="allow")
    status: Literal["firing", "resolved"]
    labels: dict[IdentityText, IdentityText] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    startsAt: IdentityText = Field("", max_length=64)
    endsAt: str = ""
    fingerprint: IdentityText = Field("", max_length=128)

    @model_validator(mode="after")
    def _identity_fits(self) -> Alert:
        if len(self.identity) > IDENTITY_MAX_CHARS:
            raise ValueError(f"fingerprint (or labels) and startsAt exceed {IDENTITY_MAX_CHARS} characters")
        return self

    @property
    def name(self) -> str:
        return self.labels.get("alertname", "")

    @property
    def identity(self) -> str:
        """What identifies one firing of one alert across re-sends (fingerprint and start time)."""
        fingerprint = self.fingerprint or ",".join(f"{k}={v}" for k, v in sorted(self.labels.items()))
        return f"{fingerprint}@{self.startsAt}"


class Notification(BaseModel):
    """Fields every alert notification shares: a group status and its alerts."""

    model_config = ConfigDict(extra="allow")
    receiver: str = ""
    status: Literal["firing", "resolved"]
    alerts: list[Alert] = Field(max_length=1000)
    groupKey: str = ""
    externalURL: str = ""


class AlertmanagerNotification(Notification):
    """Alertmanager webhook body (``version: "4"``)."""

    version: Literal["4"]


class GrafanaNotification(Notification):
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


class CredentialCheck(Protocol):
    """One way a sender proves itself; a check that is not configured is not required."""

    failure: ClassVar[str]

    @property
    def configured(self) -> bool: ...

    def passes(self, headers: Mapping[str, str], body: bytes, now: float) -> bool: ...


@dataclass(frozen=True)
class HeaderCredentials:
    """``Authorization: Bearer <token>`` or ``Basic <user:password>``; either one, when configured, passes."""

    failure: ClassVar[str] = "missing or wrong webhook credentials"
    bearer_token: str | None = None
    basic_username: str | None = None
    basic_password: str | None = None

    @property
    def configured(self) -> bool:
        return bool(self.bearer_token or (self.basic_username and self.basic_password))

    def passes(self, headers: Mapping[str, str], body: bytes, now: float) -> bool:
        authorization = headers.get("authorization", "")
        if bearer_matches(authorization, self.bearer_token):
            return True
        scheme, _, credentials = authorization.partition(" ")
        if scheme.lower() != "basic" or not (self.basic_username and self.basic_password):
            return False
        try:
            decoded = base64.b64decode(credentials.strip(), validate=True)
        except (binascii.Error, ValueError):
            return False
        user, sep, password = decoded.partition(b":")
        # Both compared every time, so timing does not tell which one was wrong.
        user_ok = hmac.compare_digest(user, self.basic_username.encode())
        password_ok = hmac.compare_digest(password, self.basic_password.encode())
        return bool(sep) and user_ok and password_ok


# A signing time in Unix seconds: ASCII digits only (``str.isdigit`` also takes "²" and Arabic-Indic
# digits, which ``int`` refuses or reads), short enough that ``int`` and float arithmetic never see a huge number.
_UNIX_SECONDS = re.compile(r"[0-9]{1,12}", re.ASCII)


@dataclass(frozen=True)
class HmacSignature:
    """HMAC-SHA256 of the body (or of ``<timestamp>:<body>`` with a timestamp header) in a header, hex."""

    failure: ClassVar[str] = "missing, wrong or expired webhook signature"
    secret: str | None = None
    signature_header: str = "X-Grafana-Alerting-Signature"
    timestamp_header: str | None = None
    replay_window_seconds: int = 300

    @property
    def configured(self) -> bool:
        return bool(self.secret)

    def passes(self, headers: Mapping[str, str], body: bytes, now: float) -> bool:
        assert self.secret is not None
        signature = headers.get(self.signature_header.lower(), "")
        message = body
        if self.timestamp_header:
            stamp = headers.get(self.timestamp_header.lower(), "")
            if not _UNIX_SECONDS.fullmatch(stamp) or abs(now - int(stamp)) > self.replay_window_seconds:
                return False
            message = stamp.encode() + b":" + body
        expected = hmac.new(self.secret.encode(), message, hashlib.sha256).hexdigest()
        return hmac.compare_digest(signature.strip().lower().encode(), expected.encode())


@dataclass(frozen=True)
class Verifier:
    """The credentials one webhook source must present: every configured check of it."""

    checks: tuple[CredentialCheck, ...]
    allow_unauthenticated: bool = False

    @property
    def configured(self) -> bool:
        return any(check.configured for check in self.checks)

    def verify(self, headers: Mapping[str, str], body: bytes, now: float | None = None) -> None:
        """Raise :class:`UnauthorizedError` unless the request passes every configured check.

        ``headers`` must answer lower-case names. With no check configured, only development mode
        (``allow_unauthenticated``) lets a request through.
        """
        now = time.time() if now is None else now
        configured = [check for check in self.checks if check.configured]
        for check in configured:
            if not check.passes(headers, body, now):
                raise UnauthorizedError(check.failure)
        if not configured and not self.allow_unauthenticated:
            raise UnauthorizedError("no credentials are configured for this webhook")


def require_configured(verifiers: Iterable[Verifier]) -> None:
    """Refuse to run when no source can authenticate anyone, unless development mode allows it."""
    if not any(v.configured or v.allow_unauthenticated for v in verifiers):
        raise WebhookConfigurationError(
            "webhook authentication is unset: set SENTIMENT_WEBHOOK_TOKEN(_FILE), basic auth or the Grafana "
            "HMAC secret, or SENTIMENT_ALLOW_UNAUTHENTICATED_WEBHOOKS=true for development"
        )
