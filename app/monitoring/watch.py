"""The promotion watch: for a while after a promotion, the new version must not do worse than the one it replaced.

A retrain's promotion (and ``python -m app.cli promote --watch``) records a ``promoted`` event with ``watch: true``
and the version it replaced (``previous``, the parent). For ``SENTIMENT_PROMOTION_WATCH_SECONDS`` after that event
the drift monitor's leader (:mod:`app.monitoring.monitor`, one process across instances) compares the current
version with its parent every :data:`WATCH_EVERY_SECONDS`, on two figures:

- Realised accuracy, from feedback labels on the predictions each version served: the parent's latest
  ``SENTIMENT_LIVE_ACCURACY_WINDOW`` labelled predictions before the promotion, the new version's since. Once both
  have ``SENTIMENT_PROMOTION_WATCH_MIN_LABELS``, a one-sided two-proportion z-test (pooled) asks whether the new
  version is less accurate. It is repeated as labels arrive, so its level is spent, not reused: the k-th test runs
  when the new version's labels reach ``min_labels * 2**(k - 1)``, at ``SENTIMENT_PROMOTION_WATCH_P_VALUE / 2**k``
  (the levels add up to at most the setting: a version as good as its parent is rolled back with at most that
  probability over the whole watch). A drop that is significant and at least ``SENTIMENT_PROMOTION_WATCH_MIN_DROP``
  points rolls back (reason ``realised_accuracy``).
- Estimated accuracy, without labels (:func:`app.monitoring.performance.estimate_accuracy`): the new version's
  latest ``SENTIMENT_DRIFT_WINDOW_SIZE`` predictions since the promotion (at least :data:`ESTIMATE_MIN_ROWS`),
  against the parent model re-scoring the same texts, so a change of traffic moves both alike. More than
  ``SENTIMENT_PROMOTION_WATCH_MAX_ESTIMATED_DROP`` points below the parent rolls back (reason
  ``estimated_accuracy``).

A rollback is guarded (:meth:`app.ml.registry.ModelRegistry.rollback` with ``expected_current``): if an operator
promoted or rolled back meanwhile, their choice stays. The version rolled back from becomes ``rejected`` (it is
never promoted again, and the next retrain needs labels newer than the ones it was fitted on), the ``rolled_back``
event records the reason and figures, ``sentiment_model_rollbacks_total{reason}`` counts it and the log says
``model_auto_rolled_back``. Workers pick the restored version up as any pointer change. A watch that ends without a
rollback records ``watch_passed`` with its last figures.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import structlog
from numpy.typing import NDArray

from app.errors import CurrentVersionChangedError
from app.ml.registry import LoadedModel, ModelRegistry
from app.monitoring import metrics
from app.monitoring.performance import estimate_accuracy
from app.settings import Settings
from app.storage.database import Database
from app.storage.model_events import ModelEvent, ModelEventRepository
from app.storage.predictions import PredictionRepository

log = structlog.get_logger("app.monitoring.watch")

WATCH_EVERY_SECONDS = 5.0
"""How often the monitor's leader looks at a watched promotion (a few queries; a re-score when the window moved)."""
ESTIMATE_MIN_ROWS = 100
"""Fewest predictions of the new version behind an estimated-accuracy comparison."""
ACTOR = "monitor"


@dataclass(frozen=True)
class WatchRules:
    """How long a promotion is watched and what rolls it back (percentage points for drops)."""

    seconds: float
    min_labels: int
    p_value: float
    min_drop: float
    max_estimated_drop: float
    parent_labels: int  # the parent's latest labelled predictions compared
    window_size: int  # the new version's latest predictions behind the estimate

    @classmethod
    def from_settings(cls, settings: Settings) -> WatchRules:
        return cls(
            settings.promotion_watch_seconds,
            settings.promotion_watch_min_labels,
            settings.promotion_watch_p_value,
            settings.promotion_watch_min_drop,
            settings.promotion_watch_max_estimated_drop,
            settings.live_accuracy_window,
            settings.drift_window_size,
        )


def drop_p_value(parent_right: int, parent_labelled: int, new_right: int, new_labelled: int) -> float:
    """One-sided p-value that the new version is less accurate than the parent: the pooled two-proportion
    z-test of ``H0: p_new >= p_parent``. 1.0 when either side has no labels or every label agrees."""
    if parent_labelled == 0 or new_labelled == 0:
        return 1.0
    pooled = (parent_right + new_right) / (parent_labelled + new_labelled)
    variance = pooled * (1 - pooled) * (1 / parent_labelled + 1 / new_labelled)
    if variance == 0:
        return 1.0
    z = (parent_right / parent_labelled - new_right / new_labelled) / math.sqrt(variance)
    return 0.5 * math.erfc(z / math.sqrt(2))  # P(Z >= z)


