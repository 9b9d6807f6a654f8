"""One retrain at a time across instances sharing a PostgreSQL, and the cooldown read from the jobs table."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from threading import Barrier
from typing import Any, ClassVar

import pytest

from app.migrations import upgrade
from app.retrain import job
from app.retrain import launcher as launcher_module
from app.retrain.launcher import RetrainLauncher
from app.retrain.lock import AdvisoryRetrainLock, FileRetrainLock, RetrainLock
from app.settings import REPO_ROOT, Settings
from app.storage.repositories import Repositories
from tests.postgres import postgres, postgres_url  # noqa: F401  fixtures

pytestmark = pytest.mark.integration

# A process that takes the advisory lock once the go file exists, says whether it won, and holds on until
# its stdin closes (or it is killed).
HOLDER = """
import pathlib, sys, time
from app.retrain.lock import AdvisoryRetrainLock
go = pathlib.Path(sys.argv[2])
while not go.exists():
    time.sleep(0.005)
lock = AdvisoryRetrainLock(sys.argv[1])  # referenced to the end: the session, and the lock, live as long
print("won" if lock.try_acquire() else "lost", flush=True)
sys.stdin.read()
"""


class _Spawned:
    """Stands in for the retrain process: records its command, exits 0 at once (its job stays running)."""

    calls: ClassVar[list[list[str]]] = []

    def __init__(self, args: list[str], **_: Any) -> None:
        self.calls.append(args)
        self.pid = 4242

    def wait(self) -> int:
        return 0


@pytest.fixture
def database(postgres_url: str) -> str:  # noqa: F811
    upgrade(postgres_url)
    return postgres_url


@pytest.fixture
def spawned(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    launcher_module.idle_priority()  # cached: probes chrt with the real Popen before it is replaced
    monkeypatch.setattr(launcher_module.subprocess, "Popen", _Spawned)
    _Spawned.calls = []
    return _Spawned.calls


def holders(url: str, go: Path, count: int) -> list[subprocess.Popen[str]]:
    return [
        subprocess.Popen(
            [sys.executable, "-c", HOLDER, url, str(go)],
            cwd=REPO_ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(count)
    ]


def test_the_lock_follows_the_database_dialect(tmp_path: Path, database: str) -> None:
    """PostgreSQL: the advisory lock; SQLite: the store's flock."""
    assert isinstance(
        RetrainLock.for_settings(Settings(model_store=tmp_path, database_url=database)), AdvisoryRetrainLock
    )
    assert isinstance(RetrainLock.for_settings(Settings(model_store=tmp_path, state_dir=tmp_path)), FileRetrainLock)


def test_two_processes_racing_for_the_lock_one_wins_and_a_sigkill_frees_it(tmp_path: Path, database: str) -> None:
    """Of two processes that try at the same moment exactly one holds the lock; SIGKILLed, it holds it no more."""
    go = tmp_path / "go"
    racers = holders(database, go, 2)
    probe = AdvisoryRetrainLock(database)
    try:
        time.sleep(1.5)  # both imported and waiting
        go.touch()
        answers = [racer.stdout.readline().strip() for racer in racers]  # type: ignore[union-attr]
        assert sorted(answers) == ["lost", "won"]
        assert probe.held_elsewhere() and not probe.try_acquire()
        winner = racers[answers.index("won")]
        os.kill(winner.pid, signal.SIGKILL)
        winner.wait(10)
        deadline = time.monotonic() + 10
        while probe.held_elsewhere() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not probe.held_elsewhere()  # the server dropped the killed process's session, and its lock
        assert probe.try_acquire()
    finally:
        probe.dispose()
        for racer in racers:
            racer.kill()
            racer.wait(10)
            racer.stdin.close()  # type: ignore[union-attr]
            racer.stdout.close()  # type: ignore[union-attr]


def test_twenty_concurrent_starts_on_two_instances_record_exactly_one_running_job(
    tmp_path: Path, database: str, spawned: list[list[str]]
) -> None:
    """20 threads over two launchers (two instances, each its own pool) start one retrain; the unique index
    on running jobs decides, not a process: the others answer already_running."""
    logs = [Repositories.connect(database), Repositories.connect(database)]
    instances = [RetrainLauncher(tmp_path / f"store-{i}", log.jobs, 0.0) for i, log in enumerate(logs)]
    barrier = Barrier(20)

    def start(i: int) -> str:
        barrier.wait()
        return instances[i % 2].start("alertmanager", "SentimentDriftDetected").action

    try:
        with ThreadPoolExecutor(20) as pool:
            actions = list(pool.map(start, range(20)))
        jobs = logs[0].jobs.recent()
    finally:
        for log in logs:
            log.dispose()
    assert actions.count("retrain_started") == 1, actions
    assert set(actions) == {"retrain_started", "already_running"}, actions
    assert [j.status for j in jobs] == ["running"] and len(spawned) == 1
    assert spawned[0][-3] == jobs[0].id


def test_the_cooldown_is_read_from_the_jobs_table(tmp_path: Path, database: str, spawned: list[list[str]]) -> None:
    """A job that ended within the cooldown holds the next start off (with the time left); one older does not."""
    log = Repositories.connect(database)
    launcher = RetrainLauncher(tmp_path, log.jobs, 3600.0)
    try:
        log.jobs.create_job("recent", "manual", "test", time.time() - 600)
        log.jobs.finish_job("recent", "succeeded", "rejected", {})
        launch = launcher.start("manual", "test")
        assert launch.action == "cooldown" and launch.retry_after_seconds == pytest.approx(3000, abs=5)
        assert spawned == []
        assert RetrainLauncher(tmp_path, log.jobs, 300.0).start("manual", "test").action == "retrain_started"
        assert len(spawned) == 1
    finally:
        log.dispose()


def test_a_job_finding_the_lock_held_records_it_and_exits_without_retraining(tmp_path: Path, database: str) -> None:
    """On PostgreSQL the retrain process takes the lock itself: while another holds it, its job is recorded
    failed (reason lock_held) and it exits 3."""
    log = Repositories.connect(database)
    holder = AdvisoryRetrainLock(database)
    try:
        log.jobs.create_job("late", "manual", "test")
        assert holder.try_acquire()
        settings = Settings(model_store=tmp_path / "store", state_dir=tmp_path / "var", database_url=database)
        env = {**os.environ, **settings.as_env()}
        done = subprocess.run(
            [sys.executable, "-m", "app.retrain.job", "late"],
            check=False,
            cwd=REPO_ROOT,
            env=env,
            capture_output=True,
            timeout=120,
        )
        assert done.returncode == job.LOCK_HELD_EXIT_CODE, done.stderr
        record = log.jobs.get("late")
        assert record is not None and record.status == "failed" and record.details["reason"] == "lock_held"
    finally:
        holder.dispose()
        log.dispose()


def test_in_progress_reads_the_advisory_lock(tmp_path: Path, database: str) -> None:
    """sentiment_retrain_in_progress: 1 while some session holds the lock (answer reused for a second)."""
    log = Repositories.connect(database)
    launcher = RetrainLauncher(tmp_path, log.jobs, 0.0)
    holder = AdvisoryRetrainLock(database)
    try:
        assert launcher.in_progress() is False
        assert holder.try_acquire()
        time.sleep(launcher.lock.probe_seconds)
        assert launcher.in_progress() is True
        holder.release()
        time.sleep(launcher.lock.probe_seconds)
        assert launcher.in_progress() is False
    finally:
        holder.dispose()
        log.dispose()
