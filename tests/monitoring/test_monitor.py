"""The monitor: checks when due, records and exports every check, follows the current version."""

from __future__ import annotations

import math
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from app.migrations import upgrade
from app.ml.drift_reference import ARRAYS_ARTIFACT, SUMMARY_ARTIFACT, DriftReference
from app.ml.registry import LoadedModel, ModelRegistry
from app.monitoring import monitor as monitor_module
from app.monitoring.drift import DriftResult
from app.monitoring.explain import DriftExplanation
from app.monitoring.monitor import DriftMonitor
from app.monitoring.performance import reference_estimate
from app.monitoring.report import REFERENCE_KEY
from app.settings import Settings
from app.storage.drift_checks import DriftCheck
from app.storage.predictions import PredictionRepository
from tests.traffic import log_predictions


def log_window(store: PredictionRepository, model: LoadedModel, texts: list[str], start: float) -> None:
    log_predictions(store, model.model, model.version, texts, start=start)


def make_monitor(store: ModelRegistry, tmp_path: Path, **overrides: Any) -> DriftMonitor:
    """A monitor of window 200 checking every 50 predictions (or after an hour with news), default gap rules."""
    settings = Settings(
        model_store=store.root,
        state_dir=tmp_path / "var",
        drift_window_size=200,
        drift_check_every_predictions=50,
        drift_check_interval_seconds=3600,
        **overrides,
    )
    upgrade(settings.prediction_log_url)
    return DriftMonitor(settings)


@pytest.fixture
def monitor(store: ModelRegistry, tmp_path: Path) -> DriftMonitor:
    return make_monitor(store, tmp_path)


def gauge(name: str, labels: dict[str, Any] | None = None) -> float | None:
    return REGISTRY.get_sample_value(name, labels or {})


def step_after_gap(monitor: DriftMonitor) -> DriftResult | None:
    """One step once the minimum gap since the last check's start has passed (the schedule's clock moved on)."""
    monitor.last_started -= monitor.min_interval()
    return monitor.step()


def test_checks_are_stored_exported_and_only_rerun_when_due(
    monitor: DriftMonitor, current: LoadedModel, clothing_texts: list[str]
) -> None:
    first = monitor.step()
    assert first is not None and first.status == "insufficient_data"
    assert step_after_gap(monitor) is None  # nothing new since
    log_window(monitor.predictions, current, clothing_texts[:200], time.time())
    result = step_after_gap(monitor)
    assert result is not None and result.drift
    assert gauge("sentiment_drift_detected") == 1.0 and gauge("sentiment_drift_window_size") == 200
    assert gauge("sentiment_drift_score") == pytest.approx(result.score)
    assert gauge("sentiment_drift_test_p_value", {"test": "length"}) == pytest.approx(
        result.details["p_values"]["length"]
    )
    assert monitor.drift_checks.history(1)[0].status == "drift"
    log_window(monitor.predictions, current, clothing_texts[200:230], time.time() + 1)
    assert step_after_gap(monitor) is None  # 30 new predictions: fewer than every-50, interval not over


def test_a_new_current_version_gets_its_own_reference_and_window(
    monitor: DriftMonitor,
    store: ModelRegistry,
    current: LoadedModel,
    versions: list[str],
    clothing_texts: list[str],
) -> None:
    log_window(monitor.predictions, current, clothing_texts[:200], time.time())
    assert monitor.step().drift  # type: ignore[union-attr]
    store.promote(versions[1])
    switched = monitor.step()
    assert switched is not None and switched.model_version == versions[1]
    assert switched.status == "insufficient_data" and gauge("sentiment_drift_detected") == 0.0
    # The version left behind no longer vouches for an estimate; the new one has its reference already.
    for name in ("", "_lower", "_upper", "_reference"):
        assert math.isnan(gauge(f"sentiment_estimated_accuracy{name}", {"model_version": current.version}) or 0.0)
    assert 0.5 < (gauge("sentiment_estimated_accuracy_reference", {"model_version": versions[1]}) or 0.0) <= 1.0


def test_a_version_without_reference_is_reported_not_fatal(
    monitor: DriftMonitor, store: ModelRegistry, current: LoadedModel
) -> None:
    import json

    meta_path = current.path / "metadata.json"
    meta = json.loads(meta_path.read_text())
    for artifact in (ARRAYS_ARTIFACT, SUMMARY_ARTIFACT):
        del meta["artifacts"][artifact]
    meta_path.write_text(json.dumps(meta))
    errors_before = gauge("sentiment_drift_checks_total", {"outcome": "error"}) or 0.0
    assert monitor.step() is None and monitor.step() is None
    assert gauge("sentiment_drift_checks_total", {"outcome": "error"}) == errors_before + 1  # retried later


