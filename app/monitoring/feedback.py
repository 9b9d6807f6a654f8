"""Feedback: the true label of a logged prediction, which live accuracy and retraining are built on."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from sqlalchemy.exc import SQLAlchemyError

from app.errors import FeedbackConflictError, PredictionNotFoundError, StorageUnavailableError
from app.monitoring import metrics
from app.monitoring.prediction_log import LabelOutcome, LabelResult, PredictionLog, PredictionRecorder


@dataclass(frozen=True)
class FeedbackReceipt:
    prediction_id: str
    label: str
    predicted: str
    correct: bool
    already_recorded: bool
    live_accuracy: float | None


class FeedbackService:
    """Labels predictions in the log and keeps ``sentiment_live_accuracy`` current."""

    def __init__(self, predictions: PredictionLog, recorder: PredictionRecorder, accuracy_window: int) -> None:
        self.predictions = predictions
        self.recorder = recorder
        self.accuracy_window = accuracy_window

    async def _label(self, prediction_id: str, label: str) -> LabelResult:
        try:
            return await self.predictions.call(self.predictions.set_label, prediction_id, label)
        except SQLAlchemyError as exc:
            raise StorageUnavailableError("the prediction log is unavailable; retry later") from exc

    async def record(self, prediction_id: str, label: str) -> FeedbackReceipt:
        """Store ``label`` for the prediction: idempotent for the same label, 409 for a different one.

        A prediction may still sit in some worker's write buffer for up to one flush interval, so an
        unknown id is looked up once more after that interval before it is declared unknown.
        """
        await self.recorder.flush()
        result = await self._label(prediction_id, label)
        if result.outcome is LabelOutcome.NOT_FOUND:
            await asyncio.sleep(self.recorder.flush_interval * 2)
            result = await self._label(prediction_id, label)
        if result.outcome is LabelOutcome.NOT_FOUND:
            raise PredictionNotFoundError(
                f"no prediction with id {prediction_id!r}", details={"prediction_id": prediction_id}
            )
        if result.outcome is LabelOutcome.CONFLICT:
            raise FeedbackConflictError(
                f"prediction {prediction_id} is already labelled {result.label!r}",
                details={"prediction_id": prediction_id, "label": result.label},
            )
        accuracy: float | None = None
        if result.outcome is LabelOutcome.STORED:
            metrics.FEEDBACK.labels(sentiment=label).inc()
            try:
                accuracy, _ = await self.predictions.call(self.predictions.live_accuracy, self.accuracy_window)
            except SQLAlchemyError:
                accuracy = None
            if accuracy is not None:
                metrics.LIVE_ACCURACY.set(accuracy)
        assert result.sentiment is not None
        return FeedbackReceipt(
            prediction_id,
            label,
            result.sentiment,
            result.sentiment == label,
            result.outcome is LabelOutcome.UNCHANGED,
            accuracy,
        )
