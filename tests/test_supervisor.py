"""The supervisor with real processes: it restarts and counts the monitor, reaps orphaned grandchildren
without stealing its own children's exit codes, and refuses to start on an unsafe setting."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector
from pydantic import ValidationError

from app.monitoring.metrics import MULTIPROC_ENV
from app.settings import Settings
from app.supervisor import monitor_environment

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable

# A stand-in for gunicorn: a "worker" starts a "retrain" and exits before it (a recycled worker); the retrain
# writes its parent's pid once orphaned, then exits 5. The "master" lives on for 4 s and exits 7.
ORPHAN = "import os, sys, time; time.sleep(0.5); open(sys.argv[1], 'w').write(str(os.getppid())); sys.exit(5)"
WORKER = f"import subprocess, sys; p = subprocess.Popen([sys.executable, '-c', {ORPHAN!r}, sys.argv[1]]); print(p.pid)"
MASTER = (
    "import subprocess, sys, time\n"
    f"out = subprocess.run([sys.executable, '-c', {WORKER!r}, sys.argv[1]], capture_output=True, text=True).stdout\n"
    "open(sys.argv[2], 'w').write(out.strip())\n"
    "time.sleep(4)\n"
    "sys.exit(7)\n"
)
RUN = (
    "import json, sys\n"
    "from app.logs import configure_logging\n"
    "from app.supervisor import Supervisor\n"
    "configure_logging('info')\n"
    "sys.exit(Supervisor(json.loads(sys.argv[1]), json.loads(sys.argv[2])).run())\n"
)


def events(output: str) -> list[dict[str, Any]]:
    lines = []
    for raw in output.splitlines():
        try:
            lines.append(json.loads(raw))
        except ValueError:
            continue
    return lines


def test_orphans_are_reaped_the_monitor_restarted_and_counted_and_exit_codes_kept(tmp_path: Path) -> None:
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    parent_file, orphan_file = tmp_path / "orphan_parent", tmp_path / "orphan_pid"
    gunicorn = [PY, "-c", MASTER, str(parent_file), str(orphan_file)]
    monitor = [PY, "-c", "import sys; sys.exit(3)"]  # a monitor that dies at once, every time
    result = subprocess.run(
        [PY, "-c", RUN, json.dumps(gunicorn), json.dumps(monitor)],
        cwd=REPO,
        env={**os.environ, MULTIPROC_ENV: str(metrics_dir)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    logs = events(result.stdout)
    assert result.returncode == 7, result.stdout + result.stderr  # gunicorn's status, not taken by the reaper
    (stopped,) = [e for e in logs if e["event"] == "service_stopped"]
    supervisor_pid = stopped["pid"]

    # The orphan was reparented to the supervisor (a subreaper), which collected it with its own exit code.
    orphan = int(orphan_file.read_text())
    assert int(parent_file.read_text()) == supervisor_pid
    assert {"orphan_pid": orphan, "code": 5} in [
        {"orphan_pid": e["orphan_pid"], "code": e["code"]} for e in logs if e["event"] == "orphan_reaped"
    ]
    assert not Path(f"/proc/{orphan}").exists()

    # Every monitor exit was seen with the monitor's own code, and each restart is counted.
    exits = [e for e in logs if e["event"] == "drift_monitor_exited"]
    assert exits and all(e["code"] == 3 for e in exits)
    spawned = [e for e in logs if e["event"] == "drift_monitor_spawned"]
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(metrics_dir))  # type: ignore[no-untyped-call]
    restarts = {
        s.labels["process"]: s.value
        for family in registry.collect()
        for s in family.samples
        if s.name == "sentiment_supervised_restarts_total"
    }
    assert restarts == {"monitor": len(spawned) - 1} and len(spawned) >= 2


def test_a_drift_window_above_the_maximum_is_refused_at_start(tmp_path: Path) -> None:
    """A window the monitor could not hold in memory stops the service at once instead of crash-looping it."""
    assert Settings(drift_window_size=10_000).drift_window_size == 10_000
    with pytest.raises(ValidationError, match="drift_window_size"):
        Settings(drift_window_size=10_001)
    result = subprocess.run(
        [PY, "-m", "app.supervisor"],
        cwd=REPO,
        env={**os.environ, MULTIPROC_ENV: str(tmp_path), "SENTIMENT_DRIFT_WINDOW_SIZE": "20000"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    (refused,) = [e for e in events(result.stdout) if e["event"] == "settings_invalid"]
    assert [error["loc"] for error in refused["errors"]] == [["drift_window_size"]]
    assert "drift_monitor_spawned" not in result.stdout


def test_with_monitoring_off_no_drift_monitor_runs(tmp_path: Path) -> None:
    """SENTIMENT_MONITORING_ENABLED=false: the supervisor runs gunicorn alone (nothing is recorded to test)."""
    gunicorn = [PY, "-c", "import time, sys; time.sleep(1); sys.exit(0)"]
    run_main = (
        "import sys\n"
        "import app.supervisor as s\n"
        f"s.GUNICORN = {gunicorn!r}\n"
        "s.Supervisor.__init__.__defaults__ = (s.GUNICORN, s.MONITOR)\n"
        "sys.exit(s.main())\n"
    )
    result = subprocess.run(
        [PY, "-c", run_main],
        cwd=REPO,
        env={**os.environ, MULTIPROC_ENV: str(tmp_path), "SENTIMENT_MONITORING_ENABLED": "false"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    logged = [e["event"] for e in events(result.stdout)]
    assert "drift_monitor_disabled" in logged
    assert "drift_monitor_spawned" not in logged
    assert "service_stopped" in logged


def test_the_monitor_asks_glibc_for_huge_pages_unless_told_otherwise() -> None:
    """The monitor's environment adds glibc.malloc.hugetlb=1 to the other tunables; a value already set wins."""
    assert monitor_environment({"A": "1"}) == {"A": "1", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    tunables = monitor_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})["GLIBC_TUNABLES"]
    assert tunables == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    kept = monitor_environment({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})
    assert kept["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=0"
