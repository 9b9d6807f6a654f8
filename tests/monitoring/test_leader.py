"""Leader election of drift monitors: of two real monitor processes on one database exactly one checks, and
the other takes over within 15 s of the leader's SIGKILL; a leader whose lock session dies stops checking."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import pytest
import structlog
from prometheus_client import multiprocess
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import create_engine, text

from app.migrations import upgrade
from app.ml.registry import LoadedModel, ModelRegistry
from app.monitoring.leader import ADVISORY_KEY, AdvisoryLeaderLock, FileLeaderLock, LeaderLock
from app.monitoring.metrics import MULTIPROC_ENV
from app.monitoring.monitor import DriftMonitor
from app.settings import REPO_ROOT, Settings
from app.storage.repositories import Repositories
from tests.conftest import free_port
from tests.postgres import PostgresCluster, postgres, postgres_url  # noqa: F401  fixtures
from tests.traffic import log_predictions

pytestmark = pytest.mark.integration

TAKEOVER_LIMIT_SECONDS = 15.0
CHECK_EVENTS = {"drift_checked", "drift_detected"}


@dataclass
class Monitor:
    """One ``python -m app.monitoring.monitor`` process, its JSON log in a file, its own /metrics port."""

    process: subprocess.Popen[bytes]
    log_path: Path
    port: int
    _out: TextIO

    @property
    def pid(self) -> int:
        return self.process.pid

    def events(self, *names: str) -> list[dict[str, Any]]:
        found = []
        for line in self.log_path.read_text().splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if not names or event.get("event") in names:
                found.append(event)
        return found

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._out.close()


def wait_for(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def leader_gauges(port: int) -> dict[int, float]:
    """``sentiment_drift_monitor_leader`` by pid, as a monitor's own /metrics serves it."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        body = response.read().decode()
    return {
        int(sample.labels["pid"]): sample.value
        for family in text_string_to_metric_families(body)
        if family.name == "sentiment_drift_monitor_leader"
        for sample in family.samples
    }


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A migrated prediction database: the state dir's SQLite file, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'var' / 'predictions.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    upgrade(url)
    return url


