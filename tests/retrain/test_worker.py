"""Queue mode and the retrain worker, with real processes on SQLite and PostgreSQL: the web service only queues,
a worker claims and runs each job in a child process, two workers never run two retrains, a killed retrain
fails its job without taking its worker down, and a stopped worker hands its job back."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.migrations import upgrade
from app.retrain import launcher as launcher_module
from app.retrain.launcher import RetrainLauncher
from app.settings import REPO_ROOT, Settings
from app.storage.database import Database
from app.storage.retrain_jobs import RetrainJob, RetrainJobRepository
from tests.conftest import ADMIN_TOKEN, WEBHOOK_TOKEN
from tests.postgres import postgres, postgres_url  # noqa: F401  fixtures

pytestmark = pytest.mark.integration

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
HOOK = {"Authorization": f"Bearer {WEBHOOK_TOKEN}"}
PAYLOADS = Path(__file__).resolve().parents[1] / "fixtures" / "payloads"


@pytest.fixture(params=["sqlite", "postgresql"])
def queue_settings(request: pytest.FixtureRequest, settings: Settings) -> Settings:
    """Queue mode over the small store (no feedback: a retrain ends ``skipped_no_new_labels`` in seconds), on
    SQLite or on a fresh PostgreSQL database; workers poll every 0.1 s."""
    update: dict[str, Any] = {"retrain_mode": "queue", "retrain_worker_poll_seconds": 0.1}
    if request.param == "postgresql":
        url = request.getfixturevalue("postgres_url")
        upgrade(url)
        update["database_url"] = url
    return settings.model_copy(update=update)


@pytest.fixture
def jobs(queue_settings: Settings) -> Iterator[RetrainJobRepository]:
    database = Database.from_settings(queue_settings)
    yield RetrainJobRepository(database)
    database.dispose()


def queue(settings: Settings, jobs: RetrainJobRepository) -> str:
    launcher = RetrainLauncher(settings.model_store, jobs, 0, settings.as_env(), mode="queue")
    launch = launcher.start("manual", "test")
    assert launch.action == "queued" and launch.job_id, launch
    return launch.job_id


def wait_for(condition: Callable[[], Any], timeout: float = 60, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def job(jobs: RetrainJobRepository, job_id: str) -> RetrainJob:
    row = jobs.get(job_id)
    assert row is not None
    return row


def reaches(jobs: RetrainJobRepository, job_id: str, status: str, timeout: float = 90) -> RetrainJob:
    """The job's row once it has ``status``."""
    found = wait_for(lambda: [r for r in [jobs.get(job_id)] if r is not None and r.status == status], timeout, status)
    return found[0]  # type: ignore[no-any-return]


class Worker:
    """``python -m app.retrain.worker`` with the settings' environment; its JSON log lines, read as they come."""

    def __init__(self, settings: Settings, **extra: str) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SENTIMENT_")}
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "app.retrain.worker"],
            cwd=REPO_ROOT,
            env={**env, **settings.as_env(), **extra},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.events: list[dict[str, Any]] = []
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)
            try:
                self.events.append(json.loads(line))
            except ValueError:
                continue

    def logged(self, event: str, **fields: Any) -> list[dict[str, Any]]:
        return [e for e in list(self.events) if e.get("event") == event and fields.items() <= e.items()]

    def wait_logged(self, event: str, timeout: float = 60, **fields: Any) -> dict[str, Any]:
        found = wait_for(lambda: self.logged(event, **fields), timeout, f"{event} {fields}: {''.join(self.lines)}")
        return found[0]  # type: ignore[no-any-return]

    def stop(self, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=timeout)
        self._close()
        return code

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._close()

    def _close(self) -> None:
        self._reader.join(timeout=5)
        if self.process.stdout is not None and not self.process.stdout.closed:
            self.process.stdout.close()


@pytest.fixture
def workers() -> Iterator[list[Worker]]:
    started: list[Worker] = []
    yield started
    for worker in started:
        worker.kill()


