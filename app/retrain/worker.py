"""The retrain worker: claims queued retrain jobs and runs each in its own process (``python -m app.retrain.worker``).

With ``SENTIMENT_RETRAIN_MODE=queue`` the web service only records a job as ``queued``
(:mod:`app.retrain.launcher`); a worker, in a process or pod of its own, polls the jobs table every
``SENTIMENT_RETRAIN_WORKER_POLL_SECONDS``, claims the oldest queued job (one statement:
:meth:`~app.storage.retrain_jobs.RetrainJobRepository.claim_job`) and starts ``python -m app.retrain.job JOB_ID
--trigger T`` as its child, under the launcher's lock rules (:func:`~app.retrain.launcher.spawn_job`): on
SQLite it takes the store's flock before claiming and hands it to the child; on PostgreSQL it checks the
advisory lock and the child takes it. A crashed, killed or timed-out retrain ends its own process, never the
worker's, and its memory goes back to the system; the worker records a retrain that died without reporting as
failed and claims the next job. Any number of workers may run: the unique index on the one ``running`` job
and the retrain lock let one retrain run at a time. A retrain that outlives ``SENTIMENT_RETRAIN_MAX_SECONDS``
and its grace period (its own watchdog could not end it) is killed by the worker that follows it, and one of
this host that no worker follows (its worker was restarted) by any worker that finds the lock held
(:func:`~app.retrain.launcher.end_overtime`).

SIGTERM stops claiming; the running retrain gets ``SENTIMENT_RETRAIN_WORKER_STOP_SECONDS`` to finish, after
which the worker ends it and puts its job back in the queue for the next worker (a retrain that already
registered its candidate is not fitted twice: the rerun finds no new labels). Run as its own pod, the worker
serves every process's metrics (its own and its retrains') on ``SENTIMENT_RETRAIN_WORKER_METRICS_PORT``.
"""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import structlog

from app.migrations import DatabaseSchemaBehindError, require_current
from app.monitoring import metrics
from app.retrain.launcher import (
    DIED_UNREPORTED,
    OVERTIME_GRACE_SECONDS,
    STARTUP_GRACE_SECONDS,
    end_overtime,
    end_overtime_jobs,
    record_unreported_exit,
    spawn_job,
)
from app.retrain.lock import AdvisoryRetrainLock, RetrainLock
from app.settings import Settings
from app.storage.database import Database
from app.storage.retrain_jobs import RetrainJobRepository

log = structlog.get_logger("app.retrain.worker")

HANDED_BACK = "the retrain worker stopped before the retrain ended; another job was queued meanwhile"


@dataclass(frozen=True)
class Running:
    """The retrain process this worker started, and its job."""

    job_id: str
    trigger: str
    process: subprocess.Popen[bytes]
    started: float = field(default_factory=time.monotonic)


