"""The model contract: kinds by name, the one decision rule, weighted fits, and versions from before it."""

from __future__ import annotations

import json
from pathlib import Path

import joblib
import numpy as np
import pytest

from app.errors import ModelStoreError
from app.ml.data import Corpus
from app.ml.model import (
    DEFAULT_KIND,
    MODEL_KINDS,
    POSITIVE_THRESHOLD,
    SentimentModel,
    build_model,
    confidence_of,
    decide,
    load_model,
    model_kind,
)
from app.ml.pipeline import WordCharTfidfModel, WordTfidfModel
from app.ml.registry import METADATA, MODEL_ARTIFACT, ModelRegistry, sha256_file
from app.serving.models import prepare
from tests.conftest import SMALL_PARAMS


def test_the_decision_rule_calls_the_threshold_itself_positive() -> None:
    p = np.array([0.0, POSITIVE_THRESHOLD - 1e-9, POSITIVE_THRESHOLD, 1.0])
    assert decide(p).tolist() == [0, 0, 1, 1]
    assert confidence_of(p).tolist() == pytest.approx([1.0, 1 - POSITIVE_THRESHOLD, POSITIVE_THRESHOLD, 1.0])


def test_both_tfidf_kinds_are_registered_and_built_by_name() -> None:
    assert model_kind(DEFAULT_KIND) is WordCharTfidfModel and MODEL_KINDS["tfidf_word_logreg"] is WordTfidfModel
    model = build_model("tfidf_word_logreg", {**SMALL_PARAMS, "C": 3.0, "not_a_param": 1})
    assert isinstance(model, WordTfidfModel) and model.params_dict()["C"] == 3.0
    with pytest.raises(KeyError, match="unknown model kind 'nope'"):
        build_model("nope")


def test_words_only_features_are_the_word_block_of_the_default_kind(small_corpus: Corpus) -> None:
    texts, labels = small_corpus.texts[:600], small_corpus.labels[:600]
    both = build_model(DEFAULT_KIND, SMALL_PARAMS).fit(texts, labels)
    words = build_model("tfidf_word_logreg", SMALL_PARAMS).fit(texts, labels)
    n_words = words.features(texts[:5]).shape[1]
    assert 0 < n_words < both.features(texts[:5]).shape[1]
    assert np.allclose(words.features(texts[:5]).toarray(), both.features(texts[:5]).toarray()[:, :n_words])


def test_sample_weights_reach_the_classifier(small_corpus: Corpus) -> None:
    texts, labels = small_corpus.texts[:600], small_corpus.labels[:600]
    plain = build_model("tfidf_word_logreg", SMALL_PARAMS).fit(texts, labels)
    # Positive rows weigh 5 times as much: the model calls more texts positive.
    weights = np.where(labels == 1, 5.0, 1.0)
    weighted = build_model("tfidf_word_logreg", SMALL_PARAMS).fit(texts, labels, sample_weight=weights)
    probe = small_corpus.texts[-500:]
    assert weighted.p_positive(probe).mean() > plain.p_positive(probe).mean() + 0.05


def test_a_saved_model_loads_back_as_its_kind(small_corpus: Corpus, tmp_path: Path) -> None:
    model = build_model("tfidf_word_logreg", SMALL_PARAMS).fit(small_corpus.texts, small_corpus.labels)
    model.save(tmp_path / MODEL_ARTIFACT)
    loaded = load_model(tmp_path / MODEL_ARTIFACT)
    assert isinstance(loaded, WordTfidfModel) and loaded.params_dict() == model.params_dict()
    assert np.array_equal(loaded.predict_proba(small_corpus.texts[:50]), model.predict_proba(small_corpus.texts[:50]))


def _as_legacy_version(store: ModelRegistry, version: str) -> None:
    """Rewrite a version as versions were stored before the model contract: a bare pipeline, no kind."""
    folder = store.root / version
    model = store.load(version).model
    assert isinstance(model, WordCharTfidfModel)
    artifact, metadata_path = folder / MODEL_ARTIFACT, folder / METADATA
    artifact.chmod(0o644)
    joblib.dump(model.pipeline, artifact, compress=3)
    metadata = json.loads(metadata_path.read_text())
    del metadata["model"]
    metadata["artifacts"][MODEL_ARTIFACT] = sha256_file(artifact)
    metadata_path.write_text(json.dumps(metadata))


def test_a_version_stored_as_a_bare_pipeline_still_loads_and_serves(store: ModelRegistry, versions: list[str]) -> None:
    expected = store.load(versions[0]).model.predict_proba(["a warm, funny and moving film", "a dull mess"])
    _as_legacy_version(store, versions[0])
    assert not isinstance(joblib.load(store.root / versions[0] / MODEL_ARTIFACT), SentimentModel)
    loaded = store.load(versions[0])
    assert isinstance(loaded.model, WordCharTfidfModel) and loaded.model.kind == DEFAULT_KIND
    assert loaded.model.params_dict() == loaded.metadata["params"]
    assert np.array_equal(loaded.model.predict_proba(["a warm, funny and moving film", "a dull mess"]), expected)
    assert prepare(loaded).compiled


def test_a_model_of_another_kind_than_its_metadata_says_is_refused(store: ModelRegistry, versions: list[str]) -> None:
    folder = store.root / versions[0]
    metadata = json.loads((folder / METADATA).read_text())
    assert metadata["model"] == {"kind": DEFAULT_KIND}
    metadata["model"]["kind"] = "tfidf_word_logreg"
    (folder / METADATA).chmod(0o644)
    (folder / METADATA).write_text(json.dumps(metadata))
    with pytest.raises(ModelStoreError, match="metadata says 'tfidf_word_logreg'"):
        store.load(versions[0])
