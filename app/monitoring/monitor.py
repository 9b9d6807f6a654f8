"""The drift monitor: one process per service, off the request path (``python -m app.monitoring.monitor``).

Every instance may run one; of all the monitors sharing a prediction database only the leader, the holder of
:mod:`app.monitoring.leader`'s lock, checks and enforces retention. The others wait and retry the lock every
``FOLLOWER_RETRY_SECONDS``, so one takes over within seconds of the leader's death.

It follows the store's current version, reads that version's latest predictions
(:mod:`app.storage.predictions`), runs the drift tests (:mod:`app.monitoring.drift`) on a schedule that adapts
to load (:meth:`DriftMonitor.due`), stores each result (:mod:`app.storage.drift_checks`) and exports it as
``sentiment_drift_*`` gauges through the shared Prometheus multiprocess directory (one
``sentiment_drift_test_p_value`` label per test of the family). With each full window it stores and exports
the label-free accuracy estimate (:mod:`app.monitoring.performance`,
``sentiment_estimated_accuracy*{model_version}``), and with a check that flags drift, rate-limited, what
separates the window from the reference (:mod:`app.monitoring.explain`). It also refreshes
``sentiment_live_accuracy``, enforces retention and watches a fresh promotion (:mod:`app.monitoring.watch`),
rolling it back on a significant drop. ``app.supervisor`` starts it next to gunicorn and restarts it if it
dies; it runs at nice 19 with one compute thread (:func:`_lower_priority`) and counts its CPU seconds
(``sentiment_drift_monitor_cpu_seconds_total``). With ``SENTIMENT_DRIFT_BACKEND=builtin`` it never imports
torch or alibi-detect. Run as its own process (its own pod) it serves every process's metrics on
``SENTIMENT_MONITOR_METRICS_PORT``.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

if __name__ == "__main__":
    # Run as the monitor process: before the imports below, which would import pandas and rich.
    from app.process_memory import skip_unused_optional_imports

    skip_unused_optional_imports()

import structlog

from app.errors import SentimentServiceError
from app.migrations import DatabaseSchemaBehindError, require_current
from app.ml.drift_reference import load_reference
from app.ml.registry import REFERENCE_ARTIFACT, LoadedModel, ModelRegistry
from app.monitoring import metrics
from app.monitoring.drift import DriftDetector, DriftResult, Window
from app.monitoring.explain import DriftExplanation, TermCounts, count_terms, explain
from app.monitoring.host import HostIdle
from app.monitoring.leader import LeaderLock
from app.monitoring.performance import AccuracyEstimate, estimate_accuracy, reference_estimate
from app.monitoring.report import estimate_details
from app.monitoring.watch import PromotionWatch
from app.settings import Settings
from app.storage.database import Database
from app.storage.drift_checks import DriftCheck, DriftCheckRepository
from app.storage.predictions import PredictionRepository, WindowRow

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


def export_estimate(version: str, estimate: AccuracyEstimate, reference: AccuracyEstimate) -> None:
    """Publish a full window's accuracy estimate, its band and the reference estimate for ``version`` (the
    reference again: a monitor that stopped leading set it to NaN, and leads again with the same version)."""
    metrics.ESTIMATED_ACCURACY_REFERENCE.labels(model_version=version).set(reference.estimate)
    metrics.ESTIMATED_ACCURACY.labels(model_version=version).set(estimate.estimate)
    metrics.ESTIMATED_ACCURACY_LOWER.labels(model_version=version).set(estimate.low)
    metrics.ESTIMATED_ACCURACY_UPPER.labels(model_version=version).set(estimate.high)


def forget_estimate(version: str) -> None:
    """``version``'s four estimate gauges as NaN: the monitor no longer checks it (another version is current,
    or this monitor stopped leading), and "mostrecent" would keep its last values forever."""
    nan = float("nan")
    for gauge in (
        metrics.ESTIMATED_ACCURACY,
        metrics.ESTIMATED_ACCURACY_LOWER,
        metrics.ESTIMATED_ACCURACY_UPPER,
        metrics.ESTIMATED_ACCURACY_REFERENCE,
    ):
        gauge.labels(model_version=version).set(nan)


def reference_terms(loaded: LoadedModel) -> TermCounts | None:
    """The n-gram counts of the texts ``loaded``'s drift reference was drawn from (its held-out
    ``reference.json``), for the explanations' term lists; None when the reference is of other texts (a
    retrain's recent traffic, which no artifact keeps)."""
    if loaded.metadata.get("data", {}).get("drift_reference_source", "holdout") != "holdout":
        return None
    return count_terms(loaded.read_json(REFERENCE_ARTIFACT)["texts"])


