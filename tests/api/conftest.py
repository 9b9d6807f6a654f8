"""API fixtures: the real app factory with its lifespan, over a private copy of a trained store."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.ml.data import Corpus, load_tweets
from app.ml.registry import ModelRegistry
from app.monitoring.monitor import DriftMonitor
from app.settings import Settings
from app.storage.drift_checks import DriftCheck
from tests.traffic import log_predictions


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings), raise_server_exceptions=False) as test_client:
        yield test_client


@pytest.fixture
def drift_check(settings: Settings, store: ModelRegistry) -> Iterator[Callable[[list[str]], DriftCheck]]:
    """Log texts as the current model's predictions in the service's database and run the real drift
    monitor's check of them (a window of 200, the builtin MMD engine): the stored check."""
    monitor = DriftMonitor(settings.model_copy(update={"drift_window_size": 200, "drift_backend": "builtin"}))
    current = store.load_current()
    assert current is not None

    def check(texts: list[str]) -> DriftCheck:
        log_predictions(monitor.predictions, current.model, current.version, texts)
        monitor.check(current.version)
        return monitor.drift_checks.history(1)[0]

    yield check
    monitor.database.dispose()


@pytest.fixture(scope="session")
def tweets() -> list[str]:
    """200 tweets: another domain, on which the model is less sure (its estimated accuracy drops ~5 points)."""
    texts = load_tweets().texts
    return [texts[i] for i in np.random.default_rng(0).choice(len(texts), 200, replace=False)]


@pytest.fixture(scope="session")
def joined_reviews(rotten_tomatoes: Corpus, small_corpus: Corpus) -> list[str]:
    """200 texts of two unseen film reviews each: drift (length, MMD) the model is no less sure about."""
    used = set(small_corpus.texts)
    unseen = [t for t in rotten_tomatoes.texts if t not in used]
    pairs = [unseen[i] for i in np.random.default_rng(5).choice(len(unseen), 400, replace=False)]
    return [f"{pairs[2 * i]} {pairs[2 * i + 1]}" for i in range(200)]
