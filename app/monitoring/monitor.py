"""The drift monitor: one process per service, off the request path (``python -m app.monitoring.monitor``).

Every instance may run one; of all the monitors sharing a prediction database only the leader, the holder of
:mod:`app.monitoring.leader`'s lock, checks and enforces retention. The others wait and retry the lock every
``FOLLOWER_RETRY_SECONDS``, so one takes over within seconds of the leader's death.

It follows the store's current version, reads that version's latest predictions from the prediction log,
runs the drift tests (:mod:`app.monitoring.drift`) on a timer and every N new predictions, stores each
result in the ``drift_checks`` table and exports it as ``sentiment_drift_*`` gauges through the shared
Prometheus multiprocess directory (one ``sentiment_drift_test_p_value`` label per test of the family). It
also refreshes ``sentiment_live_accuracy`` and enforces retention. ``app.supervisor`` starts it next to
gunicorn and restarts it if it dies; it runs at nice 19 with one compute thread (:func:`_lower_priority`).
With ``SENTIMENT_DRIFT_BACKEND=builtin`` it never imports torch or alibi-detect. Run as its own process (its
own pod) it serves every process's metrics on ``SENTIMENT_MONITOR_METRICS_PORT``.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Sequence
from typing import Any

import structlog

from app.errors import SentimentServiceError
from app.migrations import DatabaseSchemaBehindError, require_current
from app.ml.drift_reference import load_reference
from app.ml.registry import ModelRegistry
from app.monitoring import metrics
from app.monitoring.drift import DriftDetector, DriftResult
from app.monitoring.leader import LeaderLock
from app.monitoring.prediction_log import PredictionLog
from app.settings import Settings

log = structlog.get_logger("app.monitoring.monitor")

POLL_SECONDS = 1.0
RETENTION_EVERY_SECONDS = 300.0
DRIFT_CHECKS_KEPT = 10_000
RETRY_FAILED_SECONDS = 60.0
FOLLOWER_RETRY_SECONDS = 2.0  # a follower's lock attempts: takeover within this of the leader's lock being freed


def export(result: DriftResult, tests: Sequence[str]) -> None:
    """Publish one check as the drift gauges (unknown values as NaN, never as a reassuring 0).

    ``tests`` names the detector's tests (its Bonferroni family): one ``sentiment_drift_test_p_value``
    label each, NaN until a full window is tested.
    """
    nan = float("nan")
    metrics.DRIFT_DETECTED.set(1 if result.drift else 0)
    metrics.DRIFT_WINDOW_SIZE.set(result.window_size)
    metrics.DRIFT_SCORE.set(nan if result.score is None else result.score)
    metrics.DRIFT_P_VALUE.set(nan if result.p_value is None else result.p_value)
    metrics.DRIFT_THRESHOLD.set(nan if result.threshold is None else result.threshold)
    metrics.CONFIDENCE_MEAN.set(nan if result.confidence_mean is None else result.confidence_mean)
    p_values = result.details.get("p_values", {})
    for test in tests:
        metrics.DRIFT_TEST_P_VALUE.labels(test=test).set(p_values.get(test, nan))


def export_unknown(tests: Sequence[str]) -> None:
    """Drift gauges as NaN: a monitor that stopped leading no longer vouches for its last check (the new
    leader's gauges do), and a stale 1 in its pod would keep ``max(sentiment_drift_detected)`` firing."""
    nan = float("nan")
    for gauge in (
        metrics.DRIFT_DETECTED,
        metrics.DRIFT_WINDOW_SIZE,
        metrics.DRIFT_SCORE,
        metrics.DRIFT_P_VALUE,
        metrics.DRIFT_THRESHOLD,
        metrics.CONFIDENCE_MEAN,
    ):
        gauge.set(nan)
    for test in tests:
        metrics.DRIFT_TEST_P_VALUE.labels(test=test).set(nan)


class DriftMonitor:
    """Decides when to check, runs the check, and records it everywhere it is read."""

    def __init__(self, settings: Settings, leader_lock: LeaderLock | None = None) -> None:
        self.settings = settings
        self.leader_lock = LeaderLock.for_settings(settings) if leader_lock is None else leader_lock
        self.leading = False
        self.next_attempt = 0.0  # monotonic time of a follower's next try at the leader lock
        self.lock_failing = False  # the last try at the lock raised (logged once per outage)
        self.registry = ModelRegistry.from_settings(settings)
        self.store = PredictionLog.from_settings(settings)
        require_current(self.store.engine, "monitor")  # the schema is `db upgrade`'s to change
        self.detector: DriftDetector | None = None
        self.last_check_at = 0.0
        self.last_seen = 0.0  # created_at of the newest prediction the last check saw
        self.last_retention = 0.0
        self.stopping = threading.Event()
        self.failed: dict[str, float] = {}  # version -> time of its last failed check

    def detector_for(self, version: str) -> DriftDetector:
        """The detector of ``version``, built (model, reference, MMD engine) when the version changes."""
        if self.detector is None or self.detector.model_version != version:
            loaded = self.registry.load(version)  # sha256 of every artifact verified, the reference's too
            reference = load_reference(loaded)  # DriftReferenceMissingError if it has none
            self.detector = DriftDetector(
                version,
                loaded.model,
                reference,
                p_value=self.settings.drift_p_value,
                permutations=self.settings.drift_permutations,
                window_size=self.settings.drift_window_size,
                mmd_engine=self.settings.drift_backend,
            )
            self.last_check_at, self.last_seen = 0.0, 0.0
            log.info(
                "drift_reference_loaded",
                model_version=version,
                reference_size=reference.size,
                drift_backend=self.settings.drift_backend,
            )
        return self.detector

    def due(self, version: str, now: float) -> bool:
        """Check when the version changed, N new predictions arrived, or the interval passed with news."""
        if self.detector is None or self.detector.model_version != version or self.last_check_at == 0.0:
            return True
        new = self.store.count_predictions(version, since=self.last_seen)
        if new >= self.settings.drift_check_every_predictions:
            return True
        return new > 0 and now - self.last_check_at >= self.settings.drift_check_interval_seconds

    def check(self, version: str) -> DriftResult:
        started = time.perf_counter()
        detector = self.detector_for(version)
        rows = self.store.window(self.settings.drift_window_size, version)
        result = detector.check(rows)
        self.last_check_at = time.time()
        self.last_seen = max((r["created_at"] for r in rows), default=self.last_seen)
        self.store.insert_drift_check(result.record())
        export(result, detector.names)
        metrics.DRIFT_CHECKS.labels(outcome=result.status).inc()
        metrics.DRIFT_LAST_CHECK.set(self.last_check_at)
        metrics.DRIFT_CHECK_DURATION.observe(time.perf_counter() - started)
        log.info(
            "drift_detected" if result.drift else "drift_checked",
            model_version=version,
            status=result.status,
            window_size=result.window_size,
            p_value=result.p_value,
            score=result.score,
            tests_rejecting=result.details.get("tests_rejecting"),
        )
        return result

    def housekeeping(self, now: float) -> None:
        accuracy, labelled = self.store.live_accuracy(self.settings.live_accuracy_window)
        if accuracy is not None:
            metrics.LIVE_ACCURACY.set(accuracy)
        if now - self.last_retention >= RETENTION_EVERY_SECONDS:
            deleted = self.store.enforce_retention(
                self.settings.retention_max_rows,
                self.settings.retention_max_age_hours * 3600,
                now,
                max_labelled_rows=self.settings.retention_max_labelled_rows,
                max_labelled_age_seconds=self.settings.retention_max_labelled_age_hours * 3600,
            )
            self.store.prune_drift_checks(DRIFT_CHECKS_KEPT)
            self.last_retention = now
            if deleted:
                log.info("prediction_log_retention", deleted=deleted, labelled_kept=labelled)

    def step(self) -> DriftResult | None:
        """One poll: check if due; errors are logged and counted, never fatal.

        A version that cannot be monitored (no reference, failed verification) is retried only after
        ``RETRY_FAILED_SECONDS`` or once the current version changes, and logged once per attempt.
        """
        now = time.time()
        version = None
        try:
            version = self.registry.current_version()
            if version and self.failed.get(version, 0.0) + RETRY_FAILED_SECONDS < now and self.due(version, now):
                result: DriftResult | None = self.check(version)
            else:
                result = None
            self.housekeeping(now)
        except Exception as exc:
            metrics.DRIFT_CHECKS.labels(outcome="error").inc()
            if version is not None:
                self.failed[version] = now
            if isinstance(exc, SentimentServiceError):
                log.error("drift_check_failed", model_version=version, reason=exc.message)
            else:
                log.exception("drift_check_failed", model_version=version, reason=str(exc))
            return None
        return result

    def lead(self) -> bool:
        """Whether this monitor leads now. The leader asks its lock each cycle whether it still holds it; a
        follower tries to take it every ``FOLLOWER_RETRY_SECONDS``. Errors make a follower, never a crash."""
        gauge = metrics.DRIFT_MONITOR_LEADER.labels(lock=self.leader_lock.kind)
        if self.leading:
            try:
                if self.leader_lock.held():
                    return True
                reason = "lock_gone"
            except Exception as exc:  # its connection died: the server has freed the lock, or soon will
                reason = str(exc).strip() or type(exc).__name__
            self.leader_lock.release()
            self.leading = False
            self.next_attempt = time.monotonic() + FOLLOWER_RETRY_SECONDS
            gauge.set(0)
            if self.detector is not None:
                export_unknown(self.detector.names)
            log.warning("monitor_leader_lost", lock=self.leader_lock.kind, reason=reason)
            return False
        now = time.monotonic()
        if now < self.next_attempt:
            return False
        self.next_attempt = now + FOLLOWER_RETRY_SECONDS
        try:
            self.leading = self.leader_lock.try_acquire()
        except Exception as exc:  # the database is unreachable: stay a follower and retry
            if not self.lock_failing:
                log.warning("monitor_leader_lock_failed", lock=self.leader_lock.kind, reason=str(exc).strip())
            self.lock_failing = True
            return False
        self.lock_failing = False
        if self.leading:
            # Check at once and enforce retention on the first step: the previous leader's schedule is unknown.
            self.last_check_at, self.last_retention = 0.0, 0.0
            gauge.set(1)
            log.info("monitor_leader_acquired", lock=self.leader_lock.kind)
        return self.leading

    def run(self) -> None:
        log.info(
            "drift_monitor_started",
            window=self.settings.drift_window_size,
            interval_seconds=self.settings.drift_check_interval_seconds,
            leader_lock=self.leader_lock.kind,
        )
        metrics.DRIFT_MONITOR_LEADER.labels(lock=self.leader_lock.kind).set(0)
        try:
            while not self.stopping.is_set():
                if self.lead():
                    self.step()
                self.stopping.wait(POLL_SECONDS)
        finally:
            self.leader_lock.dispose()  # a graceful stop hands over at once, not after a connection timeout
            self.store.dispose()
        log.info("drift_monitor_stopped", was_leader=self.leading)


def _lower_priority(drift_backend: str) -> None:
    # The monitor shares the cores with the web workers: it yields to them (nice 19: CFS weight 15 against
    # a worker's 1024, about 1.5 % of a contended core, so checks still progress under full load, unlike
    # SCHED_IDLE), and computes on one thread: BLAS's (the builtin engine's matrix products) and torch's.
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)
    if drift_backend == "alibi-detect":  # the builtin engine must not import torch
        import torch

        torch.set_num_threads(1)
    os.nice(19)


def main() -> None:
    from app.logs import configure_logging

    settings = Settings()
    configure_logging(settings.log_level)
    _lower_priority(settings.drift_backend)
    try:
        monitor = DriftMonitor(settings)
    except DatabaseSchemaBehindError:  # logged as database_schema_behind, with the command to run
        raise SystemExit(2) from None
    if settings.monitor_metrics_port is not None:
        metrics.serve(settings.monitor_metrics_port, settings.monitor_metrics_host)
        log.info("monitor_metrics_serving", host=settings.monitor_metrics_host, port=settings.monitor_metrics_port)

    def stop(signum: int, _frame: Any) -> None:
        log.info("drift_monitor_signal", signal=signal.Signals(signum).name)
        monitor.stopping.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    monitor.run()


if __name__ == "__main__":
    main()
