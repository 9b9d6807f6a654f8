"""``POST /v1/predict`` and ``POST /v1/predict/batch``."""

# No "from __future__ import annotations": the request models are local to build_router, and FastAPI
# must see them as real classes, not strings, to read them from the body.
from typing import Any

from fastapi import APIRouter, Response

from app.api.deps import DriftStatusDep, JsonBody, PredictorDep
from app.api.schemas import BatchPredictionOut, ErrorOut, PredictionWithDriftOut, request_models
from app.settings import Settings

_ERRORS: dict[int | str, dict[str, Any]] = {status: {"model": ErrorOut} for status in (413, 415, 422, 503)}


def build_router(settings: Settings) -> APIRouter:
    """Routes whose request bodies carry the configured text and batch limits."""
    PredictRequest, BatchPredictRequest = request_models(settings.max_text_chars, settings.max_batch_size)
    router = APIRouter(prefix="/v1", tags=["predict"], dependencies=[JsonBody], responses=_ERRORS)

    @router.post("/predict", response_model=PredictionWithDriftOut, summary="Classify one text")
    async def predict(
        body: PredictRequest,  # type: ignore[valid-type]
        predictor: PredictorDep,
        drift: DriftStatusDep,
        response: Response,
    ) -> dict[str, Any]:
        (prediction,) = await predictor.predict([body.text])  # type: ignore[attr-defined]
        response.headers["X-Model-Version"] = prediction.model_version
        return {**prediction.as_dict(), "drift": drift.summary}

    @router.post("/predict/batch", response_model=BatchPredictionOut, summary="Classify several texts")
    async def predict_batch(
        body: BatchPredictRequest,  # type: ignore[valid-type]
        predictor: PredictorDep,
        drift: DriftStatusDep,
        response: Response,
    ) -> dict[str, Any]:
        predictions = await predictor.predict(body.texts)  # type: ignore[attr-defined]
        version = predictions[0].model_version
        response.headers["X-Model-Version"] = version
        return {"predictions": [p.as_dict() for p in predictions], "model_version": version, "drift": drift.summary}

    return router
