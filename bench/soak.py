"""Soak: a long constant load at 80 % of the measured maximum against the real service, Prometheus scraping.

1. Train the default model into a temporary store; start the service as ``scripts/serve`` does
   (``app.supervisor``: gunicorn with 2 workers and the drift monitor) on a free loopback port with its state
   in a temporary folder, and Debian's Prometheus scraping ``/metrics`` every 5 s.
2. Maximum throughput: a closed loop of 32 keep-alive connections on ``POST /v1/predict`` with held-out
   Rotten Tomatoes texts (after a 3 s warm-up).
3. Soak: an open loop at ``--load`` (0.8) of that maximum for ``--minutes`` (10). Every second the client
   samples each web worker's VmRSS and times one ``GET /metrics``.
4. Stop the service gracefully (the workers flush their buffered predictions), then read the prediction log.

Goals (exit status 1 if one fails): no 5xx and no connection error; prediction-log rows == 2xx predictions,
every answered id logged; each worker's RSS grows <= 10 % from the first to the last window (same pids);
``/metrics`` median time in the last window <= 1.25x the first, from the client and from Prometheus'
``scrape_duration_seconds``, every scrape up; the soak achieved >= 95 % of its target rate.

Windows are a minute long (a third of the run when it is shorter than 3 minutes). Two settings differ from
``scripts/serve``: gunicorn's ``max_requests`` recycling is off (``GUNICORN_CMD_ARGS=--max-requests 0``:
recycling would hide a leak and replace the pids whose memory is tracked) and prediction-log retention is
raised so no row is pruned before it is counted.

Usage: ``.venv/bin/python -m bench.soak [--minutes 10] [--load 0.8]``; prints a table and writes
``bench/results/soak.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from app.ml.data import load_rotten_tomatoes
from app.ml.registry import ModelRegistry
from bench.loadgen import (
    CONNECTION_ERRORS,
    ERROR,
    STATS,
    Connection,
    Tally,
    closed_loop,
    get,
    open_loop,
    post_json,
    prediction_id,
    run_async,
)
from bench.output import write_results
from bench.serving import rss_mb
from tests.integration.services import REPO, Daemon, Service, start_prometheus, start_service, wait_for

CONNECTIONS = 32
WARMUP_SECONDS = 3.0
SCRAPE_SECONDS = 5
RSS_GROWTH_MAX = 0.10
METRICS_RATIO_MAX = 1.25
RATE_MIN = 0.95
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def train(root: Path) -> tuple[ModelRegistry, str, list[str]]:
    """The default model (as ``python -m app.cli train``) in a fresh store; its version and holdout texts."""
    from app.ml.train import split_holdout, train_and_register

    corpus = load_rotten_tomatoes()
    store = ModelRegistry(root)
    result = train_and_register(store, corpus, progress=False)
    _, holdout = split_holdout(corpus, 0.15, seed=0)
    texts = list(holdout.texts)
    random.Random(0).shuffle(texts)
    return store, result.version.version, texts


def prometheus_for(service: Service, tmp: Path) -> Daemon:
    """Debian's Prometheus with the repository's config and rules, scraping ``service`` every 5 s."""
    config = yaml.safe_load((REPO / "prometheus" / "prometheus.yml").read_text())
    config["global"].update(
        scrape_interval=f"{SCRAPE_SECONDS}s", scrape_timeout=f"{SCRAPE_SECONDS}s", evaluation_interval="5s"
    )
    config["rule_files"] = [str(REPO / "prometheus" / "rules" / "sentiment.rules.yml")]
    config.pop("alerting")
    config["scrape_configs"][0]["static_configs"][0]["targets"] = [service.url.removeprefix("http://")]
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    prometheus = start_prometheus(tmp / "prometheus.yml", tmp)

    def scraped() -> bool:
        result = prometheus.get("/api/v1/query", query='up{job="sentiment"}')["data"]["result"]  # type: ignore[index]
        return bool(result) and result[0]["value"][1] == "1"

    if not wait_for(scraped, timeout=30):
        prometheus.stop()
        raise RuntimeError("Prometheus did not scrape the service")
    return prometheus


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of the live processes in ``pids``."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / CLOCK_TICKS


def metric_sum(exposition: str, name: str) -> float:
    return sum(
        float(line.split()[-1]) for line in exposition.splitlines() if line.startswith((f"{name} ", f"{name}{{"))
    )


class Sampler:
    """Once a second during the soak: every web worker's VmRSS, and one timed ``GET /metrics``."""

    def __init__(self, service: Service, host: str, port: int, start: float) -> None:
        self.pids = service.worker_pids()
        self.connection = Connection(host, port)
        self.request = get(f"{host}:{port}", "/metrics")
        self.start = start
        self.rss: list[tuple[float, int, float]] = []  # (seconds since start, pid, MB)
        self.metrics: list[tuple[float, float, int]] = []  # (seconds since start, ms, status)
        self.sizes: list[tuple[float, int]] = []  # (seconds since start, exposition bytes)
        self.last_exposition = ""

    async def run(self, stop: asyncio.Event) -> None:
        tick = 0
        while not stop.is_set():
            now = time.perf_counter()
            for pid in self.pids:
                self.rss.append((now - self.start, pid, rss_mb(pid)))
            try:
                status, body = await self.connection.request(self.request)
            except CONNECTION_ERRORS:
                status, body = ERROR, b""
            self.metrics.append((now - self.start, (time.perf_counter() - now) * 1000, status))
            if status == 200:
                self.last_exposition = body.decode()
                self.sizes.append((now - self.start, len(body)))
            tick += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), max(0.0, self.start + tick - time.perf_counter()))
        self.connection.close()


