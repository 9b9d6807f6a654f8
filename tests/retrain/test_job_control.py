"""Operators stay in control of a retrain: their rollback or purge wins over its promotion, and it ends by its
deadline."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from typing import Any

import pytest
from structlog.testing import capture_logs

from app.ml.data import Corpus
from app.ml.registry import ModelRegistry
from app.retrain import job
from app.retrain.lock import LOCK_FD_ENV, try_lock
from app.settings import REPO_ROOT, Settings
from app.storage.feedback_sources import FeedbackSourceRepository
from app.storage.repositories import Repositories
from tests.retrain.conftest import add_feedback


def test_a_rollback_while_a_retrain_runs_stays_current(
    store: ModelRegistry,
    settings: Settings,
    storage: Repositories,
    tweets: Corpus,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    first = store.current_version()
    assert first is not None
    shutil.copytree(store.root / first, store.root / "v-second")  # a second good version to roll back from
    store.promote("v-second")
    add_feedback(storage.predictions, store, tweets, 0, 300)
    real_gate = job.run_gate

    def gate_during_a_rollback(*args: Any, **kwargs: Any) -> dict[str, Any]:
        store.rollback()  # the operator rolls back after the candidate was fitted, before its promotion
        return {**real_gate(*args, **kwargs), "decision": "promote"}

    monkeypatch.setattr(job, "run_gate", gate_during_a_rollback)
    result = job.retrain(settings, "job-1", "manual")
    assert store.current_version() == first
    assert result.outcome == "superseded" and result.details["reason"] == "parent_not_current"
    assert result.details["parent"] == "v-second" and result.details["current_version"] == first
    assert store.get(result.candidate_version).stage == "candidate"  # type: ignore[arg-type]


def test_a_purge_while_a_retrain_runs_stops_its_promotion(
    store: ModelRegistry,
    settings: Settings,
    storage: Repositories,
    tweets: Corpus,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`feedback purge partner` after the retrain read partner's labels, before the promotion: the candidate
    fitted on them stays a candidate, outcome superseded (labels_purged), recorded as the job and an event."""
    first = store.current_version()
    add_feedback(storage.predictions, store, tweets, 0, 300, source="trusted")
    add_feedback(storage.predictions, store, tweets, 300, 300, source="partner")
    real_gate = job.run_gate
    monkeypatch.setattr(job, "run_gate", lambda *a, **k: {**real_gate(*a, **k), "decision": "promote"})
    sources = FeedbackSourceRepository(storage.database)
    storage.jobs.create_job("job-1", "manual", "test")
    report = job.JobReport(storage.jobs, "job-1", "manual", time.perf_counter())
    with capture_logs() as logs:
        result = job.retrain(settings, "job-1", "manual", settle=lambda: sources.purge("partner"))
        report.finished(result)
    assert result.outcome == "superseded", result.details.get("shadow")
    assert result.details["reason"] == "labels_purged" and result.details["purged_sources"] == ["partner"]
    assert store.current_version() == first
    assert store.get(result.candidate_version).stage == "candidate"  # type: ignore[arg-type]
    recorded = storage.jobs.get("job-1")
    assert recorded is not None and recorded.outcome == "superseded"
    assert recorded.details["reason"] == "labels_purged"
    (superseded,) = [e for e in logs if e["event"] == "retrain_superseded"]
    assert superseded["purged_sources"] == ["partner"]
    events = storage.events.for_version(result.candidate_version)  # type: ignore[arg-type]
    assert events[-1].event == "superseded" and events[-1].details["purged_sources"] == ["partner"]


def _run_job(settings: Settings, storage: Repositories, max_seconds: float) -> tuple[str, int, float]:
    """Start ``python -m app.retrain.job`` for a recorded job; its id, exit status and seconds."""
    job_id = uuid.uuid4().hex
    storage.jobs.create_job(job_id, "manual", "test")
    env = {k: v for k, v in os.environ.items() if k != LOCK_FD_ENV}
    env |= {**settings.as_env(), "SENTIMENT_RETRAIN_MAX_SECONDS": str(max_seconds), "OMP_NUM_THREADS": "1"}
    started = time.monotonic()
    process = subprocess.run(
        [sys.executable, "-m", "app.retrain.job", job_id],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        timeout=300,
        check=False,
    )
    return job_id, process.returncode, time.monotonic() - started


def test_a_retrain_past_its_max_time_is_ended_recorded_as_failed_and_frees_the_lock(
    store: ModelRegistry, settings: Settings, storage: Repositories, tweets: Corpus, versions: list[str]
) -> None:
    add_feedback(storage.predictions, store, tweets, 0, 300)  # enough new labels to fit: seconds of work
    job_id, code, seconds = _run_job(settings, storage, max_seconds=0.5)
    assert code == job.TIMEOUT_EXIT_CODE
    record = storage.jobs.get(job_id)
    assert record is not None and record.status == "failed" and record.outcome == "failed"
    assert record.details["reason"] == "timeout"
    fd = try_lock(store.root)
    assert fd is not None, "the retrain lock outlived the retrain"
    os.close(fd)
    assert store.current_version() == versions[0] and len(store.versions()) == 1
    assert seconds < 60


def test_a_retrain_within_its_max_time_ends_normally(
    store: ModelRegistry, settings: Settings, storage: Repositories
) -> None:
    job_id, code, _ = _run_job(settings, storage, max_seconds=600)
    assert code == 0
    record = storage.jobs.get(job_id)
    assert record is not None and record.status == "succeeded" and record.outcome == "skipped_no_new_labels"
