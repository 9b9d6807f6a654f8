"""Scale-out costs on one machine: one instance vs two on a shared PostgreSQL, PostgreSQL vs SQLite logging,
and latency while a retrain runs in spawn vs queue mode.

One run measures, configurations alternated, ``--rounds`` (2) rounds each:

1. Saturated throughput (closed loop, 32 keep-alive connections of ``bench/loadgen.py``, ``POST /v1/predict``
   with held-out Rotten Tomatoes texts, ``--seconds`` after a warm-up) of one instance with 2 gunicorn
   workers vs two instances with 1 worker each (16 connections to each), both on one PostgreSQL and the
   SeaweedFS S3 model store; and of one 2-worker instance on PostgreSQL with the folder store, and on SQLite
   with the folder store (the single-machine default). Server, PostgreSQL and client CPU are counted, and
   after a graceful stop the prediction log's rows are counted against the 2xx answers.
2. ``PredictionRepository.insert_predictions`` in-process, batches of 100 / 500 / 2,000 rows (the recorder writes
   what a worker buffered in 0.5 s, at most 2,000 per insert): rows/s and µs per row, SQLite file vs
   PostgreSQL, with the client's and the server's CPU per row.
3. p99 at a fixed 100 req/s (open loop) over an idle window and while a retrain on fresh labelled tweets
   runs: ``SENTIMENT_RETRAIN_MODE=spawn`` (the retrain is a child of a web worker; nothing pinned) vs
   ``queue`` with the gunicorn processes pinned to CPU 0 and ``python -m app.retrain.worker`` (and so its
   retrains) to CPU 1, which approximates separate pods on a 2-core machine.

Instances are plain gunicorn (``app/gunicorn_conf.py``, as ``start_service`` runs it: no drift monitor),
with metrics and the prediction log on. PostgreSQL 15 runs with its default durability (fsync and
synchronous commits on); SQLite is the service's WAL file with ``synchronous=NORMAL``. Everything, the load
generator included, shares the machine's cores.

Usage: ``.venv/bin/python -m bench.scale_out [--seconds 15] [--rounds 2] [--skip-retrain]``; prints tables
and writes ``bench/results/scale_out.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from sqlalchemy import text

from app.ml.data import load_tweets
from app.ml.labels import LABELS
from app.ml.registry import ModelRegistry
from app.settings import Settings
from app.storage.database import Database
from app.storage.predictions import PredictionRepository
from app.storage.recorder import FLUSH_CHUNK_ROWS
from app.storage.retrain_jobs import RetrainJobRepository
from bench.backing import SharedServices, shared_services
from bench.loadgen import STATS, Tally, closed_loop, open_loop, post_json, run_async
from bench.output import write_results
from bench.soak import cpu_seconds, train
from tests.integration.services import REPO, Service, start_service, wait_for
from tests.traffic import log_predictions

CONNECTIONS = 32
WARMUP_SECONDS = 3.0
INSERT_BATCHES = (100, 500, FLUSH_CHUNK_ROWS)
RETRAIN_RATE = 100.0
IDLE_SECONDS = 10.0
RETRAIN_LIMIT_SECONDS = 90.0
FEEDBACK_LABELS = 1000
ADMIN_TOKEN = "bench-admin-token"
SERVED_CPU, RETRAIN_CPU = 0, 1


@dataclass(frozen=True)
class Layout:
    """One configuration of the saturation runs."""

    name: str
    instances: int
    workers: int
    database: str  # "postgresql" or "sqlite"
    store: str  # "s3" or "folder"


LAYOUTS = (
    Layout("1 instance x 2 workers, PostgreSQL + S3", 1, 2, "postgresql", "s3"),
    Layout("2 instances x 1 worker, PostgreSQL + S3", 2, 1, "postgresql", "s3"),
    Layout("1 instance x 2 workers, PostgreSQL + folder", 1, 2, "postgresql", "folder"),
    Layout("1 instance x 2 workers, SQLite + folder", 1, 2, "sqlite", "folder"),
)


# -- instances -------------------------------------------------------------------------------------------
class Instances:
    """Starts and stops the service instances of one configuration, each in its own folder."""

    def __init__(self, tmp: Path, folder: ModelRegistry, shared: SharedServices) -> None:
        self.tmp, self.folder, self.shared = tmp, folder, shared

    def environ(self, database: str, store: str, **extra: str) -> dict[str, str]:
        env = {
            "SENTIMENT_ADMIN_TOKEN": ADMIN_TOKEN,
            # start_service polls fast for its tests; the benchmark runs the default
            "SENTIMENT_RELOAD_INTERVAL_SECONDS": str(Settings.model_fields["reload_interval_seconds"].default),
            **extra,
        }
        if database == "postgresql":
            env["SENTIMENT_DATABASE_URL"] = self.shared.database_url
        if store == "s3":
            env.update(self.shared.environ())
        return env

    def start(self, count: int, workers: int, env: dict[str, str]) -> list[Service]:
        services: list[Service] = []
        try:
            for _ in range(count):
                folder = self.tmp / f"instance-{uuid.uuid4().hex[:8]}"
                folder.mkdir()
                store = None if "SENTIMENT_MODEL_STORE_URL" in env else self.folder
                services.append(start_service(store, folder / "service.log", workers, **env))
            for service in services:
                if not wait_for(lambda s=service: s.serving(workers), 60, every=0.2):
                    raise RuntimeError(f"{service.url} never served: {service.logs()[-5:]}")
        except BaseException:
            stop(services)
            raise
        return services


def stop(services: Sequence[Service]) -> list[int]:
    """SIGTERM to every instance at once (their workers flush the buffered predictions), then wait."""
    for service in services:
        if service.process.poll() is None:
            service.process.send_signal(signal.SIGTERM)
    return [service.stop(timeout=60) for service in services]


def service_pids(services: Sequence[Service]) -> list[int]:
    return [pid for s in services for pid in (s.process.pid, *s.descendants())]


def address(service: Service) -> tuple[str, int]:
    host, port = service.url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def percentiles(latencies: Sequence[float]) -> dict[str, float | None]:
    if not latencies:
        return {"p50_ms": None, "p99_ms": None}
    values = np.asarray(latencies)
    return {"p50_ms": float(np.percentile(values, 50)), "p99_ms": float(np.percentile(values, 99))}


# -- 1 and 2b: saturation ---------------------------------------------------------------------------------
def saturate(
    services: Sequence[Service], texts: Sequence[str], seconds: float, postgres_pids: Callable[[], list[int]] | None
) -> dict[str, Any]:
    """Closed loop of CONNECTIONS connections split evenly across ``services``; throughput, latency, CPU."""
    targets = [address(s) for s in services]
    payloads = [
        [post_json(f"{host}:{port}", "/v1/predict", json.dumps({"text": t}).encode()) for t in texts]
        for host, port in targets
    ]
    per_target = CONNECTIONS // len(services)
    answered = Counter[int]()

    def count(status: int, _body: bytes) -> None:
        answered[status] += 1

    async def run() -> dict[str, Any]:
        warmup = Tally(time.perf_counter(), WARMUP_SECONDS)
        await asyncio.gather(
            *(
                closed_loop(h, p, pl, connections=per_target, seconds=WARMUP_SECONDS, tally=warmup, on_body=count)
                for (h, p), pl in zip(targets, payloads, strict=True)
            )
        )
        tallies = [Tally(time.perf_counter(), seconds + 60) for _ in targets]
        servers, database = service_pids(services), postgres_pids() if postgres_pids else []
        before = (cpu_seconds(servers), cpu_seconds(database), time.process_time(), time.perf_counter())
        rates = await asyncio.gather(
            *(
                closed_loop(h, p, pl, connections=per_target, seconds=seconds, tally=tally, on_body=count)
                for (h, p), pl, tally in zip(targets, payloads, tallies, strict=True)
            )
        )
        # Backends opened during the run (new pooled connections) count from their start.
        database = sorted({*database, *(postgres_pids() if postgres_pids else [])})
        elapsed = time.perf_counter() - before[3]
        server_cpu = cpu_seconds(servers) - before[0]
        database_cpu = cpu_seconds(database) - before[1]
        client_cpu = time.process_time() - before[2]
        statuses = Counter[int]()
        latencies: list[float] = []
        for tally in tallies:
            statuses.update(tally.statuses())
            for window in tally.windows:
                latencies.extend(window.latencies_ms)
        requests = statuses.total()
        return {
            "requests_per_s": sum(rates),
            "per_instance_requests_per_s": [round(r, 1) for r in rates],
            **percentiles(latencies),
            "requests": requests,
            "statuses": {str(k): v for k, v in sorted(statuses.items())},
            "cpu_cores": {
                "service": server_cpu / elapsed,
                "postgresql": database_cpu / elapsed,
                "client": client_cpu / elapsed,
            },
            "cpu_ms_per_request": {
                "service": 1000 * server_cpu / requests,
                "postgresql": 1000 * database_cpu / requests,
                "client": 1000 * client_cpu / requests,
            },
        }

    result: dict[str, Any] = run_async(run)
    result["answered_2xx_total"] = sum(v for k, v in answered.items() if 200 <= k < 300)
    return result


def logged_rows(layout: Layout, services: Sequence[Service], shared: SharedServices) -> int:
    """Rows in the prediction log of this phase (read after the graceful stop); resets PostgreSQL's."""
    if layout.database == "sqlite":
        (service,) = services
        log = Database(f"sqlite:///{Path(service.env['SENTIMENT_STATE_DIR']) / 'predictions.db'}")
        try:
            with log.engine.connect() as conn:
                return int(conn.execute(text("SELECT count(*) FROM predictions")).scalar_one())
        finally:
            log.dispose()
    log = Database(shared.database_url)
    try:
        with log.engine.begin() as conn:
            rows = int(conn.execute(text("SELECT count(*) FROM predictions")).scalar_one())
            conn.execute(text("TRUNCATE predictions"))  # the next phase starts from an empty table, as SQLite
        return rows
    finally:
        log.dispose()