class Predictions:
    """Counts every status of ``POST /v1/predict`` and appends each answered id to a file."""

    def __init__(self, ids_path: Path) -> None:
        self.ids = ids_path.open("wb")
        self.ok = 0

    def __call__(self, status: int, body: bytes) -> None:
        if 200 <= status < 300:
            self.ok += 1
            self.ids.write(prediction_id(body) + b"\n")


def load(service: Service, texts: list[str], args: argparse.Namespace, ids: Predictions) -> dict[str, Any]:
    """Warm-up, saturation, then the soak with its samplers; everything the client saw."""
    host, port = "127.0.0.1", int(service.url.rsplit(":", 1)[1])
    payloads = [post_json(f"{host}:{port}", "/v1/predict", json.dumps({"text": t}).encode()) for t in texts]
    seconds = args.minutes * 60

    async def run() -> dict[str, Any]:
        warmup = Tally(time.perf_counter(), WARMUP_SECONDS)
        await closed_loop(
            host, port, payloads, connections=CONNECTIONS, seconds=WARMUP_SECONDS, tally=warmup, on_body=ids
        )
        saturation = Tally(time.perf_counter(), args.saturation_seconds)
        cpu_before = time.process_time()
        maximum = await closed_loop(
            host,
            port,
            payloads,
            connections=CONNECTIONS,
            seconds=args.saturation_seconds,
            tally=saturation,
            on_body=ids,
        )
        saturation_cpu = (time.process_time() - cpu_before) / args.saturation_seconds
        rate = args.load * maximum
        print(f"maximum {maximum:.0f} req/s (closed loop, {CONNECTIONS} connections); soak at {rate:.0f} req/s")

        start = time.perf_counter()
        wall_start = time.time()
        soak = Tally(start, args.window_seconds)
        sampler = Sampler(service, host, port, start)
        server_pids = [service.process.pid, *service.descendants()]
        server_cpu, cpu_before = cpu_seconds(server_pids), time.process_time()
        stop = asyncio.Event()
        sampling = asyncio.create_task(sampler.run(stop))
        scheduler = await open_loop(host, port, payloads, rate=rate, seconds=seconds, tally=soak, on_body=ids)
        elapsed = time.perf_counter() - start
        client_cpu, server_cpu = time.process_time() - cpu_before, cpu_seconds(server_pids) - server_cpu
        stop.set()
        await sampling
        return {
            "warmup_statuses": warmup.statuses(),
            "saturation": saturation,
            "maximum": maximum,
            "saturation_client_cpu": saturation_cpu,
            "rate": rate,
            "soak": soak,
            "scheduler": scheduler,
            "sampler": sampler,
            "wall_start": wall_start,
            "elapsed": elapsed,
            "client_cpu": client_cpu / elapsed,
            "server_cpu": server_cpu / elapsed,
            "worker_pids_end": service.worker_pids(),
            "window_seconds": args.window_seconds,
        }

    return run_async(run)


