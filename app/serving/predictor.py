"""Turns texts into predictions with the worker's current model."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from app.ml.data import LABELS
from app.serving.batcher import InferenceBatcher
from app.serving.models import ModelManager


@dataclass(frozen=True)
class Prediction:
    """One text's prediction: the label, its probability, both class probabilities and the model."""

    id: str
    sentiment: str
    confidence: float
    probabilities: dict[str, float]
    model_version: str


class Predictor:
    """Predicts through the batcher; every text of one call is answered by the same model version."""

    def __init__(self, models: ModelManager, batcher: InferenceBatcher) -> None:
        self.models = models
        self.batcher = batcher

    async def predict(self, texts: list[str]) -> list[Prediction]:
        model = self.models.current
        proba = await self.batcher.predict_proba(model, texts)
        predictions = []
        for row in proba.tolist():
            negative, positive = row
            label = 1 if positive >= negative else 0
            predictions.append(
                Prediction(
                    id=uuid.uuid4().hex,
                    sentiment=LABELS[label],
                    confidence=row[label],
                    probabilities={LABELS[0]: negative, LABELS[1]: positive},
                    model_version=model.version,
                )
            )
        return predictions
