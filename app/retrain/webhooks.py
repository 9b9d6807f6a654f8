"""Webhook sources and what a notification does: authenticate, parse, pick the alerts that matter, retrain.

``SOURCES`` is the table of alerting systems the service accepts notifications from. A source is one
:class:`WebhookSource` entry: its name (the URL is ``/v1/webhooks/<name>``), its payload model, the
credential checks it accepts (built from the settings it reads) and how to pick its firing alerts.
Adding a sender is one entry in the table (and its test); the HTTP routes are generated from it.

A firing drift alert (:data:`DRIFT_ALERT`) records the drift check it is about, and its explanation, in the job
it starts. With ``SENTIMENT_RETRAIN_MIN_ESTIMATED_DROP_POINTS`` set, it starts none while the latest check's
label-free accuracy estimate is not that far below the version's reference (:func:`estimated_drop_gate`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import structlog
from pydantic import ValidationError

from app.errors import InvalidInputError
from app.monitoring import metrics
from app.monitoring.performance import dropped_below, estimated_drop
from app.monitoring.report import estimates_of
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
from app.storage.alerts import AlertRepository
from app.storage.drift_checks import DriftCheck, DriftCheckRepository

log = structlog.get_logger(__name__)

DRIFT_ALERT = "SentimentDriftDetected"
"""The drift alert's name (prometheus/rules, Grafana's provisioned rule): the alert that records its drift check
in the job and that ``SENTIMENT_RETRAIN_MIN_ESTIMATED_DROP_POINTS`` holds back."""
HARMLESS_DRIFT = "skipped_harmless_drift"


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


def estimated_drop_gate(check: DriftCheck | None, points: float) -> dict[str, Any]:
    """Whether ``check`` (the latest drift check) lets a drift alert retrain: ``decision`` is ``retrain`` when
    its estimated accuracy is at least ``points`` percentage points below its version's reference estimate,
    ``skip`` when not, ``no_estimate`` (retrain: nothing shows the drift is harmless) when it has none; with the
    figures behind it, as the job record and the webhook's answer show them."""
    window, reference = (None, None) if check is None else (estimates_of(check) or (None, None))
    if check is None or window is None or reference is None:
        return {"decision": "no_estimate", "check_id": None if check is None else check.id, "threshold_points": points}
    return {
        "decision": "retrain" if dropped_below(window, reference, points) else "skip",
        "check_id": check.id,
        "estimated_accuracy": window.estimate,
        "reference_estimated_accuracy": reference.estimate,
        "drop_points": round(estimated_drop(window, reference) * 100, 2),
        "threshold_points": points,
    }


def check_record(check: DriftCheck) -> dict[str, Any]:
    """A drift check as a job records its trigger: id, time, version, verdict and explanation."""
    return {
        "id": check.id,
        "checked_at": check.checked_at,
        "model_version": check.model_version,
        "p_value": check.p_value,
        "tests_rejecting": check.details.get("tests_rejecting"),
        "estimated_accuracy": check.estimated_accuracy,
        "explanation": check.explanation,
    }


@dataclass(frozen=True)
class WebhookResult:
    """``status`` is one of retrain_started, queued, already_running, already_queued, cooldown, duplicate, ignored,
    skipped_harmless_drift."""

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
        alerts: AlertRepository,
        launcher: RetrainLauncher,
        *,
        drift_checks: DriftCheckRepository | None = None,
        min_estimated_drop_points: float | None = None,
    ) -> None:
        """``drift_checks`` (None: no drift check is recorded or read) and ``min_estimated_drop_points``
        (``SENTIMENT_RETRAIN_MIN_ESTIMATED_DROP_POINTS``; None: drift alone retrains) serve the drift alert."""
        self.verifiers = verifiers
        self.alert_names = set(alert_names)
        self.alerts = alerts
        self.launcher = launcher
        self.drift_checks = drift_checks
        self.min_estimated_drop_points = min_estimated_drop_points

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
        at most once per cooldown, on the labels gathered since. With a drop threshold set, the drift alert
        alone while the latest check's estimated accuracy has not dropped that far answers
        ``skipped_harmless_drift``: counted, nothing started or claimed, so a re-send is judged afresh.
        """
        notification = self.parse(source, headers, body)
        firing = [a for a in source.firing(notification) if a.name in self.alert_names]
        if not firing:
            reason = "resolved" if notification.status == "resolved" else "no configured alert is firing"
            log.info("webhook_ignored", source=source.name, reason=reason, alerts=len(notification.alerts))
            return WebhookResult("ignored", alerts=len(notification.alerts), detail=reason)
        unseen = self.alerts.unseen([a.identity for a in firing])
        if not unseen:
            log.info("webhook_duplicate", source=source.name, alerts=len(firing))
            return WebhookResult("duplicate", alerts=len(firing), detail="a retrain already acts on these firings")
        names = {a.name for a in firing}
        details = self.drift_details() if DRIFT_ALERT in names else {}
        gate = details.get("estimated_accuracy_gate")
        if names == {DRIFT_ALERT} and gate is not None and gate["decision"] == "skip":
            metrics.RETRAIN_TOTAL.labels(trigger=source.name, outcome=HARMLESS_DRIFT).inc()
            log.info("retrain_skipped", source=source.name, outcome=HARMLESS_DRIFT, **gate)
            detail = (
                f"drift check {gate['check_id']}: estimated accuracy {gate['drop_points']} points below the "
                f"reference, under the {gate['threshold_points']} points a retrain needs"
            )
            return WebhookResult(HARMLESS_DRIFT, alerts=len(firing), detail=detail)
        launch = self.launcher.start(
            trigger=source.name, reason=", ".join(sorted(names)), alerts=unseen, details=details
        )
        log.info("webhook_handled", source=source.name, status=launch.action, job_id=launch.job_id)
        return WebhookResult(launch.action, launch.job_id, len(firing), retry_after_seconds=launch.retry_after_seconds)

    def drift_details(self) -> dict[str, Any]:
        """What a drift alert's job records: ``drift_check``, the explained check of the drift it reports (None
        if none was explained), and with the setting, ``estimated_accuracy_gate`` (:func:`estimated_drop_gate`)."""
        if self.drift_checks is None:
            return {}
        explained = self.drift_checks.explaining_current_drift()
        details: dict[str, Any] = {"drift_check": None if explained is None else check_record(explained)}
        if self.min_estimated_drop_points is not None:
            latest = self.drift_checks.history(1)
            details["estimated_accuracy_gate"] = estimated_drop_gate(
                latest[0] if latest else None, self.min_estimated_drop_points
            )
        return details