def scrape_durations(prometheus: Daemon, wall_start: float, wall_end: float) -> tuple[list[tuple[float, float]], int]:
    """Prometheus' own samples during the soak: (seconds since start, scrape ms), and how many scrapes failed."""
    span = f"{int(wall_end - wall_start) + SCRAPE_SECONDS}s"
    samples: dict[str, list[tuple[float, float]]] = {}
    for metric in ("scrape_duration_seconds", "up"):
        result = prometheus.get("/api/v1/query", query=f'{metric}{{job="sentiment"}}[{span}]', time=str(wall_end))
        values = result["data"]["result"][0]["values"]  # type: ignore[index]
        samples[metric] = [(float(t) - wall_start, float(v)) for t, v in values if float(t) >= wall_start]
    return [(t, v * 1000) for t, v in samples["scrape_duration_seconds"]], sum(v == 0 for _, v in samples["up"])


def check_log(state_dir: Path, ids_path: Path) -> dict[str, Any]:
    """Rows in the stopped service's SQLite prediction log against the ids the client was answered."""
    db = sqlite3.connect(state_dir / "predictions.db")
    try:
        rows = db.execute("SELECT count(*) FROM predictions").fetchone()[0]
        db.execute("CREATE TEMP TABLE answered (id TEXT)")
        with ids_path.open() as lines:
            db.executemany("INSERT INTO answered VALUES (?)", ((line.strip(),) for line in lines))
        answered, distinct = db.execute("SELECT count(*), count(DISTINCT id) FROM answered").fetchone()
        missing = db.execute(
            "SELECT count(*) FROM answered a WHERE NOT EXISTS (SELECT 1 FROM predictions p WHERE p.id = a.id)"
        ).fetchone()[0]
    finally:
        db.close()
    spool = state_dir / "prediction-spool"
    return {
        "rows": rows,
        "answered_2xx": answered,
        "answered_distinct_ids": distinct,
        "answered_ids_missing_from_log": missing,
        "spool_files_left": sum(1 for p in spool.rglob("*") if p.is_file()) if spool.exists() else 0,
    }


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def ratio(last: float | None, first: float | None) -> float | None:
    return last / first if last is not None and first else None


def windows(run: dict[str, Any], scrapes: list[tuple[float, float]], count: int, width: float) -> list[dict[str, Any]]:
    """One row per window of the soak: rate, latency, statuses, worker RSS and /metrics times."""
    soak: Tally = run["soak"]
    sampler: Sampler = run["sampler"]
    rows = []
    for i in range(count):
        # Responses that completed after the last window (the open loop's final in-flight requests) join it.
        parts = soak.windows[i : i + 1] if i < count - 1 else soak.windows[i:]
        statuses: Counter[int] = Counter()
        for part in parts:
            statuses.update(part.statuses)
        latencies = np.concatenate([np.frombuffer(p.latencies_ms, dtype=np.float64) for p in parts] or [np.empty(0)])

        def within(t: float, i: int = i) -> bool:
            return i * width <= t < (i + 1) * width or (i == count - 1 and t >= count * width)

        rows.append(
            {
                "window": i + 1,
                "completed": int(sum(p.statuses.total() for p in soak.windows[i : i + 1])),
                "achieved_per_s": sum(p.statuses.total() for p in soak.windows[i : i + 1]) / width,
                "p50_ms": float(np.percentile(latencies, 50)) if latencies.size else None,
                "p99_ms": float(np.percentile(latencies, 99)) if latencies.size else None,
                "statuses": {str(k): v for k, v in sorted(statuses.items())},
                "worker_rss_mb": {
                    str(pid): median([mb for t, p, mb in sampler.rss if p == pid and within(t)]) for pid in sampler.pids
                },
                "metrics_client_median_ms": median([ms for t, ms, s in sampler.metrics if s == 200 and within(t)]),
                "metrics_client_samples": sum(1 for t, _, s in sampler.metrics if s == 200 and within(t)),
                "metrics_bytes_median": median([float(n) for t, n in sampler.sizes if within(t)]),
                "scrape_duration_median_ms": median([ms for t, ms in scrapes if within(t)]),
                "scrape_samples": sum(1 for t, _ in scrapes if within(t)),
            }
        )
    return rows