@pytest.fixture
def spawn(store: ModelRegistry, tmp_path: Path, database_url: str) -> Iterator[Callable[[str], Monitor]]:
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SENTIMENT_")} | {
        MULTIPROC_ENV: str(metrics_dir),
        "SENTIMENT_MODEL_STORE": str(store.root),
        "SENTIMENT_STATE_DIR": str(tmp_path / "var"),  # shared: the flock lives there
        "SENTIMENT_DATABASE_URL": database_url,
        "SENTIMENT_DRIFT_BACKEND": "builtin",
        "SENTIMENT_DRIFT_WINDOW_SIZE": "100",
        "SENTIMENT_DRIFT_PERMUTATIONS": "20",
        "SENTIMENT_DRIFT_CHECK_EVERY_PREDICTIONS": "10",
        "SENTIMENT_DRIFT_CHECK_INTERVAL_SECONDS": "0.5",
        "SENTIMENT_DRIFT_MIN_CHECK_INTERVAL_SECONDS": "0",  # a check each poll with news: 3 in the 4 s below
    }
    started: list[Monitor] = []

    def start(name: str) -> Monitor:
        port = free_port()
        log_path = tmp_path / f"{name}.log"
        out = log_path.open("w")
        process = subprocess.Popen(
            [sys.executable, "-m", "app.monitoring.monitor"],
            cwd=REPO_ROOT,
            env=env | {"SENTIMENT_MONITOR_METRICS_PORT": str(port)},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        started.append(Monitor(process, log_path, port, out))
        return started[-1]

    yield start
    for monitor in started:
        monitor.stop()


def test_one_of_two_monitor_processes_leads_and_the_other_takes_over_after_a_sigkill(
    spawn: Callable[[str], Monitor],
    database_url: str,
    current: LoadedModel,
    clothing_texts: list[str],
    tmp_path: Path,
) -> None:
    log = Repositories.connect(database_url)
    sent = 0

    def traffic() -> None:  # a few new predictions: a check is due on the leader's next poll
        nonlocal sent
        log_predictions(log.predictions, current.model, current.version, clothing_texts[sent : sent + 20])
        sent += 20

    first, second = spawn("first"), spawn("second")
    both = (first, second)
    wait_for(lambda: all(m.events("drift_monitor_started") for m in both), 60, "both monitors to start")
    leader = wait_for(lambda: next((m for m in both if m.events("monitor_leader_acquired")), None), 30, "a leader")
    follower = second if leader is first else first
    wait_for(lambda: len(leader.events(*CHECK_EVENTS)) >= 1, 30, "the leader's first check")
    for _ in range(4):
        traffic()
        time.sleep(1.0)  # the follower retries the lock twice in this time
    checks = leader.events(*CHECK_EVENTS)
    assert len(checks) >= 3 and not follower.events(*CHECK_EVENTS, "monitor_leader_acquired")
    assert leader_gauges(follower.port) == {leader.pid: 1.0, follower.pid: 0.0}  # either port serves both
    # Every stored check is one the leader logged: the follower wrote none.
    assert len(log.drift_checks.history(1000)) == len(checks)

    killed_at = time.monotonic()
    leader.process.send_signal(signal.SIGKILL)
    leader.process.wait()
    wait_for(lambda: follower.events("monitor_leader_acquired"), TAKEOVER_LIMIT_SECONDS, "the follower to take over")
    takeover = time.monotonic() - killed_at
    (tmp_path / "takeover_seconds").write_text(f"{takeover:.2f}\n")
    print(f"takeover after SIGKILL: {takeover:.2f} s ({database_url.split(':', maxsplit=1)[0]})")

    traffic()
    wait_for(lambda: follower.events(*CHECK_EVENTS), 30, "a check by the new leader")
    # The supervisor (or a fresh pod's wiped directory) drops a dead process's live gauges.
    multiprocess.mark_process_dead(leader.pid, str(tmp_path / "metrics"))  # type: ignore[no-untyped-call]
    assert leader_gauges(follower.port) == {follower.pid: 1.0}
    assert len(log.drift_checks.history(1000)) == len(checks) + len(follower.events(*CHECK_EVENTS))
    log.dispose()


def test_a_leader_whose_lock_session_dies_stops_checking_and_another_takes_the_lock(
    store: ModelRegistry,
    tmp_path: Path,
    postgres_url: str,  # noqa: F811
) -> None:
    upgrade(postgres_url)
    settings = Settings(model_store=store.root, state_dir=tmp_path / "var", database_url=postgres_url)
    monitor = DriftMonitor(settings)
    other = AdvisoryLeaderLock(postgres_url)
    try:
        assert monitor.lead() and not other.try_acquire()
        engine = create_engine(postgres_url)
        with engine.connect() as conn:  # an operator (or a failover) ends the leader's lock session
            conn.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory'"
                    " AND CAST(objid AS bigint) = :low"
                ),
                {"low": ADVISORY_KEY & 0xFFFFFFFF},
            )
        engine.dispose()
        with structlog.testing.capture_logs() as logs:
            assert not monitor.lead()
        assert [e["event"] for e in logs] == ["monitor_leader_lost"]
        assert not monitor.lead()  # a follower now: it waits before it retries
        assert other.try_acquire() and other.held()
    finally:
        other.dispose()
        monitor.leader_lock.dispose()
        monitor.database.dispose()


def test_through_a_database_outage_the_leader_steps_down_and_leads_again_after(
    store: ModelRegistry,
    tmp_path: Path,
    postgres: PostgresCluster,  # noqa: F811
    postgres_url: str,  # noqa: F811
) -> None:
    upgrade(postgres_url)
    settings = Settings(model_store=store.root, state_dir=tmp_path / "var", database_url=postgres_url)
    monitor = DriftMonitor(settings)
    try:
        assert monitor.lead()
        with postgres.outage(), structlog.testing.capture_logs() as logs:
            assert not monitor.lead()
            for _ in range(3):  # each retry fails; the failure is logged once
                monitor.next_attempt = 0.0
                assert not monitor.lead()
        assert [e["event"] for e in logs] == ["monitor_leader_lost", "monitor_leader_lock_failed"]
        monitor.next_attempt = 0.0
        assert monitor.lead() and monitor.lead()
    finally:
        monitor.leader_lock.dispose()
        monitor.database.dispose()


@pytest.mark.parametrize("kind", ["flock", "advisory"])
def test_the_lock_is_exclusive_and_freed_on_release(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    def lock() -> LeaderLock:
        if kind == "flock":
            return FileLeaderLock(tmp_path / "leader.lock")
        return AdvisoryLeaderLock(request.getfixturevalue("postgres_url"))

    first, second = lock(), lock()
    try:
        assert first.try_acquire() and first.held()
        assert not second.try_acquire() and not second.held()
        first.release()
        assert not first.held() and second.try_acquire() and second.held()
    finally:
        first.dispose()
        second.dispose()


def test_a_flock_whose_file_was_replaced_counts_as_lost(tmp_path: Path) -> None:
    """Deleting the lock file would let another monitor lock a new one: the holder notices and steps down."""
    path = tmp_path / "leader.lock"
    holder = FileLeaderLock(path)
    assert holder.try_acquire()
    path.unlink()
    assert not holder.held()
    holder.release()
