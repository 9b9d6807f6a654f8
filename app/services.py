"""The service's collaborators in one typed container, built and torn down by ``build_services``."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import structlog
from sqlalchemy.exc import SQLAlchemyError

from app.migrations import DatabaseSchemaBehindError, require_current
from app.ml.registry import ModelRegistry
from app.monitoring.feedback import FeedbackCredentials, FeedbackService
from app.monitoring.metric_writes import WRITES
from app.monitoring.status import DriftStatus
from app.retrain.launcher import RetrainLauncher
from app.retrain.webhooks import SOURCES, WebhookService, WebhookSource, verifiers
from app.serving.batcher import InferenceBatcher
from app.serving.models import ModelManager
from app.serving.predictor import Predictor
from app.settings import Settings
from app.storage.recorder import PredictionRecorder
from app.storage.repositories import Repositories

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Services:
    """Everything a request may need, built once per worker process."""

    settings: Settings
    registry: ModelRegistry  # the model store
    models: ModelManager  # the model this worker serves, kept in sync with the store
    storage: Repositories  # the service's database: predictions, labels, drift checks, retrain jobs, alerts
    recorder: PredictionRecorder
    batcher: InferenceBatcher
    predictor: Predictor
    drift_status: DriftStatus
    feedback: FeedbackService
    launcher: RetrainLauncher
    webhooks: WebhookService
    admin_token: str | None  # read once at start; unset: the admin endpoints answer 401


async def _load_models(settings: Settings) -> tuple[ModelRegistry, ModelManager]:
    registry = ModelRegistry.from_settings(settings)
    manager = ModelManager(registry, settings.reload_interval_seconds, load_lock=settings.state_dir / "model-load.lock")
    await asyncio.to_thread(manager.sync)
    if not manager.ready:
        log.error("model_not_ready", model_store=registry.location, hint="train one: python -m app.cli train")
    return registry, manager


async def _open_database(settings: Settings) -> Repositories:
    """Open the database after checking its schema: one behind this code refuses the start
    (:class:`DatabaseSchemaBehindError`, logged ``database_schema_behind``); an unreachable database does
    not (predictions are served anyway and the recorder keeps retrying)."""
    storage = Repositories.from_settings(settings)
    try:
        await storage.database.call(require_current, storage.database.engine, "web")
    except SQLAlchemyError as exc:
        log.error("prediction_log_unavailable", reason=type(exc).__name__)
    except DatabaseSchemaBehindError:
        storage.dispose()
        raise
    return storage


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


@contextlib.asynccontextmanager
async def build_services(settings: Settings, sources: Sequence[WebhookSource] = SOURCES) -> AsyncIterator[Services]:
    """Open the model store and the prediction database, load the current model, start the background
    tasks (model watcher, drift status, batcher, prediction recorder), and stop them in reverse order on
    exit: graceful shutdown writes buffered predictions before the database is closed."""
    async with contextlib.AsyncExitStack() as stack:
        process_default = WRITES.interval
        WRITES.interval = settings.metrics_write_seconds
        stack.callback(setattr, WRITES, "interval", process_default)
        stack.callback(WRITES.flush)  # the metric writes of the requests served until the end
        registry, models = await _load_models(settings)
        stack.callback(registry.close)  # a store in the database holds connections; closed after the watcher
        storage = await _open_database(settings)
        stack.callback(storage.dispose)
        recorder = PredictionRecorder.from_settings(storage.predictions, settings)
        recorder.start()
        stack.push_async_callback(recorder.close)
        batcher = InferenceBatcher(settings.inference_max_batch, measure=settings.monitoring_enabled)
        batcher.start()
        stack.push_async_callback(batcher.stop)
        drift_status = DriftStatus(storage.drift_checks, settings.drift_status_refresh_seconds)
        for task in (
            asyncio.create_task(models.watch(), name="model-watcher"),
            asyncio.create_task(drift_status.watch(), name="drift-status"),
        ):
            stack.push_async_callback(_cancel, task)
        launcher, feedback, webhooks = _request_services(settings, sources, storage, recorder)
        yield Services(
            settings=settings,
            registry=registry,
            models=models,
            storage=storage,
            recorder=recorder,
            batcher=batcher,
            predictor=Predictor(models, batcher, recorder if settings.monitoring_enabled else None),
            drift_status=drift_status,
            feedback=feedback,
            launcher=launcher,
            webhooks=webhooks,
            admin_token=settings.secret("admin_token"),
        )


def _request_services(
    settings: Settings, sources: Sequence[WebhookSource], storage: Repositories, recorder: PredictionRecorder
) -> tuple[RetrainLauncher, FeedbackService, WebhookService]:
    """The retrain launcher and the services the feedback and webhook routes call."""
    launcher = RetrainLauncher(
        settings.model_store,
        storage.jobs,
        settings.retrain_cooldown_seconds,
        settings.as_env(),
        mode=settings.retrain_mode,
    )
    feedback = FeedbackService(
        storage.predictions, recorder, settings.live_accuracy_window, FeedbackCredentials.from_settings(settings)
    )
    webhooks = WebhookService(
        verifiers(settings, sources),
        settings.retrain_alert_names,
        storage.alerts,
        launcher,
        drift_checks=storage.drift_checks,
        min_estimated_drop_points=settings.retrain_min_estimated_drop_points,
    )
    return launcher, feedback, webhooks
