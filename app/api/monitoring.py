"""``GET /v1/drift``, ``POST /v1/feedback`` and ``GET /metrics``."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.exc import SQLAlchemyError

from app.api.deps import DriftStatusDep, FeedbackDep, JsonBody, LauncherDep, PredictionsDep
from app.api.schemas import DriftOut, ErrorOut, FeedbackIn, FeedbackOut
from app.errors import StorageUnavailableError
from app.monitoring.metrics import RetrainLockCollector, render
from app.monitoring.status import utc

router = APIRouter(tags=["monitoring"])

# Documents the credential in OpenAPI; the check itself is FeedbackCredentials.identify (constant-time).
FEEDBACK_BEARER = HTTPBearer(
    scheme_name="feedbackToken",
    description="A feedback token from `SENTIMENT_FEEDBACK_TOKEN[_FILE]`; its name is recorded with each label.",
    auto_error=False,
)


async def feedback_source(
    request: Request,
    service: FeedbackDep,
    _: Annotated[HTTPAuthorizationCredentials | None, Security(FEEDBACK_BEARER)],
) -> str:
    """The name of the feedback token the request presents; 401 ``unauthorized`` without a valid one."""
    return service.authenticate(request.headers.get("authorization", ""))


@router.get(
    "/v1/drift", response_model=DriftOut, responses={503: {"model": ErrorOut}}, summary="Drift status and recent checks"
)
async def drift(
    predictions: PredictionsDep,
    status: DriftStatusDep,
    limit: Annotated[int, Query(ge=1, le=500, description="How many recent checks to return.")] = 20,
) -> dict[str, Any]:
    try:
        history = await predictions.call(predictions.drift_history, limit)
    except SQLAlchemyError as exc:
        raise StorageUnavailableError("the prediction log is unavailable; retry later") from exc
    for check in history:
        check["checked_at"] = utc(check["checked_at"])
    await status.update()
    return {"current": status.summary, "history": history}


@router.post(
    "/v1/feedback",
    response_model=FeedbackOut,
    dependencies=[JsonBody],
    responses={status: {"model": ErrorOut} for status in (401, 404, 409, 415, 422, 503)},
    summary="Send the true label of a prediction (feedback token)",
)
async def feedback(
    body: FeedbackIn, service: FeedbackDep, source: Annotated[str, Depends(feedback_source)]
) -> FeedbackOut:
    receipt = await service.record(body.prediction_id, body.label, source)
    return FeedbackOut(**receipt.__dict__)


@router.get("/metrics", include_in_schema=False)
async def prometheus_metrics(launcher: LauncherDep) -> Response:
    lock = RetrainLockCollector(launcher.in_progress)
    payload, content_type = await asyncio.to_thread(render, lock)
    return Response(payload, media_type=content_type)
