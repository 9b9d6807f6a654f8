"""The monitor: checks when due, records and exports every check, follows the current version."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from app.migrations import upgrade
from app.ml.drift_reference import ARRAYS_ARTIFACT, SUMMARY_ARTIFACT
from app.ml.registry import LoadedModel, ModelRegistry
from app.monitoring.monitor import DriftMonitor
from app.monitoring.prediction_log import PredictionLog
from app.settings import Settings
from tests.traffic import log_predictions


def log_window(store: PredictionLog, model: LoadedModel, texts: list[str], start: float) -> None:
    log_predictions(store, model.model, model.version, texts, start=start)


@pytest.fixture
def monitor(store: ModelRegistry, tmp_path: Path) -> DriftMonitor:
    settings = Settings(
        model_store=store.root,
        state_dir=tmp_path / "var",
        drift_window_size=200,
        drift_check_every_predictions=50,
        drift_check_interval_seconds=3600,
    )
    upgrade(settings.prediction_log_url)
    return DriftMonitor(settings)


def gauge(name: str, labels: dict[str, Any] | None = None) -> float | None:
    return REGISTRY.get_sample_value(name, labels or {})


def test_checks_are_stored_exported_and_only_rerun_when_due(
    monitor: DriftMonitor, current: LoadedModel, clothing_texts: list[str]
) -> None:
    first = monitor.step()
    assert first is not None and first.status == "insufficient_data"
    assert monitor.step() is None  # nothing new since
    log_window(monitor.store, current, clothing_texts[:200], time.time())
    result = monitor.step()
    assert result is not None and result.drift
    assert gauge("sentiment_drift_detected") == 1.0 and gauge("sentiment_drift_window_size") == 200
    assert gauge("sentiment_drift_score") == pytest.approx(result.score)
    assert gauge("sentiment_drift_test_p_value", {"test": "length"}) == pytest.approx(
        result.details["p_values"]["length"]
    )
    assert monitor.store.drift_history(1)[0]["status"] == "drift"
    log_window(monitor.store, current, clothing_texts[200:230], time.time() + 1)
    assert monitor.step() is None  # 30 new predictions: fewer than every-50, interval not over


def test_a_new_current_version_gets_its_own_reference_and_window(
    monitor: DriftMonitor,
    store: ModelRegistry,
    current: LoadedModel,
    versions: list[str],
    clothing_texts: list[str],
) -> None:
    log_window(monitor.store, current, clothing_texts[:200], time.time())
    assert monitor.step().drift  # type: ignore[union-attr]
    store.promote(versions[1])
    switched = monitor.step()
    assert switched is not None and switched.model_version == versions[1]
    assert switched.status == "insufficient_data" and gauge("sentiment_drift_detected") == 0.0


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
