"""The retrain itself: real feedback, class weighting, the promotion gate, and skipping when nothing is new."""

from __future__ import annotations

import time

import numpy as np
import pytest

from app.ml.data import Corpus
from app.ml.registry import ModelRegistry
from app.retrain.job import (
    Feedback,
    JobReport,
    PurgeCheck,
    corpus_of,
    group_weights,
    in_feedback_holdout,
    retrain,
    source_report,
    source_shares,
    training_weights,
)
from app.settings import Settings
from app.storage.feedback_sources import FeedbackSourceRepository
from app.storage.predictions import LabelledRow
from app.storage.repositories import Repositories
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


@pytest.mark.parametrize("cap", [0.5, 0.6, 0.8])
def test_with_two_sources_the_larger_gets_exactly_the_cap(cap: float) -> None:
    shares = source_shares({"crowd": 900, "partner": 100}, cap)
    assert shares["crowd"] == pytest.approx(cap) and shares["partner"] == pytest.approx(1 - cap)


def test_source_shares_follow_rows_under_the_cap_and_never_cap_a_lone_source() -> None:
    assert source_shares({"only": 5000}, 0.1) == {"only": 1.0}
    assert source_shares({"a": 40, "b": 60}, 0.6) == pytest.approx({"a": 0.4, "b": 0.6})  # nobody over
    assert source_shares({"a": 0, "b": 10}, 0.5) == {"b": 1.0}  # a source without rows takes no share


def test_weight_a_capped_source_gives_up_can_lift_another_to_the_cap() -> None:
    # a: 0.7 of the rows is capped at 0.4; the 0.6 left goes 2:1 to b and c, which lifts b to 0.4 > cap,
    # so b is capped too and c gets the rest.
    shares = source_shares({"a": 700, "b": 200, "c": 100}, 0.4)
    assert shares == pytest.approx({"a": 0.4, "b": 0.4, "c": 0.2})
    assert sum(shares.values()) == pytest.approx(1.0)


def test_when_no_split_keeps_every_source_under_the_cap_they_share_equally() -> None:
    assert source_shares({"a": 90, "b": 10}, 0.3) == pytest.approx({"a": 0.5, "b": 0.5})


def test_training_weights_cap_a_source_and_balance_labels_within_each() -> None:
    rows = [LabelledRow(f"c{i}", f"crowd {i}", "positive" if i % 4 else "negative", 1.0, "crowd") for i in range(300)]
    rows += [LabelledRow(f"p{i}", f"partner {i}", "negative", 1.0, "partner") for i in range(100)]
    fit = sorted(rows, key=lambda r: r.source)
    feedback = Feedback(rows, 400, corpus_of("fit", fit), corpus_of("holdout", []), tuple(r.source for r in fit), ())
    base = np.array([0] * 500 + [1] * 500)
    weights = training_weights(base, feedback, 0.25, cap=0.6)
    assert np.isclose(weights.sum(), 1400)
    crowd, partner = weights[1000:1300], weights[1300:]
    assert np.isclose(crowd.sum() / weights.sum(), 0.25 * 0.6) and np.isclose(partner.sum() / weights.sum(), 0.25 * 0.4)
    labels = feedback.fit.labels[:300]
    assert np.isclose(crowd[labels == 0].sum(), crowd[labels == 1].sum())  # balanced within the source
    report = source_report(feedback, weights, 0.6)
    assert report["sources"]["crowd"] == {
        "rows": 300,
        "fit_rows": 300,
        "holdout_rows": 0,
        "weight_share": 0.15,
        "feedback_weight_share": 0.6,
    }
    assert report["sources"]["partner"]["weight_share"] == pytest.approx(0.1)


def test_feedback_holdout_membership_is_fixed_and_about_the_fraction() -> None:
    ids = [f"{i:032x}" for i in range(5000)]
    held = [in_feedback_holdout(i, 0.2) for i in ids]
    assert 0.18 < np.mean(held) < 0.22
    assert held == [in_feedback_holdout(i, 0.2) for i in ids]


