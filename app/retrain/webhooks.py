"""Webhook sources and what a notification does: authenticate, parse, pick the alerts that matter, retrain.

``SOURCES`` is the table of alerting systems the service accepts notifications from. A source is one
:class:`WebhookSource` entry: its name (the URL is ``/v1/webhooks/<name>``), its payload model, the
credential checks it accepts (built from the settings it reads) and how to pick its firing alerts.
Adding a sender is one entry in the table (and its test); the HTTP routes are generated from it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import structlog
from pydantic import ValidationError

from app.errors import InvalidInputError
from app.monitoring.prediction_log import PredictionLog
from app.retrain.alerts import (
    Alert,
    AlertmanagerNotification,
    CredentialCheck,
    GrafanaNotification,
    HeaderCredentials,
    HmacSignature,
    Notification,
    Verifier,
    require_configured,
)
from app.retrain.launcher import RetrainLauncher
from app.settings import Settings

log = structlog.get_logger(__name__)


def firing_alerts(notification: Notification) -> list[Alert]:
    """The alerts of a notification whose own status is ``firing`` (the group may be ``resolved``)."""
    return [alert for alert in notification.alerts if alert.status == "firing"]


def header_credentials(settings: Settings) -> HeaderCredentials:
    """Bearer token or basic auth: ``SENTIMENT_WEBHOOK_TOKEN(_FILE)``, ``SENTIMENT_WEBHOOK_BASIC_*``."""
    return HeaderCredentials(
        bearer_token=settings.secret("webhook_token"),
        basic_username=settings.webhook_basic_username,
        basic_password=settings.secret("webhook_basic_password"),
    )


def grafana_signature(settings: Settings) -> HmacSignature:
    """Grafana's body signature: ``SENTIMENT_GRAFANA_HMAC_SECRET(_FILE)`` and its header settings."""
    return HmacSignature(
        secret=settings.secret("grafana_hmac_secret"),
        signature_header=settings.grafana_signature_header,
        timestamp_header=settings.grafana_timestamp_header,
        replay_window_seconds=settings.grafana_replay_window_seconds,
    )


@dataclass(frozen=True)
class WebhookSource:
    """One alerting system that may call ``/v1/webhooks/<name>``."""

    name: str
    summary: str  # the route's summary in the OpenAPI schema
    payload: type[Notification]
    checks: Callable[[Settings], tuple[CredentialCheck, ...]]
    firing: Callable[[Notification], list[Alert]] = firing_alerts

    def verifier(self, settings: Settings) -> Verifier:
        return Verifier(self.checks(settings), allow_unauthenticated=settings.allow_unauthenticated_webhooks)


ALERTMANAGER = WebhookSource(
    name="alertmanager",
    summary="Alertmanager webhook receiver (version 4)",
    payload=AlertmanagerNotification,
    checks=lambda settings: (header_credentials(settings),),  # Alertmanager cannot sign a body
)
GRAFANA = WebhookSource(
    name="grafana",
    summary="Grafana Alerting webhook contact point (version 1)",
    payload=GrafanaNotification,
    checks=lambda settings: (header_credentials(settings), grafana_signature(settings)),
)
SOURCES: tuple[WebhookSource, ...] = (ALERTMANAGER, GRAFANA)


def verifiers(settings: Settings, sources: Sequence[WebhookSource]) -> dict[WebhookSource, Verifier]:
    """Each source's verifier; raises :class:`WebhookConfigurationError` when none can authenticate anyone."""
    table = {source: source.verifier(settings) for source in sources}
    require_configured(table.values())
    return table


@dataclass(frozen=True)
class WebhookResult:
    """``status`` is one of retrain_started, queued, already_running, already_queued, cooldown, duplicate, ignored."""

    status: str
    job_id: str | None = None
    alerts: int = 0
    detail: str = ""
    retry_after_seconds: float | None = None


class WebhookService:
    """Acts on notifications from the sources it has a verifier for."""

    def __init__(
        self,
        verifiers: Mapping[WebhookSource, Verifier],
        alert_names: Sequence[str],
        predictions: PredictionLog,
        launcher: RetrainLauncher,
    ) -> None:
        self.verifiers = verifiers
        self.alert_names = set(alert_names)
        self.predictions = predictions
        self.launcher = launcher

    def parse(self, source: WebhookSource, headers: Mapping[str, str], body: bytes) -> Notification:
        """The notification, once its credentials passed: nothing is parsed for an unauthenticated caller."""
        self.verifiers[source].verify(headers, body)
        try:
            return source.payload.model_validate_json(body)
        except ValidationError as exc:
            details = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
            raise InvalidInputError(f"not a {source.name} webhook notification", details=details) from exc

    def handle(self, source: WebhookSource, headers: Mapping[str, str], body: bytes) -> WebhookResult:
        """Act on one notification (``headers`` must answer lower-case names).

        Only ``firing`` alerts with a configured name count. A firing (same fingerprint and start time:
        Alertmanager and Grafana re-send it every repeat_interval) that started a retrain is claimed by it:
        re-sends are ``duplicate`` while that retrain runs, and for good once it promotes a model. A retrain
        that rejects its candidate, skips or fails releases the firing, and a firing that met a running
        retrain or the cooldown is not consumed: as long as the drift lasts, a later re-send tries again,
        at most once per cooldown, on the labels gathered since.
        """
        notification = self.parse(source, headers, body)
        firing = [a for a in source.firing(notification) if a.name in self.alert_names]
        if not firing:
            reason = "resolved" if notification.status == "resolved" else "no configured alert is firing"
            log.info("webhook_ignored", source=source.name, reason=reason, alerts=len(notification.alerts))
            return WebhookResult("ignored", alerts=len(notification.alerts), detail=reason)
        unseen = self.predictions.unseen_alerts([a.identity for a in firing])
        if not unseen:
            log.info("webhook_duplicate", source=source.name, alerts=len(firing))
            return WebhookResult("duplicate", alerts=len(firing), detail="a retrain already acts on these firings")
        reason = ", ".join(sorted({a.name for a in firing}))
        launch = self.launcher.start(trigger=source.name, reason=reason, alerts=unseen)
        log.info("webhook_handled", source=source.name, status=launch.action, job_id=launch.job_id)
        return WebhookResult(launch.action, launch.job_id, len(firing), retry_after_seconds=launch.retry_after_seconds)
