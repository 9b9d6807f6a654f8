"""The TF-IDF model kinds: NLTK-preprocessed word (and character) n-grams, calibrated logistic regression."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Self

import numpy as np
from numpy.typing import NDArray
from sklearn.calibration import CalibratedClassifierCV
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import FeatureUnion, Pipeline

from app.ml.inference import compile_pipeline
from app.ml.model import ProbaFunction, SentimentModel, register_kind
from app.ml.preprocess import WordAnalyzer

FEATURES, CLASSIFIER = "features", "classifier"
"""Names of the pipeline's two steps."""
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
    """Hyper-parameters of the TF-IDF kinds (:func:`build_pipeline`); stored in every version's metadata."""

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


def word_vectorizer(params: ModelParams) -> CompactTfidfVectorizer:
    """TF-IDF of word n-grams from :class:`WordAnalyzer` (NLTK tokenizer, stemmer, negation marking)."""
    return CompactTfidfVectorizer(analyzer=WordAnalyzer(params.word_ngram_range), sublinear_tf=True, dtype=np.float32)


def char_vectorizer(params: ModelParams) -> CompactTfidfVectorizer:
    """TF-IDF of character n-grams within word boundaries: robust to spelling and unseen inflections."""
    return CompactTfidfVectorizer(
        analyzer="char_wb",
        ngram_range=params.char_ngram_range,
        min_df=params.char_min_df,
        sublinear_tf=True,
        dtype=np.float32,
    )


def word_and_char_features(params: ModelParams) -> FeatureUnion:
    """Word n-grams beside character n-grams, each block l2-normalised TF-IDF."""
    return FeatureUnion([("words", word_vectorizer(params)), ("chars", char_vectorizer(params))])


def build_pipeline(params: ModelParams | None = None, features: FeatureUnion | None = None) -> Pipeline:
    """An unfitted pipeline mapping raw texts to P(negative), P(positive).

    ``features`` defaults to word n-grams plus character n-grams. Logistic regression is wrapped in
    sigmoid calibration fitted on internal folds, so ``confidence`` means what it says.
    """
    params = params or ModelParams()
    if features is None:
        features = word_and_char_features(params)
    classifier = LogisticRegression(
        C=params.C, class_weight=params.class_weight, max_iter=2000, random_state=params.random_state
    )
    if params.calibration_folds > 1:
        model: Any = CalibratedClassifierCV(classifier, method="sigmoid", cv=params.calibration_folds)
    else:
        model = classifier
    return Pipeline([(FEATURES, features), (CLASSIFIER, model)])


@register_kind
class WordCharTfidfModel(SentimentModel):
    """TF-IDF of word and character n-grams into calibrated logistic regression: a scikit-learn pipeline.

    Serving uses :mod:`app.ml.inference`'s compiled form of the fitted pipeline when it reproduces the
    pipeline's probabilities on the probe texts.
    """

    kind = "tfidf_word_char_logreg"

    def __init__(self, params: ModelParams | None = None, pipeline: Pipeline | None = None) -> None:
        self.params = params or ModelParams()
        self.pipeline = pipeline if pipeline is not None else build_pipeline(self.params, self.build_features())

    def build_features(self) -> FeatureUnion:
        """The unfitted feature union of this kind (the only thing the kinds of this family change)."""
        return word_and_char_features(self.params)

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> Self:
        return cls(ModelParams.from_dict(dict(params)))

    @classmethod
    def adopt(cls, fitted: Any, params: Mapping[str, Any]) -> Self:
        """A bare fitted pipeline, as versions saved before the model contract hold it."""
        if not isinstance(fitted, Pipeline) or [name for name, _ in fitted.steps] != [FEATURES, CLASSIFIER]:
            return super().adopt(fitted, params)
        return cls(ModelParams.from_dict(dict(params)), fitted)

    def fit(
        self, texts: Sequence[str], labels: NDArray[np.int64], sample_weight: NDArray[np.float64] | None = None
    ) -> Self:
        weights = {} if sample_weight is None else {f"{CLASSIFIER}__sample_weight": sample_weight}
        self.pipeline.fit(list(texts), labels, **weights)
        return self

    def predict_proba(self, texts: Sequence[str]) -> NDArray[np.float64]:
        return np.asarray(self.pipeline.predict_proba(list(texts)), dtype=np.float64)

    def features(self, texts: Sequence[str]) -> Any:
        """The fitted feature union's sparse TF-IDF rows."""
        return self.pipeline.named_steps[FEATURES].transform(list(texts))

    def params_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.params.to_dict().items()}

    def serving_predictor(self, probe_texts: Sequence[str]) -> tuple[ProbaFunction, bool]:
        compiled = compile_pipeline(self.pipeline, probe_texts)
        return (compiled.predict_proba, True) if compiled is not None else (self.predict_proba, False)


@register_kind
class WordTfidfModel(WordCharTfidfModel):
    """Like :class:`WordCharTfidfModel` with word n-grams only (the ``char_*`` parameters are unused)."""

    kind = "tfidf_word_logreg"

    def build_features(self) -> FeatureUnion:
        return FeatureUnion([("words", word_vectorizer(self.params))])