def test_nothing_new_means_no_training(store: ModelRegistry, settings: Settings, storage: Repositories) -> None:
    result = retrain(settings, "job-1", "manual")
    assert result.outcome == "skipped_no_new_labels" and result.candidate_version is None
    assert len(store.versions()) == 1


def test_too_few_labels_are_not_worth_a_retrain(
    store: ModelRegistry, settings: Settings, storage: Repositories, tweets: Corpus
) -> None:
    add_feedback(storage.predictions, store, tweets, 0, 10)
    assert retrain(settings, "job-1", "manual").outcome == "skipped_too_few_labels"


def test_tweet_feedback_trains_a_candidate_the_gate_promotes(
    store: ModelRegistry, settings: Settings, storage: Repositories, tweets: Corpus, versions: list[str]
) -> None:
    # Tweet feedback really costs this 3-fold-calibrated model some Rotten Tomatoes accuracy: 0.3-1.1 points
    # over 16 runs, which differ only in the random prediction ids that pick the feedback holdout. At the
    # default 1-point margin the gate rejected 2 of them (docs/design.md, Known limits); this test is about learning
    # the new domain and promoting, so it allows 2 points. Rejection has its own test below.
    lenient = settings.model_copy(update={"retrain_promotion_margin": 0.02})
    add_feedback(storage.predictions, store, tweets, 0, 1500)
    result = retrain(lenient, "job-1", "alertmanager")
    gate = result.details["gate"]
    assert gate["candidate"]["feedback"] > gate["current"]["feedback"] + 0.05, gate  # learnt the new domain
    assert result.outcome == "promoted" and store.current_version() == result.candidate_version, gate
    meta = store.get(result.candidate_version).metadata  # type: ignore[arg-type]
    assert meta["parent"] == versions[0] and meta["retrain"] == {"job_id": "job-1", "trigger": "alertmanager"}
    assert meta["data"]["feedback"]["rows"] == 1500 and meta["gate"]["decision"] == "promote"
    assert meta["data"]["drift_reference_source"] == "recent_traffic"
    assert meta["shadow"]["decision"] in {"promote", "skipped"}  # the live window is mostly the fitted feedback
    events = storage.events.for_version(result.candidate_version)  # type: ignore[arg-type]
    assert [e.event for e in events] == ["registered", "gated", "shadowed", "promoted"]
    assert events[3].details == {"previous": versions[0], "watch": True} and events[3].actor == "retrain:job-1"
    assert events[1].details == gate and events[0].trigger == "alertmanager"
    # Everything labelled was used: the next retrain has nothing new.
    assert retrain(lenient, "job-2", "manual").outcome == "skipped_no_new_labels"


def test_a_candidate_that_is_not_better_is_registered_as_rejected(
    store: ModelRegistry, settings: Settings, storage: Repositories, tweets: Corpus, versions: list[str]
) -> None:
    # Labels that say the opposite of the truth: the candidate cannot beat the current model on them and
    # on the base holdout at once.
    flipped = Corpus("tweets_flipped", tweets.texts, 1 - tweets.labels, "")
    add_feedback(storage.predictions, store, flipped, 0, 300)
    strict = settings.model_copy(update={"retrain_promotion_margin": 0.0})
    result = retrain(strict, "job-1", "manual")
    assert result.outcome == "rejected"
    assert store.current_version() == versions[0]
    assert store.get(result.candidate_version).stage == "rejected"  # type: ignore[arg-type]
    # The alert keeps firing: a retry refits only once enough labels newer than the rejected try arrive.
    retry = retrain(strict, "job-2", "manual")
    assert retry.outcome == "skipped_no_new_labels" and retry.details["tried_by"] == result.candidate_version
    add_feedback(storage.predictions, store, flipped, 300, 20)
    retry = retrain(strict, "job-3", "manual")
    assert retry.outcome == "skipped_too_few_labels" and retry.details["new_labels"] == 20
    add_feedback(storage.predictions, store, flipped, 320, 100)
    assert retrain(strict, "job-4", "manual").outcome == "rejected"


