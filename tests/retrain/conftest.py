"""Retrain fixtures: the service settings over the small store, and real labelled feedback."""

from __future__ import annotations

import shutil
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from app.ml.data import LABELS, Corpus, load_tweets
from app.ml.registry import ModelRegistry
from app.monitoring.prediction_log import PredictionLog
from app.settings import Settings


@pytest.fixture
def store(tmp_path: Path, full_store: tuple[Path, str]) -> ModelRegistry:
    """Overrides the small-sample store: a private copy of the full-corpus store."""
    root = tmp_path / "model_store"
    shutil.copytree(full_store[0], root)
    return ModelRegistry(root)


@pytest.fixture
def versions(full_store: tuple[Path, str]) -> list[str]:
    return [full_store[1]]


@pytest.fixture(scope="session")
def tweets() -> Corpus:
    corpus = load_tweets()
    return corpus.subset(np.random.default_rng(0).permutation(len(corpus))[:4000], "tweets_sample")


@pytest.fixture
def prediction_log(settings: Settings) -> PredictionLog:
    store = PredictionLog(settings.prediction_log_url)
    store.create_tables()
    return store


def add_feedback(store: PredictionLog, registry: ModelRegistry, corpus: Corpus, start: int, count: int) -> None:
    """Log real predictions of the current model on ``corpus`` rows, then label them with the truth."""
    model = registry.load_current()
    assert model is not None
    texts = corpus.texts[start : start + count]
    proba = model.pipeline.predict_proba(texts)[:, 1]
    now = time.time()
    rows = [
        {
            "id": uuid.uuid4().hex,
            "created_at": now + i * 1e-4,
            "text": t,
            "text_length": len(t),
            "sentiment": LABELS[int(p >= 0.5)],
            "confidence": float(max(p, 1 - p)),
            "p_positive": float(p),
            "model_version": model.version,
            "latency_ms": 1.0,
        }
        for i, (t, p) in enumerate(zip(texts, proba, strict=True))
    ]
    store.insert_predictions(rows)
    for row, label in zip(rows, corpus.labels[start : start + count], strict=True):
        store.set_label(row["id"], LABELS[int(label)], now=now + 1)