def saturation_rounds(
    instances: Instances, texts: Sequence[str], args: argparse.Namespace
) -> dict[str, list[dict[str, Any]]]:
    results: dict[str, list[dict[str, Any]]] = {layout.name: [] for layout in LAYOUTS}
    for round_ in range(1, args.rounds + 1):
        for layout in LAYOUTS:
            services = instances.start(
                layout.instances, layout.workers, instances.environ(layout.database, layout.store)
            )
            try:
                pids = instances.shared.postgres_pids if layout.database == "postgresql" else None
                result = saturate(services, texts, args.seconds, pids)
            finally:
                result_codes = stop(services)
            result["exit_codes"] = result_codes
            result["logged_rows"] = logged_rows(layout, services, instances.shared)
            result["round"] = round_
            results[layout.name].append(result)
            print(
                f"  round {round_}  {layout.name:<44} {result['requests_per_s']:7.0f} req/s  "
                f"p99 {result['p99_ms']:6.1f} ms  service {result['cpu_cores']['service']:.2f} + "
                f"PostgreSQL {result['cpu_cores']['postgresql']:.2f} cores; logged "
                f"{result['logged_rows']} of {result['answered_2xx_total']}",
                flush=True,
            )
    return results


# -- 2a: inserts in process --------------------------------------------------------------------------------
def rows_for(texts: Sequence[str], count: int, start: int) -> list[dict[str, Any]]:
    """``count`` rows shaped as the predictor records them (``app/serving/predictor.py``)."""
    now = time.time()
    return [
        {
            "id": uuid.uuid4().hex,
            "created_at": now,
            "text": texts[(start + i) % len(texts)],
            "text_length": len(texts[(start + i) % len(texts)]),
            "sentiment": LABELS[i % 2],
            "confidence": 0.75,
            "p_positive": 0.25 if i % 2 == 0 else 0.75,
            "model_version": "v20261201T000000Z-bench0",
            "latency_ms": 1.3,
        }
        for i in range(count)
    ]


