"""``GET /v1/models``, ``/v1/models/current``, ``/v1/models/{version}`` and ``/v1/models/{version}/events``: what
the model store holds, what this worker serves, and each version's audit trail."""

from __future__ import annotations

import re

from fastapi import APIRouter
from sqlalchemy.exc import SQLAlchemyError

from app.api.deps import ModelEventsDep, ModelsDep, RegistryDep
from app.api.schemas import ErrorOut, ModelEventOut, ModelEventsOut, ModelListOut, ModelVersionOut
from app.errors import StorageUnavailableError, VersionNotFoundError
from app.ml.registry import ModelVersion
from app.monitoring.status import utc

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
    _check_name(version)
    return _out(registry.get(version), registry.current_version())


@router.get(
    "/{version}/events",
    response_model=ModelEventsOut,
    responses={404: {"model": ErrorOut}, 503: {"model": ErrorOut}},
    summary="A model version's lifecycle events, oldest first",
)
async def model_events(version: str, registry: RegistryDep, events: ModelEventsDep) -> ModelEventsOut:
    _check_name(version)
    registry.get(version)  # VersionNotFoundError: 404
    try:
        found = await events.call(events.for_version, version)
    except SQLAlchemyError as exc:
        raise StorageUnavailableError("the database is unavailable; retry later") from exc
    return ModelEventsOut(
        version=version,
        events=[
            ModelEventOut(
                occurred_at=utc(e.occurred_at), event=e.event, trigger=e.trigger, actor=e.actor, details=e.details
            )
            for e in found
        ],
    )


def _check_name(version: str) -> None:
    if not _VERSION_NAME.fullmatch(version):
        raise VersionNotFoundError("no such model version")  # not echoed: it can be 1 KiB of control bytes
