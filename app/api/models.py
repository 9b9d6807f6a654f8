"""``GET /v1/models`` and ``GET /v1/models/current``: what the store holds and what is served."""

from __future__ import annotations

from fastapi import APIRouter

from app.api.deps import ModelsDep, RegistryDep
from app.api.schemas import ErrorOut, ModelListOut, ModelVersionOut
from app.ml.registry import ModelVersion

router = APIRouter(prefix="/v1/models", tags=["models"])


def _out(entry: ModelVersion, current: str | None) -> ModelVersionOut:
    meta = entry.metadata
    return ModelVersionOut(
        version=entry.version,
        stage=entry.stage,
        current=entry.version == current,
        created_at=meta.get("created_at"),
        parent=meta.get("parent"),
        metrics=meta.get("metrics", {}),
        data=meta.get("data", {}),
        params=meta.get("params", {}),
        libraries=meta.get("libraries", {}),
        artifacts=meta.get("artifacts", {}),
    )


@router.get("", response_model=ModelListOut, summary="Every registered model version")
async def list_models(registry: RegistryDep) -> ModelListOut:
    current = registry.current_version()
    return ModelListOut(current=current, versions=[_out(v, current) for v in registry.versions()])


@router.get(
    "/current",
    response_model=ModelVersionOut,
    responses={503: {"model": ErrorOut}},
    summary="The version this worker serves",
)
async def current_model(registry: RegistryDep, models: ModelsDep) -> ModelVersionOut:
    served = models.current
    return _out(registry.get(served.version), registry.current_version())


@router.get(
    "/{version}",
    response_model=ModelVersionOut,
    responses={404: {"model": ErrorOut}},
    summary="One registered model version",
)
async def get_model(version: str, registry: RegistryDep) -> ModelVersionOut:
    return _out(registry.get(version), registry.current_version())
