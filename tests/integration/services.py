"""Start and stop the real service: gunicorn with its config file, on a free loopback port.

Shared by the integration tests and the benchmarks in ``bench/``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import httpx

from app.migrations import upgrade
from app.ml.registry import SIGNATURE, ModelRegistry, ModelVersion
from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[2]
FEEDBACK_TOKEN = "integration-feedback-token"
"""The feedback token a started service accepts (named ``default``) unless the test gives its own."""
FEEDBACK = {"Authorization": f"Bearer {FEEDBACK_TOKEN}"}


@dataclass
class Service:
    """A running gunicorn: its URL, process, and the JSON lines it logged so far."""

    url: str
    process: subprocess.Popen[bytes]
    log_path: Path
    env: dict[str, str] = field(repr=False)
    log_handle: BinaryIO | None = field(default=None, repr=False)
    supervised: bool = False

    def logs(self) -> list[dict[str, object]]:
        lines = []
        for raw in self.log_path.read_text(errors="replace").splitlines():
            try:
                lines.append(json.loads(raw))
            except ValueError:
                continue
        return lines

    def descendants(self) -> dict[int, tuple[int, str]]:
        """Every live process below ours: pid -> (parent pid, command line)."""
        table: dict[int, tuple[int, str]] = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    stat = (entry / "stat").read_text()
                    cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                except OSError:
                    continue
                table[int(entry.name)] = (int(stat.rsplit(")", 1)[1].split()[1]), cmdline)
        found: dict[int, tuple[int, str]] = {}
        frontier = [self.process.pid]
        while frontier:
            parent = frontier.pop()
            for pid, (ppid, cmd) in table.items():
                if ppid == parent and pid not in found:
                    found[pid] = (ppid, cmd)
                    frontier.append(pid)
        return found

    def worker_pids(self) -> list[int]:
        """Pids of the gunicorn workers: the children of the gunicorn master."""
        tree = self.descendants()
        if self.supervised:
            masters = [pid for pid, (ppid, cmd) in tree.items() if ppid == self.process.pid and "gunicorn" in cmd]
        else:
            masters = [self.process.pid]
        return sorted(pid for pid, (ppid, _) in tree.items() if ppid in masters)

    def serving(self, workers: int) -> bool:
        """It answers /readyz and each of its ``workers`` live workers has loaded a model (logged
        ``model_swapped``): a replaced worker counts only once it has."""
        try:
            if httpx.get(f"{self.url}/readyz", timeout=2).status_code != 200:
                return False
        except httpx.HTTPError:
            return False
        swapped = {e["pid"] for e in self.logs() if e.get("event") == "model_swapped"}
        pids = self.worker_pids()
        return len(pids) == workers and set(pids) <= swapped

    def monitor_pid(self) -> int | None:
        monitors = [pid for pid, (_, cmd) in self.descendants().items() if "app.monitoring.monitor" in cmd]
        return monitors[0] if monitors else None

    def stop(self, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        finally:
            if self.log_handle is not None:
                self.log_handle.close()


T = TypeVar("T")


def wait_for(condition: Callable[[], T], timeout: float = 30.0, every: float = 0.5) -> T:
    """Call ``condition`` every ``every`` s until it returns something truthy or ``timeout`` s have
    passed; return its last result."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := condition():
            return result
        time.sleep(every)
    return condition()


def start_service(
    store: ModelRegistry | None,
    log_path: Path,
    workers: int = 2,
    app: str = "app.main:create_app()",
    supervised: bool = False,
    *,
    upgrade_database: bool = True,
    command_prefix: Sequence[str] = (),
    **env: str,
) -> Service:
    """Start gunicorn serving ``app`` and return once every worker is ready (loaded its model).

    ``supervised`` runs the whole service as ``scripts/serve`` does: ``app.supervisor`` with gunicorn and
    the drift monitor. Metrics and the prediction log go to fresh folders beside ``log_path``; the log is
    migrated to head first (``db upgrade``, as ``scripts/serve`` does) unless ``upgrade_database`` is false.
    ``command_prefix`` runs the command under another (e.g. :func:`file_modes_enforced`).
    """
    port = free_port()
    metrics_dir = log_path.parent / f"metrics-{port}"
    metrics_dir.mkdir()
    environment = {
        **os.environ,
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
        "SENTIMENT_STATE_DIR": str(log_path.parent / f"var-{port}"),
        "SENTIMENT_PORT": str(port),
        "SENTIMENT_WORKERS": str(workers),
        "SENTIMENT_RELOAD_INTERVAL_SECONDS": "0.5",
        "PYTHONUNBUFFERED": "1",
        **env,
    }
    if store is not None:
        environment["SENTIMENT_MODEL_STORE"] = str(store.root)
    if not {"SENTIMENT_WEBHOOK_TOKEN", "SENTIMENT_WEBHOOK_TOKEN_FILE"} & env.keys():
        environment["SENTIMENT_WEBHOOK_TOKEN"] = "integration-webhook-token"  # the service needs one to start
    if not {"SENTIMENT_FEEDBACK_TOKEN", "SENTIMENT_FEEDBACK_TOKEN_FILE"} & env.keys():
        environment["SENTIMENT_FEEDBACK_TOKEN"] = FEEDBACK_TOKEN  # without one, feedback answers 401
    if upgrade_database:
        upgrade(
            environment.get("SENTIMENT_DATABASE_URL")
            or f"sqlite:///{environment['SENTIMENT_STATE_DIR']}/predictions.db"
        )
    handle = log_path.open("wb")
    command = (
        [sys.executable, "-m", "app.supervisor"]
        if supervised
        else [sys.executable, "-m", "gunicorn", "-c", "app/gunicorn_conf.py", app]
    )
    process = subprocess.Popen(
        [*command_prefix, *command],
        cwd=REPO,
        env=environment,
        stdout=handle,
        stderr=subprocess.STDOUT,
    )
    service = Service(f"http://127.0.0.1:{port}", process, log_path, environment, handle, supervised)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            handle.close()
            raise RuntimeError(f"gunicorn exited with {process.returncode}: {log_path.read_text()[-2000:]}")
        try:
            if store is None:
                booted = [e for e in service.logs() if str(e.get("event", "")).startswith("Application startup")]
                if len(booted) >= workers:
                    return service
            elif httpx.get(f"{service.url}/readyz", timeout=1).status_code == 200:
                # Every worker must have loaded the model, not only the first to answer.
                swapped = [e for e in service.logs() if e.get("event") == "model_swapped"]
                if len({e["pid"] for e in swapped}) >= workers:
                    return service
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    service.stop()
    raise RuntimeError(f"gunicorn did not become ready: {log_path.read_text()[-2000:]}")