def goals(run: dict[str, Any], rows: list[dict[str, Any]], log: dict[str, Any], failed_scrapes: int) -> dict[str, Any]:
    statuses = Counter(run["saturation"].statuses()) + run["warmup_statuses"] + run["soak"].statuses()
    bad = {str(k): v for k, v in statuses.items() if k == ERROR or k >= 500}
    first, last = rows[0], rows[-1]
    pids = run["sampler"].pids
    growth = {str(pid): ratio(last["worker_rss_mb"][str(pid)], first["worker_rss_mb"][str(pid)]) for pid in pids}
    growth = {pid: None if g is None else g - 1 for pid, g in growth.items()}
    client = ratio(last["metrics_client_median_ms"], first["metrics_client_median_ms"])
    scrape = ratio(last["scrape_duration_median_ms"], first["scrape_duration_median_ms"])
    achieved = sum(r["completed"] for r in rows) / (len(rows) * run["window_seconds"])
    return {
        "no_5xx_or_connection_errors": {
            "value": bad,
            "goal": "0 responses 5xx and 0 requests without a response, in every phase",
            "met": not bad,
        },
        "prediction_log_complete": {
            "value": log,
            "goal": "rows == 2xx predictions, every answered id logged once",
            "met": log["rows"] == log["answered_2xx"] == log["answered_distinct_ids"] == run["ok"]
            and log["answered_ids_missing_from_log"] == 0,
        },
        "worker_rss_growth": {
            "value": growth,
            "goal": f"each web worker <= {RSS_GROWTH_MAX:.0%} (median of 1 s samples, first vs last window), "
            "same workers throughout",
            "met": all(g is not None and g <= RSS_GROWTH_MAX for g in growth.values())
            and sorted(pids) == sorted(run["worker_pids_end"]),
        },
        "metrics_render_flat": {
            "value": {
                "exposition_bytes_last_vs_first": ratio(last["metrics_bytes_median"], first["metrics_bytes_median"]),
                "client_last_vs_first": client,
                "prometheus_last_vs_first": scrape,
                "failed_scrapes": failed_scrapes,
            },
            "goal": f"median GET /metrics time, last vs first window <= {METRICS_RATIO_MAX}x (client and "
            "Prometheus scrape_duration_seconds), every scrape up",
            "met": client is not None
            and client <= METRICS_RATIO_MAX
            and scrape is not None
            and scrape <= METRICS_RATIO_MAX
            and failed_scrapes == 0,
        },
        "rate_sustained": {
            "value": achieved / run["rate"],
            "goal": f"responses within the soak >= {RATE_MIN:.0%} of the target rate",
            "met": achieved >= RATE_MIN * run["rate"],
        },
    }


