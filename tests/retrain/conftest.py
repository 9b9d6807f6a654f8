"""Retrain fixtures: the service settings over the small store, and real labelled feedback."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from app.migrations import upgrade
from app.ml.data import Corpus, load_tweets
from app.ml.registry import ModelRegistry
from app.settings import Settings
from app.storage.predictions import PredictionRepository
from app.storage.repositories import Repositories
from tests.traffic import log_predictions


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
def storage(settings: Settings) -> Iterator[Repositories]:
    upgrade(settings.prediction_log_url)
    repositories = Repositories.connect(settings.prediction_log_url)
    yield repositories
    repositories.dispose()


def add_feedback(
    store: PredictionRepository,
    registry: ModelRegistry,
    corpus: Corpus,
    start: int,
    count: int,
    *,
    source: str = "default",
) -> None:
    """Log real predictions of the current model on ``corpus`` rows, then label them with the truth, as sent
    by the feedback token named ``source``."""
    model = registry.load_current()
    assert model is not None
    log_predictions(
        store,
        model.model,
        model.version,
        corpus.texts[start : start + count],
        corpus.labels[start : start + count],
        source=source,
    )
