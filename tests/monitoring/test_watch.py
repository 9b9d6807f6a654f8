"""The promotion watch: a promoted version worse than its parent is rolled back, a good one stays, and the rule's
statistics are the ones the docs state."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import numpy as np
import pytest
from prometheus_client import REGISTRY
from scipy.stats import norm
from structlog.testing import capture_logs

from app.ml.data import Corpus
from app.ml.registry import ModelRegistry
from app.monitoring.watch import PromotionWatch, WatchRules, drop_p_value, look_of, realised_figures
from app.settings import Settings
from app.storage.model_events import ModelEvent
from app.storage.repositories import Repositories
from tests.traffic import log_predictions

RULES = WatchRules(
    seconds=600, min_labels=50, p_value=0.05, min_drop=2.0, max_estimated_drop=5.0, parent_labels=500, window_size=200
)


@pytest.fixture(scope="module")
def unseen(rotten_tomatoes: Corpus, small_corpus: Corpus) -> Corpus:
    """Labelled Rotten Tomatoes rows neither small model was fitted on."""
    used = set(small_corpus.texts)
    index = np.array([i for i, t in enumerate(rotten_tomatoes.texts) if t not in used][:1000])
    return rotten_tomatoes.subset(index, "unseen")


@pytest.fixture
def storage(settings: Settings) -> Iterator[Repositories]:
    repositories = Repositories.from_settings(settings)
    yield repositories
    repositories.dispose()


@pytest.fixture
def watch(store: ModelRegistry, storage: Repositories) -> PromotionWatch:
    return PromotionWatch(RULES, store, storage.predictions, storage.events)


def promote(store: ModelRegistry, storage: Repositories, versions: list[str], *, watch: bool = True) -> float:
    """Promote the candidate as a retrain does (the event asks for a watch); the promotion's time."""
    store.promote(versions[1])
    at = time.time()
    details = {"previous": versions[0], "watch": watch}
    storage.events.record(ModelEvent(versions[1], "promoted", "retrain:j1", "manual", details, occurred_at=at))
    return at


def serve(
    store: ModelRegistry, storage: Repositories, version: str, corpus: Corpus, *, start: float, flip: bool
) -> None:
    """``version``'s real predictions of ``corpus``, labelled with the truth (or its opposite)."""
    model = store.load(version)
    labels = 1 - corpus.labels if flip else corpus.labels
    log_predictions(storage.predictions, model.model, version, corpus.texts, labels, start=start)


def rollbacks(reason: str) -> float:
    return REGISTRY.get_sample_value("sentiment_model_rollbacks_total", {"reason": reason}) or 0.0


def test_the_p_value_is_the_one_sided_normal_tail_of_the_pooled_two_proportion_z() -> None:
    pooled = 135 / 200
    z = (0.75 - 0.60) / np.sqrt(pooled * (1 - pooled) * (1 / 100 + 1 / 100))
    assert drop_p_value(75, 100, 60, 100) == pytest.approx(norm.sf(z))
    assert drop_p_value(60, 100, 75, 100) == pytest.approx(norm.sf(-z))  # better, not worse: large
    assert drop_p_value(50, 100, 50, 100) == pytest.approx(0.5)
    assert drop_p_value(0, 0, 5, 10) == 1.0 and drop_p_value(10, 10, 10, 10) == 1.0


def test_tests_are_spent_at_doubling_label_counts() -> None:
    assert [look_of(n, 50) for n in (0, 49, 50, 99, 100, 199, 200, 400, 799)] == [0, 0, 1, 1, 2, 2, 3, 4, 4]
    assert sum(0.05 / 2**k for k in range(1, 40)) < 0.05  # every look's level together stays under the setting


def test_a_significant_drop_rolls_back_only_past_the_minimum_drop() -> None:
    worse = realised_figures((750, 1000), (300, 500), RULES, look=1)
    assert worse["rollback"] and worse["drop"] == pytest.approx(15.0) and worse["level"] == pytest.approx(0.025)
    # 20,000 labels make a 1.5-point drop significant, but it is under the 2-point minimum.
    slight = realised_figures((15_300, 20_000), (15_000, 20_000), RULES, look=1)
    assert slight["p_value"] < slight["level"] and not slight["rollback"]
    assert "rollback" not in realised_figures((750, 1000), (30, 50), RULES, look=None)  # no test due


def test_a_promotion_worse_on_feedback_than_its_parent_is_rolled_back_and_recorded(
    watch: PromotionWatch, store: ModelRegistry, storage: Repositories, versions: list[str], unseen: Corpus
) -> None:
    serve(store, storage, versions[0], unseen.subset(np.arange(0, 300), "before"), start=time.time() - 600, flip=False)
    promoted_at = promote(store, storage, versions)
    serve(store, storage, versions[1], unseen.subset(np.arange(300, 400), "after"), start=promoted_at + 1, flip=True)
    before = rollbacks("realised_accuracy")
    with capture_logs() as logs:
        assert watch.step(promoted_at + 10) == "realised_accuracy"
    assert store.current_version() == versions[0] and store.get(versions[1]).stage == "rejected"
    assert rollbacks("realised_accuracy") == before + 1
    (rolled,) = [e for e in storage.events.for_version(versions[1]) if e.event == "rolled_back"]
    assert rolled.actor == "monitor" and rolled.trigger == "watch"
    assert rolled.details["reason"] == "realised_accuracy" and rolled.details["restored"] == versions[0]
    realised = rolled.details["realised"]
    assert realised["new"]["labelled"] == 100 and realised["parent"]["labelled"] == 300 and realised["look"] == 2
    assert realised["drop"] > 30 and realised["p_value"] < realised["level"]
    restored = storage.events.for_version(versions[0])[-1]
    assert restored.event == "promoted" and restored.trigger == "rollback" and restored.details["watch"] is False
    (line,) = [e for e in logs if e["event"] == "model_auto_rolled_back"]
    assert line["model_version"] == versions[1] and line["restored_version"] == versions[0]
    assert watch.step(promoted_at + 20) is None  # the restored version is not watched