def insert_rate(
    url: str, texts: Sequence[str], batch: int, seconds: float, server: Callable[[], list[int]] | None
) -> dict[str, Any]:
    """Insert batches of ``batch`` rows for about ``seconds``: rows/s, wall and CPU µs per row (the client's,
    and the database server's when ``server`` lists its processes)."""
    log = PredictionRepository(Database(url))
    try:
        log.insert_predictions(rows_for(texts, batch, 0))  # connect and warm up outside the timing
        server_pids = server() if server else []  # the backend of the connection just opened included
        rows = wall = client = 0.0
        server_before = cpu_seconds(server_pids)
        while wall < seconds:
            chunk = rows_for(texts, batch, int(rows))
            cpu, began = time.process_time(), time.perf_counter()
            log.insert_predictions(chunk)
            wall += time.perf_counter() - began
            client += time.process_time() - cpu
            rows += batch
        server_cpu = cpu_seconds(server_pids) - server_before
    finally:
        log.database.dispose()
    return {
        "rows": int(rows),
        "rows_per_s": rows / wall,
        "us_per_row": 1e6 * wall / rows,
        "client_cpu_us_per_row": 1e6 * client / rows,
        "server_cpu_us_per_row": 1e6 * server_cpu / rows if server else None,
    }


def insert_rounds(shared: SharedServices, tmp: Path, texts: Sequence[str], args: argparse.Namespace) -> dict[str, Any]:
    from app.migrations import upgrade

    results: dict[str, list[dict[str, Any]]] = {}
    seconds = max(1.0, args.seconds / 5)
    for round_ in range(1, args.rounds + 1):
        for batch in INSERT_BATCHES:
            for database in ("sqlite", "postgresql"):
                if database == "sqlite":
                    url = f"sqlite:///{tmp / f'insert-{uuid.uuid4().hex[:8]}.db'}"
                    upgrade(url)
                    server = None
                else:
                    url = shared.create_database()
                    server = shared.postgres_pids
                result = insert_rate(url, texts, batch, seconds, server)
                result["round"] = round_
                results.setdefault(f"{database} {batch}", []).append(result)
                print(
                    f"  round {round_}  {database:<10} batch {batch:>5}: {result['rows_per_s']:9.0f} rows/s "
                    f"{result['us_per_row']:6.1f} µs/row (client CPU {result['client_cpu_us_per_row']:.1f}, "
                    f"server CPU {result['server_cpu_us_per_row'] or 0:.1f} µs/row)",
                    flush=True,
                )
    return {"seconds_per_measurement": seconds, "batches": list(INSERT_BATCHES), "runs": results}


