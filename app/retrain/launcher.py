"""Starts at most one retrain at a time, in its own process, and never within the cooldown.

``SENTIMENT_RETRAIN_MODE`` says where the retrain process runs: ``spawn`` (default), as a child of the web
worker that accepted the request; ``queue``, the request only records the job as ``queued`` (at most one
waits: a unique index) and a retrain worker (:mod:`app.retrain.worker`) claims it and starts the process,
under the same lock rules (:func:`spawn_job`). The cooldown counts queued jobs too.

Three guards, all shared by every worker of every instance:

- The retrain lock (:mod:`app.retrain.lock`): on SQLite the launcher takes the store's ``flock`` and the
  retrain process inherits it; on PostgreSQL the launcher only checks the advisory lock and the retrain
  process takes it when it starts (and records its job ``failed``, reason ``lock_held``, if it cannot).
- The jobs table decides which request starts the retrain: at most one job row is ``running`` (a unique
  index), so of many concurrent starts exactly one inserts its row; the others answer ``already_running``.
- The cooldown is read from the same table, in the same statement as the insert: no job is recorded while
  the latest one started less than ``cooldown_seconds`` ago, whatever its outcome (a firing whose retrain
  did not promote is released, and its re-sends retry at most once per cooldown).

``SENTIMENT_RETRAIN_MAX_SECONDS`` is enforced twice. The retrain's own watchdog (:mod:`app.retrain.job`) ends
it from inside; a process that watchdog cannot end (stuck in C code holding the GIL, stopped) is killed from
outside once its job has run :data:`OVERTIME_GRACE_SECONDS` longer (:func:`end_overtime`): by the worker that
started it, and by :meth:`RetrainLauncher.reconcile` for any retrain process of this host.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from app.monitoring import metrics
from app.retrain.lock import CachedProbe, RetrainLock, for_database
from app.settings import REPO_ROOT, Settings
from app.storage.retrain_jobs import RetrainJobRepository

log = structlog.get_logger(__name__)

DIED_UNREPORTED = "the retrain process ended without reporting (killed?)"
STARTUP_GRACE_SECONDS = 120.0
"""On PostgreSQL a retrain process takes the lock itself once it runs: until then its job is running without
a lock holder. Only a job older than this without one has died (the worker that started it reaps it sooner)."""
OVERTIME_GRACE_SECONDS = STARTUP_GRACE_SECONDS + 60.0
"""How long past ``SENTIMENT_RETRAIN_MAX_SECONDS`` (counted from its job's start) a retrain process may live
before it is killed from outside: at idle priority it may take STARTUP_GRACE_SECONDS to start its watchdog,
which then waits up to 60 s for a promotion in progress before it exits the process itself."""
KILL_WAIT_SECONDS = 5.0
"""How long a kill waits for the killed process to exit (its files closed: the flock is free)."""
JOB_MODULE = b"app.retrain.job"
PROC = Path("/proc")
# One BLAS/OpenMP thread: a retrain must leave the second core to the web workers, not spin on it.
SINGLE_THREADED = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
SETTINGS_PREFIX = "SENTIMENT_"
# The settings a retrain reads (the model store and its signing key, the corpora, the prediction database,
# its own limits, logging): an allow-list, so no credential of the HTTP side (webhook, admin, Grafana
# tokens and secrets) ever reaches the retrain process or its environment.
JOB_SETTINGS = (
    "SENTIMENT_MODEL_STORE",
    "SENTIMENT_MODEL_SIGNING_KEY",
    "SENTIMENT_DATA_DIR",
    "SENTIMENT_STATE_DIR",
    "SENTIMENT_DATABASE_",
    "SENTIMENT_PREDICTION_LOG_",
    "SENTIMENT_DRIFT_",
    "SENTIMENT_RETRAIN_",
    "SENTIMENT_LOG_LEVEL",
    "SENTIMENT_GRACEFUL_TIMEOUT_SECONDS",
)


def job_environment(settings_env: Mapping[str, str], inherited: Mapping[str, str]) -> dict[str, str]:
    """The environment of a retrain process: ``inherited`` (PATH, PROMETHEUS_MULTIPROC_DIR, ...) without any
    ``SENTIMENT_*`` variable, plus the allow-listed settings of ``settings_env`` (``Settings.as_env()``)."""
    env = {name: value for name, value in inherited.items() if not name.startswith(SETTINGS_PREFIX)}
    env.update({name: value for name, value in settings_env.items() if name.startswith(JOB_SETTINGS)})
    return env


@dataclass(frozen=True)
class Launch:
    """What a request to retrain did: ``retrain_started``, ``queued`` (queue mode), ``already_running``,
    ``already_queued`` (queue mode: a job waits for a worker already) or ``cooldown``."""

    action: str
    job_id: str | None = None
    retry_after_seconds: float | None = None


@functools.cache
def idle_priority() -> list[str]:
    """A command prefix that starts the retrain at SCHED_IDLE already, so its imports (over a second of
    CPU) do not compete with the workers either: ``chrt --idle 0`` if it works here (a seccomp profile
    may refuse it), else nothing, and the job lowers its own priority once it runs."""
    chrt = shutil.which("chrt")
    if chrt is None:
        return []
    try:
        subprocess.run([chrt, "--idle", "0", "true"], check=True, capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return []
    return [chrt, "--idle", "0"]


MODES = ("spawn", "queue")


def max_run_seconds(job_env: Mapping[str, str]) -> float:
    """The ``SENTIMENT_RETRAIN_MAX_SECONDS`` a retrain started with the settings ``job_env`` runs under (it
    inherits no other ``SENTIMENT_*`` variable: the default otherwise)."""
    raw = job_env.get("SENTIMENT_RETRAIN_MAX_SECONDS")
    return float(raw) if raw else float(Settings.model_fields["retrain_max_seconds"].default)


def spawn_job(job_id: str, trigger: str, job_env: Mapping[str, str], lock: RetrainLock) -> subprocess.Popen[bytes]:
    """Start ``python -m app.retrain.job JOB_ID --trigger T`` for a job recorded as running, at idle priority
    with one BLAS thread and only the allow-listed settings. ``lock`` is the caller's fresh handle: held
    (SQLite: the child inherits the flock; the caller releases its own copy afterwards), or only checked
    (PostgreSQL: the child takes the advisory lock itself)."""
    return subprocess.Popen(
        [*idle_priority(), sys.executable, "-m", "app.retrain.job", job_id, "--trigger", trigger],
        cwd=REPO_ROOT,
        env={**job_environment(job_env, os.environ), **SINGLE_THREADED, **lock.child_env()},
        pass_fds=lock.child_fds(),
        start_new_session=True,  # the parent's SIGTERM or restart does not take the retrain down
    )


def record_unreported_exit(jobs: RetrainJobRepository, job_id: str, code: int) -> bool:
    """A retrain process exited with ``code``: if it failed while its job is still running (killed, crashed
    before it reported), record the job failed. Whether it did."""
    if code == 0:
        return False
    job = jobs.get(job_id)
    if job is None or job.status != "running":
        return False
    jobs.finish_job(job_id, "failed", "failed", {"error": f"retrain process exited {code}"})
    log.error("retrain_failed", job_id=job_id, exit_code=code)
    return True


def overtime_error(max_seconds: float) -> str:
    return (
        f"the retrain process exceeded the maximum run time (SENTIMENT_RETRAIN_MAX_SECONDS={max_seconds:g} s,"
        " plus a grace period) and was killed"
    )


def _job_of(cmdline: Path) -> str | None:
    """The job id of a ``python -m app.retrain.job JOB_ID`` command line (``/proc/PID/cmdline``), or None."""
    try:
        argv = cmdline.read_bytes().split(b"\0")
    except OSError:
        return None
    for i in range(len(argv) - 2):
        if argv[i] == b"-m" and argv[i + 1] == JOB_MODULE:
            return argv[i + 2].decode(errors="replace")
    return None


def retrain_processes(proc: Path = PROC) -> dict[str, list[int]]:
    """The retrain processes of this host (this pid namespace, read in ``/proc``): their pids by job id."""
    found: dict[str, list[int]] = {}
    with contextlib.suppress(OSError), os.scandir(proc) as entries:
        for entry in entries:
            job_id = _job_of(Path(entry.path, "cmdline")) if entry.name.isdigit() else None
            if job_id is not None:
                found.setdefault(job_id, []).append(int(entry.name))
    return found


def _exited(pid: int) -> bool:
    """``pid`` is gone, or a zombie (which has closed its files, the retrain flock included)."""
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def kill_group(pid: int) -> None:
    """SIGKILL ``pid``'s process group if it leads one (a retrain starts its own session), else ``pid`` alone;
    wait up to :data:`KILL_WAIT_SECONDS` for it to exit."""
    with contextlib.suppress(ProcessLookupError):
        if os.getpgid(pid) == pid:
            os.killpg(pid, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + KILL_WAIT_SECONDS
    while not _exited(pid) and time.monotonic() < deadline:
        time.sleep(0.02)


def _fail_overtime(jobs: RetrainJobRepository, job_id: str, max_seconds: float) -> bool:
    """Record the job failed for running past its time, if it is still running; whether it was."""
    job = jobs.get(job_id)
    if job is None or job.status != "running":
        return False
    jobs.finish_job(job_id, "failed", "failed", {"error": overtime_error(max_seconds), "reason": "overtime"})
    metrics.RETRAIN_TOTAL.labels(trigger=job.trigger, outcome="failed").inc()
    return True


def end_overtime(jobs: RetrainJobRepository, job_id: str, pid: int, max_seconds: float) -> None:
    """Kill ``pid``, the retrain process of ``job_id``, which ran past ``max_seconds`` and the grace period.

    The job is recorded failed first, so the parent that reaps the killed process finds it ended and leaves
    the record alone; if the database refuses (a stopped process may hold SQLite's write lock), after the
    kill. The retrain lock goes with the process (the kernel closes its flock, the server its session).
    """
    try:
        recorded: bool | None = _fail_overtime(jobs, job_id, max_seconds)
    except SQLAlchemyError:
        recorded = None
    kill_group(pid)
    if recorded is None:
        recorded = _fail_overtime(jobs, job_id, max_seconds)
    log.error("retrain_killed_overtime", job_id=job_id, retrain_pid=pid, max_seconds=max_seconds, recorded=recorded)


def end_overtime_jobs(
    jobs: RetrainJobRepository, max_seconds: float, grace_seconds: float = OVERTIME_GRACE_SECONDS
) -> list[str]:
    """Kill every retrain process of this host whose job started more than ``max_seconds + grace_seconds``
    ago (:func:`end_overtime`), whatever its job's status (one that reported but hangs still holds the
    lock); the ids of those jobs. A process of no recorded job (run by hand) is left alone."""
    deadline = time.time() - max_seconds - grace_seconds
    ended = []
    for job_id, pids in retrain_processes().items():
        job = jobs.get(job_id)
        if job is None or job.started_at >= deadline:
            continue
        for pid in pids:
            end_overtime(jobs, job_id, pid, max_seconds)
        ended.append(job_id)
    return ended


class RetrainLauncher:
    def __init__(
        self,
        store_root: Path,
        jobs: RetrainJobRepository,
        cooldown_seconds: float,
        job_env: dict[str, str] | None = None,
        *,
        lock: RetrainLock | None = None,
        mode: str = "spawn",
        overtime_grace_seconds: float = OVERTIME_GRACE_SECONDS,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"retrain mode {mode!r} is not one of {MODES}")
        self.mode = mode
        self.store_root = store_root
        self.jobs = jobs
        self.cooldown_seconds = cooldown_seconds
        # The service's settings (``Settings.as_env()``), so the job reads the same model store and prediction
        # database; only the allow-listed ones reach it (``job_environment``).
        self.job_env = job_env or {}
        self.max_seconds = max_run_seconds(self.job_env)
        """The retrain's own limit (``SENTIMENT_RETRAIN_MAX_SECONDS`` of ``job_env``), enforced from outside too."""
        self.overtime_grace_seconds = overtime_grace_seconds
        self.lock = lock or for_database(jobs.database.url, store_root, engine=jobs.engine)
        self.in_progress = CachedProbe(self.lock.held_elsewhere, self.lock.probe_seconds)
        """``sentiment_retrain_in_progress``, read from the lock at scrape time."""

    def _stale_before(self, now: float) -> float | None:
        """Jobs running without a lock holder that started before this time have died (None: all of them)."""
        return None if self.lock.hands_over else now - STARTUP_GRACE_SECONDS

    def reconcile(self) -> None:
        """A retrain process of this host past its maximum run time is killed and its job failed; jobs recorded
        as running while nobody holds the lock died without saying so."""
        end_overtime_jobs(self.jobs, self.max_seconds, self.overtime_grace_seconds)
        if not self.lock.held_elsewhere():
            failed = self.jobs.fail_running_jobs(DIED_UNREPORTED, started_before=self._stale_before(time.time()))
            if failed:
                log.error("retrain_failed", reason="process died", jobs=failed)

    def _not_started(self, now: float | None = None) -> Launch:
        """Why no job was recorded: one is running (or holds the lock: ``now`` None), one is queued (queue
        mode), or the latest one started within the cooldown."""
        latest = self.jobs.recent(limit=5)
        waiting = "queued" if self.mode == "queue" else "running"
        blocking = [j.id for j in latest if j.status == waiting]
        if blocking or not latest or now is None:
            return Launch(f"already_{waiting}", blocking[0] if blocking else None)
        wait = latest[0].started_at + self.cooldown_seconds - now
        return Launch("cooldown", retry_after_seconds=round(max(wait, 0.0), 1))

    def start(
        self, trigger: str, reason: str, alerts: Sequence[str] = (), details: Mapping[str, Any] | None = None
    ) -> Launch:
        """Start a retrain unless one is running or the cooldown has not passed; it claims ``alerts``, and its
        job record starts with ``details`` (what triggered it). In queue mode, record it as queued for a retrain
        worker unless one is queued already or the cooldown has not passed."""
        if self.mode == "queue":
            return self._enqueue(trigger, reason, alerts, details)
        lock = self.lock.fresh()  # concurrent starts (threads of one worker) must not share a hold
        if not (lock.try_acquire() if lock.hands_over else not lock.held_elsewhere()):
            return self._not_started()
        try:
            now = time.time()
            # Nobody else holds the lock: a job still marked running has died (on PostgreSQL, once its
            # process had time to take the lock).
            self.jobs.fail_running_jobs(DIED_UNREPORTED, started_before=self._stale_before(now))
            job_id = self._record(trigger, reason, now, alerts, details, status="running")
            if job_id is None:  # cooling down, or another request recorded the running job first
                return self._not_started(now)
            process = spawn_job(job_id, trigger, self.job_env, lock)
        finally:
            if lock.hands_over:
                lock.release()  # the retrain process holds its inherited copy of the flock
        # Reap the child when it ends (no zombie); a crash before it reported marks the job failed.
        threading.Thread(target=self._reap, args=(process, job_id), daemon=True, name=f"reap-{job_id}").start()
        log.info("retrain_started", job_id=job_id, trigger=trigger, retrain_pid=process.pid)
        return Launch("retrain_started", job_id)

    def _enqueue(
        self, trigger: str, reason: str, alerts: Sequence[str], details: Mapping[str, Any] | None = None
    ) -> Launch:
        """Queue mode: record the job as ``queued``; a retrain worker runs it. Nothing is spawned here."""
        now = time.time()
        job_id = self._record(trigger, reason, now, alerts, details, status="queued")
        if job_id is None:  # cooling down, or another request queued the waiting job first
            return self._not_started(now)
        log.info("retrain_queued", job_id=job_id, trigger=trigger)
        return Launch("queued", job_id)

    def _record(
        self,
        trigger: str,
        reason: str,
        now: float,
        alerts: Sequence[str],
        details: Mapping[str, Any] | None,
        *,
        status: str,
    ) -> str | None:
        """Record a new job in ``status`` unless one started within the cooldown or one in ``status`` exists
        (the database's unique index decides between concurrent requests); its id, or None."""
        job_id = uuid.uuid4().hex
        try:
            created = self.jobs.create_job(
                job_id,
                trigger,
                reason,
                now,
                alerts,
                unless_started_after=now - self.cooldown_seconds,
                status=status,
                details=dict(details or {}),
            )
        except IntegrityError:
            created = False
        return job_id if created else None

    def _reap(self, process: subprocess.Popen[bytes], job_id: str) -> None:
        overdue = threading.Timer(self.max_seconds + self.overtime_grace_seconds, self._overdue, (process, job_id))
        overdue.daemon = True
        overdue.start()
        code = process.wait()
        overdue.cancel()
        with contextlib.suppress(Exception):
            record_unreported_exit(self.jobs, job_id, code)

    def _overdue(self, process: subprocess.Popen[bytes], job_id: str) -> None:
        """The child still runs past its time: kill it (not yet reaped, its pid cannot name another process)."""
        if process.returncode is None:
            with contextlib.suppress(Exception):
                end_overtime(self.jobs, job_id, process.pid, self.max_seconds)
