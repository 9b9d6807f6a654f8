"""The retrain itself: real feedback, class weighting, the promotion gate, and skipping when nothing is new."""

from __future__ import annotations

import numpy as np

from app.ml.data import Corpus
from app.ml.registry import ModelRegistry
from app.monitoring.prediction_log import PredictionLog
from app.retrain.job import group_weights, in_feedback_holdout, retrain
from app.settings import Settings
from tests.retrain.conftest import add_feedback


def test_group_weights_give_each_source_its_share_split_evenly_by_label() -> None:
    base = np.array([0] * 60 + [1] * 40)
    feedback = np.array([1] * 9 + [0])
    weights = group_weights([(base, 0.75), (feedback, 0.25)])
    base_w, feedback_w = weights[:100], weights[100:]
    assert np.isclose(weights.sum(), 110)
    assert np.isclose(base_w[base == 0].sum(), base_w[base == 1].sum())
    assert np.isclose(feedback_w[feedback == 0].sum(), feedback_w[feedback == 1].sum())
    assert np.isclose(feedback_w.sum() / weights.sum(), 0.25)


def test_feedback_holdout_membership_is_fixed_and_about_the_fraction() -> None:
    ids = [f"{i:032x}" for i in range(5000)]
    held = [in_feedback_holdout(i, 0.2) for i in ids]
    assert 0.18 < np.mean(held) < 0.22
    assert held == [in_feedback_holdout(i, 0.2) for i in ids]


def test_nothing_new_means_no_training(store: ModelRegistry, settings: Settings, prediction_log: PredictionLog) -> None:
    result = retrain(settings, "job-1", "manual")
    assert result.outcome == "skipped_no_new_labels" and result.candidate_version is None
    assert len(store.versions()) == 1


def test_too_few_labels_are_not_worth_a_retrain(
    store: ModelRegistry, settings: Settings, prediction_log: PredictionLog, tweets: Corpus
) -> None:
    add_feedback(prediction_log, store, tweets, 0, 10)
    assert retrain(settings, "job-1", "manual").outcome == "skipped_too_few_labels"


def test_tweet_feedback_trains_a_candidate_the_gate_promotes(
    store: ModelRegistry, settings: Settings, prediction_log: PredictionLog, tweets: Corpus, versions: list[str]
) -> None:
    # Tweet feedback really costs this 3-fold-calibrated model some Rotten Tomatoes accuracy: 0.3-1.1 points
    # over 16 runs, which differ only in the random prediction ids that pick the feedback holdout. At the
    # default 1-point margin the gate rejected 2 of them (README, Known limits); this test is about learning
    # the new domain and promoting, so it allows 2 points. Rejection has its own test below.
    lenient = settings.model_copy(update={"retrain_promotion_margin": 0.02})
    add_feedback(prediction_log, store, tweets, 0, 1500)
    result = retrain(lenient, "job-1", "alertmanager")
    gate = result.details["gate"]
    assert gate["candidate"]["feedback"] > gate["current"]["feedback"] + 0.05, gate  # learnt the new domain
    assert result.outcome == "promoted" and store.current_version() == result.candidate_version, gate
    meta = store.get(result.candidate_version).metadata  # type: ignore[arg-type]
    assert meta["parent"] == versions[0] and meta["retrain"] == {"job_id": "job-1", "trigger": "alertmanager"}
    assert meta["data"]["feedback"]["rows"] == 1500 and meta["gate"]["decision"] == "promote"
    assert meta["data"]["drift_reference_source"] == "recent_traffic"
    # Everything labelled was used: the next retrain has nothing new.
    assert retrain(lenient, "job-2", "manual").outcome == "skipped_no_new_labels"


def test_a_candidate_that_is_not_better_is_registered_as_rejected(
    store: ModelRegistry, settings: Settings, prediction_log: PredictionLog, tweets: Corpus, versions: list[str]
) -> None:
    # Labels that say the opposite of the truth: the candidate cannot beat the current model on them and
    # on the base holdout at once.
    flipped = Corpus("tweets_flipped", tweets.texts, 1 - tweets.labels, "")
    add_feedback(prediction_log, store, flipped, 0, 300)
    strict = settings.model_copy(update={"retrain_promotion_margin": 0.0})
    result = retrain(strict, "job-1", "manual")
    assert result.outcome == "rejected"
    assert store.current_version() == versions[0]
    assert store.get(result.candidate_version).stage == "rejected"  # type: ignore[arg-type]
    # The alert keeps firing: a retry refits only once enough labels newer than the rejected try arrive.
    retry = retrain(strict, "job-2", "manual")
    assert retry.outcome == "skipped_no_new_labels" and retry.details["tried_by"] == result.candidate_version
    add_feedback(prediction_log, store, flipped, 300, 20)
    retry = retrain(strict, "job-3", "manual")
    assert retry.outcome == "skipped_too_few_labels" and retry.details["new_labels"] == 20
    add_feedback(prediction_log, store, flipped, 320, 100)
    assert retrain(strict, "job-4", "manual").outcome == "rejected"
