"""``GET /healthz`` (the process answers) and ``GET /readyz`` (a verified model is loaded)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from app.api.deps import ModelsDep
from app.api.schemas import HealthOut, ReadyOut

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=HealthOut, summary="Liveness")
async def healthz() -> HealthOut:
    return HealthOut(status="ok")


@router.get("/readyz", response_model=ReadyOut, responses={503: {"model": ReadyOut}}, summary="Readiness")
async def readyz(models: ModelsDep) -> JSONResponse:
    if not models.ready:
        return JSONResponse({"status": "not_ready", "model_version": None}, status_code=503)
    return JSONResponse({"status": "ready", "model_version": models.current.version})
