"""The pipeline's vectorizers persist their vocabulary compactly and load back identical."""

from __future__ import annotations

import pickle
from pathlib import Path

import joblib
import numpy as np
from sklearn.base import clone

from app.ml.data import Corpus
from app.ml.pipeline import CompactTfidfVectorizer, ModelParams, build_pipeline
from tests.conftest import SMALL_PARAMS


def split_bars(text: str) -> list[str]:
    return text.split("|")


def test_a_saved_pipeline_loads_back_with_the_same_vocabularies_and_probabilities(
    small_corpus: Corpus, tmp_path: Path
) -> None:
    pipeline = build_pipeline(ModelParams.from_dict(SMALL_PARAMS)).fit(small_corpus.texts, small_corpus.labels)
    joblib.dump(pipeline, tmp_path / "model.joblib", compress=3)
    loaded = joblib.load(tmp_path / "model.joblib")
    for (_, saved), (_, back) in zip(
        pipeline.named_steps["features"].transformer_list, loaded.named_steps["features"].transformer_list, strict=True
    ):
        assert isinstance(back, CompactTfidfVectorizer) and back.vocabulary_ == saved.vocabulary_
        assert "vocabulary_chunks_" not in vars(back)
    assert np.array_equal(loaded.predict_proba(small_corpus.texts), pipeline.predict_proba(small_corpus.texts))
    assert isinstance(clone(loaded), type(pipeline))


def test_the_vocabulary_is_strings_of_terms_unless_a_term_could_not_be_joined(small_corpus: Corpus) -> None:
    vectorizer = CompactTfidfVectorizer().fit(small_corpus.texts)
    state = vectorizer.__getstate__()
    assert "vocabulary_" not in state and len(state["vocabulary_chunks_"]) == -(-len(vectorizer.vocabulary_) // 4096)
    odd = CompactTfidfVectorizer(analyzer=split_bars).fit(["a\0b|c", "c|d"])
    assert "vocabulary_" in odd.__getstate__()  # a NUL inside a term: stored as the usual dict
    assert pickle.loads(pickle.dumps(odd)).vocabulary_ == odd.vocabulary_
    assert pickle.loads(pickle.dumps(CompactTfidfVectorizer())).get_params() == CompactTfidfVectorizer().get_params()
