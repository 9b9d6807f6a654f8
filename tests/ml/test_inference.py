"""The compiled serving path reproduces the pipeline, and refuses pipelines it does not know."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.naive_bayes import MultinomialNB
from sklearn.pipeline import make_pipeline
from structlog.testing import capture_logs

from app.ml import inference
from app.ml.data import Corpus
from app.ml.inference import TOLERANCE, compile_pipeline
from app.ml.registry import ModelRegistry

ODD_TEXTS = ["", "!!!", "zzzz qqqq", "\U0001f600", "NOT BAD AT ALL :)", "x" * 5000, "word " * 1000]


def test_compiled_probabilities_equal_the_pipelines(store: ModelRegistry, rotten_tomatoes: Corpus) -> None:
    model = store.load_current()
    assert model is not None
    compiled = compile_pipeline(model.model.pipeline, rotten_tomatoes.texts[:50])
    assert compiled is not None
    texts = rotten_tomatoes.texts[-2000:] + ODD_TEXTS
    gap = np.abs(compiled.predict_proba(texts) - model.model.pipeline.predict_proba(texts)).max()
    assert gap <= TOLERANCE


def test_batch_composition_does_not_change_a_texts_probability(store: ModelRegistry, rotten_tomatoes: Corpus) -> None:
    model = store.load_current()
    assert model is not None
    compiled = compile_pipeline(model.model.pipeline, rotten_tomatoes.texts[:20])
    assert compiled is not None
    texts = rotten_tomatoes.texts[:64]
    together = compiled.predict_proba(texts)
    alone = np.vstack([compiled.predict_proba([t]) for t in texts])
    assert np.abs(together - alone).max() < 1e-12


def test_plain_logistic_regression_pipelines_compile_too(small_corpus: Corpus) -> None:
    pipeline = make_pipeline(TfidfVectorizer(), LogisticRegression()).fit(small_corpus.texts, small_corpus.labels)
    compiled = compile_pipeline(pipeline, small_corpus.texts[:100])
    assert compiled is not None
    assert np.abs(compiled.predict_proba(ODD_TEXTS) - pipeline.predict_proba(ODD_TEXTS)).max() <= TOLERANCE


def test_unknown_pipeline_structures_are_served_by_the_pipeline_itself(small_corpus: Corpus) -> None:
    naive_bayes = make_pipeline(TfidfVectorizer(), MultinomialNB()).fit(small_corpus.texts, small_corpus.labels)
    assert compile_pipeline(naive_bayes, small_corpus.texts[:10]) is None
    assert compile_pipeline("not a pipeline", ["x"]) is None


def test_a_compiled_model_that_disagrees_on_probes_is_refused(
    small_corpus: Corpus, monkeypatch: pytest.MonkeyPatch
) -> None:
    pipeline = make_pipeline(TfidfVectorizer(), LogisticRegression()).fit(small_corpus.texts, small_corpus.labels)
    # No tolerance at all: any floating-point difference counts as disagreement.
    monkeypatch.setattr(inference, "TOLERANCE", -1.0)
    with capture_logs() as logs:
        assert inference.compile_pipeline(pipeline, small_corpus.texts[:10]) is None
    assert logs[-1]["event"] == "compiled_model_mismatch"
