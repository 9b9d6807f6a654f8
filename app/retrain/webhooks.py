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

        Only ``firing`` alerts with a configured name count. A firing (same fingerprint and start time:
        Alertmanager and Grafana re-send it every repeat_interval) that started a retrain is claimed by it:
        re-sends are ``duplicate`` while that retrain runs, and for good once it promotes a model. A retrain
        that rejects its candidate, skips or fails releases the firing, and a firing that met a running
        retrain or the cooldown is not consumed: as long as the drift lasts, a later re-send tries again,
        at most once per cooldown, on the labels gathered since.
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
        unseen = self.store.unseen_alerts([a.identity for a in firing])
        if not unseen:
            log.info("webhook_duplicate", source=source, alerts=len(firing))
            return WebhookResult("duplicate", alerts=len(firing), detail="a retrain already acts on these firings")
        reason = ", ".join(sorted({a.name for a in firing}))
        launch = self.launcher.start(trigger=source, reason=reason, alerts=unseen)
        log.info("webhook_handled", source=source, status=launch.action, job_id=launch.job_id)
        return WebhookResult(launch.action, launch.job_id, len(firing), retry_after_seconds=launch.retry_after_seconds)
