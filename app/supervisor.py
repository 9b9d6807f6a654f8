"""Runs the service as one unit: gunicorn (the web workers) plus exactly one drift monitor (and, with
``SENTIMENT_RETRAIN_MODE=queue``, one retrain worker, restarted as the monitor is).

``python -m app.supervisor`` (what ``scripts/serve`` execs) starts both as child processes (no monitor when
``SENTIMENT_MONITORING_ENABLED`` is false: nothing is recorded for it to test), restarts the
monitor whenever it exits (with backoff if it keeps failing, counted in ``sentiment_supervised_restarts_total``),
forwards SIGTERM/SIGINT to both for a graceful stop, and exits with gunicorn's status when gunicorn exits.
On Linux it is a child subreaper: a descendant whose parent died first (a retrain whose launching worker was
recycled) becomes its child, and it reaps those too, so none is left a zombie. ``PROMETHEUS_MULTIPROC_DIR``
must be set (and wiped) by the caller before anything imports prometheus_client.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

if __name__ == "__main__":
    # Run as the supervisor process: before structlog, which would import rich.
    from app.process_memory import skip_unused_optional_imports

    skip_unused_optional_imports()

import structlog
from pydantic import ValidationError

from app.logs import configure_logging
from app.monitoring.metrics import MULTIPROC_ENV, SUPERVISED_RESTARTS, retire_process
from app.settings import REPO_ROOT, Settings

log = structlog.get_logger("app.supervisor")

GUNICORN = [sys.executable, "-m", "gunicorn", "-c", "app/gunicorn_conf.py", "app.main:create_app()"]
MONITOR = [sys.executable, "-m", "app.monitoring.monitor"]
RETRAIN_WORKER = [sys.executable, "-m", "app.retrain.worker"]
WORKER_STOP_SECONDS = 60.0  # past the worker's own SENTIMENT_RETRAIN_WORKER_STOP_SECONDS (default 30) to hand back
MAX_BACKOFF_SECONDS = 30.0
MONITOR_STOP_SECONDS = 30.0  # a monitor finishing its check after SIGTERM
MONITOR_MALLOC_TUNABLE = "glibc.malloc.hugetlb=1"
HEALTHY_AFTER_SECONDS = 60.0  # a monitor that ran this long resets the backoff
PR_SET_CHILD_SUBREAPER = 36  # <linux/prctl.h>


def become_subreaper() -> bool:
    """Make orphaned descendants this process's children instead of PID 1's (Linux ``prctl``).

    Without it a retrain whose worker was recycled is reparented to PID 1, which in a container without an
    init (or with this process as PID 1) never reaps it. Returns whether the kernel accepted it.
    """
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        log.warning("subreaper_unavailable", errno=ctypes.get_errno())
        return False
    return True


def monitor_environment(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The drift monitor's environment: ``environ`` with glibc's malloc asked to back its own mappings with
    transparent huge pages (``GLIBC_TUNABLES``; a ``glibc.malloc.hugetlb`` already set there wins).

    The MMD engines make glibc map every block of 1 MB or more on its own and unmap it when freed, which
    keeps the monitor's memory flat (:func:`app.monitoring.mmd.bound_allocator`); alibi-detect then faults in
    fresh 9 MB kernel matrices 200 times a check, 4 KB at a time, which made a check at a window of 500 take
    1.5 s instead of 1.0 s. Huge pages take that back at the same resident size. It is read at process start,
    hence here; other C libraries ignore it.
    """
    tunables = [item for item in environ.get("GLIBC_TUNABLES", "").split(":") if item]
    if not any(item.startswith("glibc.malloc.hugetlb=") for item in tunables):
        tunables.append(MONITOR_MALLOC_TUNABLE)
    return {**environ, "GLIBC_TUNABLES": ":".join(tunables)}


def reap_orphans(managed: Sequence[subprocess.Popen[bytes] | None]) -> list[tuple[int, int]]:
    """Reap every exited child that is not one of ``managed``; return each one's (pid, exit code).

    ``waitpid(-1)`` would also collect a managed child and steal the status its ``Popen`` reports (gunicorn's
    is the service's exit code). So each exited child is first only looked at (``waitid`` with ``WNOWAIT``):
    a managed one is handed to its own ``Popen.poll()``, which collects it and keeps its return code; any
    other is collected here.
    """
    reaped: list[tuple[int, int]] = []
    if not sys.platform.startswith("linux"):  # not a subreaper there: only managed children to collect
        return reaped
    owners = {p.pid: p for p in managed if p is not None and p.returncode is None}
    while True:
        try:
            info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:  # no children at all
            return reaped
        if info is None or info.si_pid == 0:  # children, none exited
            return reaped
        owner = owners.pop(info.si_pid, None)
        if owner is not None:
            if owner.poll() is None:  # its Popen is busy collecting it elsewhere: look again next time
                return reaped
            continue
        try:
            pid, status = os.waitpid(info.si_pid, os.WNOHANG)
        except ChildProcessError:  # collected in between
            continue
        if not pid:  # not collectable after all: never spin on it
            return reaped
        reaped.append((pid, os.waitstatus_to_exitcode(status)))


