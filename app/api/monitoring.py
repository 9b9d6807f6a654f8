"""``GET /v1/drift``, ``GET /v1/drift/checks/{id}``, ``POST /v1/feedback`` and ``GET /metrics``."""

from __future__ import annotations

import asyncio
from dataclasses import asdict
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Request, Response, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.exc import SQLAlchemyError

from app.api.deps import (
    DriftChecksDep,
    DriftStatusDep,
    FeedbackDep,
    JsonBody,
    LauncherDep,
    PredictionsDep,
    SettingsDep,
)
from app.api.schemas import (
    AccuracyEstimateOut,
    DriftCheckDetailOut,
    DriftCheckOut,
    DriftExplanationOut,
    DriftOut,
    DriftSummary,
    ErrorOut,
    EstimatedAccuracyOut,
    ExplainedCheckOut,
    FeedbackIn,
    FeedbackOut,
    LiveAccuracyOut,
)
from app.errors import DriftCheckNotFoundError, StorageUnavailableError
from app.monitoring.metrics import RetrainLockCollector, render
from app.monitoring.performance import estimated_drop
from app.monitoring.report import drift_report, estimates_of
from app.monitoring.status import utc
from app.storage.drift_checks import DriftCheck

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


def _check_out(check: DriftCheck) -> DriftCheckOut:
    return DriftCheckOut(
        **{**asdict(check), "checked_at": utc(check.checked_at), "explained": check.explanation is not None}
    )


def _estimated_out(check: DriftCheck | None) -> EstimatedAccuracyOut | None:
    estimates = None if check is None or check.id is None else estimates_of(check)
    if check is None or check.id is None or estimates is None:
        return None
    window, reference = estimates
    return EstimatedAccuracyOut(
        **window.to_dict(),
        check_id=check.id,
        checked_at=utc(check.checked_at),
        model_version=check.model_version,
        reference=None if reference is None else AccuracyEstimateOut(**reference.to_dict()),
        drop_points=None if reference is None else round(estimated_drop(window, reference) * 100, 2),
    )


def _explained_out(check: DriftCheck | None) -> ExplainedCheckOut | None:
    if check is None or check.id is None or check.explanation is None:
        return None
    return ExplainedCheckOut(
        check_id=check.id,
        checked_at=utc(check.checked_at),
        model_version=check.model_version,
        explanation=DriftExplanationOut.model_validate(check.explanation),
    )


@router.get(
    "/v1/drift", response_model=DriftOut, responses={503: {"model": ErrorOut}}, summary="Drift status and recent checks"
)
async def drift(
    drift_checks: DriftChecksDep,
    predictions: PredictionsDep,
    settings: SettingsDep,
    status: DriftStatusDep,
    limit: Annotated[int, Query(ge=1, le=500, description="How many recent checks to return.")] = 20,
) -> DriftOut:
    try:
        report = await drift_checks.call(drift_report, drift_checks, predictions, limit, settings.live_accuracy_window)
    except SQLAlchemyError as exc:
        raise StorageUnavailableError("the prediction log is unavailable; retry later") from exc
    await status.update()
    return DriftOut(
        current=DriftSummary(**status.summary),
        history=[_check_out(check) for check in report.history],
        estimated_accuracy=_estimated_out(report.estimated),
        live_accuracy=LiveAccuracyOut(**asdict(report.live_accuracy)),
        explanation=_explained_out(report.explained),
    )


@router.get(
    "/v1/drift/checks/{check_id}",
    response_model=DriftCheckDetailOut,
    responses={status: {"model": ErrorOut} for status in (404, 422, 503)},
    summary="One drift check and its explanation",
)
async def drift_check(
    check_id: Annotated[int, Path(ge=1, le=2**31 - 1, description="The check's id, as `/v1/drift` lists it.")],
    drift_checks: DriftChecksDep,
) -> DriftCheckDetailOut:
    try:
        check = await drift_checks.call(drift_checks.get, check_id)
    except SQLAlchemyError as exc:
        raise StorageUnavailableError("the prediction log is unavailable; retry later") from exc
    if check is None:
        raise DriftCheckNotFoundError(f"no drift check {check_id}", details={"check_id": check_id})
    return DriftCheckDetailOut(**_check_out(check).model_dump(), explanation=check.explanation)


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
