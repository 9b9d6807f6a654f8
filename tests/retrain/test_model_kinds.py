"""A second model kind goes through training, serving, drift monitoring and retraining unchanged."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from app.ml.data import Corpus
from app.ml.drift_reference import load_reference
from app.ml.inference import TOLERANCE
from app.ml.registry import ModelRegistry
from app.ml.train import train_and_register
from app.monitoring.drift import DriftDetector
from app.retrain.job import retrain
from app.serving.models import ModelManager
from app.settings import Settings
from app.storage.repositories import Repositories
from tests.conftest import SMALL_PARAMS
from tests.retrain.conftest import add_feedback
from tests.traffic import log_predictions

WORDS_ONLY = "tfidf_word_logreg"


@pytest.fixture(scope="module")
def words_store(tmp_path_factory: pytest.TempPathFactory, rotten_tomatoes: Corpus) -> Path:
    """A store whose current model is the words-only kind, trained on the whole named corpus."""
    root = tmp_path_factory.mktemp("words_store")
    train_and_register(ModelRegistry(root), rotten_tomatoes, SMALL_PARAMS, kind=WORDS_ONLY, progress=False)
    return root


@pytest.fixture
def store(tmp_path: Path, words_store: Path) -> ModelRegistry:
    """Overrides the default-kind store: a private copy of the words-only one."""
    root = tmp_path / "model_store"
    shutil.copytree(words_store, root)
    return ModelRegistry(root)


def test_a_words_only_model_trains_serves_and_is_monitored(
    store: ModelRegistry, tweets: Corpus, storage: Repositories
) -> None:
    loaded = store.load_current()
    assert loaded is not None and loaded.model.kind == WORDS_ONLY
    assert (
        loaded.metadata["model"] == {"kind": WORDS_ONLY} and loaded.metadata["data"]["base_corpus"] == "rotten_tomatoes"
    )

    manager = ModelManager(store, reload_interval=1)
    assert manager.sync() and manager.current.compiled
    texts = [*tweets.texts[:500], "", "\U0001f600", "NOT BAD AT ALL :)"]
    assert np.abs(manager.current.predict_proba(texts) - loaded.model.predict_proba(texts)).max() <= TOLERANCE

    reference = load_reference(loaded)
    detector = DriftDetector(loaded.version, loaded.model, reference, p_value=0.05, permutations=100, window_size=200)
    log_predictions(storage.predictions, loaded.model, loaded.version, tweets.texts[:200])
    result = detector.check(storage.predictions.window(200, loaded.version))
    assert result.drift and "mmd" in result.details["tests_rejecting"], result  # tweets are not film reviews


def test_a_retrain_keeps_the_words_only_kind(
    store: ModelRegistry, settings: Settings, storage: Repositories, tweets: Corpus
) -> None:
    add_feedback(storage.predictions, store, tweets, 0, 1500)
    result = retrain(settings.model_copy(update={"retrain_promotion_margin": 1.0}), "job-1", "manual")
    assert result.candidate_version is not None, result
    candidate = store.load(result.candidate_version)
    assert candidate.model.kind == WORDS_ONLY and candidate.metadata["model"] == {"kind": WORDS_ONLY}
    assert candidate.metadata["data"]["base_corpus"] == "rotten_tomatoes"
    assert candidate.metadata["params"] == store.get(candidate.metadata["parent"]).metadata["params"]