class RestartedChild:
    """A child process restarted with backoff whenever it exits, counted in ``sentiment_supervised_restarts_total``.

    ``events`` names its log events (spawned, exited): the monitor keeps ``drift_monitor_spawned`` and
    ``drift_monitor_exited``, which operators and alerts know it by.
    """

    def __init__(
        self,
        name: str,
        command: Sequence[str],
        stop_seconds: float,
        events: tuple[str, str] = ("supervised_process_spawned", "supervised_process_exited"),
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.name = name
        self.command = list(command)
        self.env = None if env is None else dict(env)  # None: the supervisor's own environment
        self.stop_seconds = stop_seconds  # how long a stop waits after SIGTERM before SIGKILL
        self.spawned_event, self.exited_event = events
        self.process: subprocess.Popen[bytes] | None = None
        self.started = 0.0
        self.backoff = 1.0
        self.restart_at = 0.0

    def start(self) -> None:
        self.process = subprocess.Popen(self.command, cwd=REPO_ROOT, env=self.env)
        self.started = time.monotonic()
        log.info(self.spawned_event, process=self.name, pid=self.process.pid)

    def watch(self) -> None:
        if self.process is None:
            return
        code = self.process.poll()
        now = time.monotonic()
        if code is None:
            if now - self.started > HEALTHY_AFTER_SECONDS:
                self.backoff = 1.0
            return
        if self.restart_at == 0.0:
            retire_process(self.process.pid)
            log.error(self.exited_event, process=self.name, pid=self.process.pid, code=code, restart_in=self.backoff)
            self.restart_at = now + self.backoff
            self.backoff = min(self.backoff * 2, MAX_BACKOFF_SECONDS)
        elif now >= self.restart_at:
            self.restart_at = 0.0
            SUPERVISED_RESTARTS.labels(process=self.name).inc()
            self.start()

    def signal(self, signum: int) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signum)

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=self.stop_seconds)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class Supervisor:
    def __init__(
        self,
        gunicorn: Sequence[str] = GUNICORN,
        monitor: Sequence[str] | None = MONITOR,
        *,
        retrain_worker: Sequence[str] | None = None,
    ) -> None:
        # None: no drift monitor (monitoring off) / no retrain worker (SENTIMENT_RETRAIN_MODE=spawn: a web
        # worker starts each retrain itself)
        self.children: list[RestartedChild] = []
        if monitor is not None:
            events = ("drift_monitor_spawned", "drift_monitor_exited")
            self.children.append(
                RestartedChild("monitor", monitor, MONITOR_STOP_SECONDS, events, env=monitor_environment())
            )
        if retrain_worker is not None:
            self.children.append(RestartedChild("retrain_worker", retrain_worker, WORKER_STOP_SECONDS))
        self.gunicorn_command = list(gunicorn)
        self.stopping = False
        self.gunicorn: subprocess.Popen[bytes] | None = None

    def signal(self, signum: int, _frame: Any) -> None:
        self.stopping = True
        forwarded = signal.SIGTERM if signum != signal.SIGINT else signal.SIGINT
        if self.gunicorn is not None and self.gunicorn.poll() is None:
            self.gunicorn.send_signal(forwarded)
        for child in self.children:
            child.signal(forwarded)

    def reap(self) -> None:
        """Collect orphans that died (their metric files are retired, as for a dead worker)."""
        for pid, code in reap_orphans([self.gunicorn, *(child.process for child in self.children)]):
            retire_process(pid)
            log.info("orphan_reaped", orphan_pid=pid, code=code)

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self.signal)
        signal.signal(signal.SIGINT, self.signal)
        become_subreaper()
        self.gunicorn = subprocess.Popen(self.gunicorn_command, cwd=REPO_ROOT)
        for child in self.children:
            child.start()
        while self.gunicorn.poll() is None:
            if not self.stopping:
                for child in self.children:
                    child.watch()
            self.reap()
            time.sleep(0.2)
        for child in self.children:
            child.stop()
        self.reap()
        log.info("service_stopped", gunicorn_code=self.gunicorn.returncode)
        return self.gunicorn.returncode


def main() -> int:
    try:
        settings = Settings()
    except ValidationError as exc:
        # Refuse to start on a bad value, once, rather than start children that would crash-loop on it.
        configure_logging("info")
        log.error("settings_invalid", errors=exc.errors(include_url=False, include_input=False))
        return 2
    configure_logging(settings.log_level)
    metrics_dir = os.environ.get(MULTIPROC_ENV)
    if not metrics_dir or not Path(metrics_dir).is_dir():
        log.error("metrics_dir_missing", hint=f"set {MULTIPROC_ENV} to an empty directory (scripts/serve does)")
        return 2
    worker = RETRAIN_WORKER if settings.retrain_mode == "queue" else None
    if not settings.monitoring_enabled:
        log.info("drift_monitor_disabled", reason="SENTIMENT_MONITORING_ENABLED is false")
        return Supervisor(monitor=None, retrain_worker=worker).run()
    return Supervisor(retrain_worker=worker).run()


if __name__ == "__main__":
    sys.exit(main())