def export_unknown(tests: Sequence[str], model_version: str | None = None) -> None:
    """Drift gauges as NaN: a monitor that stopped leading no longer vouches for its last check (the new
    leader's gauges do), and a stale 1 in its pod would keep ``max(sentiment_drift_detected)`` firing.
    ``model_version``'s estimate gauges too (:func:`forget_estimate`)."""
    if model_version is not None:
        forget_estimate(model_version)
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
        self.database = Database.from_settings(settings)
        require_current(self.database.engine, "monitor")  # the schema is `db upgrade`'s to change
        self.predictions = PredictionRepository(self.database)
        self.drift_checks = DriftCheckRepository(self.database)
        self.watch = PromotionWatch.from_settings(settings, self.registry, self.database)  # rolls back bad promotions
        self.detector: DriftDetector | None = None
        self.reference_accuracy: AccuracyEstimate | None = None  # the detector's version's reference estimate
        self.reference_terms: TermCounts | None = None  # n-gram counts of its reference's texts, if kept
        self.flagged = False  # the last check flagged drift
        self.explained_through = 0.0  # created_at of the newest prediction of the last window explained
        self.last_check_at = 0.0
        self.last_started = 0.0  # time.time() when the last check's tests started
        self.last_check_cpu = 0.0  # CPU seconds the last check took (its tests, estimate, explanation, storing)
        self.cpu_reported = 0.0  # process CPU seconds already added to sentiment_drift_monitor_cpu_seconds_total
        self.host = HostIdle()
        self.host_idle = 1.0  # the host's smoothed idle share, sampled every poll
        self.last_seen = 0.0  # created_at of the newest prediction the last check saw
        self.last_retention = 0.0
        self.stopping = threading.Event()
        self.failed: dict[str, float] = {}  # version -> time of its last failed check

    def detector_for(self, version: str) -> DriftDetector:
        """The detector of ``version``, built (model, reference, MMD engine) when the version changes."""
        if self.detector is None or self.detector.model_version != version:
            if self.detector is not None:
                forget_estimate(self.detector.model_version)
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
            self.flagged, self.explained_through = False, 0.0
            self.reference_accuracy = reference_estimate(reference)
            metrics.ESTIMATED_ACCURACY_REFERENCE.labels(model_version=version).set(self.reference_accuracy.estimate)
            self.reference_terms = self._terms(loaded)
            log.info(
                "drift_reference_loaded",
                model_version=version,
                reference_size=reference.size,
                drift_backend=self.settings.drift_backend,
            )
        return self.detector

    def cpu_share(self) -> float:
        """The share of one core checks may use now: ``drift_max_cpu_share`` on an idle host, falling with the
        square of the host's idle share (:class:`app.monitoring.host.HostIdle`) to ``drift_busy_cpu_share`` on
        a saturated one, where every cycle the monitor takes is one the web workers lose (never above
        ``drift_max_cpu_share``, should the busy share be set higher). The square keeps a host that is mostly
        busy (wrk's and the workers' own pauses leave a saturated 2-core host 10-20 % idle) near the busy
        share, and a lightly loaded one (50 req/s leaves it about 90 % idle) near the idle share."""
        busy, most = self.settings.drift_busy_cpu_share, self.settings.drift_max_cpu_share
        return min(most, busy + (most - busy) * self.host_idle**2)

    def min_interval(self) -> float:
        """Least time between the starts of two checks: ``drift_min_check_interval_seconds``, or the last check's
        CPU seconds over :meth:`cpu_share` if longer, so checks use at most that share of one core."""
        return max(self.settings.drift_min_check_interval_seconds, self.last_check_cpu / self.cpu_share())

    def due(self, version: str, now: float) -> bool:
        """Whether to check now: at once when the version changed or nothing was checked yet (a new leader);
        otherwise when :meth:`min_interval` passed since the last check started and there is news, either
        ``drift_check_every_predictions`` (N) new predictions or any once ``drift_check_interval_seconds`` passed.

        The gap bounds the cost however fast traffic is; the count keeps slow traffic's cadence (every N
        predictions). Above W / gap predictions a second (W the window: 250 req/s at the defaults, a saturated
        service) the whole window turns over between two checks, so no check re-tests rows the last one saw where
        waiting for that costs no delay. Below that rate the schedule does not wait for a turnover: it would add
        up to W / rate to the detection delay (10 s at 50 req/s), where the count adds at most N / rate (2 s)
        and still gives each check N new rows (a fifth of the default window).
        """
        if self.detector is None or self.detector.model_version != version or self.last_check_at == 0.0:
            return True
        if now - self.last_started < self.min_interval():
            return False  # before counting: under saturation most polls end here, without a query
        new = self.predictions.count_predictions(version, since=self.last_seen)
        if new >= self.settings.drift_check_every_predictions:
            return True
        return new > 0 and now - self.last_check_at >= self.settings.drift_check_interval_seconds

    def _terms(self, loaded: LoadedModel) -> TermCounts | None:
        try:
            return reference_terms(loaded)
        except Exception as exc:  # the explanations go without term lists; the drift tests are unaffected
            log.warning("drift_reference_terms_unavailable", model_version=loaded.version, reason=str(exc))
            return None

    def check(self, version: str) -> DriftResult:
        """Test ``version``'s latest window, then store, export and log the result (:meth:`_estimate`,
        :meth:`_explained`, :meth:`_publish`)."""
        started = time.perf_counter()
        detector = self.detector_for(version)
        # After building the detector: a version's one-off model load is not what the next check will cost.
        cpu_started, self.last_started = time.process_time(), time.time()
        rows = self.predictions.window(self.settings.drift_window_size, version)
        result, window = detector.check_window(rows)
        self.last_check_at = time.time()
        self.last_seen = max((r.created_at for r in rows), default=self.last_seen)
        record, estimate = self._estimate(version, result.record(), window)
        record, explanation = self._explained(detector, result, record, rows, window)
        self.flagged = result.drift
        check_id = self.drift_checks.insert(record)
        self._publish(detector, result, check_id, explanation)
        metrics.DRIFT_CHECK_DURATION.observe(time.perf_counter() - started)
        self.last_check_cpu = time.process_time() - cpu_started
        metrics.DRIFT_CHECK_MIN_INTERVAL.set(self.min_interval())
        log.info(
            "drift_detected" if result.drift else "drift_checked",
            model_version=version,
            status=result.status,
            window_size=result.window_size,
            p_value=result.p_value,
            score=result.score,
            tests_rejecting=result.details.get("tests_rejecting"),
            estimated_accuracy=None if estimate is None else round(estimate.estimate, 4),
            check_id=check_id,
        )
        return result

    def _estimate(
        self, version: str, record: DriftCheck, window: Window | None
    ) -> tuple[DriftCheck, AccuracyEstimate | None]:
        """A full window's label-free accuracy estimate, added to the check's record and exported (None and the
        record unchanged when the window is not full or the reference has no estimate)."""
        if window is None or self.reference_accuracy is None:
            return record, None
        estimate = estimate_accuracy(window.p_positive)
        record = replace(
            record,
            details={**record.details, **estimate_details(self.reference_accuracy, estimate.method)},
            estimated_accuracy=estimate.estimate,
            estimated_accuracy_low=estimate.low,
            estimated_accuracy_high=estimate.high,
        )
        export_estimate(version, estimate, self.reference_accuracy)
        return record, estimate

    def _explained(
        self,
        detector: DriftDetector,
        result: DriftResult,
        record: DriftCheck,
        rows: Sequence[WindowRow],
        window: Window | None,
    ) -> tuple[DriftCheck, DriftExplanation | None]:
        """The record with an explanation of the drift when one is due (:meth:`_explain_due`) and succeeds."""
        if window is None or not self._explain_due(result, detector.model_version):
            return record, None
        self.explained_through = self.last_seen
        explanation = self._explain(detector, rows, window)
        if explanation is None:
            return record, None
        return replace(record, explanation=explanation.to_dict()), explanation

    def _publish(
        self, detector: DriftDetector, result: DriftResult, check_id: int, explanation: DriftExplanation | None
    ) -> None:
        """Export the stored check ``check_id`` as the drift gauges and counters (and its explanation's id)."""
        if explanation is not None:
            metrics.DRIFT_EXPLAINED_CHECK_ID.set(check_id)
            log.info(
                "drift_explained",
                model_version=detector.model_version,
                check_id=check_id,
                domain_auc=explanation.domain_auc,
                seconds=explanation.seconds,
            )
        export(result, detector.names)
        metrics.DRIFT_CHECKS.labels(outcome=result.status).inc()
        metrics.DRIFT_LAST_CHECK.set(self.last_check_at)

    def _explain_due(self, result: DriftResult, version: str) -> bool:
        """Explain the first check that flags drift after one that did not, then at most once per
        ``drift_window_size`` new predictions while the drift lasts (a fresh window's worth of texts)."""
        if not result.drift:
            return False
        if not self.flagged:
            return True
        new = self.predictions.count_predictions(version, since=self.explained_through)
        return new >= self.settings.drift_window_size

    def _explain(self, detector: DriftDetector, rows: Sequence[WindowRow], window: Window) -> DriftExplanation | None:
        """What separates the window from the reference; a failure is logged and leaves the check unexplained."""
        try:
            return explain(
                detector.model,
                detector.reference,
                [r.text for r in rows],
                reference_terms=self.reference_terms,
                window_embeddings=window.embeddings,
            )
        except Exception as exc:
            log.exception("drift_explain_failed", model_version=detector.model_version, reason=str(exc))
            return None

    def housekeeping(self, now: float) -> None:
        accuracy, labelled = self.predictions.live_accuracy(self.settings.live_accuracy_window)
        if accuracy is not None:
            metrics.LIVE_ACCURACY.set(accuracy)
        if now - self.last_retention >= RETENTION_EVERY_SECONDS:
            deleted = self.predictions.enforce_retention(
                self.settings.retention_max_rows,
                self.settings.retention_max_age_hours * 3600,
                now,
                max_labelled_rows=self.settings.retention_max_labelled_rows,
                max_labelled_age_seconds=self.settings.retention_max_labelled_age_hours * 3600,
            )
            self.drift_checks.prune(DRIFT_CHECKS_KEPT)
            # An explanation quotes user texts: it goes when unlabelled predictions of its age do.
            self.drift_checks.forget_explanations(now - self.settings.retention_max_age_hours * 3600)
            self.last_retention = now
            if deleted:
                log.info("prediction_log_retention", deleted=deleted, labelled_kept=labelled)

    def step(self) -> DriftResult | None:
        """One poll: check if due; errors are logged and counted, never fatal.

        A version that cannot be monitored (no reference, failed verification) is retried only after
        ``RETRY_FAILED_SECONDS`` or once the current version changes, and logged once per attempt.
        """
        now = time.time()
        self.watch.step(now)  # first: a rollback it makes is the version this step checks
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
                export_unknown(self.detector.names, self.detector.model_version)
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

    def report_cpu(self) -> None:
        """Add the CPU seconds this process used since the last report (user + system, all threads; all of it
        on the first) to ``sentiment_drift_monitor_cpu_seconds_total``."""
        cpu = time.process_time()
        metrics.DRIFT_MONITOR_CPU.inc(max(cpu - self.cpu_reported, 0.0))
        self.cpu_reported = cpu

    def run(self) -> None:
        log.info(
            "drift_monitor_started",
            window=self.settings.drift_window_size,
            interval_seconds=self.settings.drift_check_interval_seconds,
            min_interval_seconds=self.settings.drift_min_check_interval_seconds,
            max_cpu_share=self.settings.drift_max_cpu_share,
            busy_cpu_share=self.settings.drift_busy_cpu_share,
            leader_lock=self.leader_lock.kind,
        )
        metrics.DRIFT_MONITOR_LEADER.labels(lock=self.leader_lock.kind).set(0)
        try:
            while not self.stopping.is_set():
                if self.lead():
                    self.step()
                self.report_cpu()
                self.host_idle = self.host.sample()
                self.stopping.wait(POLL_SECONDS)
        finally:
            self.leader_lock.dispose()  # a graceful stop hands over at once, not after a connection timeout
            self.database.dispose()
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


