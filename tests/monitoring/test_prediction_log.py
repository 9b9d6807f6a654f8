"""The prediction log: rows, windows, feedback labels, retention, and the write-behind recorder."""

from __future__ import annotations

import asyncio
import random
import signal
import sqlite3
import subprocess
import sys
import time
import tracemalloc
import uuid
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY
from sqlalchemy.exc import IntegrityError
from structlog.testing import capture_logs

from app.migrations import upgrade
from app.monitoring.prediction_log import LabelOutcome, PredictionLog, PredictionRecorder
from app.monitoring.spool import PredictionSpool
from tests.postgres import postgres, postgres_url  # noqa: F401  fixtures

REPO = Path(__file__).resolve().parents[2]


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
    upgrade(f"sqlite:///{tmp_path / 'sub' / 'log.db'}")
    log = PredictionLog(f"sqlite:///{tmp_path / 'sub' / 'log.db'}")
    return log


def errors(reason: str) -> float:
    return REGISTRY.get_sample_value("sentiment_prediction_log_errors_total", {"reason": reason}) or 0.0


def dropped(reason: str) -> float:
    return REGISTRY.get_sample_value("sentiment_prediction_log_dropped_total", {"reason": reason}) or 0.0


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


def test_retention_bounds_labelled_rows_by_label_age_and_count(store: PredictionLog) -> None:
    store.insert_predictions([row(i, created_at=float(i)) for i in range(10)])
    for i in range(8):
        store.set_label(f"p{i:05d}", "positive", now=1000.0 + i)
    # Labels older than 5.5 s at 1007: rows 0 and 1; beyond the newest 4 labels left: rows 2 and 3.
    deleted = store.enforce_retention(
        max_rows=100, max_age_seconds=1e9, now=1007.0, max_labelled_rows=4, max_labelled_age_seconds=5.5
    )
    assert deleted == 4
    assert [r["id"] for r in store.labelled()] == [f"p{i:05d}" for i in (4, 5, 6, 7)]
    assert store.count_predictions() == 6  # the unlabelled rows 8 and 9 are within their own bounds
    # Without labelled bounds, labelled rows are left alone.
    assert store.enforce_retention(max_rows=0, max_age_seconds=1e9, now=1e6) == 2
    assert store.count_predictions() == 4


def test_labels_record_their_source_and_a_purge_forgets_one_source_only(store: PredictionLog) -> None:
    store.insert_predictions([row(i) for i in range(6)])
    for i, source in enumerate(["web", "web", "crowd", "crowd", "crowd"]):
        store.set_label(f"p{i:05d}", "positive", now=2000.0 + i, source=source)
    assert store.set_label("p00000", "positive", source="crowd").outcome is LabelOutcome.UNCHANGED  # first stays
    assert {r["id"]: r["source"] for r in store.labelled()}["p00000"] == "web"
    assert [(s["source"], s["labels"]) for s in store.label_sources()] == [("crowd", 3), ("web", 2)]

    assert store.purge_labels("crowd") == 3
    assert store.purge_labels("crowd") == 0
    assert [(r["id"], r["source"]) for r in store.labelled()] == [("p00000", "web"), ("p00001", "web")]
    purged = store.get_prediction("p00002")
    assert purged is not None  # the prediction stays, unlabelled
    assert (purged["label"], purged["labelled_at"], purged["label_source"]) == (None, None, None)
    assert store.set_label("p00002", "negative", source="web").outcome is LabelOutcome.STORED


