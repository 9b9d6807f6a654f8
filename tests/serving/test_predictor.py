"""The prediction record a response is built from, and how the predictor records what it predicted."""

from __future__ import annotations

import asyncio
import marshal
import struct
import uuid
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from prometheus_client import REGISTRY

from app.monitoring.spool import PredictionSpool
from app.serving import predictor
from app.serving.batcher import InferenceBatcher
from app.serving.models import ServedModel
from app.serving.predictor import Prediction, Predictor, prediction_ids
from app.storage.database import Database
from app.storage.predictions import LOG_COLUMNS, PredictionRepository
from app.storage.recorder import PredictionRecorder


def test_as_dict_has_every_field_asdict_has() -> None:
    prediction = Prediction("a" * 32, "positive", 0.8, {"negative": 0.2, "positive": 0.8}, "v1")
    assert prediction.as_dict() == asdict(prediction)


def test_prediction_ids_are_uuid7_ordered_by_time_and_unique(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter([1_796_000_000_000_000_000, 1_796_000_000_001_000_000])  # two calls, 1 ms apart
    monkeypatch.setattr(predictor.time, "time_ns", lambda: next(clock))
    first, second = prediction_ids(1000), prediction_ids(1)
    assert len(set(first)) == 1000
    for value in [*first, *second]:
        parsed = uuid.UUID(hex=value)
        assert len(value) == 32 and parsed.version == 7 and parsed.variant == uuid.RFC_4122
    assert {int(value[:12], 16) for value in first} == {1_796_000_000_000}
    assert max(first) < second[0]  # a later millisecond sorts after every id of an earlier one
    assert len({value[13:] for value in first}) == 1000  # the rest is random


class HalfModel:
    """P(positive) = 0.25 for texts starting with "n", 0.75 otherwise: a model with known answers."""

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        positive = np.array([0.25 if t.startswith("n") else 0.75 for t in texts])
        return np.column_stack([1 - positive, positive])


def _sample(name: str, labels: dict[str, str]) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_one_model_call_is_recorded_with_one_spool_write_before_any_of_its_callers_resumes(tmp_path: Path) -> None:
    """Concurrent requests answered by one model call: every prediction is counted, buffered and spooled
    (one spool record for the batch) by the time each caller gets its predictions back."""
    spool = PredictionSpool(tmp_path / "spool")
    spool.open()
    recorder = PredictionRecorder(
        PredictionRepository(Database(f"sqlite:///{tmp_path / 'log.db'}")), 10, 1000, spool=spool
    )
    model = ServedModel("v-batch", {}, HalfModel(), compiled=False)
    models = SimpleNamespace(current=model)
    labels = {"model_version": "v-batch", "sentiment": "positive"}
    before = _sample("sentiment_predictions_total", labels)
    seen_on_return: list[bool] = []

    async def one(predictor: Predictor, text: str) -> list[Prediction]:
        predictions = await predictor.predict([text])
        buffered = {row[0] for _, _, row in recorder._buffer}
        seen_on_return.append(all(p.id in buffered for p in predictions))
        return predictions

    async def scenario() -> list[list[Prediction]]:
        batcher = InferenceBatcher(max_batch=64)
        batcher.start()
        predictor = Predictor(models, batcher, recorder)  # type: ignore[arg-type]
        results = await asyncio.gather(*(one(predictor, t) for t in texts))
        await batcher.stop()
        return results

    texts = [f"{'n' if i % 3 == 0 else 'p'} review {i}" for i in range(12)]
    results = asyncio.run(scenario())
    spool.close()
    assert seen_on_return == [True] * 12
    predictions = [p for result in results for p in result]
    assert [p.sentiment for p in predictions] == ["negative" if i % 3 == 0 else "positive" for i in range(12)]
    (segment,) = (tmp_path / "spool").glob("*.spool")
    data = segment.read_bytes()
    (length,) = struct.unpack_from("<I", data)
    assert len(data) == 4 + length  # one record
    columns, rows = marshal.loads(data[4:])
    assert columns == LOG_COLUMNS
    assert [(row[0], row[2], row[4], row[7]) for row in rows] == [
        (p.id, t, p.sentiment, "v-batch") for p, t in zip(predictions, texts, strict=True)
    ]
    assert _sample("sentiment_predictions_total", labels) == before + 8


def test_without_a_recorder_nothing_is_recorded() -> None:
    """Monitoring off: the same predictions, no staged rows, no metric writes."""
    model = ServedModel("v-off", {}, HalfModel(), compiled=False)

    async def scenario() -> list[list[Prediction]]:
        batcher = InferenceBatcher(max_batch=64, measure=False)
        batcher.start()
        predictor = Predictor(SimpleNamespace(current=model), batcher, None)  # type: ignore[arg-type]
        results = await asyncio.gather(*(predictor.predict(["no", "yes"]) for _ in range(3)))
        await batcher.stop()
        return results

    for result in asyncio.run(scenario()):
        assert [(p.sentiment, p.confidence) for p in result] == [("negative", 0.75), ("positive", 0.75)]
    assert _sample("sentiment_predictions_total", {"model_version": "v-off", "sentiment": "positive"}) == 0.0
