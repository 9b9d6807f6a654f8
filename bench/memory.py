"""Memory of the running service's processes: the web workers under hostile input, and the drift monitor with
each MMD engine.

- ``workers``: 320 ``POST /v1/predict/batch`` requests of 250 distinct random 3,900-character single-token
  texts (each text one "word" no vocabulary holds, the worst case for per-token caches and for the prediction
  log's write-behind buffer) against gunicorn with two workers, as ``scripts/serve`` runs it; the resident
  memory (``VmRSS``) of every web worker before, at its peak during (sampled twice a second) and after.
  Goal: every worker <= 300 MB.
- ``monitor``: for each engine of :data:`app.monitoring.mmd.ENGINES` (``SENTIMENT_DRIFT_BACKEND``), the whole
  service as ``scripts/serve`` runs it (``app.supervisor``: gunicorn and the drift monitor, default settings
  but the engine), fed Rotten Tomatoes texts in batches of ``SENTIMENT_DRIFT_CHECK_EVERY_PREDICTIONS`` until
  the monitor has run :data:`MONITOR_CHECKS` checks of a full window (the default
  ``SENTIMENT_DRIFT_WINDOW_SIZE``); the monitor's ``VmRSS`` once its detector is built and after the checks,
  and its ``VmHWM`` (peak). Goal: <= 500 MB with every engine.

Usage: ``.venv/bin/python -m bench.memory [--part all|workers|monitor] [--store PATH] [--output
bench/results/memory.json]``. Uses the current model of ``--store`` (default: the configured model store), or
trains the default model into a temporary store when it has none. Prints a table and writes the JSON result;
a part not run keeps its previous result in the file. The load average is recorded with each part (other
processes on the machine share its cores).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import string
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import httpx

from app.ml.data import load_rotten_tomatoes
from app.ml.registry import ModelRegistry
from app.ml.train import train_and_register
from app.monitoring.mmd import ENGINES
from app.settings import Settings
from bench.output import RESULTS
from bench.serving import rss_mb
from tests.integration.services import Service, start_service, wait_for

REQUESTS = 320
TEXTS_PER_REQUEST = 250
TEXT_CHARS = 3900
CLIENTS = 4
GOAL_MB = 300.0
MONITOR_CHECKS = 10
MONITOR_GOAL_MB = 500.0
CHECK_EVENTS = {"drift_checked", "drift_detected"}


def random_texts(rng: random.Random, n: int) -> list[str]:
    """``n`` distinct single-token texts: lower-case letters and digits only, so the tokenizer keeps each whole."""
    alphabet = string.ascii_lowercase + string.digits
    return ["".join(rng.choices(alphabet, k=TEXT_CHARS)) for _ in range(n)]


def memory_mb(pid: int) -> dict[str, float]:
    """``VmRSS`` (resident now) and ``VmHWM`` (peak resident) of ``pid``, in MB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return {name: round(int(fields[name].split()[0]) / 1024, 1) for name in ("VmRSS", "VmHWM")}


def maps_torch(pid: int) -> bool:
    """Whether ``pid`` has torch's shared library mapped (imported torch)."""
    return "libtorch_cpu" in Path(f"/proc/{pid}/maps").read_text()


def load_average() -> list[float]:
    return [round(load, 2) for load in os.getloadavg()]


