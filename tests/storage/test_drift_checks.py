"""The drift checks table: newest first, pruned to the latest."""

from __future__ import annotations

import pytest

from app.storage.drift_checks import DriftCheck, DriftCheckRepository
from app.storage.repositories import Repositories


@pytest.fixture
def drift_checks(storage: Repositories) -> DriftCheckRepository:
    return storage.drift_checks


def test_drift_history_is_newest_first_and_pruned(drift_checks: DriftCheckRepository) -> None:
    for i in range(5):
        drift_checks.insert(DriftCheck(10.0 + i, "v1", "no_drift", drift=False, window_size=500, details={"i": i}))
    assert [c.details["i"] for c in drift_checks.history(3)] == [4, 3, 2]
    drift_checks.prune(keep=2)
    assert [c.details["i"] for c in drift_checks.history(10)] == [4, 3]


def flagged(at: float, *, drift: bool = True, explained: bool = False) -> DriftCheck:
    explanation = {"domain_auc": at} if explained else None
    return DriftCheck(at, "v1", "drift" if drift else "no_drift", drift=drift, window_size=500, explanation=explanation)


def test_a_check_reads_back_by_id_with_its_estimate_and_explanation(drift_checks: DriftCheckRepository) -> None:
    check = DriftCheck(
        1.0,
        "v1",
        "drift",
        drift=True,
        window_size=500,
        estimated_accuracy=0.75,
        estimated_accuracy_low=0.71,
        estimated_accuracy_high=0.79,
        explanation={"examples": [{"text": "Runs small; order a size up.", "score": 0.97}]},
    )
    check_id = drift_checks.insert(check)
    assert drift_checks.get(check_id) == DriftCheck(**{**check.__dict__, "id": check_id})
    assert drift_checks.get(check_id + 1) is None


def test_latest_estimated_and_explained_checks_skip_the_ones_without(drift_checks: DriftCheckRepository) -> None:
    drift_checks.insert(DriftCheck(1.0, "v1", "no_drift", drift=False, window_size=500, estimated_accuracy=0.8))
    drift_checks.insert(flagged(2.0, explained=True))
    drift_checks.insert(DriftCheck(3.0, "v1", "insufficient_data", drift=False, window_size=10))
    estimated, explained = drift_checks.latest_estimated(), drift_checks.latest_explained()
    assert estimated is not None and estimated.checked_at == 1.0
    assert explained is not None and explained.checked_at == 2.0


def test_the_current_drift_is_the_run_of_flagged_checks_since_the_last_clear_one(
    drift_checks: DriftCheckRepository,
) -> None:
    """A drift alert is about the latest explained check with no clear check after it."""
    assert drift_checks.explaining_current_drift() is None
    drift_checks.insert(flagged(1.0, explained=True))
    drift_checks.insert(flagged(2.0))
    assert drift_checks.explaining_current_drift().checked_at == 1.0  # type: ignore[union-attr]
    drift_checks.insert(flagged(3.0, drift=False))
    drift_checks.insert(flagged(4.0))  # a new run whose explanation failed: the old one does not stand in
    assert drift_checks.explaining_current_drift() is None
    drift_checks.insert(flagged(5.0, explained=True))
    assert drift_checks.explaining_current_drift().checked_at == 5.0  # type: ignore[union-attr]


def test_explanations_older_than_the_cutoff_are_forgotten_and_the_checks_kept(
    drift_checks: DriftCheckRepository,
) -> None:
    for at in (1.0, 2.0, 3.0):
        drift_checks.insert(flagged(at, explained=True))
    assert drift_checks.forget_explanations(before=2.5) == 2
    assert [c.explanation is not None for c in drift_checks.history(10)] == [True, False, False]