# -- 3: p99 while a retrain runs ---------------------------------------------------------------------------
class Sent(Tally):
    """Every response: (wall time the request was scheduled, latency ms, status)."""

    def __init__(self) -> None:
        super().__init__(time.perf_counter(), 1.0)
        self.offset = time.time() - time.perf_counter()
        self.samples: list[tuple[float, float, int]] = []

    def add(self, done: float, latency_ms: float, status: int) -> None:
        self.samples.append((done + self.offset - latency_ms / 1000, latency_ms, status))


@contextmanager
def retrain_worker(service: Service, tmp: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``python -m app.retrain.worker`` with the service's settings, on RETRAIN_CPU (its retrains inherit it)."""
    log = (tmp / f"retrain-worker-{uuid.uuid4().hex[:8]}.log").open("wb")
    process = subprocess.Popen(
        ["taskset", "-c", str(RETRAIN_CPU), sys.executable, "-m", "app.retrain.worker"],
        cwd=REPO,
        env=service.env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        yield process
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def log_feedback(shared: SharedServices, folder: ModelRegistry, tweets: Any, round_: int, label: str) -> None:
    """FEEDBACK_LABELS fresh labelled tweets in the shared log, as predicted by the folder's model."""
    model = folder.load_current()
    assert model is not None
    offset = (round_ * 2 + (label == "queue")) * FEEDBACK_LABELS
    sample = tweets.subset(np.arange(offset, offset + FEEDBACK_LABELS) % len(tweets))
    database = Database(shared.database_url)
    try:
        log_predictions(PredictionRepository(database), model.model, model.version, sample.texts, sample.labels)
    finally:
        database.dispose()


def retrain_window(service: Service, shared: SharedServices, texts: Sequence[str]) -> dict[str, Any]:
    """An idle window at RETRAIN_RATE, then a retrain started through /v1/retrain under the same load."""
    host, port = address(service)
    payloads = [post_json(f"{host}:{port}", "/v1/predict", json.dumps({"text": t}).encode()) for t in texts]
    database = Database(shared.database_url)
    jobs = RetrainJobRepository(database)
    idle, busy = Sent(), Sent()

    def ignore(_status: int, _body: bytes) -> None:
        return None

    async def run() -> dict[str, Any]:
        await open_loop(
            host, port, payloads, rate=RETRAIN_RATE, seconds=2.0, tally=Tally(time.perf_counter(), 60), on_body=ignore
        )
        await open_loop(host, port, payloads, rate=RETRAIN_RATE, seconds=IDLE_SECONDS, tally=idle, on_body=ignore)
        async with httpx.AsyncClient(base_url=service.url, timeout=30) as client:
            answer = await client.post("/v1/retrain", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        job_id = answer.json()["job_id"]
        began = time.monotonic()
        while time.monotonic() - began < RETRAIN_LIMIT_SECONDS:
            await open_loop(host, port, payloads, rate=RETRAIN_RATE, seconds=2.0, tally=busy, on_body=ignore)
            found = await asyncio.to_thread(jobs.get, job_id)
            assert found is not None
            job = asdict(found)
            if job["finished_at"] is not None:
                break
        return {"job": job, "answer": answer.json()}

    try:
        outcome = run_async(run)
    finally:
        database.dispose()
    job = outcome["job"]
    end = job["finished_at"] or float("inf")
    during = [lat for t, lat, _ in busy.samples if job["started_at"] <= t <= end]
    failed = sum(1 for _, _, s in (*idle.samples, *busy.samples) if not 200 <= s < 300)
    return {
        "idle_latencies_ms": [lat for _, lat, _ in idle.samples],
        "retrain_latencies_ms": during,
        "retrain_seconds": (job["finished_at"] - job["started_at"]) if job["finished_at"] else None,
        "status": job["status"],
        "outcome": job["outcome"],
        "failed_requests": failed,
    }


def retrain_rounds(instances: Instances, texts: Sequence[str], args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    tweets = load_tweets()
    tweets = tweets.subset(np.random.default_rng(0).permutation(len(tweets)))  # sorted by label: mix them
    modes = {
        "spawn (retrain child of a web worker, nothing pinned)": "spawn",
        "queue (web on CPU 0, retrain worker on CPU 1)": "queue",
    }
    raw: dict[str, list[dict[str, Any]]] = {name: [] for name in modes}
    for round_ in range(args.rounds):
        for name, mode in modes.items():
            log_feedback(instances.shared, instances.folder, tweets, round_, mode)
            env = instances.environ(
                "postgresql", "s3", SENTIMENT_RETRAIN_MODE=mode, SENTIMENT_RETRAIN_COOLDOWN_SECONDS="0"
            )
            services = instances.start(1, 2, env)
            (service,) = services
            try:
                if mode == "queue":
                    for pid in service_pids(services):
                        os.sched_setaffinity(pid, {SERVED_CPU})
                    with retrain_worker(service, tmp):
                        result = retrain_window(service, instances.shared, texts)
                else:
                    result = retrain_window(service, instances.shared, texts)
            finally:
                stop(services)
            result["round"] = round_ + 1
            raw[name].append(result)
            print(
                f"  round {round_ + 1}  {name:<54} idle p99 "
                f"{percentiles(result['idle_latencies_ms'])['p99_ms'] or 0:6.1f} ms, retrain p99 "
                f"{percentiles(result['retrain_latencies_ms'])['p99_ms'] or 0:6.1f} ms "
                f"({result['status']} {result['outcome']}, {result['retrain_seconds'] or 0:.1f} s), "
                f"failed {result['failed_requests']}",
                flush=True,
            )
    summary: dict[str, Any] = {}
    for name, runs in raw.items():
        idle = [lat for r in runs for lat in r["idle_latencies_ms"]]
        during = [lat for r in runs for lat in r["retrain_latencies_ms"]]
        idle_p, during_p = percentiles(idle), percentiles(during)
        summary[name] = {
            "idle_requests": len(idle),
            "idle": idle_p,
            "retrain_requests": len(during),
            "retrain": during_p,
            "p99_ratio": during_p["p99_ms"] / idle_p["p99_ms"] if during_p["p99_ms"] and idle_p["p99_ms"] else None,
            "per_round": [
                {
                    "round": r["round"],
                    "idle_p99_ms": percentiles(r["idle_latencies_ms"])["p99_ms"],
                    "retrain_p99_ms": percentiles(r["retrain_latencies_ms"])["p99_ms"],
                    "retrain_seconds": r["retrain_seconds"],
                    "status": r["status"],
                    "outcome": r["outcome"],
                    "failed_requests": r["failed_requests"],
                }
                for r in runs
            ],
        }
    return {"rate": RETRAIN_RATE, "idle_seconds": IDLE_SECONDS, "feedback_labels": FEEDBACK_LABELS, "modes": summary}


# -- report -------------------------------------------------------------------------------------------------
def median(values: Sequence[float]) -> float:
    return float(np.median(values))


def summarise_saturation(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    summary = {}
    for name, results in runs.items():
        summary[name] = {
            "requests_per_s": [round(r["requests_per_s"], 1) for r in results],
            "requests_per_s_median": median([r["requests_per_s"] for r in results]),
            "p99_ms_median": median([r["p99_ms"] for r in results]),
            "service_cpu_ms_per_request": median([r["cpu_ms_per_request"]["service"] for r in results]),
            "postgresql_cpu_ms_per_request": median([r["cpu_ms_per_request"]["postgresql"] for r in results]),
            "client_cpu_cores": median([r["cpu_cores"]["client"] for r in results]),
            "logged_rows_equal_2xx": all(r["logged_rows"] == r["answered_2xx_total"] for r in results),
        }
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=15.0, help="each saturation phase (default 15)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--skip-retrain", action="store_true", help="leave out part 3 (p99 during a retrain)")
    args = parser.parse_args()
    measured_at = datetime.now(UTC).isoformat(timespec="seconds")
    load_before = os.getloadavg()

    with tempfile.TemporaryDirectory(prefix="bench-scale-out-") as tmp_dir:
        tmp = Path(tmp_dir)
        began = time.perf_counter()
        folder, version, texts = train(tmp / "model_store")
        print(f"trained {version} in {time.perf_counter() - began:.0f} s; {len(texts)} held-out texts", flush=True)
        with shared_services(folder, version) as shared:
            instances = Instances(tmp, folder, shared)
            print("1 + 2b: saturation (closed loop)", flush=True)
            saturation = saturation_rounds(instances, texts, args)
            print("2a: PredictionRepository.insert_predictions in process", flush=True)
            inserts = insert_rounds(shared, tmp, texts, args)
            retrains = None
            if not args.skip_retrain:
                print(f"3: p99 at {RETRAIN_RATE:.0f} req/s, idle vs while a retrain runs", flush=True)
                retrains = retrain_rounds(instances, texts, args, tmp)

    saturation_summary = summarise_saturation(saturation)
    insert_summary = {
        key: {
            "rows_per_s_median": median([r["rows_per_s"] for r in runs]),
            "us_per_row_median": median([r["us_per_row"] for r in runs]),
            "client_cpu_us_per_row_median": median([r["client_cpu_us_per_row"] for r in runs]),
            "server_cpu_us_per_row_median": median([r["server_cpu_us_per_row"] for r in runs])
            if runs[0]["server_cpu_us_per_row"] is not None
            else None,
        }
        for key, runs in inserts["runs"].items()
    }
    results = {
        "measured_at": measured_at,
        "command": "python -m bench.scale_out " + " ".join(sys.argv[1:]),
        "machine": {
            "nproc": os.cpu_count(),
            "cpus_usable": len(os.sched_getaffinity(0)),
            "python": platform.python_version(),
            "load_average_at_start": [round(x, 2) for x in load_before],
        },
        "model_version": version,
        "configuration": {
            "rounds": args.rounds,
            "saturation_seconds": args.seconds,
            "warmup_seconds": WARMUP_SECONDS,
            "connections": CONNECTIONS,
            "connections_split": "evenly across the instances",
            "client": "bench/loadgen.py (asyncio, uvloop, raw HTTP/1.1 keep-alive) in this process",
            "instances": "plain gunicorn with app/gunicorn_conf.py (no drift monitor), metrics and prediction log on",
            "postgresql": "PostgreSQL 15, default durability (fsync, synchronous_commit on), on this machine",
            "sqlite": "the service's WAL file, synchronous=NORMAL",
            "s3": "SeaweedFS (weed server -s3) on this machine; model rows and pointer in PostgreSQL",
            "texts": f"{len(texts)} held-out Rotten Tomatoes texts",
            "retrain": "spawn: nothing pinned; queue: gunicorn pinned to CPU 0, app.retrain.worker to CPU 1",
        },
        "saturation": {"summary": saturation_summary, "runs": saturation},
        "inserts": {**inserts, "summary": insert_summary},
        "retrain_p99": retrains,
        "client_connection_events": dict(STATS),
    }
    write_results("scale_out", results)
    print_tables(results)
    print("wrote bench/results/scale_out.json")


def print_tables(results: dict[str, Any]) -> None:
    print(f"\nsaturation ({results['configuration']['connections']} connections), median of rounds")
    print(f"{'configuration':<46} {'req/s (rounds)':>24} {'p99 ms':>7} {'svc ms/req':>10} {'pg ms/req':>9}")
    for name, s in results["saturation"]["summary"].items():
        rounds = ", ".join(f"{x:.0f}" for x in s["requests_per_s"])
        print(
            f"{name:<46} {s['requests_per_s_median']:7.0f} ({rounds:>14}) {s['p99_ms_median']:7.1f} "
            f"{s['service_cpu_ms_per_request']:10.3f} {s['postgresql_cpu_ms_per_request']:9.3f}"
        )
    print("\nPredictionRepository.insert_predictions, median of rounds")
    print(f"{'database, batch':<20} {'rows/s':>9} {'µs/row':>7} {'client CPU µs':>13} {'server CPU µs':>13}")
    for key, s in results["inserts"]["summary"].items():
        server = "-" if s["server_cpu_us_per_row_median"] is None else f"{s['server_cpu_us_per_row_median']:.1f}"
        print(
            f"{key:<20} {s['rows_per_s_median']:9.0f} {s['us_per_row_median']:7.1f} "
            f"{s['client_cpu_us_per_row_median']:13.1f} {server:>13}"
        )
    if results["retrain_p99"]:
        print(f"\np99 at {results['retrain_p99']['rate']:.0f} req/s")
        for name, s in results["retrain_p99"]["modes"].items():
            ratio = "-" if s["p99_ratio"] is None else f"{s['p99_ratio']:.2f}x"
            print(
                f"{name:<54} idle {s['idle']['p99_ms'] or 0:6.1f} ms (n={s['idle_requests']}), retrain "
                f"{s['retrain']['p99_ms'] or 0:6.1f} ms (n={s['retrain_requests']}) = {ratio}"
            )


if __name__ == "__main__":
    main()