class RssSampler:
    """Samples every web worker's RSS twice a second: the peak of each pid, whichever workers come and go."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.peak: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> dict[int, float]:
        now = {}
        for pid in self.service.worker_pids():
            with contextlib.suppress(OSError):
                now[pid] = round(rss_mb(pid), 1)
        for pid, mb in now.items():
            self.peak[pid] = max(mb, self.peak.get(pid, 0.0))
        return now

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            self.sample()

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def run_workers(store: ModelRegistry, workdir: Path) -> dict[str, Any]:
    # A 250-text request of these texts takes a worker seconds of CPU: on a busy machine gunicorn's 30 s
    # heartbeat timeout could recycle a worker mid-run, which would hide exactly the growth measured here.
    service = start_service(store, workdir / "service.log", SENTIMENT_WORKER_TIMEOUT_SECONDS="600")
    load_before = load_average()
    try:
        sampler = RssSampler(service)
        before = sampler.sample()
        rng = random.Random(0)
        seeds = [rng.random() for _ in range(REQUESTS)]
        started = time.perf_counter()

        def one(i: int) -> str:
            texts = random_texts(random.Random(seeds[i]), TEXTS_PER_REQUEST)
            try:
                response = httpx.post(f"{service.url}/v1/predict/batch", json={"texts": texts}, timeout=300)
            except httpx.HTTPError as exc:
                return type(exc).__name__
            return str(response.status_code)

        with sampler, ThreadPoolExecutor(CLIENTS) as pool:
            statuses = list(pool.map(one, range(REQUESTS)))
        elapsed = time.perf_counter() - started
        time.sleep(2)  # a few flush intervals: the write-behind buffers drain
        after = sampler.sample()
    finally:
        service.stop()
    served_by: dict[str, int] = {}
    logs = service.logs()
    for entry in logs:
        if entry.get("event") == "request" and entry.get("route") == "/v1/predict/batch":
            served_by[str(entry["pid"])] = served_by.get(str(entry["pid"]), 0) + 1
    problems = [e for e in logs if e.get("level") in {"warning", "error", "critical"}]
    worst = max(sampler.peak.values())
    return {
        "load": f"{REQUESTS} x POST /v1/predict/batch, {TEXTS_PER_REQUEST} distinct random {TEXT_CHARS}-char "
        f"single-token texts each, {CLIENTS} clients, 2 workers",
        "load_average_before_after": [load_before, load_average()],
        "seconds": round(elapsed, 1),
        "status_codes": {code: statuses.count(code) for code in sorted(set(statuses))},
        "requests_per_worker": served_by,
        "worker_rss_mb_before": {str(pid): mb for pid, mb in before.items()},
        "worker_rss_mb_after": {str(pid): mb for pid, mb in after.items()},
        "worker_rss_mb_peak": {str(pid): mb for pid, mb in sampler.peak.items()},
        "workers_replaced": sorted(str(pid) for pid in set(before) - set(after)),
        "warnings_and_errors": problems[:20],
        "goal_mb": GOAL_MB,
        "max_worker_rss_mb": worst,
        "goal_met": worst <= GOAL_MB,
    }


def full_checks(service: Service, window: int) -> list[dict[str, object]]:
    """The monitor's logged checks of a full window so far."""
    return [e for e in service.logs() if e.get("event") in CHECK_EVENTS and e.get("window_size") == window]


def checked_more_than(service: Service, window: int, n: int) -> bool:
    return len(full_checks(service, window)) > n


def run_monitor(store: ModelRegistry, workdir: Path, engine: str, texts: list[str]) -> dict[str, Any]:
    """The drift monitor of the supervised service with ``engine``: its memory once its detector is built and
    after :data:`MONITOR_CHECKS` checks of a full window."""
    defaults = Settings.model_fields
    window = int(defaults["drift_window_size"].default)
    batch = int(defaults["drift_check_every_predictions"].default)
    service = start_service(store, workdir / f"monitor-{engine}.log", supervised=True, SENTIMENT_DRIFT_BACKEND=engine)
    load_before = load_average()
    sent = 0

    def send(n: int) -> None:
        nonlocal sent
        chunk = [texts[(sent + i) % len(texts)] for i in range(n)]
        response = httpx.post(f"{service.url}/v1/predict/batch", json={"texts": chunk}, timeout=60)
        response.raise_for_status()
        sent += n

    try:
        loaded = wait_for(lambda: [e for e in service.logs() if e.get("event") == "drift_reference_loaded"], 300)
        if not loaded:
            raise RuntimeError(f"the {engine} monitor built no detector: {service.log_path}")
        pid = service.monitor_pid()
        assert pid is not None
        time.sleep(2)  # its first check (of an empty window) is logged just after
        built = memory_mb(pid)
        started = time.perf_counter()
        while sent < window - batch:
            send(batch)
        for done in range(MONITOR_CHECKS):
            send(batch)  # one check per batch of new predictions, once the window is full
            if not wait_for(partial(checked_more_than, service, window, done), 300):
                problems = [e for e in service.logs() if e.get("level") in {"warning", "error", "critical"}]
                raise RuntimeError(f"the {engine} monitor did not run check {done + 1}: {problems[-5:]}")
        elapsed = time.perf_counter() - started
        time.sleep(1)
        after = memory_mb(pid)
        torch_loaded = maps_torch(pid)
        if service.monitor_pid() != pid:
            raise RuntimeError(f"the {engine} monitor was restarted during the run: {service.log_path}")
    finally:
        service.stop()
    checks = full_checks(service, window)
    return {
        "monitor_rss_mb_detector_built": built["VmRSS"],
        "monitor_rss_mb_after_checks": after["VmRSS"],
        "monitor_peak_rss_mb": after["VmHWM"],
        "checks": len(checks),
        "predictions_sent": sent,
        "seconds": round(elapsed, 1),
        "statuses": sorted({str(e.get("status")) for e in checks}),
        "torch_loaded": torch_loaded,
        "load_average_before_after": [load_before, load_average()],
        "goal_met": max(after["VmRSS"], after["VmHWM"]) <= MONITOR_GOAL_MB,
    }