def test_the_job_record_shows_each_source_and_caps_the_larger_one(
    store: ModelRegistry, settings: Settings, storage: Repositories, tweets: Corpus
) -> None:
    """Two feedback tokens, one sending three times as many labels: it carries exactly the capped share."""
    add_feedback(storage.predictions, store, tweets, 0, 600, source="crowd")
    add_feedback(storage.predictions, store, tweets, 600, 200, source="partner")
    capped = settings.model_copy(update={"retrain_max_source_share": 0.6, "retrain_feedback_weight": 0.25})
    storage.jobs.create_job("job-1", "manual", "test")
    result = retrain(capped, "job-1", "manual")
    JobReport(storage.jobs, "job-1", "manual", time.perf_counter()).finished(result)
    (job,) = storage.jobs.recent()
    sources = job.details["feedback"]["sources"]
    assert set(sources) == {"crowd", "partner"} and job.details["feedback"]["max_source_share"] == 0.6
    assert sources["crowd"]["rows"] == 600 and sources["partner"]["rows"] == 200
    assert sources["crowd"]["fit_rows"] + sources["crowd"]["holdout_rows"] == 600
    assert sources["crowd"]["feedback_weight_share"] == pytest.approx(0.6)
    assert sources["crowd"]["weight_share"] == pytest.approx(0.25 * 0.6)
    assert sources["partner"]["weight_share"] == pytest.approx(0.25 * 0.4)
    card = store.get(result.candidate_version).metadata["data"]["feedback"]  # type: ignore[arg-type]
    assert card["sources"] == sources  # the version says which tokens it was fitted on


def test_labels_of_a_purged_source_never_reach_a_retrain(
    store: ModelRegistry, settings: Settings, storage: Repositories, tweets: Corpus, rotten_tomatoes: Corpus
) -> None:
    flipped = Corpus("tweets_flipped", tweets.texts, 1 - tweets.labels, "")
    add_feedback(storage.predictions, store, tweets, 0, 300, source="trusted")
    add_feedback(storage.predictions, store, flipped, 300, 300, source="leaked")
    assert storage.predictions.purge_labels("leaked") == 300
    result = retrain(settings, "job-1", "manual")
    assert result.outcome in {"promoted", "rejected"}
    fed = result.details["feedback"]["sources"]
    assert list(fed) == ["trusted"] and fed["trusted"]["rows"] == 300
    assert fed["trusted"]["fit_rows"] + fed["trusted"]["holdout_rows"] == 300
    assert fed["trusted"]["feedback_weight_share"] == pytest.approx(1.0)  # a lone source is not capped
    card = store.get(result.candidate_version).metadata["data"]  # type: ignore[arg-type]
    assert card["feedback"]["rows"] == 300
    # Fit and holdout rows together: the base corpus and the trusted labels, not one purged row.
    assert card["rows"] == len(rotten_tomatoes) + 300


def test_the_purge_check_names_only_fitted_sources_purged_since_it_started(storage: Repositories) -> None:
    sources = FeedbackSourceRepository(storage.database)
    sources.purge("old", now=1.0)
    sources.purge("gone", revoke=True, now=2.0)
    check = PurgeCheck.start(sources)
    rows = [LabelledRow(f"r{i}", "text", "positive", 3.0, source) for i, source in enumerate(["gone", "web", "old"])]
    assert [r.source for r in check.usable(rows)] == ["web", "old"]  # a revoked name's late labels are left out
    assert check.purged_since(["web", "old"]) == []  # purged before the labels were read: nothing to undo
    sources.purge("unrelated", now=4.0)
    sources.purge("old", now=5.0)
    assert check.purged_since(["web", "old"]) == ["old"]
