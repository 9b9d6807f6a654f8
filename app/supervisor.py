"""Runs the service as one unit: gunicorn (the web workers) plus exactly one drift monitor.

``python -m app.supervisor`` (what ``scripts/serve`` execs) starts both as child processes, restarts the
monitor whenever it exits (with backoff if it keeps failing), forwards SIGTERM/SIGINT to both for a
graceful stop, and exits with gunicorn's status when gunicorn exits. ``PROMETHEUS_MULTIPROC_DIR`` must be
set (and wiped) by the caller before anything imports prometheus_client.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import structlog

from app.logs import configure_logging
from app.monitoring.metrics import MULTIPROC_ENV, mark_process_dead
from app.settings import REPO_ROOT, Settings

log = structlog.get_logger("app.supervisor")

GUNICORN = [sys.executable, "-m", "gunicorn", "-c", "app/gunicorn_conf.py", "app.main:create_app()"]
MONITOR = [sys.executable, "-m", "app.monitoring.monitor"]
MAX_BACKOFF_SECONDS = 30.0
HEALTHY_AFTER_SECONDS = 60.0  # a monitor that ran this long resets the backoff


class Supervisor:
    def __init__(self) -> None:
        self.stopping = False
        self.gunicorn: subprocess.Popen[bytes] | None = None
        self.monitor: subprocess.Popen[bytes] | None = None
        self.monitor_started = 0.0
        self.backoff = 1.0
        self.restart_at = 0.0

    def start_monitor(self) -> None:
        self.monitor = subprocess.Popen(MONITOR, cwd=REPO_ROOT)
        self.monitor_started = time.monotonic()
        log.info("drift_monitor_spawned", monitor_pid=self.monitor.pid)

    def signal(self, signum: int, _frame: Any) -> None:
        self.stopping = True
        for child in (self.gunicorn, self.monitor):
            if child is not None and child.poll() is None:
                child.send_signal(signal.SIGTERM if signum != signal.SIGINT else signal.SIGINT)

    def watch_monitor(self) -> None:
        assert self.monitor is not None
        code = self.monitor.poll()
        now = time.monotonic()
        if code is None:
            if now - self.monitor_started > HEALTHY_AFTER_SECONDS:
                self.backoff = 1.0
            return
        if self.restart_at == 0.0:
            mark_process_dead(self.monitor.pid)
            log.error("drift_monitor_exited", monitor_pid=self.monitor.pid, code=code, restart_in=self.backoff)
            self.restart_at = now + self.backoff
            self.backoff = min(self.backoff * 2, MAX_BACKOFF_SECONDS)
        elif now >= self.restart_at:
            self.restart_at = 0.0
            self.start_monitor()

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self.signal)
        signal.signal(signal.SIGINT, self.signal)
        self.gunicorn = subprocess.Popen(GUNICORN, cwd=REPO_ROOT)
        self.start_monitor()
        while self.gunicorn.poll() is None:
            if not self.stopping:
                self.watch_monitor()
            time.sleep(0.2)
        assert self.monitor is not None
        if self.monitor.poll() is None:
            self.monitor.send_signal(signal.SIGTERM)
        try:
            self.monitor.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.monitor.kill()
            self.monitor.wait()
        log.info("service_stopped", gunicorn_code=self.gunicorn.returncode)
        return self.gunicorn.returncode


def main() -> int:
    settings = Settings()
    configure_logging(settings.log_level)
    metrics_dir = os.environ.get(MULTIPROC_ENV)
    if not metrics_dir or not Path(metrics_dir).is_dir():
        log.error("metrics_dir_missing", hint=f"set {MULTIPROC_ENV} to an empty directory (scripts/serve does)")
        return 2
    return Supervisor().run()


if __name__ == "__main__":
    sys.exit(main())
