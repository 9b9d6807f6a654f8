"""The model: NLTK-preprocessed word n-grams and character n-grams, TF-IDF, calibrated logistic regression."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from sklearn.calibration import CalibratedClassifierCV
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import FeatureUnion, Pipeline

from app.ml.preprocess import WordAnalyzer


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
                TfidfVectorizer(analyzer=WordAnalyzer(params.word_ngram_range), sublinear_tf=True, dtype=np.float32),
            ),
            (
                "chars",
                TfidfVectorizer(
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
