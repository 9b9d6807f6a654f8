"""The retrain jobs table: one running and one queued job at most, the cooldown, and the alert firings a job
claims (:mod:`app.storage.alerts`)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from sqlalchemy.exc import IntegrityError

from app.migrations import upgrade
from app.storage.repositories import Repositories


def test_alert_firings_stay_claimed_only_by_a_running_or_promoting_retrain(storage: Repositories) -> None:
    storage.jobs.create_job("a", "alertmanager", "SentimentDriftDetected", now=1.0, alerts=["f1@t1"])
    assert storage.alerts.unseen(["f1@t1", "f2@t2"]) == ["f2@t2"]
    storage.jobs.finish_job("a", "succeeded", "promoted", {})
    assert storage.alerts.unseen(["f1@t1"]) == []  # acted on for good
    storage.jobs.create_job("b", "grafana", "SentimentDriftDetected", now=2.0, alerts=["f2@t2"])
    storage.jobs.finish_job("b", "succeeded", "rejected", {})
    assert storage.alerts.unseen(["f2@t2"]) == ["f2@t2"]  # released: a re-send may retry
    storage.jobs.create_job("c", "grafana", "SentimentDriftDetected", now=3.0, alerts=["f2@t2"])
    assert storage.jobs.fail_running_jobs("killed") == 1
    assert storage.alerts.unseen(["f2@t2"]) == ["f2@t2"]
    assert [j.status for j in storage.jobs.recent()] == ["failed", "succeeded", "succeeded"]


def test_at_most_one_job_runs_and_the_cooldown_is_checked_in_the_insert(storage: Repositories) -> None:
    """A second running job is refused by the database; ``unless_started_after`` records nothing (and claims
    no firing) while a job started after that time, whatever its outcome."""
    storage.jobs.create_job("a", "manual", "test", now=100.0)
    with pytest.raises(IntegrityError):
        storage.jobs.create_job("b", "manual", "test", now=101.0)
    storage.jobs.finish_job("a", "succeeded", "rejected", {})
    assert not storage.jobs.create_job("c", "grafana", "test", now=150.0, alerts=["f@t"], unless_started_after=99.0)
    assert storage.alerts.unseen(["f@t"]) == ["f@t"]
    assert storage.jobs.create_job("d", "grafana", "test", now=200.0, alerts=["f@t"], unless_started_after=100.0)
    assert [j.id for j in storage.jobs.recent()] == ["d", "a"] and storage.alerts.unseen(["f@t"]) == []


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
    log = Repositories.connect(url)
    assert {j.id: j.status for j in log.jobs.recent()} == {"old": "failed", "new": "running"}
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
    old = Repositories.connect(f"sqlite:///{path}")
    old.jobs.create_job("a", "alertmanager", "SentimentDriftDetected", alerts=["new@t1"])
    assert old.alerts.unseen(["old@t0", "new@t1", "x@t2"]) == ["x@t2"]
    old.jobs.finish_job("a", "succeeded", "skipped_no_new_labels", {})
    assert old.alerts.unseen(["old@t0", "new@t1"]) == ["new@t1"]
    old.dispose()


def test_a_job_keeps_the_details_it_started_with_however_it_ends(storage: Repositories) -> None:
    """What triggered a retrain (its drift check) stays in the record next to how it ended."""
    trigger = {"drift_check": {"id": 7}}
    storage.jobs.create_job("a", "alertmanager", "SentimentDriftDetected", now=1.0, details=trigger)
    storage.jobs.finish_job("a", "succeeded", "rejected", {"gate": {"decision": "reject"}})
    assert storage.jobs.get("a").details == {**trigger, "gate": {"decision": "reject"}}  # type: ignore[union-attr]
    storage.jobs.create_job("b", "alertmanager", "SentimentDriftDetected", now=2.0, details=trigger)
    assert storage.jobs.fail_running_jobs("died") == 1
    assert storage.jobs.get("b").details == {**trigger, "error": "died"}  # type: ignore[union-attr]