def look_of(labels: int, min_labels: int) -> int:
    """Which test a count of the new version's labels stands for: 0 below ``min_labels``, 1 from it, 2 from
    twice it, 3 from four times, ..."""
    return 0 if labels < min_labels else int(math.log2(labels / min_labels)) + 1


def realised_figures(
    parent: tuple[int, int], new: tuple[int, int], rules: WatchRules, look: int | None
) -> dict[str, Any]:
    """The realised-accuracy comparison of (right, labelled) tallies; with ``look`` (the test's index, see
    :func:`look_of`), the test at level ``p_value / 2**look`` and whether it calls for a rollback."""
    (parent_right, parent_labelled), (new_right, new_labelled) = parent, new
    figures: dict[str, Any] = {
        "parent": {"right": parent_right, "labelled": parent_labelled},
        "new": {"right": new_right, "labelled": new_labelled},
        "min_labels": rules.min_labels,
    }
    for side, right, labelled in (("parent", parent_right, parent_labelled), ("new", new_right, new_labelled)):
        figures[side]["accuracy"] = right / labelled if labelled else None
    if parent_labelled and new_labelled:
        figures["drop"] = round((parent_right / parent_labelled - new_right / new_labelled) * 100, 4)
    if look:
        level = rules.p_value / 2**look
        p_value = drop_p_value(parent_right, parent_labelled, new_right, new_labelled)
        figures |= {"look": look, "level": level, "p_value": p_value}
        figures["rollback"] = bool(p_value < level and figures["drop"] >= rules.min_drop)
    return figures


def estimated_figures(parent_p: NDArray[np.float64], new_p: NDArray[np.float64], rules: WatchRules) -> dict[str, Any]:
    """The estimated-accuracy comparison of the parent's and the new version's P(positive) on the same texts."""
    parent, new = estimate_accuracy(parent_p), estimate_accuracy(new_p)
    drop = round((parent.estimate - new.estimate) * 100, 4)
    return {
        "rows": int(new_p.size),
        "parent": parent.to_dict(),
        "new": new.to_dict(),
        "drop": drop,
        "max_drop": rules.max_estimated_drop,
        "rollback": drop > rules.max_estimated_drop,
    }


def rollback_reason(figures: dict[str, Any]) -> str | None:
    """The reason the figures roll back for (realised accuracy first: labels outrank estimates), or None."""
    for reason, key in (("realised_accuracy", "realised"), ("estimated_accuracy", "estimated")):
        if (figures.get(key) or {}).get("rollback"):
            return reason
    return None


@dataclass(frozen=True)
class Promotion:
    """A watched promotion: the version, the one it replaced, and when."""

    version: str
    parent: str
    promoted_at: float


