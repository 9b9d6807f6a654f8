"""Turns texts into predictions with the worker's current model, and records what it predicted."""

from __future__ import annotations

import asyncio
import functools
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import structlog
from numpy.typing import NDArray
from prometheus_client import Counter, Histogram

from app.ml.labels import LABELS
from app.ml.model import decide
from app.monitoring import metrics
from app.monitoring.metric_writes import WRITES
from app.serving.batcher import InferenceBatcher
from app.serving.models import ModelManager
from app.storage.predictions import LOG_COLUMNS, LogRow
from app.storage.recorder import PredictionRecorder

log = structlog.get_logger(__name__)

_TEXT_LENGTH, _SENTIMENT, _CONFIDENCE, _VERSION = (
    LOG_COLUMNS.index(c) for c in ("text_length", "sentiment", "confidence", "model_version")
)


@dataclass(frozen=True)
class Prediction:
    """One text's prediction: the label, its probability, both class probabilities and the model."""

    id: str
    sentiment: str
    confidence: float
    probabilities: dict[str, float]
    model_version: str

    def as_dict(self) -> dict[str, Any]:
        """The response fields; a plain copy, six times cheaper than ``dataclasses.asdict``'s deep copy."""
        return {
            "id": self.id,
            "sentiment": self.sentiment,
            "confidence": self.confidence,
            "probabilities": self.probabilities,
            "model_version": self.model_version,
        }


_UUID7_VERSION_AND_VARIANT = (0x7 << 76) | (0b10 << 62)
_RAND_A, _RAND_B = (1 << 12) - 1, (1 << 62) - 1


def prediction_ids(n: int) -> list[str]:
    """``n`` new prediction ids: UUIDv7 (RFC 9562) as 32 hex digits, the Unix time in milliseconds then 74
    random bits.

    Time-ordered, so the prediction log's primary-key index grows at its end: with random ids (uuid4) each
    insert lands on a random page of the index, and SQLite spent 19.7 us of CPU per row on a 200,000-row log
    where ordered ids take 4.8 us (``bench/flush_contention.py`` measures the flush). The random bits keep
    ids unguessable; the time in them is the prediction's own, which its client already knows.
    """
    prefix = (time.time_ns() // 1_000_000) << 80 | _UUID7_VERSION_AND_VARIANT
    entropy = os.urandom(10 * n)
    ids = []
    for i in range(n):
        rand = int.from_bytes(entropy[10 * i : 10 * i + 10], "big")
        ids.append(f"{prefix | ((rand >> 62) & _RAND_A) << 64 | (rand & _RAND_B):032x}")
    return ids


def _predictions(version: str, proba: NDArray[np.float64]) -> list[Prediction]:
    predictions = []
    ids = prediction_ids(len(proba))
    for (negative, positive), label, prediction_id in zip(
        proba.tolist(), decide(proba[:, 1]).tolist(), ids, strict=True
    ):
        predictions.append(
            Prediction(
                id=prediction_id,
                sentiment=LABELS[label],
                confidence=positive if label else negative,
                probabilities={LABELS[0]: negative, LABELS[1]: positive},
                model_version=version,
            )
        )
    return predictions


class Predictor:
    """Predicts through the batcher; every text of one call is answered by the same model version.

    With a recorder, every prediction is counted in the Prometheus metrics and appended to the
    prediction log (buffered; the request never waits for the database). Recording is per model call:
    the batcher hands each request's rows to :meth:`_stage` in the batch step, which schedules one
    :meth:`_record_staged` ahead of the callers' wake-ups: a batch costs one spool write and one round of
    gathered counts (``bench/request_profile.py``: 15 us down to 7 us per request at 14 requests per model
    call), every prediction is spooled before its response is sent, and its metric writes are gathered with
    the worker's others (:mod:`app.monitoring.metric_writes`).
    """

    def __init__(self, models: ModelManager, batcher: InferenceBatcher, recorder: PredictionRecorder | None) -> None:
        self.models = models
        self.batcher = batcher
        self.recorder = recorder
        self._staged: list[LogRow] = []  # rows predicted, not yet counted nor recorded
        self._scheduled = False
        self._children: dict[tuple[str, str], tuple[Counter, Histogram]] = {}  # (version, sentiment) -> metrics

    async def predict(self, texts: list[str]) -> list[Prediction]:
        model = self.models.current
        if self.recorder is None:
            return _predictions(model.version, await self.batcher.predict_proba(model, texts))
        predictions: list[Prediction] = []
        stage = functools.partial(self._stage, model.version, texts, time.perf_counter(), predictions)
        await self.batcher.predict_proba(model, texts, stage)
        self._record_staged()  # a no-op unless something resumed this call before the scheduled recording
        return predictions

    def _stage(
        self, version: str, texts: list[str], started: float, out: list[Prediction], proba: NDArray[np.float64]
    ) -> None:
        """The batcher's ``on_result``: build this call's predictions and queue their rows for recording."""
        latency_ms = (time.perf_counter() - started) * 1000
        now = time.time()
        out.extend(_predictions(version, proba))
        positive = LABELS[1]
        self._staged += [  # in the order of LOG_COLUMNS
            (p.id, now, text, len(text), p.sentiment, p.confidence, p.probabilities[positive], version, latency_ms)
            for text, p in zip(texts, out, strict=True)
        ]
        if not self._scheduled:
            # Before the wake-ups of this batch's callers, which the batcher schedules after this call.
            asyncio.get_running_loop().call_soon(self._record_scheduled)
            self._scheduled = True

    def _record_scheduled(self) -> None:
        self._scheduled = False
        try:
            self._record_staged()
        except Exception as exc:  # the recorder never raises; a metric write should not: logged, not fatal
            log.exception("prediction_record_failed", reason=type(exc).__name__)

    def _record_staged(self) -> None:
        """Spool and buffer the staged rows (one write), then count them (gathered with the worker's other
        metric writes: :mod:`app.monitoring.metric_writes`)."""
        if not self._staged:
            return
        rows, self._staged = self._staged, []
        assert self.recorder is not None
        self.recorder.record(rows)
        confidences: dict[tuple[str, str], list[float]] = {}
        for row in rows:
            confidences.setdefault((row[_VERSION], row[_SENTIMENT]), []).append(row[_CONFIDENCE])
        for key, values in confidences.items():
            children = self._children.get(key)
            if children is None:
                children = self._children[key] = (
                    metrics.PREDICTIONS.labels(*key),
                    metrics.PREDICTION_CONFIDENCE.labels(*key),
                )
            WRITES.inc(children[0], len(values))
            WRITES.observe_many(children[1], values)
        WRITES.observe_many(metrics.TEXT_LENGTH, [row[_TEXT_LENGTH] for row in rows])