def fmt(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="soak duration (default 10)")
    parser.add_argument("--load", type=float, default=0.8, help="share of the measured maximum (default 0.8)")
    parser.add_argument("--saturation-seconds", type=float, default=20.0)
    args = parser.parse_args()
    seconds = args.minutes * 60
    args.window_seconds = min(60.0, seconds / 3)
    count = round(seconds / args.window_seconds)
    measured_at = datetime.now(UTC).isoformat(timespec="seconds")

    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        began = time.perf_counter()
        store, version, texts = train(tmp / "model_store")
        print(f"trained {version} in {time.perf_counter() - began:.0f} s; {len(texts)} held-out texts")
        service = start_service(
            store,
            tmp / "service.log",
            supervised=True,
            GUNICORN_CMD_ARGS="--max-requests 0",
            SENTIMENT_RETENTION_MAX_ROWS="1000000000",
        )
        prometheus = None
        try:
            prometheus = prometheus_for(service, tmp)
            ids = Predictions(tmp / "answered-ids.txt")
            run = load(service, texts, args, ids)
            ids.ids.close()
            run["ok"] = ids.ok
            wall_end = run["wall_start"] + run["elapsed"]
            time.sleep(SCRAPE_SECONDS + 1)  # the scrape of the last seconds
            scrapes, failed_scrapes = scrape_durations(prometheus, run["wall_start"], wall_end)
            prometheus_cpu = cpu_seconds([prometheus.process.pid])
            exit_code = service.stop(timeout=60)
            log = check_log(Path(service.env["SENTIMENT_STATE_DIR"]), tmp / "answered-ids.txt")
            log["service_exit_code"] = exit_code
        finally:
            service.stop()
            if prometheus is not None:
                prometheus.stop()

    rows = windows(run, scrapes, count, args.window_seconds)
    exposition: str = run["sampler"].last_exposition
    results: dict[str, Any] = {
        "measured_at": measured_at,
        "command": "python -m bench.soak " + " ".join(sys.argv[1:]),
        "machine": {
            "nproc": os.cpu_count(),
            "cpus_usable": len(os.sched_getaffinity(0)),
            "python": platform.python_version(),
        },
        "model_version": version,
        "setup": {
            "workers": 2,
            "supervised": True,
            "prometheus_scrape_seconds": SCRAPE_SECONDS,
            "gunicorn_max_requests": 0,
            "client": "asyncio (uvloop) raw HTTP/1.1 keep-alive, bench/loadgen.py",
            "texts": f"{len(texts)} held-out Rotten Tomatoes texts",
        },
        "saturation": {
            "connections": CONNECTIONS,
            "seconds": args.saturation_seconds,
            "max_requests_per_s": run["maximum"],
            "statuses": {str(k): v for k, v in sorted(run["saturation"].statuses().items())},
            "client_cpu_cores": run["saturation_client_cpu"],
        },
        "soak": {
            "minutes": args.minutes,
            "load": args.load,
            "target_per_s": run["rate"],
            "window_seconds": args.window_seconds,
            "elapsed_seconds": run["elapsed"],
            "statuses": {str(k): v for k, v in sorted(run["soak"].statuses().items())},
            "scheduler": run["scheduler"],
            "client_connection_events": dict(STATS),
            "client_cpu_cores": run["client_cpu"],
            "server_cpu_cores": run["server_cpu"],
            "prometheus_cpu_seconds_total": prometheus_cpu,
            "prediction_log_errors_total": metric_sum(exposition, "sentiment_prediction_log_errors_total"),
            "prediction_log_dropped_total": metric_sum(exposition, "sentiment_prediction_log_dropped_total"),
            "windows": rows,
        },
        "goals": goals(run, rows, log, failed_scrapes),
    }
    write_results("soak", results)

    pids = run["sampler"].pids
    print(
        f"soak {args.minutes:g} min at {run['rate']:.0f} req/s ({args.load:.0%} of {run['maximum']:.0f}); "
        f"client CPU {run['client_cpu']:.2f} cores, service {run['server_cpu']:.2f} cores (of {os.cpu_count()})"
    )
    print(
        f"{'window':>6} {'req/s':>7} {'p50 ms':>7} {'p99 ms':>8} {'non-2xx':>7} "
        + " ".join(f"{'RSS ' + str(p):>10}" for p in pids)
        + f" {'/metrics ms':>11} {'scrape ms':>9}"
    )
    for row in rows:
        non_2xx = sum(v for k, v in row["statuses"].items() if not 200 <= int(k) < 300)
        print(
            f"{row['window']:>6} {row['achieved_per_s']:7.0f} {fmt(row['p50_ms'], '.2f'):>7} {fmt(row['p99_ms']):>8} "
            f"{non_2xx:>7} "
            + " ".join(f"{fmt(row['worker_rss_mb'][str(p)]):>10}" for p in pids)
            + f" {fmt(row['metrics_client_median_ms'], '.2f'):>11} {fmt(row['scrape_duration_median_ms'], '.2f'):>9}"
        )
    for name, goal in results["goals"].items():
        print(f"{'PASS' if goal['met'] else 'FAIL'}  {name}: {json.dumps(goal['value'])}  (goal: {goal['goal']})")
    print("wrote bench/results/soak.json")
    if not all(goal["met"] for goal in results["goals"].values()):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