class RetrainWorker:
    """Claims queued jobs one at a time and follows the retrain process of each."""

    def __init__(self, settings: Settings, *, lock: RetrainLock | None = None) -> None:
        self.settings = settings
        self.database = Database.from_settings(settings)
        require_current(self.database.engine, "retrain worker")  # the schema is `db upgrade`'s to change
        self.jobs = RetrainJobRepository(self.database)
        self.lock = lock or RetrainLock.for_settings(settings, engine=self.database.engine)
        self.job_env = settings.as_env()  # only the launcher's allow-list reaches the retrain process
        self.stopping = threading.Event()
        self.current: Running | None = None
        self.overtime_grace_seconds = OVERTIME_GRACE_SECONDS

    def step(self) -> None:
        """One poll: follow the running retrain; once there is none, claim and start the oldest queued job."""
        if self.current is not None:
            self._follow()
        if self.current is None and not self.stopping.is_set():
            self._claim()
        metrics.RETRAIN_JOBS_QUEUED.set(self.jobs.queued_jobs())

    def _follow(self) -> None:
        assert self.current is not None
        code = self.current.process.poll()
        if code is None:
            if not self._overdue(self.current):
                return
            code = self.current.process.wait()
        job, self.current = self.current, None
        if record_unreported_exit(self.jobs, job.job_id, code):
            metrics.RETRAIN_TOTAL.labels(trigger=job.trigger, outcome="failed").inc()
        log.info("retrain_worker_job_ended", job_id=job.job_id, exit_code=code)

    def _overdue(self, job: Running) -> bool:
        """Kill the followed retrain if it runs past its maximum time and grace period; whether it did."""
        max_seconds = self.settings.retrain_max_seconds
        if time.monotonic() - job.started < max_seconds + self.overtime_grace_seconds:
            return False
        end_overtime(self.jobs, job.job_id, job.process.pid, max_seconds)  # not yet reaped: still its pid
        return True

    def _claim(self) -> None:
        lock = self.lock.fresh()
        # As the launcher: a retrain that holds the lock (another worker's, or one a web worker spawned) goes first;
        # one of this host past its time (its worker restarted since) is killed.
        if not (lock.try_acquire() if lock.hands_over else not lock.held_elsewhere()):
            end_overtime_jobs(self.jobs, self.settings.retrain_max_seconds, self.overtime_grace_seconds)
            return
        try:
            now = time.time()
            # Nobody holds the lock: a job still marked running has died (on PostgreSQL, once its process had
            # time to take the lock).
            stale_before = None if lock.hands_over else now - STARTUP_GRACE_SECONDS
            failed = self.jobs.fail_running_jobs(DIED_UNREPORTED, started_before=stale_before)
            if failed:
                log.error("retrain_failed", reason="process died", jobs=failed)
            claimed = self.jobs.claim_job(now)
            if claimed is None:
                return
            job_id, trigger = claimed
            try:
                process = spawn_job(job_id, trigger, self.job_env, lock)
            except OSError as exc:
                self.jobs.finish_job(job_id, "failed", "failed", {"error": f"could not start: {exc}"})
                log.error("retrain_failed", job_id=job_id, reason=str(exc))
                return
        finally:
            if lock.hands_over:
                lock.release()  # the retrain process holds its inherited copy of the flock
        self.current = Running(job_id, trigger, process)
        log.info("retrain_worker_claimed", job_id=job_id, trigger=trigger, retrain_pid=process.pid)

    def drain(self, timeout: float) -> None:
        """Let the running retrain finish within ``timeout``; otherwise end it and queue its job again."""
        if self.current is None:
            return
        job = self.current
        log.info("retrain_worker_draining", job_id=job.job_id, wait_seconds=timeout)
        try:
            job.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            job.process.kill()
            job.process.wait()
            # Under the lock, so no other worker fails the job (no holder) between the kill and the hand-back.
            guard = self.lock.fresh()
            held = guard.try_acquire()
            try:
                requeued = self.jobs.requeue_job(job.job_id, HANDED_BACK)
            finally:
                if held:
                    guard.release()
            self.current = None
            log.warning("retrain_worker_handed_back", job_id=job.job_id, requeued=requeued)
            return
        self._follow()

    def run(self) -> None:
        log.info(
            "retrain_worker_started",
            poll_seconds=self.settings.retrain_worker_poll_seconds,
            lock="advisory" if isinstance(self.lock, AdvisoryRetrainLock) else "flock",
            retrain_mode=self.settings.retrain_mode,
        )
        if self.settings.retrain_mode != "queue":
            log.warning("retrain_worker_without_queue", hint="the web service spawns retrains itself: nothing queues")
        try:
            while not self.stopping.is_set():
                try:
                    self.step()
                except Exception as exc:  # the database is unreachable: keep the retrain, retry next poll
                    log.error("retrain_worker_poll_failed", reason=str(exc).strip() or type(exc).__name__)
                self.stopping.wait(self.settings.retrain_worker_poll_seconds)
            self.drain(self.settings.retrain_worker_stop_seconds)
        finally:
            if isinstance(self.lock, AdvisoryRetrainLock):
                self.lock.dispose()
            self.database.dispose()
        log.info("retrain_worker_stopped")


def main() -> None:
    from app.logs import configure_logging

    settings = Settings()
    configure_logging(settings.log_level)
    try:
        worker = RetrainWorker(settings)
    except DatabaseSchemaBehindError:  # logged as database_schema_behind, with the command to run
        raise SystemExit(2) from None
    metrics.initialise_counters()  # this pod's /metrics has every sentiment_retrain_total series from the start
    if settings.retrain_worker_metrics_port is not None:
        host, port = settings.retrain_worker_metrics_host, settings.retrain_worker_metrics_port
        metrics.serve(port, host)
        log.info("retrain_worker_metrics_serving", host=host, port=port)

    def stop(signum: int, _frame: Any) -> None:
        log.info("retrain_worker_signal", signal=signal.Signals(signum).name)
        worker.stopping.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    worker.run()


if __name__ == "__main__":
    main()
