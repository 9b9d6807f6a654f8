"""Metric helpers in multiprocess mode: counters alerts read exist at 0 from the start, and the last-check
gauge survives its monitor."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector

from app.monitoring.metrics import (
    MULTIPROC_ENV,
    PREDICTION_LOG_DROP_REASONS,
    RETRAIN_OUTCOMES,
    RETRAIN_TRIGGERS,
)

REPO = Path(__file__).resolve().parents[2]


def in_process(metrics_dir: Path, code: str) -> int:
    """Run ``code`` in a fresh interpreter writing to ``metrics_dir`` (as a worker or the monitor does); its pid."""
    script = f"import os\nfrom app.monitoring import metrics\n{code}\nprint(os.getpid())"
    env = {**os.environ, MULTIPROC_ENV: str(metrics_dir)}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    return int(result.stdout.split()[-1])


def scrape(metrics_dir: Path) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """What /metrics serves: every process's files merged by a fresh MultiProcessCollector."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(metrics_dir))  # type: ignore[no-untyped-call]
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for family in registry.collect() for s in family.samples}


def test_initialise_counters_writes_a_zero_for_every_counter_an_alert_reads(tmp_path: Path) -> None:
    """One worker's start makes each labelled counter a series at 0, so its first increment shows in increase()."""
    in_process(tmp_path, "metrics.initialise_counters()")
    samples = scrape(tmp_path)
    expected = [
        ("sentiment_feedback_total", (("sentiment", "negative"),)),
        ("sentiment_feedback_total", (("sentiment", "positive"),)),
        ("sentiment_prediction_log_errors_total", (("reason", "write_failed"),)),
        ("sentiment_supervised_restarts_total", (("process", "monitor"),)),
        ("sentiment_drift_checks_total", (("outcome", "error"),)),
        ("sentiment_model_rollbacks_total", (("reason", "realised_accuracy"),)),
        ("sentiment_model_rollbacks_total", (("reason", "estimated_accuracy"),)),
        *[("sentiment_prediction_log_dropped_total", (("reason", r),)) for r in PREDICTION_LOG_DROP_REASONS],
        *[
            ("sentiment_retrain_total", (("outcome", o), ("trigger", t)))
            for t in RETRAIN_TRIGGERS
            for o in RETRAIN_OUTCOMES
        ],
    ]
    for key in expected:
        assert samples.get(key) == 0.0, key
    # A later increment in another process (a retrain) adds to the same series.
    in_process(tmp_path, 'metrics.RETRAIN_TOTAL.labels(trigger="manual", outcome="failed").inc()')
    assert scrape(tmp_path)[("sentiment_retrain_total", (("outcome", "failed"), ("trigger", "manual")))] == 1.0


def test_last_check_reads_never_until_a_check_then_outlives_its_monitor(tmp_path: Path) -> None:
    """0 from the first scrape (a worker alone), then the latest check's time, kept after the monitor died."""
    key = ("sentiment_drift_last_check_timestamp_seconds", ())
    in_process(tmp_path, "")  # a web worker: imports the metrics, never checks
    assert scrape(tmp_path)[key] == 0.0
    first = in_process(tmp_path, "metrics.DRIFT_LAST_CHECK.set(1_700_000_000.0)")
    second = in_process(tmp_path, "metrics.DRIFT_LAST_CHECK.set(1_700_000_600.0)")  # the restarted monitor
    in_process(tmp_path, "")  # a worker started later still writes 0: it must not win
    for pid in (first, second):  # the supervisor and gunicorn mark dead processes
        in_process(tmp_path, f"metrics.mark_process_dead({pid})")
    assert scrape(tmp_path)[key] == 1_700_000_600.0


def test_estimated_accuracy_keeps_one_series_per_version_from_the_latest_monitor(tmp_path: Path) -> None:
    """mostrecent: a restarted monitor's estimate replaces the dead one's, per version; workers add no sample."""
    name = "sentiment_estimated_accuracy"
    in_process(tmp_path, "")  # a web worker: imports the metrics, never estimates
    first = in_process(tmp_path, 'metrics.ESTIMATED_ACCURACY.labels(model_version="v1").set(0.81)')
    second = in_process(  # the restarted monitor, which then follows a new version
        tmp_path,
        'metrics.ESTIMATED_ACCURACY.labels(model_version="v1").set(0.74)\n'
        'metrics.ESTIMATED_ACCURACY.labels(model_version="v2").set(0.8)\n'
        'metrics.ESTIMATED_ACCURACY_REFERENCE.labels(model_version="v2").set(0.79)',
    )
    for pid in (first, second):
        in_process(tmp_path, f"metrics.mark_process_dead({pid})")
    found = {key: value for key, value in scrape(tmp_path).items() if key[0].startswith(name)}
    assert found == {
        (name, (("model_version", "v1"),)): 0.74,
        (name, (("model_version", "v2"),)): 0.8,
        (f"{name}_reference", (("model_version", "v2"),)): 0.79,
    }
