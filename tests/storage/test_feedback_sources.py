"""Purged and revoked feedback token names: a purge forgets labels and records when; a revocation also refuses."""

from __future__ import annotations

from app.storage.feedback_sources import FeedbackSource, FeedbackSourceRepository
from app.storage.predictions import PredictionRepository
from app.storage.repositories import Repositories
from tests.storage.test_predictions import row


def labelled(predictions: PredictionRepository, sources: list[str]) -> None:
    predictions.insert_predictions([row(i) for i in range(len(sources))])
    for i, source in enumerate(sources):
        predictions.set_label(f"p{i:05d}", "positive", now=100.0 + i, source=source)


def test_a_purge_forgets_the_labels_records_its_time_and_revokes_nothing(storage: Repositories) -> None:
    labelled(storage.predictions, ["web", "crowd", "crowd"])
    sources = FeedbackSourceRepository(storage.database)
    assert sources.purge("crowd", now=500.0) == 2
    assert [r.source for r in storage.predictions.labelled()] == ["web"]
    assert sources.sources() == [FeedbackSource("crowd", 500.0, None)]
    assert sources.revoked() == frozenset()
    assert sources.purge("crowd", now=600.0) == 0
    assert sources.purge_times() == {"crowd": 600.0}  # a second purge moves the time: a running retrain sees it


def test_a_revocation_purges_and_refuses_and_keeps_its_first_time(storage: Repositories) -> None:
    labelled(storage.predictions, ["web", "leaked"])
    sources = FeedbackSourceRepository(storage.database)
    sources.purge("web", now=400.0)  # purged first, revoked later: the same row
    assert sources.purge("leaked", revoke=True, now=500.0) == 1
    assert sources.purge("web", revoke=True, now=550.0) == 0  # its label went with the first purge
    assert sources.purge("leaked", revoke=True, now=600.0) == 0
    assert sources.purge("leaked", now=700.0) == 0  # a purge never un-revokes
    assert sources.revoked() == frozenset({"leaked", "web"})
    assert sources.sources() == [FeedbackSource("leaked", 700.0, 500.0), FeedbackSource("web", 550.0, 550.0)]
    assert storage.predictions.labelled() == []
