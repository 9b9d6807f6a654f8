"""Alert webhooks (``/v1/webhooks/alertmanager``, ``/v1/webhooks/grafana``) and admin retrain endpoints."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from app.api.deps import JsonBody, LauncherDep, PredictionLogDep, SettingsDep, WebhooksDep
from app.api.schemas import ErrorOut, RetrainJobOut, WebhookOut
from app.errors import JobNotFoundError
from app.monitoring.status import iso
from app.retrain.alerts import UnauthorizedError, bearer_matches
from app.retrain.webhooks import Source, WebhookService

router = APIRouter(tags=["retrain"])
_ERRORS: dict[int | str, dict[str, Any]] = {s: {"model": ErrorOut} for s in (401, 413, 415, 422)}


async def require_admin(request: Request, settings: SettingsDep) -> None:
    """401 unless ``Authorization: Bearer <SENTIMENT_ADMIN_TOKEN>``; with no admin token set, always 401."""
    if not bearer_matches(request.headers.get("authorization", ""), settings.secret("admin_token")):
        raise UnauthorizedError("admin token required")


Admin = Depends(require_admin)


async def _webhook(source: Source, request: Request, service: WebhookService) -> JSONResponse:
    body = await request.body()
    headers = {k.lower(): v for k, v in request.headers.items()}
    result = await asyncio.to_thread(service.handle, source, headers, body)
    return JSONResponse(WebhookOut(**result.__dict__).model_dump(), status_code=202)


@router.post(
    "/v1/webhooks/alertmanager",
    status_code=202,
    response_model=WebhookOut,
    dependencies=[JsonBody],
    responses=_ERRORS,
    summary="Alertmanager webhook receiver (version 4)",
)
async def alertmanager(request: Request, service: WebhooksDep) -> JSONResponse:
    return await _webhook("alertmanager", request, service)


@router.post(
    "/v1/webhooks/grafana",
    status_code=202,
    response_model=WebhookOut,
    dependencies=[JsonBody],
    responses=_ERRORS,
    summary="Grafana Alerting webhook contact point (version 1)",
)
async def grafana(request: Request, service: WebhooksDep) -> JSONResponse:
    return await _webhook("grafana", request, service)


def _job(row: dict[str, Any]) -> RetrainJobOut:
    return RetrainJobOut(**{**row, "started_at": iso(row["started_at"]), "finished_at": iso(row["finished_at"])})


@router.post(
    "/v1/retrain",
    status_code=202,
    response_model=WebhookOut,
    dependencies=[Admin],
    responses={401: {"model": ErrorOut}},
    summary="Start a retrain now (admin)",
)
async def start_retrain(launcher: LauncherDep) -> JSONResponse:
    launch = await asyncio.to_thread(launcher.start, "manual", "requested through /v1/retrain")
    body = WebhookOut(status=launch.action, job_id=launch.job_id, retry_after_seconds=launch.retry_after_seconds)
    return JSONResponse(body.model_dump(), status_code=202)


@router.get(
    "/v1/retrain/jobs",
    response_model=list[RetrainJobOut],
    dependencies=[Admin],
    responses={401: {"model": ErrorOut}},
    summary="Recent retrain jobs, newest first (admin)",
)
async def list_jobs(store: PredictionLogDep, launcher: LauncherDep) -> list[RetrainJobOut]:
    await asyncio.to_thread(launcher.reconcile)
    return [_job(r) for r in await asyncio.to_thread(store.jobs, 50)]


@router.get(
    "/v1/retrain/jobs/{job_id}",
    response_model=RetrainJobOut,
    dependencies=[Admin],
    responses={401: {"model": ErrorOut}, 404: {"model": ErrorOut}},
    summary="One retrain job (admin)",
)
async def get_job(job_id: str, store: PredictionLogDep, launcher: LauncherDep) -> RetrainJobOut:
    await asyncio.to_thread(launcher.reconcile)
    rows = await asyncio.to_thread(store.jobs, 1, job_id)
    if not rows:
        raise JobNotFoundError(f"no retrain job {job_id!r}", details={"job_id": job_id})
    return _job(rows[0])