def in_domain_window(texts: list[str], size: int = 200) -> list[str]:
    return [texts[i] for i in np.random.default_rng(3).choice(len(texts), size, replace=False)]


def test_a_shifted_window_is_stored_with_its_estimate_and_explanation(
    monitor: DriftMonitor, current: LoadedModel, reference: DriftReference, clothing_texts: list[str]
) -> None:
    """Clothing reviews: the check records the estimate, the version's reference estimate and what separates them."""
    window = clothing_texts[:200]
    log_window(monitor.predictions, current, window, time.time())
    with capture_logs() as logs:
        result = monitor.step()
    assert result is not None and result.drift
    (check,) = monitor.drift_checks.history(1)
    assert check.estimated_accuracy is not None and check.estimated_accuracy_low is not None
    assert check.estimated_accuracy_high is not None
    assert 0.5 <= check.estimated_accuracy_low < check.estimated_accuracy < check.estimated_accuracy_high <= 1.0
    assert check.details[REFERENCE_KEY] == reference_estimate(reference).to_dict()
    labels = {"model_version": current.version}
    assert gauge("sentiment_estimated_accuracy", labels) == pytest.approx(check.estimated_accuracy)
    assert gauge("sentiment_estimated_accuracy_lower", labels) == pytest.approx(check.estimated_accuracy_low)
    assert gauge("sentiment_estimated_accuracy_upper", labels) == pytest.approx(check.estimated_accuracy_high)
    assert gauge("sentiment_estimated_accuracy_reference", labels) == pytest.approx(
        reference_estimate(reference).estimate
    )
    assert check.explanation is not None
    explanation = DriftExplanation.from_dict(check.explanation)
    assert explanation.domain_auc > 0.8 and explanation.window_rows == 200
    assert {e.text for e in explanation.examples} <= set(window)  # verbatim live texts
    assert explanation.over_represented  # the reference's holdout texts were counted: terms are compared
    assert gauge("sentiment_drift_explained_check_id") == check.id
    assert [e["check_id"] for e in logs if e["event"] == "drift_explained"] == [check.id]


def test_an_in_domain_window_gets_an_estimate_and_no_explanation(
    monitor: DriftMonitor, current: LoadedModel, reference: DriftReference, unseen_in_domain: list[str]
) -> None:
    """Unseen film reviews: no drift, an estimate near the reference's, nothing to explain."""
    log_window(monitor.predictions, current, in_domain_window(unseen_in_domain), time.time())
    result = monitor.step()
    assert result is not None and result.status == "no_drift"
    (check,) = monitor.drift_checks.history(1)
    assert check.explanation is None and check.estimated_accuracy is not None
    assert abs(check.estimated_accuracy - reference_estimate(reference).estimate) < 0.05


def test_drift_is_explained_once_then_once_per_window_of_new_predictions(
    monitor: DriftMonitor, current: LoadedModel, clothing_texts: list[str], unseen_in_domain: list[str]
) -> None:
    """Window of 200: the first flagged check, then not before 200 new predictions, and again after a clear one."""
    start = time.time()
    explained = []
    for batch in (clothing_texts[:200], clothing_texts[200:250], clothing_texts[250:400]):
        log_window(monitor.predictions, current, batch, start)
        start += 1
        result = step_after_gap(monitor)
        assert result is not None and result.drift
        explained.append(monitor.drift_checks.history(1)[0].explanation is not None)
    assert explained == [True, False, True]  # 50 new predictions, then 200 since the first explanation
    log_window(monitor.predictions, current, in_domain_window(unseen_in_domain), start)
    assert step_after_gap(monitor).status == "no_drift"  # type: ignore[union-attr]
    log_window(monitor.predictions, current, clothing_texts[400:600], start + 1)
    assert step_after_gap(monitor).drift  # type: ignore[union-attr]
    assert monitor.drift_checks.history(1)[0].explanation is not None  # a new run of drift: explained at once


