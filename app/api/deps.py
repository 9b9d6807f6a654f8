"""Typed dependency aliases: routes receive their collaborators from the one ``app.state.services``.

Every dependency is ``async def``: FastAPI runs plain ``def`` dependencies in a thread pool, a hand-off
that cost about 10 % of a worker's time per request. Each alias reads its field straight from the
container, so a route pays one dependency call per collaborator, as with separate getters.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, TypeVar

from fastapi import Depends, Request

from app.errors import UnsupportedMediaTypeError
from app.ml.registry import ModelRegistry
from app.monitoring.feedback import FeedbackService
from app.monitoring.status import DriftStatus
from app.retrain.launcher import RetrainLauncher
from app.retrain.webhooks import WebhookService
from app.services import Services
from app.serving.models import ModelManager
from app.serving.predictor import Predictor
from app.settings import Settings
from app.storage.database import Database
from app.storage.drift_checks import DriftCheckRepository
from app.storage.model_events import ModelEventRepository
from app.storage.predictions import PredictionRepository
from app.storage.retrain_jobs import RetrainJobRepository

T = TypeVar("T")


def services_of(request: Request) -> Services:
    """The container the lifespan put on ``app.state``: the one place routes get collaborators from."""
    services: Services = request.app.state.services
    return services


async def get_services(request: Request) -> Services:
    return services_of(request)


def _field(get: Callable[[Services], T]) -> Callable[[Request], Awaitable[T]]:
    async def dependency(request: Request) -> T:
        return get(services_of(request))

    return dependency


async def require_json(request: Request) -> None:
    """415 unless the body is declared as JSON (``application/json`` or ``application/*+json``)."""
    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media != "application/json" and not (media.startswith("application/") and media.endswith("+json")):
        raise UnsupportedMediaTypeError(
            "Content-Type must be application/json", details={"content_type": media or None}
        )


ServicesDep = Annotated[Services, Depends(get_services)]
SettingsDep = Annotated[Settings, Depends(_field(lambda s: s.settings))]
RegistryDep = Annotated[ModelRegistry, Depends(_field(lambda s: s.registry))]
ModelsDep = Annotated[ModelManager, Depends(_field(lambda s: s.models))]
PredictorDep = Annotated[Predictor, Depends(_field(lambda s: s.predictor))]
DatabaseDep = Annotated[Database, Depends(_field(lambda s: s.storage.database))]
DriftChecksDep = Annotated[DriftCheckRepository, Depends(_field(lambda s: s.storage.drift_checks))]
PredictionsDep = Annotated[PredictionRepository, Depends(_field(lambda s: s.storage.predictions))]
RetrainJobsDep = Annotated[RetrainJobRepository, Depends(_field(lambda s: s.storage.jobs))]
ModelEventsDep = Annotated[ModelEventRepository, Depends(_field(lambda s: s.storage.events))]
DriftStatusDep = Annotated[DriftStatus, Depends(_field(lambda s: s.drift_status))]
FeedbackDep = Annotated[FeedbackService, Depends(_field(lambda s: s.feedback))]
WebhooksDep = Annotated[WebhookService, Depends(_field(lambda s: s.webhooks))]
LauncherDep = Annotated[RetrainLauncher, Depends(_field(lambda s: s.launcher))]
JsonBody = Depends(require_json)