def test_a_promotion_as_good_as_its_parent_stays_and_its_watch_passes_once(
    watch: PromotionWatch, store: ModelRegistry, storage: Repositories, versions: list[str], unseen: Corpus
) -> None:
    serve(store, storage, versions[0], unseen.subset(np.arange(0, 300), "before"), start=time.time() - 600, flip=False)
    promoted_at = promote(store, storage, versions)
    serve(store, storage, versions[1], unseen.subset(np.arange(300, 600), "after"), start=promoted_at + 1, flip=False)
    assert watch.step(promoted_at + 10) is None and store.current_version() == versions[1]
    assert watch.step(promoted_at + RULES.seconds + 1) is None  # the watch is over
    assert watch.step(promoted_at + RULES.seconds + 10) is None
    events = storage.events.for_version(versions[1])
    assert [e.event for e in events] == ["promoted", "watch_passed"]
    passed = events[1].details
    assert passed["realised"]["new"]["labelled"] == 300 and abs(passed["estimated"]["drop"]) < 5
    assert store.current_version() == versions[1] and store.get(versions[1]).stage == "production"


def test_a_version_much_less_sure_than_its_parent_on_the_same_texts_is_rolled_back_without_labels(
    watch: PromotionWatch, store: ModelRegistry, storage: Repositories, versions: list[str], unseen: Corpus
) -> None:
    """No labels at all: the new version's served P(positive) hovers at 0.55 where the parent, re-scoring the
    same texts, is far surer: its estimated accuracy lies more than 5 points below."""
    promoted_at = promote(store, storage, versions)
    rows = [
        {
            "id": f"p{i}",
            "created_at": promoted_at + 1 + i * 1e-3,
            "text": text,
            "text_length": len(text),
            "sentiment": "positive",
            "confidence": 0.55,
            "p_positive": 0.55,
            "model_version": versions[1],
            "latency_ms": 1.0,
        }
        for i, text in enumerate(unseen.texts[:150])
    ]
    storage.predictions.insert_predictions(rows)
    assert watch.step(promoted_at + 10) == "estimated_accuracy"
    assert store.current_version() == versions[0]
    (rolled,) = [e for e in storage.events.for_version(versions[1]) if e.event == "rolled_back"]
    estimated = rolled.details["estimated"]
    assert estimated["rows"] == 150 and estimated["new"]["estimate"] == pytest.approx(0.55)
    assert estimated["drop"] > 5 and rolled.details["realised"]["new"]["labelled"] == 0


def test_an_unwatched_promotion_and_a_watch_of_zero_seconds_never_roll_back(
    store: ModelRegistry, storage: Repositories, versions: list[str], unseen: Corpus
) -> None:
    serve(store, storage, versions[0], unseen.subset(np.arange(0, 300), "before"), start=time.time() - 600, flip=False)
    promoted_at = promote(store, storage, versions, watch=False)  # an operator's promote without --watch
    serve(store, storage, versions[1], unseen.subset(np.arange(300, 500), "after"), start=promoted_at + 1, flip=True)
    assert PromotionWatch(RULES, store, storage.predictions, storage.events).step(promoted_at + 10) is None
    storage.events.record(
        ModelEvent(versions[1], "promoted", "retrain:j2", "manual", {"previous": versions[0], "watch": True})
    )
    disabled = WatchRules(**{**RULES.__dict__, "seconds": 0.0})
    assert PromotionWatch(disabled, store, storage.predictions, storage.events).step(promoted_at + 10) is None
    assert store.current_version() == versions[1]


def test_too_few_labels_run_no_test_and_a_failure_is_logged_not_raised(
    watch: PromotionWatch, store: ModelRegistry, storage: Repositories, versions: list[str], unseen: Corpus
) -> None:
    serve(store, storage, versions[0], unseen.subset(np.arange(0, 300), "before"), start=time.time() - 600, flip=False)
    promoted_at = promote(store, storage, versions)
    serve(store, storage, versions[1], unseen.subset(np.arange(300, 340), "after"), start=promoted_at + 1, flip=True)
    assert watch.step(promoted_at + 10) is None and store.current_version() == versions[1]  # 40 labels < 50
    assert watch.figures(watch.watched(versions[1]))["realised"].get("look") is None  # type: ignore[arg-type]
    (store.root / "CURRENT.json").write_text(json.dumps([]))  # an unreadable pointer
    with capture_logs() as logs:
        assert watch.step(promoted_at + 20) is None
    assert [e["event"] for e in logs] == ["promotion_watch_failed"]
