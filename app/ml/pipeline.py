"""The model: NLTK-preprocessed word n-grams and character n-grams, TF-IDF, calibrated logistic regression."""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from sklearn.calibration import CalibratedClassifierCV
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import FeatureUnion, Pipeline

from app.ml.preprocess import WordAnalyzer

_TERM_SEPARATOR = "\0"
_TERMS_PER_CHUNK = 4096


class CompactTfidfVectorizer(TfidfVectorizer):  # type: ignore[misc]  # sklearn ships no type hints
    """A ``TfidfVectorizer`` whose fitted vocabulary pickles as strings of terms in column order.

    ``joblib.load`` unpickles with pickle's pure-Python ``Unpickler``: the two vocabulary dicts (about
    200,000 terms) took about 280 ms of CPU in each web worker on every hot swap. Strings of 4,096 terms
    load in a few steps and the dict is rebuilt chunk by chunk in C (about 50 ms in all; chunks keep each
    hold of the GIL short, so the worker's event loop keeps serving, ``bench/model_load.py``). Everything
    else, and the vectorizer's behaviour, is ``TfidfVectorizer``'s own.
    """

    def __getstate__(self) -> dict[str, Any]:
        state: dict[str, Any] = dict(super().__getstate__())
        vocabulary = state.get("vocabulary_")
        if isinstance(vocabulary, dict) and vocabulary:
            terms = sorted(vocabulary, key=vocabulary.__getitem__)
            columns_in_order = all(vocabulary[term] == i for i, term in enumerate(terms))
            if columns_in_order and not any(_TERM_SEPARATOR in term for term in terms):
                del state["vocabulary_"]
                state["vocabulary_chunks_"] = [
                    _TERM_SEPARATOR.join(terms[i : i + _TERMS_PER_CHUNK])
                    for i in range(0, len(terms), _TERMS_PER_CHUNK)
                ]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        chunks = state.pop("vocabulary_chunks_", None)
        if chunks is not None:
            vocabulary: dict[str, int] = {}
            for chunk in chunks:
                vocabulary.update(zip(chunk.split(_TERM_SEPARATOR), itertools.count(len(vocabulary))))
            state["vocabulary_"] = vocabulary
        super().__setstate__(state)


@dataclass(frozen=True)
class ModelParams:
    """Hyper-parameters of :func:`build_pipeline`; stored in every version's metadata."""

    word_ngram_range: tuple[int, int] = (1, 2)
    char_ngram_range: tuple[int, int] = (3, 5)
    char_min_df: int = 2
    C: float = 8.0
    class_weight: str | None = "balanced"
    calibration_folds: int = 5
    random_state: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelParams:
        """Parameters as stored in a version's metadata (JSON lists back to tuples, unknown keys dropped)."""
        known: dict[str, Any] = {
            k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in cls.__dataclass_fields__
        }
        return cls(**known)


def build_pipeline(params: ModelParams | None = None) -> Pipeline:
    """An unfitted pipeline mapping raw texts to P(negative), P(positive).

    Word features come from :class:`WordAnalyzer` (NLTK tokenizer, stemmer, negation marking); character
    n-grams within word boundaries add robustness to spelling and unseen inflections. Logistic regression
    is wrapped in sigmoid calibration fitted on internal folds, so ``confidence`` means what it says.
    """
    params = params or ModelParams()
    features = FeatureUnion(
        [
            (
                "words",
                CompactTfidfVectorizer(
                    analyzer=WordAnalyzer(params.word_ngram_range), sublinear_tf=True, dtype=np.float32
                ),
            ),
            (
                "chars",
                CompactTfidfVectorizer(
                    analyzer="char_wb",
                    ngram_range=params.char_ngram_range,
                    min_df=params.char_min_df,
                    sublinear_tf=True,
                    dtype=np.float32,
                ),
            ),
        ]
    )
    classifier = LogisticRegression(
        C=params.C, class_weight=params.class_weight, max_iter=2000, random_state=params.random_state
    )
    if params.calibration_folds > 1:
        model: Any = CalibratedClassifierCV(classifier, method="sigmoid", cv=params.calibration_folds)
    else:
        model = classifier
    return Pipeline([("features", features), ("classifier", model)])
