"""The model contract: everything the service may ask of a sentiment model, and the table of model kinds.

Training, serving, drift and retraining talk to a model only through :class:`SentimentModel`: fit with
sample weights, ``predict_proba``, the features the drift tests embed, the decision rule, a fast serving
form, save and load. No code outside a model's own module looks at its internals (steps, vectorizers,
coefficients). A new model kind is one subclass registered with :func:`register_kind`; its name is stored
in every version's metadata (``model.kind``), and a retrain builds the same kind as the model it improves.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, ClassVar, Self, TypeVar

import joblib
import numpy as np
from numpy.typing import NDArray

POSITIVE_THRESHOLD = 0.5
"""The decision rule: a text is positive when P(positive) is at least this."""

ProbaFunction = Callable[[Sequence[str]], NDArray[np.float64]]
"""Texts -> rows of (P(negative), P(positive))."""


def decide(p_positive: NDArray[np.float64] | Sequence[float]) -> NDArray[np.int64]:
    """Labels (0 negative, 1 positive) from P(positive), by the one decision rule."""
    return (np.asarray(p_positive, dtype=np.float64) >= POSITIVE_THRESHOLD).astype(np.int64)


def confidence_of(p_positive: NDArray[np.float64]) -> NDArray[np.float64]:
    """Probability of the predicted label for each P(positive)."""
    p = np.asarray(p_positive, dtype=np.float64)
    return np.where(decide(p) == 1, p, 1.0 - p)


class SentimentModel(ABC):
    """A binary sentiment classifier over raw texts (label 0 negative, 1 positive)."""

    kind: ClassVar[str]
    """Name of the implementation, stored in version metadata and looked up in :data:`MODEL_KINDS`."""

    @classmethod
    @abstractmethod
    def from_params(cls, params: Mapping[str, Any]) -> Self:
        """An unfitted model with the hyper-parameters :meth:`params_dict` returned (unknown keys ignored)."""

    @classmethod
    def adopt(cls, fitted: Any, params: Mapping[str, Any]) -> Self:
        """Wrap a fitted artifact saved before the model contract existed (``params``: as recorded with it).

        Only a kind that predates the contract has such artifacts; the others refuse them.
        """
        raise TypeError(f"model kind {cls.kind!r} cannot read a {type(fitted).__name__} artifact")

    @abstractmethod
    def fit(
        self, texts: Sequence[str], labels: NDArray[np.int64], sample_weight: NDArray[np.float64] | None = None
    ) -> SentimentModel:
        """Fit on ``texts`` and ``labels`` (weighted per row when ``sample_weight`` is given); returns self."""

    @abstractmethod
    def predict_proba(self, texts: Sequence[str]) -> NDArray[np.float64]:
        """Rows of (P(negative), P(positive)) for ``texts``."""

    @abstractmethod
    def features(self, texts: Sequence[str]) -> Any:
        """The model's own feature matrix for ``texts`` (rows: texts), the space drift tests embed."""

    @abstractmethod
    def params_dict(self) -> dict[str, Any]:
        """The hyper-parameters, JSON-ready, stored in the version's metadata."""

    def p_positive(self, texts: Sequence[str]) -> NDArray[np.float64]:
        """P(positive) for each text."""
        return np.asarray(self.predict_proba(texts)[:, 1], dtype=np.float64)

    def predict(self, texts: Sequence[str]) -> NDArray[np.int64]:
        """Labels by the decision rule."""
        return decide(self.p_positive(texts))

    def serving_predictor(self, probe_texts: Sequence[str]) -> tuple[ProbaFunction, bool]:
        """The fastest ``predict_proba`` equal to this model's on ``probe_texts``, and whether it is a
        compiled form (True) or ``predict_proba`` itself (False). Implementations may override."""
        return self.predict_proba, False

    def save(self, path: Path) -> None:
        """Write the fitted model to ``path`` (one artifact, read back by :func:`load_model`)."""
        joblib.dump(self, path, compress=3)


M = TypeVar("M", bound=type[SentimentModel])

MODEL_KINDS: dict[str, type[SentimentModel]] = {}
"""Every model kind the service can train and serve, by name."""


def register_kind(cls: M) -> M:
    """Class decorator: make a :class:`SentimentModel` subclass available by its ``kind``."""
    if cls.kind in MODEL_KINDS:
        raise ValueError(f"model kind {cls.kind!r} is registered twice")
    MODEL_KINDS[cls.kind] = cls
    return cls


DEFAULT_KIND = "tfidf_word_char_logreg"
"""The kind ``python -m app.cli train`` builds, and the kind of every artifact saved before ``model.kind``
was recorded."""

IMPLEMENTATIONS = ("app.ml.pipeline",)
"""Modules whose import registers model kinds (with :func:`register_kind`)."""


def model_kind(name: str) -> type[SentimentModel]:
    """The registered class of model kind ``name``; ``KeyError`` naming the known kinds if there is none."""
    for module in IMPLEMENTATIONS:
        importlib.import_module(module)
    try:
        return MODEL_KINDS[name]
    except KeyError:
        raise KeyError(f"unknown model kind {name!r}; known: {sorted(MODEL_KINDS)}") from None


def build_model(kind: str = DEFAULT_KIND, params: Mapping[str, Any] | None = None) -> SentimentModel:
    """An unfitted model of ``kind`` with ``params`` (as :meth:`SentimentModel.params_dict` returns them)."""
    return model_kind(kind).from_params(params or {})


def load_model(source: Path | IO[bytes], params: Mapping[str, Any] | None = None) -> SentimentModel:
    """The model :meth:`SentimentModel.save` wrote, from its file or its bytes (unpickled: verify them first).

    Artifacts saved before the model contract hold the default kind's bare fitted estimator; they are
    wrapped in that kind, described by ``params`` (the hyper-parameters recorded with them).
    """
    loaded = joblib.load(source)
    if isinstance(loaded, SentimentModel):
        return loaded
    return model_kind(DEFAULT_KIND).adopt(loaded, params or {})
