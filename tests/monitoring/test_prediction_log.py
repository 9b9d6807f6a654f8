"""The prediction log: rows, windows, feedback labels, retention, and the write-behind recorder."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from app.monitoring.prediction_log import LabelOutcome, PredictionLog, PredictionRecorder


def row(i: int, version: str = "v1", created_at: float | None = None, sentiment: str = "positive") -> dict[str, Any]:
    return {
        "id": f"p{i:05d}",
        "created_at": created_at if created_at is not None else 1000.0 + i,
        "text": f"text number {i}",
        "text_length": 14,
        "sentiment": sentiment,
        "confidence": 0.8,
        "p_positive": 0.8 if sentiment == "positive" else 0.2,
        "model_version": version,
        "latency_ms": 1.0,
    }


@pytest.fixture
def store(tmp_path: Path) -> PredictionLog:
    log = PredictionLog(f"sqlite:///{tmp_path / 'sub' / 'log.db'}")
    log.create_tables()
    return log


def errors(reason: str) -> float:
    return REGISTRY.get_sample_value("sentiment_prediction_log_errors_total", {"reason": reason}) or 0.0


def test_window_is_the_latest_rows_of_one_version_oldest_first(store: PredictionLog) -> None:
    store.insert_predictions([row(i) for i in range(10)] + [row(100 + i, "v2") for i in range(3)])
    window = store.window(4, "v1")
    assert [r["text"] for r in window] == [f"text number {i}" for i in (6, 7, 8, 9)]
    assert store.count_predictions("v1") == 10 and store.count_predictions("v2") == 3
    assert store.count_predictions("v1", since=1007.0) == 2


def test_labels_are_idempotent_and_never_overwritten(store: PredictionLog) -> None:
    store.insert_predictions([row(1)])
    assert store.set_label("p00001", "negative").outcome is LabelOutcome.STORED
    assert store.set_label("p00001", "negative").outcome is LabelOutcome.UNCHANGED
    conflict = store.set_label("p00001", "positive")
    assert conflict.outcome is LabelOutcome.CONFLICT and conflict.label == "negative"
    assert store.get_prediction("p00001")["label"] == "negative"  # type: ignore[index]
    assert store.set_label("nope", "positive").outcome is LabelOutcome.NOT_FOUND


def test_live_accuracy_covers_the_most_recently_labelled(store: PredictionLog) -> None:
    store.insert_predictions([row(i) for i in range(6)])
    for i, label in enumerate(["positive", "positive", "negative", "negative"]):
        store.set_label(f"p{i:05d}", label, now=2000.0 + i)
    assert store.live_accuracy(last=10) == (0.5, 4)
    assert store.live_accuracy(last=2) == (0.0, 2)  # the two latest were wrong
    assert [r["label"] for r in store.labelled()] == ["positive", "positive", "negative", "negative"]


def test_retention_drops_old_and_excess_unlabelled_rows_but_keeps_labels(store: PredictionLog) -> None:
    store.insert_predictions([row(i, created_at=float(i)) for i in range(100)])
    store.set_label("p00000", "positive")
    deleted = store.enforce_retention(max_rows=50, max_age_seconds=80, now=100.0)
    # Older than 80 s: rows 0-19 (row 0 is labelled and kept); beyond the newest 50 unlabelled: rows 20-49.
    assert deleted == 49
    assert store.count_predictions() == 51
    assert store.get_prediction("p00000") is not None and store.get_prediction("p00049") is None


def test_drift_history_is_newest_first_and_pruned(store: PredictionLog) -> None:
    for i in range(5):
        store.insert_drift_check(
            {
                "checked_at": 10.0 + i,
                "model_version": "v1",
                "status": "no_drift",
                "drift": False,
                "window_size": 500,
                "details": {"i": i},
            }
        )
    assert [c["details"]["i"] for c in store.drift_history(3)] == [4, 3, 2]
    store.prune_drift_checks(keep=2)
    assert [c["details"]["i"] for c in store.drift_history(10)] == [4, 3]


def test_recorder_flushes_in_the_background_and_on_close(store: PredictionLog) -> None:
    async def scenario() -> tuple[int, int]:
        recorder = PredictionRecorder(store, flush_interval=0.05, max_buffer=100)
        recorder.start()
        recorder.record([row(i) for i in range(5)])
        await asyncio.sleep(0.2)
        flushed = store.count_predictions()
        recorder.record([row(i) for i in range(5, 8)])
        await recorder.close()
        return flushed, store.count_predictions()

    assert asyncio.run(scenario()) == (5, 8)


def test_recorder_survives_a_failing_database_and_counts_it(tmp_path: Path) -> None:
    broken = PredictionLog(f"sqlite:///{tmp_path / 'log.db'}")  # tables never created: every insert fails
    before_failed, before_dropped = errors("write_failed"), errors("dropped")

    async def scenario() -> int:
        recorder = PredictionRecorder(broken, flush_interval=10, max_buffer=5)
        recorder.record([row(i) for i in range(3)])
        await recorder.flush()
        pending_after_failure = recorder.pending
        recorder.record([row(i) for i in range(3, 6)])
        return pending_after_failure

    assert asyncio.run(scenario()) == 3  # kept for the next attempt
    assert errors("write_failed") == before_failed + 1
    assert errors("dropped") == before_dropped + 1  # 6 rows, room for 5


def test_alert_firings_stay_claimed_only_by_a_running_or_promoting_retrain(store: PredictionLog) -> None:
    store.create_job("a", "alertmanager", "SentimentDriftDetected", now=1.0, alerts=["f1@t1"])
    assert store.unseen_alerts(["f1@t1", "f2@t2"]) == ["f2@t2"]
    store.finish_job("a", "succeeded", "promoted", {})
    assert store.unseen_alerts(["f1@t1"]) == []  # acted on for good
    store.create_job("b", "grafana", "SentimentDriftDetected", now=2.0, alerts=["f2@t2"])
    store.finish_job("b", "succeeded", "rejected", {})
    assert store.unseen_alerts(["f2@t2"]) == ["f2@t2"]  # released: a re-send may retry
    store.create_job("c", "grafana", "SentimentDriftDetected", now=3.0, alerts=["f2@t2"])
    assert store.fail_running_jobs("killed") == 1
    assert store.unseen_alerts(["f2@t2"]) == ["f2@t2"]
    assert [j["status"] for j in store.jobs()] == ["failed", "succeeded", "succeeded"]


def test_a_log_created_before_claims_had_a_job_gains_the_column(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "old.db"
    with sqlite3.connect(path) as conn:
        conn.execute(
            "CREATE TABLE webhook_alerts (identity VARCHAR(255) PRIMARY KEY, source VARCHAR(16) NOT NULL,"
            " received_at FLOAT NOT NULL)"
        )
        conn.execute("INSERT INTO webhook_alerts VALUES ('old@t0', 'alertmanager', 1.0)")
    old = PredictionLog(f"sqlite:///{path}")
    old.create_tables()
    old.create_job("a", "alertmanager", "SentimentDriftDetected", alerts=["new@t1"])
    assert old.unseen_alerts(["old@t0", "new@t1", "x@t2"]) == ["x@t2"]
    old.finish_job("a", "succeeded", "skipped_no_new_labels", {})
    assert old.unseen_alerts(["old@t0", "new@t1"]) == ["new@t1"]
    old.dispose()
