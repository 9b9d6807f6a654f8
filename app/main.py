"""The FastAPI application factory; gunicorn loads ``app.main:create_app()``."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence

import structlog
from fastapi import FastAPI
from starlette.middleware import Middleware

from app.api import health, models, monitoring, predict, retrain
from app.api.errors import install_error_handlers
from app.api.middleware import (
    AccessLogMiddleware,
    BodyLimitMiddleware,
    BodyReadTimeoutMiddleware,
    InternalErrorMiddleware,
    RequestIdMiddleware,
    Utf8BodyMiddleware,
)
from app.monitoring.feedback import FeedbackCredentials
from app.retrain.webhooks import SOURCES, WebhookSource, verifiers
from app.services import build_services
from app.settings import Settings

log = structlog.get_logger(__name__)

DESCRIPTION = """
Sentiment (positive / negative) of English text from a versioned scikit-learn model.

Every response carries `X-Request-ID` (yours, if you sent a sane one) and prediction responses carry
`X-Model-Version`. Errors always have the shape `{"error": {"code", "message", "details"}}`.
"""


def check_secrets(settings: Settings) -> None:
    """Read every secret that has a ``_FILE`` twin once: an unreadable file stops the start (gunicorn refuses
    to boot, the log names the setting) rather than failing every call that needs it."""
    for name in Settings.model_fields:
        if f"{name}_file" in Settings.model_fields:
            try:
                settings.secret(name)
            except ValueError as exc:
                log.error("secret_unreadable", setting=f"SENTIMENT_{name.upper()}_FILE", reason=str(exc))
                raise


def create_app(settings: Settings | None = None, sources: Sequence[WebhookSource] = SOURCES) -> FastAPI:
    """Build the app: one webhook route per source; the lifespan builds the services (it loads the model
    store's current model and keeps it in sync) and puts them on ``app.state.services``."""
    settings = settings or Settings()
    check_secrets(settings)
    verifiers(settings, sources)  # fail fast: gunicorn does not boot a service whose webhooks anyone could call
    FeedbackCredentials.from_settings(settings)  # fail fast on a malformed feedback token list

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            app.state.services = await stack.enter_async_context(build_services(settings, sources))
            yield

    app = FastAPI(
        title="Sentiment service",
        version="1.0.0",
        description=DESCRIPTION,
        lifespan=lifespan,
        # FastAPI's native OpenTelemetry looks up the global providers on every request (~5 % of a worker's
        # samples under load); the service reports through Prometheus and its JSON logs instead.
        telemetry={"tracing": False, "metrics": False, "logs": False},
        middleware=[  # outermost first
            Middleware(RequestIdMiddleware),
            Middleware(AccessLogMiddleware, measure=settings.monitoring_enabled),
            Middleware(InternalErrorMiddleware),
            Middleware(BodyReadTimeoutMiddleware, timeout_seconds=settings.body_read_timeout_seconds),
            Middleware(BodyLimitMiddleware, max_body_bytes=settings.max_body_bytes),
            Middleware(Utf8BodyMiddleware),
        ],
    )
    install_error_handlers(app)
    app.include_router(predict.build_router(settings))
    app.include_router(models.router)
    app.include_router(monitoring.router)
    app.include_router(retrain.webhook_router(sources))
    app.include_router(retrain.router)
    app.include_router(health.router)
    return app
