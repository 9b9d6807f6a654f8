"""``GET /v1/models``, ``/v1/models/current`` and ``/v1/models/{version}``: what the model store holds and
what this worker serves."""

from __future__ import annotations

import re

from fastapi import APIRouter

from app.api.deps import ModelsDep, RegistryDep
from app.api.schemas import ErrorOut, ModelListOut, ModelVersionOut
from app.errors import VersionNotFoundError
from app.ml.registry import ModelVersion

router = APIRouter(prefix="/v1/models", tags=["models"])

# What a version folder can be called: the store never makes other names, and anything else (NUL, a path
# separator, a name longer than the file system takes) must not reach it as a path.
_VERSION_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+-]{0,127}", re.ASCII)


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
    if not _VERSION_NAME.fullmatch(version):
        raise VersionNotFoundError("no such model version")  # not echoed: it can be 1 KiB of control bytes
    return _out(registry.get(version), registry.current_version())
