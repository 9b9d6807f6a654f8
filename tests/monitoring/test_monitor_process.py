"""The monitor process's own /metrics (its Kubernetes pod's): its counters at 0 from the start, and a start time
that changes with every start, the restart alert's signal."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.migrations import upgrade
from app.ml.registry import ModelRegistry
from app.monitoring.metrics import DRIFT_CHECK_OUTCOMES, MODEL_ROLLBACK_REASONS, MULTIPROC_ENV
from app.settings import REPO_ROOT
from tests.conftest import free_port

pytestmark = pytest.mark.integration

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
START_TIME = ("sentiment_drift_monitor_start_time_seconds", ())


def scrape(port: int) -> Samples | None:
    """What the monitor's /metrics serves, or None while it does not answer yet."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            body = response.read().decode()
    except (urllib.error.URLError, ConnectionError):
        return None
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }


def first_scrape(process: subprocess.Popen[bytes], port: int, timeout: float = 60) -> Samples:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "the monitor exited"
        samples = scrape(port)
        if samples is not None:
            return samples
        time.sleep(0.1)
    pytest.fail(f"the monitor served no /metrics within {timeout} s")


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def start_monitor(store: ModelRegistry, tmp_path: Path) -> Iterator[Callable[[], tuple[subprocess.Popen[bytes], int]]]:
    """``python -m app.monitoring.monitor`` serving its own /metrics, on a migrated SQLite database; every start
    writes to the same metrics directory (as the supervisor's restarts do)."""
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    upgrade(f"sqlite:///{tmp_path / 'var' / 'predictions.db'}")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SENTIMENT_")} | {
        MULTIPROC_ENV: str(metrics_dir),
        "SENTIMENT_MODEL_STORE": str(store.root),
        "SENTIMENT_STATE_DIR": str(tmp_path / "var"),
        "SENTIMENT_DRIFT_BACKEND": "builtin",
    }
    started: list[subprocess.Popen[bytes]] = []

    def start() -> tuple[subprocess.Popen[bytes], int]:
        port = free_port()
        process = subprocess.Popen(
            [sys.executable, "-m", "app.monitoring.monitor"],
            cwd=REPO_ROOT,
            env=env | {"SENTIMENT_MONITOR_METRICS_PORT": str(port)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        started.append(process)
        return process, port

    yield start
    for process in started:
        stop(process)


def test_the_monitors_own_metrics_have_its_counters_at_zero_and_its_start_time_from_the_first_scrape(
    start_monitor: Callable[[], tuple[subprocess.Popen[bytes], int]],
) -> None:
    """Rollbacks by reason and checks by outcome are 0-valued series before any increment, so increase() sees
    the first rollback; the start time is there too, before any check."""
    before = time.time()
    process, port = start_monitor()
    samples = first_scrape(process, port)
    for reason in MODEL_ROLLBACK_REASONS:
        assert samples.get(("sentiment_model_rollbacks_total", (("reason", reason),))) == 0.0, reason
    for outcome in ("drift", "error"):  # none of these happens here (a fresh store, no traffic)
        assert samples.get(("sentiment_drift_checks_total", (("outcome", outcome),))) == 0.0, outcome
    outcomes = {dict(labels)["outcome"] for name, labels in samples if name == "sentiment_drift_checks_total"}
    assert outcomes == set(DRIFT_CHECK_OUTCOMES)
    assert before <= samples[START_TIME] <= time.time()


def test_every_start_of_the_monitor_changes_its_start_time(
    start_monitor: Callable[[], tuple[subprocess.Popen[bytes], int]],
) -> None:
    """A restarted monitor (same metrics directory) serves a later start time than the one it replaced."""
    first, port = start_monitor()
    started = first_scrape(first, port)[START_TIME]
    stop(first)
    second, port = start_monitor()
    assert first_scrape(second, port)[START_TIME] > started
