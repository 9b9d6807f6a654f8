"""The drift reference saved with each model version: how held-out, in-domain traffic looks to that model.

The representation is the model's own TF-IDF features reduced by a TruncatedSVD fitted on the rows the
model was fitted on; the reference sample is held-out rows that neither the vectorizers, the reducer nor
the classifier ever saw (a reference drawn from fitted rows looks unlike any new traffic: the model is
more confident on it and meets no unseen words, so every live window would seem to drift).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from sklearn.decomposition import TruncatedSVD

DRIFT_ARTIFACT = "drift.joblib"


@dataclass
class DriftReference:
    """Everything the drift monitor compares a live window with, for one model version."""

    reducer: TruncatedSVD
    embeddings: NDArray[np.float32]  # (n, components): reduced features of the reference texts
    lengths: NDArray[np.float64]  # characters per reference text
    confidence: NDArray[np.float64]  # the model's confidence on each reference text
    positive_rate: float  # share of reference texts the model calls positive
    size: int


def embed(pipeline: Any, reducer: TruncatedSVD, texts: Sequence[str]) -> NDArray[np.float32]:
    """Texts -> the model's features -> the reducer's dense components."""
    return np.asarray(reducer.transform(pipeline[0].transform(list(texts))), dtype=np.float32)


def build_reference(
    pipeline: Any,
    fit_texts: Sequence[str],
    reference_texts: Sequence[str],
    reference_proba: NDArray[np.float64],
    *,
    components: int = 32,
    seed: int = 0,
) -> DriftReference:
    """Fit the reducer on the model's fitted rows; describe the held-out ``reference_texts`` with it."""
    reducer = TruncatedSVD(n_components=components, random_state=seed)
    reducer.fit(pipeline[0].transform(list(fit_texts)))
    positive = np.asarray(reference_proba, dtype=np.float64)
    return DriftReference(
        reducer=reducer,
        embeddings=embed(pipeline, reducer, reference_texts),
        lengths=np.array([len(t) for t in reference_texts], dtype=np.float64),
        confidence=np.maximum(positive, 1.0 - positive),
        positive_rate=float((positive >= 0.5).mean()),
        size=len(reference_texts),
    )
