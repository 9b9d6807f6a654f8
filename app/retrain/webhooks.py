"""What an alert notification does: authenticate, parse, pick the alerts that matter, start a retrain."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import structlog
from pydantic import ValidationError

from app.errors import InvalidInputError
from app.monitoring.prediction_log import PredictionLog
from app.retrain.alerts import AlertmanagerNotification, GrafanaNotification, WebhookAuth
from app.retrain.launcher import RetrainLauncher

log = structlog.get_logger(__name__)

Source = Literal["alertmanager", "grafana"]
_MODELS: dict[str, type[AlertmanagerNotification] | type[GrafanaNotification]] = {
    "alertmanager": AlertmanagerNotification,
    "grafana": GrafanaNotification,
}


@dataclass(frozen=True)
class WebhookResult:
    """``status`` is one of retrain_started, already_running, cooldown, duplicate, ignored."""

    status: str
    job_id: str | None = None
    alerts: int = 0
    detail: str = ""
    retry_after_seconds: float | None = None


class WebhookService:
    def __init__(
        self, auth: WebhookAuth, alert_names: list[str], store: PredictionLog, launcher: RetrainLauncher
    ) -> None:
        self.auth = auth
        self.alert_names = set(alert_names)
        self.store = store
        self.launcher = launcher

    def handle(self, source: Source, headers: Mapping[str, str], body: bytes) -> WebhookResult:
        """Act on one notification. Credentials first: nothing is parsed for an unauthenticated caller.

        Only ``firing`` alerts with a configured name count. A firing already acted on (same fingerprint
        and start time: Alertmanager re-sends every repeat_interval) is a ``duplicate``; a firing that met
        a running retrain or the cooldown is not consumed, so a later re-send can still start one.
        """
        self.auth.verify(source, headers, body)
        try:
            notification = _MODELS[source].model_validate_json(body)
        except ValidationError as exc:
            details = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
            raise InvalidInputError(f"not a {source} webhook notification", details=details) from exc
        firing = [a for a in notification.alerts if a.status == "firing" and a.name in self.alert_names]
        if not firing:
            reason = "resolved" if notification.status == "resolved" else "no configured alert is firing"
            log.info("webhook_ignored", source=source, reason=reason, alerts=len(notification.alerts))
            return WebhookResult("ignored", alerts=len(notification.alerts), detail=reason)
        identities = [a.identity for a in firing]
        if not self.store.unseen_alerts(identities):
            log.info("webhook_duplicate", source=source, alerts=len(firing))
            return WebhookResult("duplicate", alerts=len(firing), detail="these firings were already acted on")
        launch = self.launcher.start(trigger=source, reason=", ".join(sorted({a.name for a in firing})))
        if launch.action == "retrain_started":
            self.store.claim_alerts(identities, source)
        log.info("webhook_handled", source=source, status=launch.action, job_id=launch.job_id)
        return WebhookResult(launch.action, launch.job_id, len(firing), retry_after_seconds=launch.retry_after_seconds)
