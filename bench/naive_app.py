"""The naive baseline: the same model behind the FastAPI server a tutorial would write.

One uvicorn process, a synchronous endpoint (FastAPI runs it in its thread pool), one ``predict_proba`` of the
scikit-learn pipeline per request; no batching, no compiled serving path, no metrics, no prediction log.
``python -m uvicorn --factory bench.naive_app:create_app``; the model is the current version of
``SENTIMENT_MODEL_STORE`` (hashes verified on load, as the service does).
"""

from __future__ import annotations

from fastapi import FastAPI
from pydantic import BaseModel

from app.ml.labels import LABELS
from app.ml.registry import ModelRegistry
from app.settings import Settings


class Review(BaseModel):
    text: str


def create_app() -> FastAPI:
    loaded = ModelRegistry.from_settings(Settings()).load_current()
    if loaded is None:
        raise SystemExit("no current model: run `python -m app.cli train` first")
    model = loaded.model
    app = FastAPI()

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/predict")
    def predict(review: Review) -> dict[str, object]:
        p_positive = float(model.predict_proba([review.text])[0][1])
        probabilities = {LABELS[0]: 1 - p_positive, LABELS[1]: p_positive}
        sentiment = max(probabilities, key=probabilities.__getitem__)
        return {
            "sentiment": sentiment,
            "confidence": probabilities[sentiment],
            "probabilities": probabilities,
            "model_version": loaded.version,
        }

    return app
