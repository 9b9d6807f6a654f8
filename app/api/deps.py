"""Typed dependency aliases: routes receive their collaborators from ``app.state``.

Every dependency is ``async def``: FastAPI runs plain ``def`` dependencies in a thread pool, a hand-off
that cost about 10 % of a worker's time per request.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from app.errors import UnsupportedMediaTypeError
from app.ml.registry import ModelRegistry
from app.monitoring.feedback import FeedbackService
from app.monitoring.prediction_log import PredictionLog
from app.monitoring.status import DriftStatus
from app.retrain.launcher import RetrainLauncher
from app.retrain.webhooks import WebhookService
from app.serving.models import ModelManager
from app.serving.predictor import Predictor
from app.settings import Settings


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]


async def get_registry(request: Request) -> ModelRegistry:
    return request.app.state.registry  # type: ignore[no-any-return]


async def get_models(request: Request) -> ModelManager:
    return request.app.state.models  # type: ignore[no-any-return]


async def get_predictor(request: Request) -> Predictor:
    return request.app.state.predictor  # type: ignore[no-any-return]


async def require_json(request: Request) -> None:
    """415 unless the body is declared as JSON (``application/json`` or ``application/*+json``)."""
    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media != "application/json" and not (media.startswith("application/") and media.endswith("+json")):
        raise UnsupportedMediaTypeError(
            "Content-Type must be application/json", details={"content_type": media or None}
        )


async def get_prediction_log(request: Request) -> PredictionLog:
    return request.app.state.prediction_log  # type: ignore[no-any-return]


async def get_drift_status(request: Request) -> DriftStatus:
    return request.app.state.drift_status  # type: ignore[no-any-return]


async def get_feedback(request: Request) -> FeedbackService:
    return request.app.state.feedback  # type: ignore[no-any-return]


async def get_webhooks(request: Request) -> WebhookService:
    return request.app.state.webhooks  # type: ignore[no-any-return]


async def get_launcher(request: Request) -> RetrainLauncher:
    return request.app.state.launcher  # type: ignore[no-any-return]


SettingsDep = Annotated[Settings, Depends(get_settings)]
RegistryDep = Annotated[ModelRegistry, Depends(get_registry)]
ModelsDep = Annotated[ModelManager, Depends(get_models)]
PredictorDep = Annotated[Predictor, Depends(get_predictor)]
PredictionLogDep = Annotated[PredictionLog, Depends(get_prediction_log)]
DriftStatusDep = Annotated[DriftStatus, Depends(get_drift_status)]
FeedbackDep = Annotated[FeedbackService, Depends(get_feedback)]
WebhooksDep = Annotated[WebhookService, Depends(get_webhooks)]
LauncherDep = Annotated[RetrainLauncher, Depends(get_launcher)]
JsonBody = Depends(require_json)
