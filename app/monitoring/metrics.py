"""Every Prometheus metric of the service, declared once (dashboards and alert rules depend on the names).

prometheus_client's multiprocess mode applies when ``PROMETHEUS_MULTIPROC_DIR`` is set before this module
is imported (``scripts/serve`` sets and wipes it): every process (gunicorn workers, the drift monitor, a
retrain) writes its samples to files there and ``/metrics`` merges them per scrape. Counters and histograms
sum over all processes, dead ones included, so a killed worker's counts survive (folded into aggregate files
once it is reaped: :mod:`app.monitoring.exposition`). Each gauge states how its per-process values combine.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from app.ml.labels import LABELS
from app.monitoring import exposition
from app.monitoring.metric_writes import WRITES

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


# Sub-millisecond to seconds: a single prediction takes ~0.3 ms of model time, a full batch a second.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
CONFIDENCE_BUCKETS = (0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 0.975, 0.99, 1.0)
LENGTH_BUCKETS = (10, 25, 50, 100, 150, 250, 500, 1000, 2500, 5000)
CHECK_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

REQUEST_DURATION = Histogram(
    "sentiment_request_duration_seconds",
    "HTTP request latency, from first byte read to response sent.",
    ["method", "route", "status"],
    buckets=LATENCY_BUCKETS,
)
REQUESTS_IN_PROGRESS = Gauge(
    "sentiment_requests_in_progress",
    "Requests being handled right now, over all live workers.",
    multiprocess_mode="livesum",
)
INFERENCE_DURATION = Histogram(
    "sentiment_inference_duration_seconds",
    "Duration of one model call (a batch of concurrent requests' texts).",
    ["model_version"],
    buckets=LATENCY_BUCKETS,
)
PREDICTIONS = Counter(
    "sentiment_predictions_total", "Predictions made, by model version and label.", ["model_version", "sentiment"]
)
PREDICTION_CONFIDENCE = Histogram(
    "sentiment_prediction_confidence",
    "Probability of the predicted label.",
    ["model_version", "sentiment"],
    buckets=CONFIDENCE_BUCKETS,
)
TEXT_LENGTH = Histogram(
    "sentiment_text_length_chars", "Length of predicted texts in characters.", buckets=LENGTH_BUCKETS
)
MODEL_INFO = Gauge(
    "sentiment_model_info",
    "1 for the model version a live worker serves, 0 for versions it served before.",
    ["version"],
    multiprocess_mode="livemax",
)
PREDICTION_LOG_ERRORS = Counter(
    "sentiment_prediction_log_errors_total",
    "Prediction-log failures: write_failed (failed flushes, rows kept for retry; lost rows are counted in "
    "sentiment_prediction_log_dropped_total).",
    ["reason"],
)
PREDICTION_LOG_ERROR_REASONS = ("write_failed",)
PREDICTION_LOG_DROPPED = Counter(
    "sentiment_prediction_log_dropped_total",
    "Predictions that never reached the prediction log, by reason: buffer_full (the buffer's bound while the "
    "database is unavailable), rejected_row (a row the database refused), shutdown (unwritten at exit).",
    ["reason"],
)
PREDICTION_LOG_DROP_REASONS = ("buffer_full", "rejected_row", "shutdown")
PREDICTION_LOG_PENDING = Gauge(
    "sentiment_prediction_log_pending_rows",
    "Predictions held in the live workers' write-behind buffers, not yet written to the prediction log.",
    multiprocess_mode="livesum",
)
FEEDBACK = Counter("sentiment_feedback_total", "Labelled feedback received, by true label.", ["sentiment"])
LIVE_ACCURACY = Gauge(
    "sentiment_live_accuracy",
    "Accuracy over the most recent labelled predictions.",
    multiprocess_mode="mostrecent",
)

# Written by the drift monitor (one process); "mostrecent" survives its restarts.
CONFIDENCE_MEAN = Gauge(
    "sentiment_confidence_mean", "Mean confidence over the current drift window.", multiprocess_mode="mostrecent"
)
DRIFT_SCORE = Gauge(
    "sentiment_drift_score", "MMD distance of the window to the reference.", multiprocess_mode="mostrecent"
)
DRIFT_P_VALUE = Gauge("sentiment_drift_p_value", "p-value of the MMD permutation test.", multiprocess_mode="mostrecent")
DRIFT_THRESHOLD = Gauge(
    "sentiment_drift_threshold",
    "MMD distance above which the permutation test rejects at the configured p-value.",
    multiprocess_mode="mostrecent",
)
DRIFT_DETECTED = Gauge(
    "sentiment_drift_detected",
    "1 if the monitor's combined verdict (all tests, corrected for multiple testing) is drift.",
    multiprocess_mode="mostrecent",
)
DRIFT_WINDOW_SIZE = Gauge(
    "sentiment_drift_window_size", "Predictions in the current drift window.", multiprocess_mode="mostrecent"
)
DRIFT_TEST_P_VALUE = Gauge(
    "sentiment_drift_test_p_value",
    "p-value of each drift test (mmd, length, length_tail, confidence, label_mix) before correction.",
    ["test"],
    multiprocess_mode="mostrecent",
)
# Label-free accuracy estimate of the drift window (app.monitoring.performance), per model version. A version's
# series keeps its last value in the multiprocess files after the monitor moves to another version: the monitor
# sets a version it no longer checks to NaN (as export_unknown does), and the alert joins on the served version.
ESTIMATED_ACCURACY = Gauge(
    "sentiment_estimated_accuracy",
    "Accuracy of the drift window estimated from the model's calibrated probabilities (mean confidence).",
    ["model_version"],
    multiprocess_mode="mostrecent",
)
ESTIMATED_ACCURACY_LOWER = Gauge(
    "sentiment_estimated_accuracy_lower",
    "Lower bound of the 95 % band the window's realised accuracy should fall in if calibration holds.",
    ["model_version"],
    multiprocess_mode="mostrecent",
)
ESTIMATED_ACCURACY_UPPER = Gauge(
    "sentiment_estimated_accuracy_upper",
    "Upper bound of the 95 % band the window's realised accuracy should fall in if calibration holds.",
    ["model_version"],
    multiprocess_mode="mostrecent",
)
ESTIMATED_ACCURACY_REFERENCE = Gauge(
    "sentiment_estimated_accuracy_reference",
    "The same estimate on the model version's held-out drift reference: what a window's estimate drops from.",
    ["model_version"],
    multiprocess_mode="mostrecent",
)
DRIFT_EXPLAINED_CHECK_ID = Gauge(
    "sentiment_drift_explained_check_id",
    "Id of the latest drift check that flagged drift and stored an explanation (GET /v1/drift/checks/<id>); "
    "0 until the first.",
    multiprocess_mode="mostrecent",
)
DRIFT_CHECKS = Counter("sentiment_drift_checks_total", "Drift checks, by outcome.", ["outcome"])
DRIFT_CHECK_OUTCOMES = ("drift", "no_drift", "insufficient_data", "error")
# "max", not "mostrecent": every process that imports this module writes 0 for it, so the series exists from
# the first scrape and reads as "never checked" (infinitely stale) until the monitor's first check; the max of
# wall-clock times is the latest, and a dead monitor's last value stays, which is what the staleness alert reads.
DRIFT_LAST_CHECK = Gauge(
    "sentiment_drift_last_check_timestamp_seconds",
    "Unix time of the drift monitor's last completed check (0: none since the service started).",
    multiprocess_mode="max",
)
DRIFT_CHECK_DURATION = Histogram(
    "sentiment_drift_check_duration_seconds", "Duration of one drift check.", buckets=CHECK_BUCKETS
)
DRIFT_CHECK_MIN_INTERVAL = Gauge(
    "sentiment_drift_check_min_interval_seconds",
    "Least time the drift monitor leaves between the starts of two checks after its last one: the larger of "
    "SENTIMENT_DRIFT_MIN_CHECK_INTERVAL_SECONDS and that check's CPU seconds over SENTIMENT_DRIFT_MAX_CPU_SHARE.",
    multiprocess_mode="mostrecent",
)
# Summed over processes, dead ones included (compaction folds their files into the aggregate), so a restarted
# monitor's CPU keeps adding up; a wiped directory (a service restart) reads as a counter reset. Unlabelled: every
# process importing this module writes a 0 sample, so the series exists before the monitor's first increment.
DRIFT_MONITOR_CPU = Counter(
    "sentiment_drift_monitor_cpu_seconds_total",
    "CPU seconds (user + system, all threads) used by drift monitor processes, leading or waiting.",
)
# A per-start signal for the restart alert (SentimentDriftMonitorRestarting on Kubernetes, where no supervisor
# counts restarts): each start writes a later time, so changes() counts starts, including those of a monitor
# that dies before its first completed check. "max": a dead monitor's value stays until a newer start replaces
# it, and the 0 that importing processes (web workers) write never hides it.
DRIFT_MONITOR_START_TIME = Gauge(
    "sentiment_drift_monitor_start_time_seconds",
    "Unix time the latest drift monitor process started (0: none since the service started).",
    multiprocess_mode="max",
)
# "liveall": one sample per live monitor process (a ``pid`` label), so two monitors writing one directory
# (or a leader and a demoted one) stay distinct; a dead one's sample goes with its process (mark_process_dead,
# compaction, a wiped directory), so a killed leader never lingers as a second 1. Across pods,
# sum(sentiment_drift_monitor_leader) is the number of leaders: 1. The ``lock`` label keeps processes that
# only import this module (web workers) from writing a 0 sample as an unlabelled gauge would.
DRIFT_MONITOR_LEADER = Gauge(
    "sentiment_drift_monitor_leader",
    "1 while this drift monitor process holds the leader lock and checks, 0 while it waits to take over.",
    ["lock"],
    multiprocess_mode="liveall",
)

# Written by the retrain process. "In progress" is read from the retrain lock at scrape time
# (RetrainLockCollector), so a killed retrain can never leave it stuck at 1.
RETRAIN_TOTAL = Counter("sentiment_retrain_total", "Retrains, by trigger and outcome.", ["trigger", "outcome"])
# The webhook sources (app.retrain.webhooks.SOURCES, which imports this module, so it cannot be read here) and
# POST /v1/retrain; tests/monitoring/test_retrain_triggers.py fails when a source is added to one and not the other.
RETRAIN_TRIGGERS = ("alertmanager", "grafana", "manual")
# skipped_harmless_drift: counted by the webhook, which starts no retrain (SENTIMENT_RETRAIN_MIN_ESTIMATED_DROP_POINTS).
RETRAIN_OUTCOMES = (
    "promoted",
    "rejected",
    "superseded",
    "skipped_no_new_labels",
    "skipped_too_few_labels",
    "skipped_harmless_drift",
    "failed",
)
RETRAIN_DURATION = Histogram(
    "sentiment_retrain_duration_seconds", "Duration of one retrain.", buckets=(5, 10, 20, 30, 60, 120, 300, 600, 1200)
)
# Written by a retrain worker (app.retrain.worker) at each poll: a job that stays queued means no worker runs it.
RETRAIN_JOBS_QUEUED = Gauge(
    "sentiment_retrain_jobs_queued",
    "Retrain jobs waiting for a retrain worker (SENTIMENT_RETRAIN_MODE=queue), as a live worker last read them.",
    multiprocess_mode="livemax",
)

# Written by the drift monitor's promotion watch (app.monitoring.watch) when it rolls a promotion back.
MODEL_ROLLBACKS = Counter(
    "sentiment_model_rollbacks_total",
    "Automatic rollbacks of a promoted model version to the one it replaced, by reason.",
    ["reason"],
)
MODEL_ROLLBACK_REASONS = ("realised_accuracy", "estimated_accuracy")

# Written by app.supervisor, the one process that restarts others.
SUPERVISED_RESTARTS = Counter(
    "sentiment_supervised_restarts_total", "Restarts of a supervised process after it exited.", ["process"]
)
SUPERVISED_PROCESSES = ("monitor", "retrain_worker")


def initialise_counters() -> None:
    """Create every labelled counter child an alert or dashboard reads, at 0, in this process.

    A labelled series appears on its first ``inc()``; ``rate()``/``increase()`` need a sample before it, so
    that first increment (the first failed retrain, the first dropped row) would be invisible. Each web worker
    calls this at start (gunicorn's ``post_worker_init``): in multiprocess mode it writes a 0 sample to the
    worker's file, which outlives the worker, so the series exist from the first scrape on and sum correctly.
    """
    for sentiment in LABELS:
        FEEDBACK.labels(sentiment=sentiment)
    for reason in PREDICTION_LOG_ERROR_REASONS:
        PREDICTION_LOG_ERRORS.labels(reason=reason)
    for reason in PREDICTION_LOG_DROP_REASONS:
        PREDICTION_LOG_DROPPED.labels(reason=reason)
    initialise_monitor_counters()
    for trigger in RETRAIN_TRIGGERS:
        for outcome in RETRAIN_OUTCOMES:
            RETRAIN_TOTAL.labels(trigger=trigger, outcome=outcome)
    for process in SUPERVISED_PROCESSES:
        SUPERVISED_RESTARTS.labels(process=process)


def initialise_monitor_counters() -> None:
    """The drift monitor's labelled counters at 0 (checks by outcome, rollbacks by reason), as
    :func:`initialise_counters` writes them: the monitor calls this at start, so where it serves its own
    ``/metrics`` (its Kubernetes pod) these series exist before their first increment too."""
    for outcome in DRIFT_CHECK_OUTCOMES:
        DRIFT_CHECKS.labels(outcome=outcome)
    for reason in MODEL_ROLLBACK_REASONS:
        MODEL_ROLLBACKS.labels(reason=reason)


class RetrainLockCollector(Collector):
    """``sentiment_retrain_in_progress``: 1 while a process holds the retrain lock (the store's flock, or
    PostgreSQL's advisory lock). No sample while the lock cannot be read (the database is down): the other
    metrics still get scraped, and a missing sample is not a wrong one."""

    def __init__(self, probe: Callable[[], bool]) -> None:
        self.probe = probe

    def collect(self) -> Iterable[Metric]:
        try:
            running = self.probe()
        except Exception:  # any failure to read the lock leaves the series out, never the scrape
            return
        yield GaugeMetricFamily(
            "sentiment_retrain_in_progress", "1 while a retrain runs (holds the retrain lock).", value=int(running)
        )


def render(extra: Collector | None = None) -> tuple[bytes, str]:
    """The exposition text of every process's metrics, and its content type.

    In multiprocess mode a fresh registry reads the files of all processes on each scrape (the documented
    pattern, with :class:`~app.monitoring.exposition.MultiProcessFilesCollector`, which also reads the
    aggregates of dead processes consistently with compactions, and compacts first when dead files piled up);
    otherwise the default registry is served.
    """
    WRITES.flush()  # this process's gathered writes (other workers' land within their interval)
    registry = CollectorRegistry()
    if extra is not None:
        registry.register(extra)
    directory = os.environ.get(MULTIPROC_ENV)
    if directory:
        exposition.register_collector(registry, directory)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY) + generate_latest(registry), CONTENT_TYPE_LATEST


class _DirectoryScrape(Collector):
    """Every process's metrics from the multiprocess directory, read afresh on each scrape (as :func:`render`)."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def collect(self) -> Iterable[Metric]:
        registry = CollectorRegistry()
        exposition.register_collector(registry, self.directory)
        return registry.collect()


def serve(port: int, host: str) -> None:
    """Serve :func:`render`'s metrics at ``http://host:port/metrics`` from a daemon thread: the drift monitor's
    own endpoint where no web service merges its files (its own pod). Raises ``OSError`` if the port is taken.

    Compacting dead processes' files on a scrape is safe here: the server runs in the process that writes
    them, so it shares their pid namespace (unlike a sidecar container)."""
    directory = os.environ.get(MULTIPROC_ENV)
    start_http_server(port, addr=host, registry=_DirectoryScrape(directory) if directory else REGISTRY)


def mark_process_dead(pid: int) -> None:
    """Drop a dead process's live gauges."""
    if os.environ.get(MULTIPROC_ENV):
        multiprocess.mark_process_dead(pid)


def retire_process(pid: int) -> None:
    """A process that wrote metrics was reaped (gunicorn's ``child_exit``, the supervisor): drop its live gauges
    and fold the files of every dead process into the aggregates, so /metrics does not slow down with each
    recycle (:mod:`app.monitoring.exposition`). Never raises: a compaction that fails or finds the lock busy
    is logged and left to a later one."""
    directory = os.environ.get(MULTIPROC_ENV)
    if directory:
        multiprocess.mark_process_dead(pid)
        exposition.compact_quietly(directory)
