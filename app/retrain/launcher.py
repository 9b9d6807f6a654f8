"""Starts at most one retrain at a time, in its own process, and never within the cooldown.

The guard is an exclusive ``flock`` on ``<model_store>/.retrain.lock``. The launcher takes it without
waiting, checks the cooldown (``.retrain-state.json`` beside it), records the job and starts
``python -m app.retrain.job`` with the locked file descriptor inherited. The launcher then closes its own
copy: from that moment the retrain process alone holds the lock, and the kernel frees it when that
process ends, however it ends. Every worker of every service instance sharing the model store goes
through the same lock, so concurrent alerts start exactly one retrain.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog

from app.monitoring.prediction_log import PredictionLog
from app.settings import REPO_ROOT

log = structlog.get_logger(__name__)

LOCK_FILE = ".retrain.lock"
STATE_FILE = ".retrain-state.json"
LOCK_FD_ENV = "SENTIMENT_RETRAIN_LOCK_FD"
DIED_UNREPORTED = "the retrain process ended without reporting (killed?)"
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
    """What a request to retrain did: ``retrain_started``, ``already_running`` or ``cooldown``."""

    action: str
    job_id: str | None = None
    retry_after_seconds: float | None = None


def retrain_running(store_root: Path) -> bool:
    """True while some process holds the retrain lock."""
    path = store_root / LOCK_FILE
    if not path.exists():
        return False
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops the probe's own lock, if it got one
    return False


def try_lock(store_root: Path) -> int | None:
    """The retrain lock, taken without waiting: its locked descriptor, or None while another process holds it."""
    store_root.mkdir(parents=True, exist_ok=True)
    fd = os.open(store_root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


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


class RetrainLauncher:
    def __init__(
        self,
        store_root: Path,
        predictions: PredictionLog,
        cooldown_seconds: float,
        job_env: dict[str, str] | None = None,
    ) -> None:
        self.store_root = store_root
        self.predictions = predictions  # the prediction database also holds the retrain jobs
        self.cooldown_seconds = cooldown_seconds
        # The service's settings (``Settings.as_env()``), so the job reads the same model store and prediction
        # database; only the allow-listed ones reach it (``job_environment``).
        self.job_env = job_env or {}

    def _last_started(self) -> float:
        try:
            return float(json.loads((self.store_root / STATE_FILE).read_text())["last_started_at"])
        except (OSError, ValueError, KeyError):
            return 0.0

    def reconcile(self) -> None:
        """Jobs recorded as running while nobody holds the lock died without saying so."""
        if not retrain_running(self.store_root):
            failed = self.predictions.fail_running_jobs(DIED_UNREPORTED)
            if failed:
                log.error("retrain_failed", reason="process died", jobs=failed)

    def start(self, trigger: str, reason: str, alerts: Sequence[str] = ()) -> Launch:
        """Start a retrain unless one is running or the cooldown has not passed; it claims ``alerts``."""
        fd = try_lock(self.store_root)
        if fd is None:
            running = [j["id"] for j in self.predictions.jobs(limit=5) if j["status"] == "running"]
            return Launch("already_running", running[0] if running else None)
        try:
            # Holding the lock: no retrain runs, so any job still marked running has died.
            self.predictions.fail_running_jobs(DIED_UNREPORTED)
            now = time.time()
            wait = self._last_started() + self.cooldown_seconds - now
            if wait > 0:
                return Launch("cooldown", retry_after_seconds=round(wait, 1))
            job_id = uuid.uuid4().hex
            self.predictions.create_job(job_id, trigger, reason, now, alerts)
            state = self.store_root / STATE_FILE
            tmp = state.with_suffix(".tmp")
            tmp.write_text(json.dumps({"last_started_at": now, "job_id": job_id}))
            tmp.replace(state)
            process = subprocess.Popen(
                [*idle_priority(), sys.executable, "-m", "app.retrain.job", job_id, "--trigger", trigger],
                cwd=REPO_ROOT,
                env={**job_environment(self.job_env, os.environ), **SINGLE_THREADED, LOCK_FD_ENV: str(fd)},
                pass_fds=(fd,),
                start_new_session=True,  # a worker's SIGTERM or restart does not take the retrain down
            )
        finally:
            os.close(fd)
        # Reap the child when it ends (no zombie); a crash before it reported marks the job failed.
        threading.Thread(target=self._reap, args=(process, job_id), daemon=True, name=f"reap-{job_id}").start()
        log.info("retrain_started", job_id=job_id, trigger=trigger, retrain_pid=process.pid)
        return Launch("retrain_started", job_id)

    def _reap(self, process: subprocess.Popen[bytes], job_id: str) -> None:
        code = process.wait()
        if code != 0:
            with contextlib.suppress(Exception):
                jobs = self.predictions.jobs(job_id=job_id)
                if jobs and jobs[0]["status"] == "running":
                    self.predictions.finish_job(job_id, "failed", "failed", {"error": f"retrain process exited {code}"})
                    log.error("retrain_failed", job_id=job_id, exit_code=code)