def test_labels_without_a_recorded_source_count_as_legacy_and_can_be_purged(store: PredictionLog) -> None:
    store.insert_predictions([row(i) for i in range(3)])
    store.set_label("p00000", "positive", source="web")
    store.set_label("p00001", "negative", source="web")
    with store.engine.begin() as conn:  # as labelled by a release before label_source
        conn.exec_driver_sql("UPDATE predictions SET label_source = NULL WHERE id = 'p00001'")
    assert [r["source"] for r in store.labelled()] == ["web", "legacy"]
    assert store.purge_labels("legacy") == 1
    assert [r["id"] for r in store.labelled()] == ["p00000"]


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
    before_failed, before_dropped = errors("write_failed"), dropped("buffer_full")

    async def scenario() -> int:
        recorder = PredictionRecorder(broken, flush_interval=10, max_buffer=5)
        recorder.record([row(i) for i in range(3)])
        await recorder.flush()
        pending_after_failure = recorder.pending
        assert REGISTRY.get_sample_value("sentiment_prediction_log_pending_rows") == 3  # the gauge says so too
        recorder.record([row(i) for i in range(3, 6)])
        return pending_after_failure

    assert asyncio.run(scenario()) == 3  # kept for the next attempt
    assert errors("write_failed") == before_failed + 1
    assert dropped("buffer_full") == before_dropped + 1  # 6 rows, room for 5


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


def test_at_most_one_job_runs_and_the_cooldown_is_checked_in_the_insert(store: PredictionLog) -> None:
    """A second running job is refused by the database; ``unless_started_after`` records nothing (and claims
    no firing) while a job started after that time, whatever its outcome."""
    store.create_job("a", "manual", "test", now=100.0)
    with pytest.raises(IntegrityError):
        store.create_job("b", "manual", "test", now=101.0)
    store.finish_job("a", "succeeded", "rejected", {})
    assert not store.create_job("c", "grafana", "test", now=150.0, alerts=["f@t"], unless_started_after=99.0)
    assert store.unseen_alerts(["f@t"]) == ["f@t"]
    assert store.create_job("d", "grafana", "test", now=200.0, alerts=["f@t"], unless_started_after=100.0)
    assert [j["id"] for j in store.jobs()] == ["d", "a"] and store.unseen_alerts(["f@t"]) == []


def test_the_upgrade_to_one_running_job_fails_all_but_the_newest_running_job(tmp_path: Path) -> None:
    """Older releases could leave several jobs 'running' (dead processes): the revision that allows one keeps
    the newest running and records the others failed, so the upgrade never stops on them."""
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    upgrade(url, "b6c9eae9dc3e")
    with sqlite3.connect(tmp_path / "jobs.db") as conn:
        conn.executemany(
            'INSERT INTO retrain_jobs (id, "trigger", reason, status, started_at, details)'
            " VALUES (?, 'manual', 'test', 'running', ?, '{}')",
            [("old", 1.0), ("new", 2.0)],
        )
    upgrade(url)
    log = PredictionLog(url)
    assert {j["id"]: j["status"] for j in log.jobs()} == {"old": "failed", "new": "running"}
    log.dispose()


def test_a_log_created_before_claims_had_a_job_gains_the_column_when_adopted(tmp_path: Path) -> None:
    """`db upgrade` adopts a log of a release before migrations: job_id is added, the claims stay."""

    path = tmp_path / "old.db"
    with sqlite3.connect(path) as conn:
        conn.execute(
            "CREATE TABLE webhook_alerts (identity VARCHAR(255) PRIMARY KEY, source VARCHAR(16) NOT NULL,"
            " received_at FLOAT NOT NULL)"
        )
        conn.execute("INSERT INTO webhook_alerts VALUES ('old@t0', 'alertmanager', 1.0)")
    upgrade(f"sqlite:///{path}")
    old = PredictionLog(f"sqlite:///{path}")
    old.create_job("a", "alertmanager", "SentimentDriftDetected", alerts=["new@t1"])
    assert old.unseen_alerts(["old@t0", "new@t1", "x@t2"]) == ["x@t2"]
    old.finish_job("a", "succeeded", "skipped_no_new_labels", {})
    assert old.unseen_alerts(["old@t0", "new@t1"]) == ["new@t1"]
    old.dispose()


# -- never lost without a trace -----------------------------------------------------------------------


def test_writing_a_row_twice_keeps_one_and_raises_nothing(store: PredictionLog) -> None:
    """A batch re-sent after a commit whose outcome was unknown (or a dead worker's spool) is harmless."""
    store.insert_predictions([row(1), row(2)])
    store.insert_predictions([row(2), row(3)])
    assert store.count_predictions() == 3