class PromotionWatch:
    """Watches the current version after a watched promotion and rolls it back on a drop (module doc).

    Called from the drift monitor leader's every step; :meth:`step` never raises.
    """

    def __init__(
        self,
        rules: WatchRules,
        registry: ModelRegistry,
        predictions: PredictionRepository,
        events: ModelEventRepository,
    ) -> None:
        self.rules = rules
        self.registry = registry
        self.predictions = predictions
        self.events = events
        self.last_run = 0.0
        self.looks: dict[Promotion, int] = {}  # the last realised-accuracy test run for each promotion
        self.abandoned: set[Promotion] = set()  # an operator's change (or a foreign history) came first
        self.estimated: dict[Promotion, tuple[float, dict[str, Any]]] = {}  # newest row seen -> its figures
        self.parent_model: LoadedModel | None = None

    @classmethod
    def from_settings(cls, settings: Settings, registry: ModelRegistry, database: Database) -> PromotionWatch:
        return cls(
            WatchRules.from_settings(settings),
            registry,
            PredictionRepository(database),
            ModelEventRepository(database),
        )

    def step(self, now: float | None = None) -> str | None:
        """One look at the current version, at most every :data:`WATCH_EVERY_SECONDS`: the reason of the
        rollback it made, or None. Errors are logged (``promotion_watch_failed``), never raised."""
        now = time.time() if now is None else now
        if self.rules.seconds <= 0 or now - self.last_run < WATCH_EVERY_SECONDS:
            return None
        self.last_run = now
        try:
            return self._step(now)
        except Exception as exc:
            log.exception("promotion_watch_failed", reason=str(exc).strip() or type(exc).__name__)
            return None

    def watched(self, version: str) -> Promotion | None:
        """The version's latest promotion if it asked for a watch that has not ended (no ``rolled_back`` or
        ``watch_passed`` after it)."""
        events = self.events.for_version(version)
        promoted = [i for i, e in enumerate(events) if e.event == "promoted"]
        if not promoted:
            return None
        event = events[promoted[-1]]
        ended = any(e.event in ("rolled_back", "watch_passed") for e in events[promoted[-1] + 1 :])
        parent = event.details.get("previous")
        if ended or not event.details.get("watch") or not isinstance(parent, str):
            return None
        return Promotion(version, parent, event.occurred_at)

    def _step(self, now: float) -> str | None:
        version = self.registry.current_version()
        promotion = None if version is None else self.watched(version)
        if promotion is None or promotion in self.abandoned:
            return None
        if promotion not in self.looks:
            self.looks[promotion] = 0
            log.info(
                "promotion_watch_started",
                model_version=promotion.version,
                parent=promotion.parent,
                until=promotion.promoted_at + self.rules.seconds,
            )
        ended = now >= promotion.promoted_at + self.rules.seconds
        figures = self.figures(promotion, test=not ended)
        if ended:
            self._record(promotion.version, "watch_passed", "watch", figures)
            log.info("promotion_watch_passed", model_version=promotion.version, parent=promotion.parent)
            self._forget(promotion)
            return None
        reason = rollback_reason(figures)
        if reason is None:
            return None
        return reason if self.roll_back(promotion, reason, figures) else None

    def figures(self, promotion: Promotion, *, test: bool = True) -> dict[str, Any]:
        """Both comparisons as they stand (``test``: run the realised-accuracy test if a new look is due)."""
        rules = self.rules
        parent = self.predictions.version_accuracy(promotion.parent, rules.parent_labels, before=promotion.promoted_at)
        new = self.predictions.version_accuracy(promotion.version, since=promotion.promoted_at)
        look = None
        if test and min(parent[1], new[1]) >= rules.min_labels:
            due = look_of(new[1], rules.min_labels)
            if due > self.looks.get(promotion, 0):
                look = self.looks[promotion] = due
        figures: dict[str, Any] = {
            "parent": promotion.parent,
            "promoted_at": promotion.promoted_at,
            "realised": realised_figures(parent, new, rules, look),
            "estimated": None,
        }
        try:
            figures["estimated"] = self._estimated(promotion)
        except Exception as exc:  # the parent cannot re-score (it fails verification): the labels still count
            log.warning("promotion_watch_estimate_failed", parent=promotion.parent, reason=str(exc).strip())
        return figures

    def _estimated(self, promotion: Promotion) -> dict[str, Any] | None:
        window = self.predictions.window(self.rules.window_size, promotion.version, since=promotion.promoted_at)
        if len(window) < ESTIMATE_MIN_ROWS:
            return None
        newest = window[-1].created_at
        cached = self.estimated.get(promotion)
        if cached is not None and cached[0] == newest:
            return cached[1]
        if self.parent_model is None or self.parent_model.version != promotion.parent:
            self.parent_model = self.registry.load(promotion.parent)  # verified, as every load
        parent_p = np.asarray(self.parent_model.model.p_positive([r.text for r in window]), dtype=np.float64)
        new_p = np.array([r.p_positive for r in window], dtype=np.float64)
        figures = estimated_figures(parent_p, new_p, self.rules)
        self.estimated[promotion] = (newest, figures)
        return figures

    def roll_back(self, promotion: Promotion, reason: str, figures: dict[str, Any]) -> bool:
        """Roll the watched version back to its parent if it is still current (and the parent is what a rollback
        restores); record, count and log it. False if an operator's change came first."""
        history = self.registry.backend.pointer().history
        if not history or history[-1] != promotion.parent:
            log.warning(
                "promotion_watch_skipped",
                model_version=promotion.version,
                parent=promotion.parent,
                reason="parent_not_previous",
            )
            self._forget(promotion, abandon=True)
            return False
        try:
            restored = self.registry.rollback(expected_current=promotion.version, reject=True)
        except CurrentVersionChangedError as exc:
            log.warning("promotion_watch_superseded", model_version=promotion.version, current=exc.details["current"])
            self._forget(promotion, abandon=True)
            return False
        metrics.MODEL_ROLLBACKS.labels(reason=reason).inc()
        self._record(promotion.version, "rolled_back", "watch", {"reason": reason, "restored": restored, **figures})
        self.events.record_safely(
            ModelEvent(restored, "promoted", ACTOR, "rollback", {"previous": promotion.version, "watch": False})
        )
        realised, estimated = figures["realised"], figures["estimated"] or {}
        log.warning(
            "model_auto_rolled_back",
            model_version=promotion.version,
            restored_version=restored,
            reason=reason,
            realised_drop=realised.get("drop"),
            p_value=realised.get("p_value"),
            new_labels=realised["new"]["labelled"],
            estimated_drop=estimated.get("drop"),
        )
        self._forget(promotion)
        return True

    def _record(self, version: str, event: str, trigger: str, details: dict[str, Any]) -> None:
        self.events.record_safely(ModelEvent(version, event, ACTOR, trigger, details))

    def _forget(self, promotion: Promotion, *, abandon: bool = False) -> None:
        self.estimated.pop(promotion, None)
        self.parent_model = None
        if abandon:
            self.abandoned.add(promotion)
