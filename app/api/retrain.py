"""Alert webhooks (``/v1/webhooks/<source>``, one route per registered source) and admin retrain endpoints."""

from __future__ import annotations

import re
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from app.api.deps import DatabaseDep, JsonBody, LauncherDep, RetrainJobsDep, ServicesDep, WebhooksDep
from app.api.schemas import ErrorOut, RetrainJobOut, WebhookOut
from app.errors import JobNotFoundError
from app.monitoring.status import utc
from app.retrain.alerts import UnauthorizedError, bearer_matches
from app.retrain.webhooks import WebhookService, WebhookSource
from app.storage.database import Database
from app.storage.retrain_jobs import RetrainJob

router = APIRouter(tags=["retrain"])
_ERRORS: dict[int | str, dict[str, Any]] = {s: {"model": ErrorOut} for s in (401, 413, 415, 422, 503)}
_ADMIN_ERRORS: dict[int | str, dict[str, Any]] = {s: {"model": ErrorOut} for s in (401, 503)}

# What a job id can be: RetrainLauncher makes them as uuid4().hex. Anything else (NUL, which PostgreSQL refuses
# even as a query parameter, or more than the column's 32 characters) names no job and never reaches the database.
_JOB_ID = re.compile(r"[0-9a-f]{32}", re.ASCII)


async def require_admin(request: Request, services: ServicesDep) -> None:
    """401 unless ``Authorization: Bearer <SENTIMENT_ADMIN_TOKEN>``; with no admin token set, always 401."""
    if not bearer_matches(request.headers.get("authorization", ""), services.admin_token):
        raise UnauthorizedError("admin token required")


Admin = Depends(require_admin)


def _inline_refs(schema: Any, defs: dict[str, Any]) -> Any:
    """``schema`` with every ``#/$defs/`` reference replaced by its definition (payloads are not recursive)."""
    if isinstance(schema, dict):
        ref = schema.get("$ref", "")
        if ref.startswith("#/$defs/"):
            return _inline_refs(defs[ref.removeprefix("#/$defs/")], defs)
        return {key: _inline_refs(value, defs) for key, value in schema.items() if key != "$defs"}
    if isinstance(schema, list):
        return [_inline_refs(item, defs) for item in schema]
    return schema


def _documented_body(payload: type[BaseModel]) -> dict[str, Any]:
    """The OpenAPI request body of a payload the route reads raw (credentials come before parsing)."""
    schema = payload.model_json_schema()
    content = {"application/json": {"schema": _inline_refs(schema, schema.get("$defs", {}))}}
    return {"requestBody": {"required": True, "content": content}}


def _receiver(
    source: WebhookSource,
) -> Callable[[Request, WebhookService, Database], Coroutine[Any, Any, JSONResponse]]:
    async def receive(request: Request, service: WebhooksDep, database: DatabaseDep) -> JSONResponse:
        body = await request.body()
        # on the database's own threads: a hung database holds those, not /metrics' or reloads'
        result = await database.call(service.handle, source, request.headers, body)
        return JSONResponse(WebhookOut(**result.__dict__).model_dump(), status_code=202)

    return receive


def webhook_router(sources: Sequence[WebhookSource]) -> APIRouter:
    """``POST /v1/webhooks/<name>`` for every source, documented with its payload model."""
    webhooks = APIRouter(prefix="/v1/webhooks", tags=["retrain"])
    for source in sources:
        webhooks.add_api_route(
            f"/{source.name}",
            _receiver(source),
            methods=["POST"],
            name=source.name,
            status_code=202,
            response_model=WebhookOut,
            dependencies=[JsonBody],
            responses=_ERRORS,
            summary=source.summary,
            openapi_extra=_documented_body(source.payload),
        )
    return webhooks


def _job(job: RetrainJob) -> RetrainJobOut:
    return RetrainJobOut(
        id=job.id,
        trigger=job.trigger,
        reason=job.reason,
        status=job.status,
        outcome=job.outcome,
        started_at=utc(job.started_at),
        finished_at=utc(job.finished_at),
        candidate_version=job.candidate_version,
        details=job.details,
    )


@router.post(
    "/v1/retrain",
    status_code=202,
    response_model=WebhookOut,
    dependencies=[Admin],
    responses=_ADMIN_ERRORS,
    summary="Start a retrain now (admin)",
)
async def start_retrain(launcher: LauncherDep, database: DatabaseDep) -> JSONResponse:
    launch = await database.call(launcher.start, "manual", "requested through /v1/retrain")
    body = WebhookOut(status=launch.action, job_id=launch.job_id, retry_after_seconds=launch.retry_after_seconds)
    return JSONResponse(body.model_dump(), status_code=202)


@router.get(
    "/v1/retrain/jobs",
    response_model=list[RetrainJobOut],
    dependencies=[Admin],
    responses=_ADMIN_ERRORS,
    summary="Recent retrain jobs, newest first (admin)",
)
async def list_jobs(jobs: RetrainJobsDep, launcher: LauncherDep) -> list[RetrainJobOut]:
    await jobs.call(launcher.reconcile)
    return [_job(job) for job in await jobs.call(jobs.recent, 50)]


@router.get(
    "/v1/retrain/jobs/{job_id}",
    response_model=RetrainJobOut,
    dependencies=[Admin],
    responses={**_ADMIN_ERRORS, 404: {"model": ErrorOut}},
    summary="One retrain job (admin)",
)
async def get_job(job_id: str, jobs: RetrainJobsDep, launcher: LauncherDep) -> RetrainJobOut:
    if not _JOB_ID.fullmatch(job_id):
        raise JobNotFoundError("no such retrain job")  # not echoed: it can be 1 KiB of control bytes
    await jobs.call(launcher.reconcile)
    job = await jobs.call(jobs.get, job_id)
    if job is None:
        raise JobNotFoundError(f"no retrain job {job_id!r}", details={"job_id": job_id})
    return _job(job)