def test_a_refused_row_is_set_aside_and_the_flush_task_keeps_writing(store: PredictionLog) -> None:
    """A lone surrogate (UnicodeEncodeError in the driver) and a NOT NULL violation cost only their rows."""
    bad_text = {**row(3), "text": "caf\ud800"}
    bad_null = {**row(6), "sentiment": None}
    before = dropped("rejected_row")

    async def scenario() -> tuple[bool, int]:
        recorder = PredictionRecorder(store, flush_interval=0.02, max_buffer=100)
        recorder.start()
        recorder.record([row(i) for i in range(3)] + [bad_text] + [row(4), row(5), bad_null, row(7)])
        await asyncio.sleep(0.3)
        recorder.record([row(8), row(9)])  # the task is still running after the bad rows
        await asyncio.sleep(0.3)
        alive = recorder._task is not None and not recorder._task.done()
        pending = recorder.pending
        await recorder.close()
        return alive, pending

    with capture_logs() as logs:
        assert asyncio.run(scenario()) == (True, 0)
    assert store.count_predictions() == 8
    assert store.get_prediction("p00003") is None and store.get_prediction("p00007") is not None
    assert dropped("rejected_row") == before + 2
    rejected = [e for e in logs if e["event"] == "prediction_log_row_rejected"]
    assert {e["prediction_id"]: e["reason"] for e in rejected} == {
        "p00003": "UnicodeEncodeError",
        "p00006": "IntegrityError",
    }
    assert not any("text number" in repr(e) or "caf" in repr(e) for e in logs)  # ids, never texts


def test_the_buffer_is_bounded_in_bytes_and_drops_the_oldest(tmp_path: Path) -> None:
    """50 rows of 10,000 characters do not fit in 200 kB: the oldest go, counted, and memory stays bounded."""
    broken = PredictionLog(f"sqlite:///{tmp_path / 'log.db'}")
    before = dropped("buffer_full")

    async def scenario() -> PredictionRecorder:
        recorder = PredictionRecorder(broken, flush_interval=10, max_buffer=1000, max_buffer_bytes=200_000)
        for i in range(50):
            recorder.record([{**row(i), "text": "x" * 10_000}])
        await recorder.flush()  # fails: the rows stay, within the bound
        return recorder

    recorder = asyncio.run(scenario())
    kept = [r["id"] for _, _, r in recorder._buffer]
    assert recorder._bytes <= 200_000 and len(kept) == 18  # 10,749 bytes each
    assert kept == [f"p{i:05d}" for i in range(32, 50)]
    assert dropped("buffer_full") == before + 32


def test_the_byte_estimate_covers_what_buffered_rows_really_take(tmp_path: Path) -> None:
    """The bound counts at least the memory the buffered rows hold, as the predictor builds them."""
    recorder = PredictionRecorder(PredictionLog(f"sqlite:///{tmp_path / 'log.db'}"), 10, 100_000)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(2000):
            text = "".join(random.Random(i).choices("abcdef ", k=i % 300))
            recorder.record(
                [
                    {
                        "id": uuid.uuid4().hex,
                        "created_at": time.time(),
                        "text": text,
                        "text_length": len(text),
                        "sentiment": "positive",
                        "confidence": random.random(),
                        "p_positive": random.random(),
                        "model_version": "v1",
                        "latency_ms": random.random(),
                    }
                ]
            )
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert held <= recorder._bytes <= 1.3 * held, (held, recorder._bytes)


def test_graceful_close_gives_up_at_its_deadline_and_counts_what_it_could_not_write(tmp_path: Path) -> None:
    """A database locked by another writer: close returns within its timeout; unspooled rows count as lost."""
    path = tmp_path / "log.db"
    upgrade(f"sqlite:///{path}")
    locked = PredictionLog(f"sqlite:///{path}")
    blocker = sqlite3.connect(path, timeout=0)
    blocker.execute("BEGIN EXCLUSIVE")
    before = dropped("shutdown")

    async def scenario() -> float:
        recorder = PredictionRecorder(locked, 10, 100, shutdown_timeout=0.3)
        recorder.record([row(i) for i in range(4)])
        started = time.monotonic()
        await recorder.close()
        return time.monotonic() - started

    try:
        assert asyncio.run(scenario()) < 1.5  # sqlite would wait 5 s for the lock
    finally:
        blocker.rollback()
        blocker.close()
        locked.dispose()
    assert dropped("shutdown") == before + 4


