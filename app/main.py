"""The FastAPI application factory; gunicorn loads ``app.main:create_app()``."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import structlog
from fastapi import FastAPI
from sqlalchemy.exc import SQLAlchemyError

from app.api import health, models, monitoring, predict, retrain
from app.api.errors import install_error_handlers
from app.api.middleware import RequestContextMiddleware
from app.ml.registry import ModelRegistry
from app.monitoring.feedback import FeedbackService
from app.monitoring.prediction_log import PredictionLog, PredictionRecorder
from app.monitoring.status import DriftStatus
from app.retrain.alerts import WebhookAuth
from app.retrain.launcher import RetrainLauncher
from app.retrain.webhooks import WebhookService
from app.serving.batcher import InferenceBatcher
from app.serving.models import ModelManager
from app.serving.predictor import Predictor
from app.settings import Settings

log = structlog.get_logger(__name__)

DESCRIPTION = """
Sentiment (positive / negative) of English text from a versioned scikit-learn model.

Every response carries `X-Request-ID` (yours, if you sent a sane one) and prediction responses carry
`X-Model-Version`. Errors always have the shape `{"error": {"code", "message", "details"}}`.
"""


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; the lifespan loads the store's current model and keeps it in sync with the store."""
    settings = settings or Settings()
    auth = WebhookAuth(
        bearer_token=settings.secret("webhook_token"),
        basic_username=settings.webhook_basic_username,
        basic_password=settings.secret("webhook_basic_password"),
        hmac_secret=settings.secret("grafana_hmac_secret"),
        signature_header=settings.grafana_signature_header,
        timestamp_header=settings.grafana_timestamp_header,
        replay_window_seconds=settings.grafana_replay_window_seconds,
        allow_unauthenticated=settings.allow_unauthenticated_webhooks,
    )
    auth.check_configured()  # fail fast: gunicorn does not boot a service whose webhooks anyone could call

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        registry = ModelRegistry(settings.model_store)
        manager = ModelManager(
            registry, settings.reload_interval_seconds, load_lock=settings.state_dir / "model-load.lock"
        )
        await asyncio.to_thread(manager.sync)
        if not manager.ready:
            log.error(
                "model_not_ready", model_store=str(settings.model_store), hint="train one: python -m app.cli train"
            )
        store = PredictionLog(settings.prediction_log_url)
        try:
            await asyncio.to_thread(store.create_tables)
        except SQLAlchemyError as exc:  # predictions are served anyway; the recorder keeps retrying
            log.error("prediction_log_unavailable", reason=type(exc).__name__)
        recorder = PredictionRecorder(store, settings.prediction_log_flush_seconds, settings.prediction_log_max_buffer)
        batcher = InferenceBatcher(settings.inference_max_batch, measure=settings.monitoring_enabled)
        drift_status = DriftStatus(store, settings.drift_status_refresh_seconds)
        app.state.settings = settings
        app.state.registry = registry
        app.state.models = manager
        app.state.prediction_log = store
        app.state.drift_status = drift_status
        app.state.feedback = FeedbackService(store, recorder, settings.live_accuracy_window)
        app.state.predictor = Predictor(manager, batcher, recorder if settings.monitoring_enabled else None)
        launcher = RetrainLauncher(settings.model_store, store, settings.retrain_cooldown_seconds, settings.as_env())
        app.state.launcher = launcher
        app.state.webhooks = WebhookService(auth, settings.retrain_alert_names, store, launcher)
        batcher.start()
        recorder.start()
        tasks = [
            asyncio.create_task(manager.watch(), name="model-watcher"),
            asyncio.create_task(drift_status.watch(), name="drift-status"),
        ]
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await batcher.stop()
            await recorder.close()  # graceful shutdown: buffered predictions reach the log
            store.dispose()

    app = FastAPI(
        title="Sentiment service",
        version="1.0.0",
        description=DESCRIPTION,
        lifespan=lifespan,
    )
    install_error_handlers(app)
    app.include_router(predict.build_router(settings))
    app.include_router(models.router)
    app.include_router(monitoring.router)
    app.include_router(retrain.router)
    app.include_router(health.router)
    app.add_middleware(
        RequestContextMiddleware, max_body_bytes=settings.max_body_bytes, measure=settings.monitoring_enabled
    )
    return app
