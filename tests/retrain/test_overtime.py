"""A retrain process its own watchdog cannot end (here: SIGSTOPped) is killed from outside once it runs past
``SENTIMENT_RETRAIN_MAX_SECONDS`` and the grace period: its job is failed, the retrain lock is free."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest
from structlog.testing import capture_logs

from app.retrain.launcher import RetrainLauncher, retrain_processes
from app.retrain.lock import try_lock
from app.retrain.worker import RetrainWorker
from app.settings import Settings
from app.storage.database import Database
from app.storage.retrain_jobs import RetrainJob, RetrainJobRepository

pytestmark = pytest.mark.integration

OVERTIME = "exceeded the maximum run time"


@pytest.fixture
def jobs(settings: Settings) -> Iterator[RetrainJobRepository]:
    database = Database.from_settings(settings)
    yield RetrainJobRepository(database)
    database.dispose()


@pytest.fixture
def stopped() -> Iterator[list[int]]:
    """Pids the test SIGSTOPs; whatever the outcome, their process groups are killed at the end."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)


def _stop(pid: int, stopped: list[int]) -> None:
    stopped.append(pid)
    os.kill(pid, signal.SIGSTOP)  # it never runs its watchdog, nor anything else, again


def _wait_for(condition: Any, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (found := condition()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return found


def _ended(jobs: RetrainJobRepository, job_id: str) -> RetrainJob:
    job = _wait_for(lambda: [j for j in [jobs.get(job_id)] if j is not None and j.status != "running"])
    assert job, f"job {job_id} still running"
    return job[0]  # type: ignore[no-any-return]


def _assert_killed_failed_and_unlocked(settings: Settings, jobs: RetrainJobRepository, job_id: str) -> None:
    assert _wait_for(lambda: job_id not in retrain_processes()), "the retrain process outlived its kill"
    job = _ended(jobs, job_id)
    assert (job.status, job.outcome, job.details["reason"]) == ("failed", "failed", "overtime")
    assert OVERTIME in job.details["error"]
    fd = try_lock(settings.model_store)
    assert fd is not None, "the retrain lock outlived the killed retrain"
    os.close(fd)


def test_reconcile_kills_a_stopped_retrain_past_its_max_time(
    settings: Settings, jobs: RetrainJobRepository, stopped: list[int]
) -> None:
    """Another worker's reconcile (a short max time, no grace) SIGKILLs the stopped retrain a web worker spawned,
    records its job failed (``exceeded the maximum run time``), logs ``retrain_killed_overtime``, frees the lock."""
    spawner = RetrainLauncher(settings.model_store, jobs, 0.0, settings.as_env())  # its own limit: 30 min
    with capture_logs() as started:
        job_id = spawner.start("manual", "test").job_id
    assert job_id is not None
    pid = next(e["retrain_pid"] for e in started if e["event"] == "retrain_started")
    _stop(pid, stopped)
    assert retrain_processes()[job_id] == [pid]
    RetrainLauncher(settings.model_store, jobs, 0.0, settings.as_env()).reconcile()  # within its time: left alone
    assert retrain_processes()[job_id] == [pid] and jobs.get(job_id).status == "running"  # type: ignore[union-attr]
    short = {**settings.as_env(), "SENTIMENT_RETRAIN_MAX_SECONDS": "0.2"}
    reconciler = RetrainLauncher(settings.model_store, jobs, 0.0, short, overtime_grace_seconds=0.0)
    time.sleep(0.3)
    with capture_logs() as logs:
        reconciler.reconcile()
    killed = [e for e in logs if e["event"] == "retrain_killed_overtime"]
    assert [(e["job_id"], e["retrain_pid"], e["recorded"]) for e in killed] == [(job_id, pid, True)]
    _assert_killed_failed_and_unlocked(settings, jobs, job_id)


def test_the_spawning_launcher_kills_its_stopped_retrain_past_its_max_time(
    settings: Settings, jobs: RetrainJobRepository, stopped: list[int]
) -> None:
    """Without any request, the launcher that spawned the retrain kills it once it runs past its time."""
    short = {**settings.as_env(), "SENTIMENT_RETRAIN_MAX_SECONDS": "0.5"}
    spawner = RetrainLauncher(settings.model_store, jobs, 0.0, short, overtime_grace_seconds=0.0)
    with capture_logs() as started:
        job_id = spawner.start("manual", "test").job_id
    assert job_id is not None
    _stop(next(e["retrain_pid"] for e in started if e["event"] == "retrain_started"), stopped)
    _assert_killed_failed_and_unlocked(settings, jobs, job_id)


def test_the_retrain_worker_kills_its_stopped_retrain_past_its_max_time(
    settings: Settings, jobs: RetrainJobRepository, stopped: list[int]
) -> None:
    """Queue mode: the worker following the retrain kills it past its time, records its job failed and is free
    to claim the next job."""
    queued = settings.model_copy(update={"retrain_mode": "queue", "retrain_max_seconds": 0.5})
    job_id = RetrainLauncher(queued.model_store, jobs, 0.0, queued.as_env(), mode="queue").start("manual", "t").job_id
    worker = RetrainWorker(queued)
    worker.overtime_grace_seconds = 3600.0
    try:
        worker.step()
        assert worker.current is not None and worker.current.job_id == job_id
        _stop(worker.current.process.pid, stopped)
        worker.step()  # within its time and grace: followed
        assert worker.current is not None
        worker.overtime_grace_seconds = 0.0
        time.sleep(0.6)
        worker.step()
        assert worker.current is None
        assert job_id is not None
        _assert_killed_failed_and_unlocked(settings, jobs, job_id)
    finally:
        worker.database.dispose()