OVERRIDING_CAPABILITIES = ("dac_override", "dac_read_search", "fowner", "chown", "linux_immutable")
"""The capabilities by which root ignores file modes (and could change them)."""
CAP_DAC_OVERRIDE = 1  # <linux/capability.h>


def file_modes_enforced() -> list[str] | None:
    """A command prefix under which file modes bind the command even when run as root: ``setpriv`` drops
    :data:`OVERRIDING_CAPABILITIES` from its bounding set (the command stays uid 0, so it still reads and
    writes what root owns with write permission, but not a file or folder without it). Nothing for another
    user; None when root cannot drop them here."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return None
    prefix = [setpriv, "--bounding-set", ",".join(f"-{cap}" for cap in OVERRIDING_CAPABILITIES), "--"]
    probe = subprocess.run([*prefix, "true"], capture_output=True, check=False)
    return prefix if probe.returncode == 0 else None


def overrides_file_modes(pid: int) -> bool:
    """Whether process ``pid`` has CAP_DAC_OVERRIDE in its effective set (root's, unless dropped)."""
    status = Path(f"/proc/{pid}/status").read_text()
    effective = next(line.split()[1] for line in status.splitlines() if line.startswith("CapEff:"))
    return bool(int(effective, 16) >> CAP_DAC_OVERRIDE & 1)


@dataclass
class Daemon:
    """A Prometheus or Alertmanager process on a loopback port, with its own data folder."""

    url: str
    process: subprocess.Popen[bytes]
    log_handle: BinaryIO

    def get(self, path: str, **params: str) -> dict[str, object]:
        response = httpx.get(f"{self.url}{path}", params=params, timeout=10)
        response.raise_for_status()
        return response.json()  # type: ignore[no-any-return]

    def wait_for_scrapes(self, since: float, count: int = 2, timeout: float = 60) -> None:
        """Wait until every target has been scraped successfully ``count`` times after ``since`` (a Unix time).

        ``rate()`` over a short window needs two fresh samples; on a loaded machine Prometheus can fall
        behind its 1 s interval for long enough that a fixed sleep is not enough.
        """
        deadline = time.monotonic() + timeout
        while True:
            targets = self.get("/api/v1/targets")["data"]["activeTargets"]  # type: ignore[index]
            fresh = all(t["health"] == "up" and _scraped_at(t) > since for t in targets)
            if targets and fresh:
                count -= 1
                if count == 0:
                    return
                since = max(_scraped_at(t) for t in targets)
            if time.monotonic() > deadline:
                raise TimeoutError(f"Prometheus did not scrape every target {count} more times: {targets}")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log_handle.close()


def _start_daemon(command: list[str], port: int, log_path: Path) -> Daemon:
    handle = log_path.open("wb")
    process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT)
    daemon = Daemon(f"http://127.0.0.1:{port}", process, handle)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            handle.close()
            raise RuntimeError(f"{command[0]} exited: {log_path.read_text()[-2000:]}")
        try:
            if httpx.get(f"{daemon.url}/-/ready", timeout=1).status_code == 200:
                return daemon
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    daemon.stop()
    raise RuntimeError(f"{command[0]} did not become ready: {log_path.read_text()[-2000:]}")


def start_prometheus(config: Path, workdir: Path) -> Daemon:
    port = free_port()
    return _start_daemon(
        [
            "prometheus",
            f"--config.file={config}",
            f"--storage.tsdb.path={workdir / 'prometheus-data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--web.enable-lifecycle",
        ],
        port,
        workdir / "prometheus.log",
    )


def start_alertmanager(config: Path, workdir: Path) -> Daemon:
    port = free_port()
    return _start_daemon(
        [
            "prometheus-alertmanager",
            f"--config.file={config}",
            f"--storage.path={workdir / 'alertmanager-data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--cluster.listen-address=",
        ],
        port,
        workdir / "alertmanager.log",
    )


def _scraped_at(target: dict[str, Any]) -> float:
    """A Prometheus target's ``lastScrape`` (RFC 3339 with nanoseconds) as a Unix time."""
    stamp = re.sub(r"(\.\d{6})\d*", r"\1", target["lastScrape"]).replace("Z", "+00:00")
    return datetime.fromisoformat(stamp).timestamp()


def register_copy(target: ModelRegistry, source: ModelVersion) -> str:
    """Register ``source``, a version of a folder store, as a new version of ``target`` (its artifacts and
    card, under a new name, unsigned by ``source``'s key); returns the new version's name."""
    assert source.path is not None
    card = {k: v for k, v in source.metadata.items() if k not in {"version", "stage", "created_at", "artifacts"}}
    card.pop(SIGNATURE, None)
    files = {
        artifact: (lambda path, src=source.path / artifact: shutil.copyfile(src, path))
        for artifact in source.metadata["artifacts"]
    }
    return target.register(files, card).version
