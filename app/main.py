"""The FastAPI application factory; gunicorn loads ``app.main:create_app()``."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import structlog
from fastapi import FastAPI

from app.api import health, models, predict
from app.api.errors import install_error_handlers
from app.api.middleware import RequestContextMiddleware
from app.ml.registry import ModelRegistry
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

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        registry = ModelRegistry(settings.model_store)
        manager = ModelManager(registry, settings.reload_interval_seconds)
        await asyncio.to_thread(manager.sync)
        if not manager.ready:
            log.error(
                "model_not_ready", model_store=str(settings.model_store), hint="train one: python -m app.cli train"
            )
        batcher = InferenceBatcher(settings.inference_max_batch)
        batcher.start()
        app.state.settings = settings
        app.state.registry = registry
        app.state.models = manager
        app.state.predictor = Predictor(manager, batcher)
        watcher = asyncio.create_task(manager.watch(), name="model-watcher")
        try:
            yield
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            await batcher.stop()

    app = FastAPI(
        title="Sentiment service",
        version="1.0.0",
        description=DESCRIPTION,
        lifespan=lifespan,
    )
    install_error_handlers(app)
    app.include_router(predict.build_router(settings))
    app.include_router(models.router)
    app.include_router(health.router)
    app.add_middleware(RequestContextMiddleware, max_body_bytes=settings.max_body_bytes)
    return app
