"""Worker memory under hostile input: long random single-token texts through the real service.

320 ``POST /v1/predict/batch`` requests of 250 distinct random 3,900-character single-token texts (each
text one "word" no vocabulary holds, the worst case for per-token caches and for the prediction log's
write-behind buffer) against gunicorn with two workers, as ``scripts/serve`` runs it; the resident memory
(``VmRSS``) of every web worker before, at its peak during (sampled twice a second) and after. Goal: every
worker <= 300 MB.

Usage: ``.venv/bin/python -m bench.memory [--store PATH] [--output bench/results/memory.json]``. Uses the
current model of ``--store`` (default: the configured model store), or trains the default model into a
temporary store when it has none. Prints a table and writes the JSON result.
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
from pathlib import Path
from typing import Any

import httpx

from app.ml.data import load_rotten_tomatoes
from app.ml.registry import ModelRegistry
from app.ml.train import train_and_register
from app.settings import Settings
from bench.serving import RESULTS, rss_mb
from tests.integration.services import Service, start_service

REQUESTS = 320
TEXTS_PER_REQUEST = 250
TEXT_CHARS = 3900
CLIENTS = 4
GOAL_MB = 300.0


def random_texts(rng: random.Random, n: int) -> list[str]:
    """``n`` distinct single-token texts: lower-case letters and digits only, so the tokenizer keeps each whole."""
    alphabet = string.ascii_lowercase + string.digits
    return ["".join(rng.choices(alphabet, k=TEXT_CHARS)) for _ in range(n)]


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


def run(store: ModelRegistry, workdir: Path) -> dict[str, Any]:
    # A 250-text request of these texts takes a worker seconds of CPU: on a busy machine gunicorn's 30 s
    # heartbeat timeout could recycle a worker mid-run, which would hide exactly the growth measured here.
    service = start_service(store, workdir / "service.log", SENTIMENT_WORKER_TIMEOUT_SECONDS="600")
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
    return {
        "seconds": round(elapsed, 1),
        "status_codes": {code: statuses.count(code) for code in sorted(set(statuses))},
        "requests_per_worker": served_by,
        "worker_rss_mb_before": {str(pid): mb for pid, mb in before.items()},
        "worker_rss_mb_after": {str(pid): mb for pid, mb in after.items()},
        "worker_rss_mb_peak": {str(pid): mb for pid, mb in sampler.peak.items()},
        "workers_replaced": sorted(str(pid) for pid in set(before) - set(after)),
        "warnings_and_errors": problems[:20],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=None, help="model store (default: SENTIMENT_MODEL_STORE)")
    parser.add_argument("--output", type=Path, default=RESULTS / "memory.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = ModelRegistry(args.store or Settings().model_store)
        if store.load_current() is None:
            print("no current model in the store: training the default model into a temporary store")
            store = ModelRegistry(Path(tmp) / "model_store")
            train_and_register(store, load_rotten_tomatoes(), progress=False)
        model = store.load_current()
        assert model is not None
        result = run(store, Path(tmp))
    worst = max(result["worker_rss_mb_peak"].values())
    results = {
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": len(os.sched_getaffinity(0)), "python": platform.python_version()},
        "model_version": model.version,
        "load": f"{REQUESTS} x POST /v1/predict/batch, {TEXTS_PER_REQUEST} distinct random {TEXT_CHARS}-char "
        f"single-token texts each, {CLIENTS} clients, 2 workers",
        **result,
        "goal_mb": GOAL_MB,
        "max_worker_rss_mb": worst,
        "goal_met": worst <= GOAL_MB,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"{result['seconds']} s, status codes {result['status_codes']}, per worker {result['requests_per_worker']}")
    for pid, mb in result["worker_rss_mb_peak"].items():
        start, end = result["worker_rss_mb_before"].get(pid), result["worker_rss_mb_after"].get(pid)
        print(f"worker {pid}: RSS before {start} MB, peak {mb} MB, after {end} MB")
    print(f"largest worker RSS {worst:.1f} MB; goal <= {GOAL_MB:.0f} MB: {'met' if worst <= GOAL_MB else 'NOT met'}")


if __name__ == "__main__":
    main()
