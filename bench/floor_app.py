"""The benchmark floor: a bare FastAPI endpoint returning fixed JSON, served by the same gunicorn config.

``gunicorn -c app/gunicorn_conf.py 'bench.floor_app:create_app()'``; POST /v1/predict ignores its body.
"""

from __future__ import annotations

from fastapi import FastAPI

_FIXED = {
    "id": "00000000000000000000000000000000",
    "sentiment": "positive",
    "confidence": 0.9,
    "probabilities": {"negative": 0.1, "positive": 0.9},
    "model_version": "floor",
}


def create_app() -> FastAPI:
    app = FastAPI()

    @app.post("/v1/predict")
    async def predict() -> dict[str, object]:
        return _FIXED

    return app