def announce_start() -> None:
    """What a monitor process writes first: its labelled counters at 0, so the first rollback or failed check
    shows in ``increase()`` on its own pod's ``/metrics`` too, and its start time, the per-start signal of
    ``SentimentDriftMonitorRestarting`` (a monitor that dies before its first check still changes it)."""
    metrics.initialise_monitor_counters()
    metrics.DRIFT_MONITOR_START_TIME.set(time.time())


def main() -> None:
    from app.logs import configure_logging

    settings = Settings()
    configure_logging(settings.log_level)
    _lower_priority(settings.drift_backend)
    announce_start()
    # Served before the monitor connects: a start that fails there (the database is down) can be scraped too.
    if settings.monitor_metrics_port is not None:
        metrics.serve(settings.monitor_metrics_port, settings.monitor_metrics_host)
        log.info("monitor_metrics_serving", host=settings.monitor_metrics_host, port=settings.monitor_metrics_port)
    try:
        monitor = DriftMonitor(settings)
    except DatabaseSchemaBehindError:  # logged as database_schema_behind, with the command to run
        raise SystemExit(2) from None

    def stop(signum: int, _frame: Any) -> None:
        log.info("drift_monitor_signal", signal=signal.Signals(signum).name)
        monitor.stopping.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    monitor.run()


if __name__ == "__main__":
    main()