def test_queue_mode_requests_queue_one_job_and_spawn_nothing(
    queue_settings: Settings, jobs: RetrainJobRepository, monkeypatch: pytest.MonkeyPatch
) -> None:
    """POST /v1/retrain and a webhook answer 202 ``queued`` / ``already_queued``; /v1/retrain/jobs lists the
    queued job; no process is started; the cooldown counts a queued job."""
    spawned: list[Any] = []
    monkeypatch.setattr(launcher_module, "spawn_job", lambda *args, **kwargs: spawned.append(args))
    monkeypatch.setattr(launcher_module.subprocess, "Popen", lambda *args, **kwargs: spawned.append(args))
    with TestClient(create_app(queue_settings)) as client:
        first = client.post("/v1/retrain", headers=ADMIN)
        assert first.status_code == 202 and first.json()["status"] == "queued" and first.json()["job_id"]
        alert = json.loads((PAYLOADS / "alertmanager-firing.json").read_text())
        again = client.post("/v1/webhooks/alertmanager", json=alert, headers=HOOK)
        assert again.status_code == 202
        assert again.json()["status"] == "already_queued" and again.json()["job_id"] == first.json()["job_id"]
        listed = client.get("/v1/retrain/jobs", headers=ADMIN).json()  # reconciles: a queued job is not dead
        assert [(j["id"], j["status"], j["outcome"]) for j in listed] == [(first.json()["job_id"], "queued", None)]
    assert spawned == []
    # The cooldown is read from every job, queued ones included.
    cooling = RetrainLauncher(queue_settings.model_store, jobs, 3600, mode="queue")
    jobs.finish_job(first.json()["job_id"], "succeeded", "skipped_no_new_labels", {})
    cooled = cooling.start("manual", "test")
    assert cooled.action == "cooldown" and cooled.retry_after_seconds is not None and cooled.retry_after_seconds > 3500


def test_a_worker_claims_a_queued_job_and_runs_it_in_a_child_process(
    queue_settings: Settings, jobs: RetrainJobRepository, workers: list[Worker]
) -> None:
    """The worker claims the job (``running``, logged with the retrain's pid), the retrain records its outcome,
    and SIGTERM stops the idle worker at once."""
    job_id = queue(queue_settings, jobs)
    worker = Worker(queue_settings)
    workers.append(worker)
    claimed = worker.wait_logged("retrain_worker_claimed", job_id=job_id)
    assert claimed["trigger"] == "manual" and claimed["retrain_pid"] != worker.process.pid
    assert reaches(jobs, job_id, "succeeded").outcome == "skipped_no_new_labels"
    worker.wait_logged("retrain_worker_job_ended", job_id=job_id, exit_code=0)
    assert worker.stop() == 0
    assert worker.logged("retrain_worker_stopped")


def test_two_workers_run_one_retrain_at_a_time_and_each_job_once(
    queue_settings: Settings, jobs: RetrainJobRepository, workers: list[Worker]
) -> None:
    """A job queued while another runs waits for it: the second retrain starts after the first ended, and
    each job is claimed by exactly one of the two workers."""
    workers.extend([Worker(queue_settings), Worker(queue_settings)])
    first = queue(queue_settings, jobs)
    reaches(jobs, first, "running", 30)
    second = queue(queue_settings, jobs)
    a, b = reaches(jobs, first, "succeeded"), reaches(jobs, second, "succeeded")
    assert a.finished_at is not None and b.started_at >= a.finished_at
    for worker in workers:
        assert worker.stop() == 0
    for job_id in (first, second):
        assert sum(len(w.logged("retrain_worker_claimed", job_id=job_id)) for w in workers) == 1


def test_a_killed_retrain_fails_its_job_and_the_worker_runs_the_next_one(
    queue_settings: Settings, jobs: RetrainJobRepository, workers: list[Worker]
) -> None:
    """SIGKILL of the retrain process: its job is recorded failed (its exit status), the worker lives on and
    runs the job queued next."""
    worker = Worker(queue_settings)
    workers.append(worker)
    killed = queue(queue_settings, jobs)
    retrain_pid = worker.wait_logged("retrain_worker_claimed", job_id=killed)["retrain_pid"]
    following = queue(queue_settings, jobs)
    os.kill(retrain_pid, signal.SIGKILL)
    assert reaches(jobs, killed, "failed", 30).details == {"error": "retrain process exited -9"}
    assert reaches(jobs, following, "succeeded").outcome == "skipped_no_new_labels"
    assert worker.process.poll() is None
    assert worker.stop() == 0


def test_a_worker_stopped_mid_retrain_hands_its_job_back_to_the_next_worker(
    queue_settings: Settings, jobs: RetrainJobRepository, workers: list[Worker]
) -> None:
    """SIGTERM with no time to finish (stop seconds 0): the retrain is ended, its job queued again, and another
    worker runs it to its outcome."""
    stopping = Worker(queue_settings, SENTIMENT_RETRAIN_WORKER_STOP_SECONDS="0")
    workers.append(stopping)
    job_id = queue(queue_settings, jobs)
    stopping.wait_logged("retrain_worker_claimed", job_id=job_id)
    assert stopping.stop() == 0
    assert stopping.logged("retrain_worker_handed_back", job_id=job_id, requeued=True)
    assert job(jobs, job_id).status == "queued"
    successor = Worker(queue_settings)
    workers.append(successor)
    successor.wait_logged("retrain_worker_claimed", job_id=job_id)
    assert reaches(jobs, job_id, "succeeded").outcome == "skipped_no_new_labels"
    assert successor.stop() == 0
