"""Drift fixtures: the current small model's drift reference, and in-domain texts it never saw."""

from __future__ import annotations

import numpy as np
import pytest

from app.ml.data import Corpus, load_clothing
from app.ml.drift_reference import DriftReference, load_reference
from app.ml.registry import LoadedModel, ModelRegistry


@pytest.fixture
def current(store: ModelRegistry) -> LoadedModel:
    model = store.load_current()
    assert model is not None
    return model


@pytest.fixture
def reference(current: LoadedModel) -> DriftReference:
    return load_reference(current)


@pytest.fixture(scope="session")
def unseen_in_domain(rotten_tomatoes: Corpus, small_corpus: Corpus) -> list[str]:
    """Rotten Tomatoes rows outside the small training sample: in-domain, never fitted or referenced."""
    used = set(small_corpus.texts)
    return [t for t in rotten_tomatoes.texts if t not in used]


@pytest.fixture(scope="session")
def clothing_texts() -> list[str]:
    texts = load_clothing().texts
    return [texts[i] for i in np.random.default_rng(0).permutation(len(texts))[:2000]]
