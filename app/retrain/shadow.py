"""Shadow scoring: a candidate the promotion gate passed scores the latest live window before it may be promoted.

The gate judges a candidate on held-out labelled rows; the shadow asks how it would behave on the traffic it is
about to serve. It runs in the retrain process (off the request path) on the current version's latest
``SENTIMENT_DRIFT_WINDOW_SIZE`` logged predictions, minus any text the candidate was fitted on, and compares the
candidate's predictions with the current model's on the same texts (the current model's are the P(positive) it
served, stored in the prediction log):

- ``agreement``: the share of texts both label alike;
- ``estimated_accuracy`` of each (:func:`app.monitoring.performance.estimate_accuracy`: mean confidence, the
  accuracy a calibrated model has on those texts) and how many points the candidate's lies below the current's;
- ``confidence_mean`` of each and the Kolmogorov-Smirnov distance between their confidence distributions
  (descriptive: how differently sure the two are, not a test the decision reads).

The candidate is rejected (``decision: reject``) when agreement is below ``SENTIMENT_RETRAIN_SHADOW_MIN_AGREEMENT``
or the estimated drop exceeds ``SENTIMENT_RETRAIN_SHADOW_MAX_ESTIMATED_DROP`` points; with fewer than
``SENTIMENT_RETRAIN_SHADOW_MIN_ROWS`` rows the shadow is ``skipped``, which does not block.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy.stats import ks_2samp

from app.ml.model import SentimentModel, confidence_of, decide
from app.monitoring.performance import AccuracyEstimate, estimate_accuracy
from app.settings import Settings
from app.storage.predictions import WindowRow


@dataclass(frozen=True)
class ShadowRules:
    """When a shadow runs and when it blocks a promotion."""

    min_rows: int
    min_agreement: float  # a share in [0, 1]
    max_estimated_drop: float  # percentage points

    @classmethod
    def from_settings(cls, settings: Settings) -> ShadowRules:
        return cls(
            settings.retrain_shadow_min_rows,
            settings.retrain_shadow_min_agreement,
            settings.retrain_shadow_max_estimated_drop,
        )


def _side(p_positive: NDArray[np.float64], estimate: AccuracyEstimate) -> dict[str, Any]:
    return {
        "estimated_accuracy": estimate.to_dict(),
        "confidence_mean": float(confidence_of(p_positive).mean()),
        "positive_share": float(decide(p_positive).mean()),
    }


def shadow_candidate(
    candidate: SentimentModel, window: Sequence[WindowRow], rules: ShadowRules, *, exclude: Collection[str] = ()
) -> dict[str, Any]:
    """The candidate's shadow figures on the current version's live ``window`` (without the texts in
    ``exclude``: what the candidate was fitted on), and the decision: ``promote``, ``reject`` (``reasons``
    says which rule) or ``skipped`` (too few rows)."""
    rows = [r for r in window if r.text not in exclude]
    shadow: dict[str, Any] = {
        "window_rows": len(window),
        "rows": len(rows),
        "min_rows": rules.min_rows,
        "min_agreement": rules.min_agreement,
        "max_estimated_drop": rules.max_estimated_drop,
    }
    if len(rows) < rules.min_rows:
        return {**shadow, "decision": "skipped", "reasons": ["too_few_rows"]}
    served = np.array([r.p_positive for r in rows], dtype=np.float64)
    scored = np.asarray(candidate.p_positive([r.text for r in rows]), dtype=np.float64)
    current, estimate = estimate_accuracy(served), estimate_accuracy(scored)
    drop = round((current.estimate - estimate.estimate) * 100, 4)
    ks = ks_2samp(confidence_of(scored), confidence_of(served), method="asymp")  # exact: slow, warns at this size
    agreement = float((decide(scored) == decide(served)).mean())
    reasons = [
        reason
        for reason, failed in (
            ("agreement", agreement < rules.min_agreement),
            ("estimated_accuracy", drop > rules.max_estimated_drop),
        )
        if failed
    ]
    return {
        **shadow,
        "agreement": agreement,
        "candidate": _side(scored, estimate),
        "current": _side(served, current),
        "estimated_drop": drop,
        "confidence_ks": {"statistic": float(ks.statistic), "p_value": float(ks.pvalue)},
        "decision": "reject" if reasons else "promote",
        "reasons": reasons,
    }
