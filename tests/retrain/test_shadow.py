"""The shadow: a candidate the gate passed scores the live window beside the current model, and can be refused."""

from __future__ import annotations

import time

import numpy as np
import pytest

from app.ml.data import Corpus
from app.ml.model import DEFAULT_KIND, SentimentModel, build_model
from app.ml.registry import ModelRegistry
from app.retrain.job import retrain
from app.retrain.shadow import ShadowRules, shadow_candidate
from app.settings import Settings
from app.storage.predictions import WindowRow
from app.storage.repositories import Repositories
from tests.conftest import SMALL_PARAMS
from tests.retrain.conftest import add_feedback
from tests.traffic import log_predictions

RULES = ShadowRules(min_rows=100, min_agreement=0.5, max_estimated_drop=5.0)


def fitted(corpus: Corpus, rows: slice, *, flip: bool = False) -> SentimentModel:
    labels = corpus.labels[rows]
    return build_model(DEFAULT_KIND, SMALL_PARAMS).fit(corpus.texts[rows], 1 - labels if flip else labels)


@pytest.fixture(scope="module")
def current(small_corpus: Corpus) -> SentimentModel:
    return fitted(small_corpus, slice(0, 2000))


@pytest.fixture(scope="module")
def window(current: SentimentModel, tweets: Corpus) -> list[WindowRow]:
    """500 live tweets as the current model served them."""
    texts = tweets.texts[3000:3500]
    p = current.p_positive(texts)
    return [
        WindowRow(t, float(max(q, 1 - q)), float(q), "positive" if q >= 0.5 else "negative", float(i))
        for i, (t, q) in enumerate(zip(texts, p, strict=True))
    ]


def test_the_current_model_itself_agrees_everywhere_and_passes(
    current: SentimentModel, window: list[WindowRow]
) -> None:
    shadow = shadow_candidate(current, window, RULES)
    assert shadow["decision"] == "promote" and shadow["reasons"] == []
    assert shadow["rows"] == 500 and shadow["agreement"] == 1.0
    assert shadow["estimated_drop"] == pytest.approx(0.0, abs=1e-9)
    assert shadow["confidence_ks"]["statistic"] == pytest.approx(0.0)
    served = np.mean([r.confidence for r in window])
    assert shadow["current"]["confidence_mean"] == pytest.approx(served)
    assert shadow["current"]["estimated_accuracy"]["estimate"] == pytest.approx(served)  # mean confidence


def test_a_candidate_fitted_on_lying_labels_is_refused_on_agreement(
    current: SentimentModel, window: list[WindowRow], small_corpus: Corpus
) -> None:
    shadow = shadow_candidate(fitted(small_corpus, slice(0, 2000), flip=True), window, RULES)
    assert shadow["agreement"] < 0.3 and "agreement" in shadow["reasons"] and shadow["decision"] == "reject"


def test_a_candidate_much_less_sure_of_the_live_texts_is_refused_on_its_estimated_accuracy(
    window: list[WindowRow], small_corpus: Corpus
) -> None:
    """A model fitted on 100 rows: its confidence, hence its estimated accuracy, lies far below the current's."""
    shadow = shadow_candidate(fitted(small_corpus, slice(2000, 2100)), window, RULES)
    assert shadow["estimated_drop"] > 5.0 and "estimated_accuracy" in shadow["reasons"]
    assert shadow["candidate"]["confidence_mean"] < shadow["current"]["confidence_mean"]


def test_too_few_rows_outside_the_fitted_texts_skip_the_shadow_without_blocking(
    current: SentimentModel, window: list[WindowRow]
) -> None:
    fitted_on = {r.text for r in window[:450]}  # the candidate was fitted on most of the window
    shadow = shadow_candidate(current, window, RULES, exclude=fitted_on)
    assert shadow["decision"] == "skipped" and shadow["reasons"] == ["too_few_rows"]
    assert shadow["rows"] == 50 and shadow["window_rows"] == 500 and "agreement" not in shadow


def test_a_retrain_on_lying_feedback_that_fools_the_gate_is_rejected_by_the_shadow(
    store: ModelRegistry, settings: Settings, storage: Repositories, tweets: Corpus, versions: list[str]
) -> None:
    """Flipped labels lie in the feedback holdout too; a lax margin lets the gate pass, the live window does not."""
    flipped = Corpus("tweets_flipped", tweets.texts, 1 - tweets.labels, "")
    add_feedback(storage.predictions, store, flipped, 0, 800)
    model = store.load_current()
    assert model is not None
    log_predictions(storage.predictions, model.model, model.version, tweets.texts[800:1200], start=time.time() + 1)
    lax = settings.model_copy(update={"retrain_promotion_margin": 0.5})
    result = retrain(lax, "job-1", "manual")
    assert result.details["gate"]["decision"] == "promote", result.details["gate"]
    assert result.outcome == "rejected" and result.details["reason"] == "shadow", result.details["shadow"]
    assert store.current_version() == versions[0]
    card = store.get(result.candidate_version)  # type: ignore[arg-type]
    assert card.stage == "rejected" and card.metadata["shadow"]["reasons"] == ["agreement"]
    events = storage.events.for_version(result.candidate_version)  # type: ignore[arg-type]
    assert [e.event for e in events] == ["registered", "gated", "shadowed", "rejected"]
    assert {e.actor for e in events} == {"retrain:job-1"} and {e.trigger for e in events} == {"manual"}
    assert events[2].details == card.metadata["shadow"] and events[3].details["reason"] == "shadow"
