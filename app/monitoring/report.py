"""What ``GET /v1/drift`` reports besides the latest checks: the label-free accuracy estimate next to its
version's reference estimate and the realised accuracy from feedback, and the latest drift explanation.

The drift monitor stores a full window's estimate in the check's ``estimated_accuracy*`` columns and the
version's reference estimate in its ``details`` (:data:`REFERENCE_KEY`); :func:`estimates_of` reads both back,
for this report and for the retrain trigger (:mod:`app.retrain.webhooks`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from app.monitoring.performance import METHOD, AccuracyEstimate
from app.storage.drift_checks import DriftCheck, DriftCheckRepository
from app.storage.predictions import PredictionRepository

REFERENCE_KEY = "estimated_accuracy_reference"
"""Key of a check's ``details`` holding its version's reference estimate (:meth:`AccuracyEstimate.to_dict`)."""
METHOD_KEY = "estimated_accuracy_method"
"""Key of a check's ``details`` naming the estimator (:attr:`AccuracyEstimate.method`)."""


def estimate_details(reference: AccuracyEstimate, method: str = METHOD) -> dict[str, Any]:
    """What a check with an estimate adds to its ``details``: the reference estimate and the method."""
    return {REFERENCE_KEY: reference.to_dict(), METHOD_KEY: method}


def estimates_of(check: DriftCheck) -> tuple[AccuracyEstimate, AccuracyEstimate | None] | None:
    """The window's estimate stored with ``check`` and its version's reference estimate (None if the check
    does not record it); None for a check without an estimate (a window that was not full)."""
    if check.estimated_accuracy is None:
        return None
    estimate = check.estimated_accuracy
    window = AccuracyEstimate(
        estimate=estimate,
        low=estimate if check.estimated_accuracy_low is None else check.estimated_accuracy_low,
        high=estimate if check.estimated_accuracy_high is None else check.estimated_accuracy_high,
        window_size=check.window_size,
        method=str(check.details.get(METHOD_KEY, METHOD)),
    )
    stored = check.details.get(REFERENCE_KEY)
    reference = AccuracyEstimate(**stored) if isinstance(stored, dict) else None
    return window, reference


@dataclass(frozen=True)
class LiveAccuracy:
    """Realised accuracy over the latest ``window`` labelled predictions (``labelled`` of them so far)."""

    accuracy: float | None
    labelled: int
    window: int


@dataclass(frozen=True)
class DriftReport:
    """The latest checks (newest first), the latest check with an estimate, the latest check with an
    explanation, and the realised accuracy from feedback."""

    history: list[DriftCheck]
    estimated: DriftCheck | None
    explained: DriftCheck | None
    live_accuracy: LiveAccuracy


def drift_report(
    drift_checks: DriftCheckRepository, predictions: PredictionRepository, limit: int, live_window: int
) -> DriftReport:
    """Read what ``GET /v1/drift`` shows (blocking: four queries)."""
    accuracy, labelled = predictions.live_accuracy(live_window)
    return DriftReport(
        history=drift_checks.history(limit),
        estimated=drift_checks.latest_estimated(),
        explained=drift_checks.latest_explained(),
        live_accuracy=LiveAccuracy(accuracy, labelled, live_window),
    )