# -- the spool: what a killed worker had not written ------------------------------------------------------

_KILLED_WORKER = """
import os, signal, sys
from pathlib import Path
from app.monitoring.spool import PredictionSpool
from tests.monitoring.test_prediction_log import row
spool = PredictionSpool(Path(sys.argv[1]))
spool.open()
for i in range(0, 30, 3):
    spool.append([row(i), row(i + 1), row(i + 2)])
spool.rotate()
spool.append([{**row(30), "text": "caf\\ud800"}])
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_killed_workers_spooled_rows_reach_the_log_through_a_survivor(tmp_path: Path, store: PredictionLog) -> None:
    """SIGKILL after appending: every appended row is on disk, and another worker writes it (bad row aside)."""
    directory = tmp_path / "spool"
    killed = subprocess.run([sys.executable, "-c", _KILLED_WORKER, str(directory)], cwd=REPO, check=False)
    assert killed.returncode == -signal.SIGKILL
    assert len(list(directory.glob("*.jsonl"))) == 2

    async def scenario() -> int:
        spool = PredictionSpool(directory)
        spool.open()
        recorder = PredictionRecorder(store, 10, 100, spool=spool)
        adopted = await recorder.adopt_orphans()
        await recorder.flush()
        await recorder.close()
        return adopted

    assert asyncio.run(scenario()) == 31
    assert store.count_predictions() == 30  # the lone surrogate was rejected again, by the database
    assert list(directory.iterdir()) == []  # everything written: segments and locks gone


def test_a_live_workers_spool_is_left_alone_and_a_closed_one_is_adopted(tmp_path: Path, store: PredictionLog) -> None:
    """Only a free lock (a dead or departed owner) lets a spool be adopted; rows left at close are kept."""
    directory = tmp_path / "spool"
    broken = PredictionLog(f"sqlite:///{tmp_path / 'broken.db'}")  # no tables: the first worker cannot write

    async def scenario() -> tuple[int, int, int]:
        first, second = PredictionSpool(directory), PredictionSpool(directory)
        first.open()
        second.open()
        writer = PredictionRecorder(broken, 10, 100, spool=first)
        survivor = PredictionRecorder(store, 10, 100, spool=second)
        writer.record([row(i) for i in range(5)])
        while_alive = await survivor.adopt_orphans()
        await writer.close()  # the database fails: the rows stay in its spool, not counted as lost
        after_close = await survivor.adopt_orphans()
        await survivor.flush()
        await survivor.close()
        return while_alive, after_close, store.count_predictions()

    before = dropped("shutdown")
    assert asyncio.run(scenario()) == (0, 5, 5)
    assert dropped("shutdown") == before


@pytest.mark.integration
def test_a_nul_character_is_refused_by_postgresql_and_set_aside_alone(postgres_url: str) -> None:  # noqa: F811
    """PostgreSQL text cannot hold NUL: that row is rejected and counted, its batch is written."""
    upgrade(postgres_url)
    prediction_db = PredictionLog(postgres_url)
    before = dropped("rejected_row")

    async def scenario() -> None:
        recorder = PredictionRecorder(prediction_db, 10, 100)
        recorder.record([row(i) for i in range(5)] + [{**row(5), "text": "bad\x00text"}] + [row(6), row(6)])
        await recorder.flush()
        await recorder.close()

    try:
        asyncio.run(scenario())
        assert prediction_db.count_predictions() == 6  # 0-4 and 6 (once)
        assert prediction_db.get_prediction("p00005") is None
    finally:
        prediction_db.dispose()
    assert dropped("rejected_row") == before + 1