def test_a_failed_explanation_is_logged_and_the_check_still_stored(
    monitor: DriftMonitor, current: LoadedModel, clothing_texts: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An explanation that raises never costs the check itself, nor its estimate."""

    def broken(*args: Any, **kwargs: Any) -> DriftExplanation:
        raise RuntimeError("boom")

    monkeypatch.setattr(monitor_module, "explain", broken)
    log_window(monitor.predictions, current, clothing_texts[:200], time.time())
    with capture_logs() as logs:
        result = monitor.step()
    assert result is not None and result.drift
    (check,) = monitor.drift_checks.history(1)
    assert check.explanation is None and check.estimated_accuracy is not None
    assert [e["reason"] for e in logs if e["event"] == "drift_explain_failed"] == ["boom"]
    assert not [e for e in logs if e["event"] == "drift_check_failed"]


def test_retention_drops_explanations_as_old_as_the_predictions_it_deletes(monitor: DriftMonitor) -> None:
    """Explanations quote user texts: past SENTIMENT_RETENTION_MAX_AGE_HOURS only the figures stay."""
    now = time.time()
    explanation = {"examples": [{"text": "a user's text", "score": 0.9}]}
    old, recent = (
        monitor.drift_checks.insert(DriftCheck(at, "v", "drift", True, 200, explanation=explanation))
        for at in (now - 169 * 3600, now - 3600)
    )
    monitor.housekeeping(now)
    assert monitor.drift_checks.get(old).explanation is None  # type: ignore[union-attr]
    assert monitor.drift_checks.get(recent).explanation == explanation  # type: ignore[union-attr]


def test_a_monitor_that_stops_leading_no_longer_vouches_for_its_estimate(
    monitor: DriftMonitor, current: LoadedModel, clothing_texts: list[str]
) -> None:
    """export_unknown (leadership lost) sets the version's four estimate gauges to NaN with the drift gauges."""
    log_window(monitor.predictions, current, clothing_texts[:200], time.time())
    assert monitor.step() is not None
    labels = {"model_version": current.version}
    assert not math.isnan(gauge("sentiment_estimated_accuracy", labels) or math.nan)
    assert monitor.detector is not None
    monitor_module.export_unknown(monitor.detector.names, current.version)
    for name in ("", "_lower", "_upper", "_reference"):
        assert math.isnan(gauge(f"sentiment_estimated_accuracy{name}", labels) or 0.0)
    assert math.isnan(gauge("sentiment_drift_detected") or 0.0)


def test_the_leaders_step_rolls_back_a_watched_promotion_that_feedback_says_is_worse(
    monitor: DriftMonitor, store: ModelRegistry, versions: list[str], unseen_in_domain: list[str]
) -> None:
    """The hook: a retrain's promotion (watched), then 150 labels saying the new version is always wrong against
    the parent's always right; the monitor's next step restores the parent before checking it."""
    from app.storage.model_events import ModelEvent, ModelEventRepository

    parent, new = store.load(versions[0]), store.load(versions[1])
    texts = unseen_in_domain[:150]
    log_predictions(monitor.predictions, parent.model, parent.version, texts, parent.model.predict(texts), start=1.0)
    store.promote(new.version)
    events = ModelEventRepository(monitor.database)
    events.record(
        ModelEvent(new.version, "promoted", "retrain:j1", "manual", {"previous": parent.version, "watch": True})
    )
    texts = unseen_in_domain[150:300]
    log_predictions(monitor.predictions, new.model, new.version, texts, 1 - new.model.predict(texts), start=time.time())
    result = monitor.step()
    assert store.current_version() == parent.version
    assert result is not None and result.model_version == parent.version  # the step checked the restored version
    assert [e.event for e in events.for_version(new.version)] == ["promoted", "rolled_back"]


# -- the schedule and its cost ---------------------------------------------------------------------------------


def test_fast_traffic_is_not_checked_before_the_minimum_interval(
    monitor: DriftMonitor, current: LoadedModel, clothing_texts: list[str]
) -> None:
    """Four times N new predictions right after a check: not due until 2 s (the default minimum) after it started."""
    assert monitor.step() is not None
    log_window(monitor.predictions, current, clothing_texts[:200], time.time())
    assert monitor.min_interval() == 2.0  # that check's CPU seconds over the default budget (0.5) are less
    assert not monitor.due(current.version, monitor.last_started + 1.99)
    assert monitor.due(current.version, monitor.last_started + 2.01)


def test_the_cpu_budget_spaces_checks_by_what_the_last_one_cost(
    store: ModelRegistry, tmp_path: Path, current: LoadedModel, clothing_texts: list[str]
) -> None:
    """A 1 % budget: the next check starts no sooner than 100 times the last one's CPU seconds after it started."""
    monitor = make_monitor(store, tmp_path, drift_max_cpu_share=0.01)
    log_window(monitor.predictions, current, clothing_texts[:200], time.time())
    cpu_before = time.process_time()
    assert monitor.step().drift  # type: ignore[union-attr]
    assert 0.02 < monitor.last_check_cpu <= time.process_time() - cpu_before  # past 2 s x 1 %: the budget rules
    gap = monitor.min_interval()
    assert gap == pytest.approx(monitor.last_check_cpu / 0.01)
    assert gauge("sentiment_drift_check_min_interval_seconds") == pytest.approx(gap)
    log_window(monitor.predictions, current, clothing_texts[200:400], time.time() + 1)
    assert not monitor.due(current.version, monitor.last_started + gap - 0.01)
    assert monitor.due(current.version, monitor.last_started + gap + 0.01)


def test_the_cpu_share_falls_from_the_idle_budget_to_the_busy_one_as_the_host_fills_up(
    store: ModelRegistry, tmp_path: Path
) -> None:
    """Idle host: drift_max_cpu_share; saturated: drift_busy_cpu_share; between, with the square of the idle
    share (a saturated host still shows 10-20 % idle); never above the max."""
    monitor = make_monitor(store, tmp_path, drift_max_cpu_share=0.5, drift_busy_cpu_share=0.05)
    monitor.last_check_cpu = 1.0
    for idle, share in ((1.0, 0.5), (0.9, 0.4145), (0.5, 0.1625), (0.15, 0.060125), (0.0, 0.05)):
        monitor.host_idle = idle
        assert monitor.cpu_share() == pytest.approx(share)
        assert monitor.min_interval() == pytest.approx(1.0 / share)
    capped = make_monitor(store, tmp_path / "capped", drift_max_cpu_share=0.01, drift_busy_cpu_share=0.05)
    capped.host_idle = 0.0
    assert capped.cpu_share() == 0.01


def test_slow_traffic_is_checked_every_n_predictions_or_after_the_interval(
    monitor: DriftMonitor, current: LoadedModel, clothing_texts: list[str]
) -> None:
    """Long after the gap: 49 new predictions wait, the 50th (N) makes a check due; one waits for the hour."""
    assert monitor.step() is not None
    later = monitor.last_started + 60
    log_window(monitor.predictions, current, clothing_texts[:49], time.time())
    assert not monitor.due(current.version, later)
    log_window(monitor.predictions, current, clothing_texts[49:50], time.time() + 1)
    assert monitor.due(current.version, later)
    assert step_after_gap(monitor) is not None
    assert not monitor.due(current.version, monitor.last_check_at + 3600)  # no news
    log_window(monitor.predictions, current, clothing_texts[50:51], time.time() + 2)
    assert not monitor.due(current.version, monitor.last_check_at + 3599)
    assert monitor.due(current.version, monitor.last_check_at + 3600.01)


def test_a_new_version_is_checked_at_once_whatever_the_gap(
    store: ModelRegistry, tmp_path: Path, current: LoadedModel, versions: list[str], clothing_texts: list[str]
) -> None:
    """A day-long minimum interval holds back the current version's next check, not a promoted version's first."""
    monitor = make_monitor(store, tmp_path, drift_min_check_interval_seconds=86_400)
    assert monitor.step() is not None
    log_window(monitor.predictions, current, clothing_texts[:200], time.time())
    assert monitor.step() is None
    store.promote(versions[1])
    switched = monitor.step()
    assert switched is not None and switched.model_version == versions[1]


def burn_cpu(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def test_the_cpu_counter_adds_the_cpu_seconds_used_since_the_last_report(monitor: DriftMonitor) -> None:
    """sentiment_drift_monitor_cpu_seconds_total moves by the process's CPU time, not by wall time."""
    monitor.report_cpu()
    before = gauge("sentiment_drift_monitor_cpu_seconds_total") or 0.0
    burn_cpu(0.2)
    time.sleep(0.2)
    monitor.report_cpu()
    moved = (gauge("sentiment_drift_monitor_cpu_seconds_total") or 0.0) - before
    assert 0.2 <= moved < 0.4  # the sleep's wall time is not in it


def test_every_poll_of_the_run_loop_reports_the_process_cpu(
    monitor: DriftMonitor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fresh monitor's first report is all of its process's CPU seconds so far (a restart loses none of them)."""
    monkeypatch.setattr(monitor_module, "POLL_SECONDS", 0.05)
    before, cpu_before = gauge("sentiment_drift_monitor_cpu_seconds_total") or 0.0, time.process_time()
    loop = threading.Thread(target=monitor.run)
    loop.start()
    deadline = time.monotonic() + 30
    while monitor.cpu_reported == 0.0 and time.monotonic() < deadline:
        time.sleep(0.01)
    monitor.stopping.set()
    loop.join(30)
    moved = (gauge("sentiment_drift_monitor_cpu_seconds_total") or 0.0) - before
    assert cpu_before <= moved <= time.process_time()