def run_monitors(store: ModelRegistry, workdir: Path) -> dict[str, Any]:
    texts = load_rotten_tomatoes().texts
    random.Random(0).shuffle(texts)
    engines = {engine: run_monitor(store, workdir, engine, texts) for engine in ENGINES}
    return {
        "load": f"supervised service, default settings but SENTIMENT_DRIFT_BACKEND; Rotten Tomatoes texts in batches "
        f"of {Settings.model_fields['drift_check_every_predictions'].default} until {MONITOR_CHECKS} checks of a "
        "full window",
        "window_size": Settings.model_fields["drift_window_size"].default,
        "permutations": Settings.model_fields["drift_permutations"].default,
        "default_engine": Settings.model_fields["drift_backend"].default,
        "engines": engines,
        "goal_mb": MONITOR_GOAL_MB,
        "goal_met": all(found["goal_met"] for found in engines.values()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["all", "workers", "monitor"], default="all")
    parser.add_argument("--store", type=Path, default=None, help="model store (default: SENTIMENT_MODEL_STORE)")
    parser.add_argument("--output", type=Path, default=RESULTS / "memory.json")
    args = parser.parse_args()
    results: dict[str, Any] = json.loads(args.output.read_text()) if args.output.exists() else {}
    with tempfile.TemporaryDirectory() as tmp:
        store = ModelRegistry(args.store or Settings().model_store)
        if store.load_current() is None:
            print("no current model in the store: training the default model into a temporary store")
            store = ModelRegistry(Path(tmp) / "model_store")
            train_and_register(store, load_rotten_tomatoes(), progress=False)
        model = store.load_current()
        assert model is not None
        header = {
            "machine": {"cpus": len(os.sched_getaffinity(0)), "python": platform.python_version()},
            "model_version": model.version,
        }
        for part, measure in (("workers", run_workers), ("monitor", run_monitors)):
            if args.part in {"all", part}:
                measured_at = datetime.now(UTC).isoformat(timespec="seconds")
                results[part] = {"measured_at": measured_at, **header, **measure(store, Path(tmp))}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    if "workers" in results and args.part in {"all", "workers"}:
        workers = results["workers"]
        print(f"{workers['seconds']} s, status codes {workers['status_codes']}, ", end="")
        print(f"per worker {workers['requests_per_worker']}")
        for pid, mb in workers["worker_rss_mb_peak"].items():
            start, end = workers["worker_rss_mb_before"].get(pid), workers["worker_rss_mb_after"].get(pid)
            print(f"worker {pid}: RSS before {start} MB, peak {mb} MB, after {end} MB")
        verdict = "met" if workers["goal_met"] else "NOT met"
        print(f"largest worker RSS {workers['max_worker_rss_mb']:.1f} MB; goal <= {GOAL_MB:.0f} MB: {verdict}")
    if "monitor" in results and args.part in {"all", "monitor"}:
        monitor = results["monitor"]
        for engine, found in monitor["engines"].items():
            print(
                f"drift monitor, {engine}: RSS {found['monitor_rss_mb_detector_built']} MB with its detector built, "
                f"{found['monitor_rss_mb_after_checks']} MB after {found['checks']} checks "
                f"of {monitor['window_size']}, "
                f"peak {found['monitor_peak_rss_mb']} MB; goal <= {MONITOR_GOAL_MB:.0f} MB: "
                f"{'met' if found['goal_met'] else 'NOT met'} (load average {found['load_average_before_after']})"
            )


if __name__ == "__main__":
    main()
