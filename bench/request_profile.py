"""Where one prediction request's microseconds go, monitoring on vs off, in one run on this machine.

Monitoring on vs off is ``SENTIMENT_MONITORING_ENABLED``: on adds the request metrics, the prediction metrics,
the prediction log (write-behind buffer, crash spool, database flushes) and the drift monitor process; the
access log line and the request id are there either way. Two complementary measurements:

1. Components, in this process, with the objects the request path uses: the middleware stack
   (``app.api.middleware``, driven on a uvloop event loop around a stub endpoint), the structlog access-log
   line (rendered and written to a file, as a worker writes its stdout), Prometheus metric updates in
   multiprocess mode (mmap files in a temporary directory), and the predictor (``Predictor`` + the
   ``InferenceBatcher`` + ``PredictionRecorder`` with its crash spool) around a stub model, with the recorder
   vs without, for one request alone and for ``--concurrency`` requests answered by one model call; plus the
   database write of each logged row (the recorder's flush, CPU of its threads). Variants run interleaved,
   the best of ``--rounds`` rounds kept, in microseconds per request. Then the whole app (``create_app`` and
   its lifespan, the real model) driven through ASGI: CPU and garbage-collection time per request, off and
   on, before and after :func:`app.gunicorn_worker.freeze_startup_heap` (what a gunicorn worker runs).
2. The real service: gunicorn with two workers under wrk (``-t2 -c32``, one text per request, as
   ``bench/monitoring.py``), monitoring off (plain gunicorn) and on (the supervised service, drift monitor
   included); each process's CPU from ``/proc/<pid>/stat``, py-spy sampling one worker (200 Hz, all
   threads, idle ones left out), each sample attributed to the innermost frame that names a component
   (table ``RULES``), and the drift monitor's CPU seconds per minute at saturation.

Usage: ``.venv/bin/python -m bench.request_profile [--seconds 15] [--skip-service]``; needs a current model
(``python -m app.cli train``), and for part 2 wrk (Debian package ``wrk``) and py-spy (requirements-dev.txt).
Prints the tables and writes ``bench/results/request_profile.json``. The machine is shared: the load average
is recorded with every measurement.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import linecache
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
import timeit
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

from bench.output import RESULTS

TEXT = "a quiet, funny film that knows exactly what it wants to be and gets there without a wasted scene"
ROUTE_PATH = "/v1/predict"
SAMPLE_RATE = 200

# Part 2: a sample belongs to the innermost frame (leaf first) whose file (and, where given, function
# prefix) matches a rule; files matching no rule (json, uuid, numpy, the standard library) count for their
# caller. Order matters only between rules matching the same frame.
RULES: list[tuple[str, str, str]] = [
    ("/app/monitoring/spool.py", "PredictionSpool.append", "spool append"),
    ("/app/monitoring/spool.py", "_write_all", "spool append"),
    ("/app/monitoring/spool.py", "", "log flush (database)"),  # rotate, release, adopting dead workers' spools
    ("/app/storage/recorder.py", "PredictionRecorder.record", "log buffer enqueue"),
    ("/app/storage/recorder.py", "PredictionRecorder._add", "log buffer enqueue"),
    ("/app/storage/recorder.py", "PredictionRecorder._enforce_bounds", "log buffer enqueue"),
    ("/app/storage/", "", "log flush (database)"),
    ("/sqlalchemy/", "", "log flush (database)"),
    ("/prometheus_client/", "", "metric writes"),
    ("/app/monitoring/metrics.py", "", "metric writes"),
    ("/structlog/", "", "log lines (structlog, logging)"),
    ("/logging/", "", "log lines (structlog, logging)"),
    ("/app/logs.py", "", "log lines (structlog, logging)"),
    ("/app/serving/predictor.py", "Predictor._record", "prediction rows"),
    ("/app/serving/predictor.py", "Predictor._stage", "prediction rows"),
    ("/app/serving/predictor.py", "", "predictor (ids, results)"),
    ("/app/serving/batcher.py", "", "batcher"),
    ("/app/serving/models.py", "", "model watcher (pointer polls)"),
    ("/app/ml/", "", "model (predict_proba)"),
    ("/sklearn/", "", "model (predict_proba)"),
    ("/app/api/middleware.py", "RequestIdMiddleware", "request id middleware"),
    ("/app/api/middleware.py", "AccessLogMiddleware", "access log middleware (timing)"),
    ("/app/api/middleware.py", "", "other middleware"),
    ("/fastapi/", "", "framework (FastAPI, Starlette, pydantic)"),
    ("/starlette/", "", "framework (FastAPI, Starlette, pydantic)"),
    ("/pydantic", "", "framework (FastAPI, Starlette, pydantic)"),
    ("/opentelemetry/", "", "framework (FastAPI, Starlette, pydantic)"),
    ("/app/api/", "", "framework (FastAPI, Starlette, pydantic)"),
    ("/uvicorn/", "", "HTTP server (uvicorn, httptools)"),
    ("/app/gunicorn_worker.py", "", "HTTP server (uvicorn, httptools)"),
    ("/asyncio/", "", "event loop and socket I/O (uvloop)"),
    ("/threading.py", "", "other threads"),
]
UNMATCHED = "other"
# Leaf frames of threads that wait (py-spy counts a pool thread blocked on its queue as active): left out.
IDLE_LEAVES = (("/concurrent/futures/thread.py", "_worker"), ("/threading.py", "Condition.wait"))


def http_scope(headers: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    """The ASGI scope of one ``POST`` to the predict route from a loopback client."""
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": ROUTE_PATH,
        "raw_path": ROUTE_PATH.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# -- part 1: components in this process ---------------------------------------------------------------------


def interleaved(
    variants: dict[str, Callable[[], object]], number: int, rounds: int, per: dict[str, int] | None = None
) -> dict[str, float]:
    """Microseconds per item of each variant: ``rounds`` rounds, each running every variant ``number`` times
    in turn (so a burst of load from other processes hits all of them alike); the best round of each.

    A variant returns None (synchronous) or an awaitable, run on the current event loop; ``per`` gives the
    items one call handles (requests answered by one ``gather``)."""
    loop = asyncio.get_event_loop()

    def timed(action: Callable[[], object]) -> float:
        if asyncio.iscoroutine(probe := action()) or isinstance(probe, asyncio.Future):
            loop.run_until_complete(probe)

            async def many() -> None:
                for _ in range(number):
                    await action()  # type: ignore[misc]

            started = time.perf_counter()
            loop.run_until_complete(many())
            return time.perf_counter() - started
        return timeit.timeit(action, number=number)

    best = dict.fromkeys(variants, float("inf"))
    for _ in range(rounds):
        for name, action in variants.items():
            best[name] = min(best[name], timed(action))
    return {name: t / (number * (per or {}).get(name, 1)) * 1e6 for name, t in best.items()}


class _Route:
    path = ROUTE_PATH


class StubEndpoint:
    """What the route does to the ASGI messages: reads the body, names its route, answers 200 with the
    model version header. No parsing and no model, so only the layers around it are timed."""

    route = _Route()
    body = json.dumps({"text": TEXT}).encode()
    headers: ClassVar = [(b"content-type", b"application/json"), (b"x-model-version", b"v20261201T000000Z-000000")]

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        scope["route"] = self.route
        await send({"type": "http.response.start", "status": 200, "headers": list(self.headers)})
        await send({"type": "http.response.body", "body": b'{"sentiment":"positive"}'})


def asgi_call(app: Any) -> Callable[[], Awaitable[None]]:
    """One POST /v1/predict through ``app``, as uvicorn hands it over."""
    body = StubEndpoint.body
    headers = [
        (b"host", b"127.0.0.1:8000"),
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        return None

    def call() -> Awaitable[None]:
        return app(http_scope(list(headers)), receive, send)  # type: ignore[no-any-return]

    return call


class StubModel:
    """Fixed class probabilities: the model's cost is the same on and off, so it is left out here."""

    def __call__(self, texts: Any) -> Any:
        import numpy as np

        return np.tile([0.2, 0.8], (len(texts), 1))


def components(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """Microseconds per request of each component (see the module docstring, part 1)."""
    import logging
    import logging.config

    import structlog
    import uvloop

    from app.api import middleware as mw
    from app.logs import configure_structlog, dict_config
    from app.migrations import upgrade
    from app.monitoring import metrics as m
    from app.monitoring.metric_writes import WRITES
    from app.monitoring.spool import PredictionSpool
    from app.serving.batcher import InferenceBatcher
    from app.serving.models import ServedModel
    from app.serving.predictor import Predictor
    from app.storage.database import Database
    from app.storage.predictions import LOG_COLUMNS, PredictionRepository
    from app.storage.recorder import PredictionRecorder

    n, rounds, k = args.number, args.rounds, args.concurrency
    configure_structlog()  # as a worker (gunicorn_conf): JSON lines on stdout, which main() points at a file
    logging.config.dictConfig(dict_config("info"))
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    result: dict[str, Any] = {"loadavg_before": loadavg(), "number": n, "rounds": rounds, "concurrency": k}

    # Middleware: each layer around the stub endpoint, minus the stub alone; then the whole stack as
    # create_app builds it, with the request metrics off and on.
    stub = StubEndpoint()

    def stack(measure: bool) -> Any:
        app: Any = stub
        for cls, kwargs in reversed(
            [
                (mw.RequestIdMiddleware, {}),
                (mw.AccessLogMiddleware, {"measure": measure}),
                (mw.InternalErrorMiddleware, {}),
                (mw.BodyReadTimeoutMiddleware, {"timeout_seconds": 10.0}),
                (mw.BodyLimitMiddleware, {"max_body_bytes": 1 << 20}),
                (mw.Utf8BodyMiddleware, {}),
            ]
        ):
            app = cls(app, **kwargs)
        return app

    access_log = structlog.get_logger("app.access")

    def log_line() -> None:
        access_log.info("request", method="POST", route=ROUTE_PATH, status=200, latency_ms=1.234, model_version="v1")

    with structlog.contextvars.bound_contextvars(request_id="0123456789abcdef0123456789abcdef"):
        layers = interleaved(
            {
                "bare": asgi_call(stub),
                "request id": asgi_call(mw.RequestIdMiddleware(stub)),
                "access off": asgi_call(mw.AccessLogMiddleware(stub, measure=False)),
                "access on": asgi_call(mw.AccessLogMiddleware(stub, measure=True)),
                "errors": asgi_call(mw.InternalErrorMiddleware(stub)),
                "deadline": asgi_call(mw.BodyReadTimeoutMiddleware(stub, timeout_seconds=10.0)),
                "cap": asgi_call(mw.BodyLimitMiddleware(stub, max_body_bytes=1 << 20)),
                "utf8": asgi_call(mw.Utf8BodyMiddleware(stub)),
                "stack off": asgi_call(stack(False)),
                "stack on": asgi_call(stack(True)),
                "log line": log_line,
            },
            n,
            rounds,
        )
    bare = layers["bare"]
    result["middleware_us"] = {name: value - bare if name != "log line" else value for name, value in layers.items()}

    # Metric primitives (multiprocess mode: each write is a locked struct.pack into an mmap).
    latency = m.REQUEST_DURATION.labels("POST", ROUTE_PATH, "200")
    result["metric_primitives_us"] = interleaved(
        {
            "gauge inc + dec": lambda: (m.REQUESTS_IN_PROGRESS.inc(), m.REQUESTS_IN_PROGRESS.dec()),
            "labels() of 3 labels": lambda: m.REQUEST_DURATION.labels("POST", ROUTE_PATH, "200"),
            "histogram observe": lambda: latency.observe(0.004),
            "counter inc": m.PREDICTIONS.labels("v1", "positive").inc,
            "observe_many, 1 value": lambda: WRITES.observe_many(m.TEXT_LENGTH, [96]),
        },
        n,
        rounds,
    )

    # The predictor with the recorder (monitoring on) and without, around a stub model: one request alone,
    # and ``k`` concurrent ones that one model call answers.
    url = f"sqlite:///{tmp / 'predictions.db'}"
    upgrade(url)
    database = Database(url)
    spool = PredictionSpool(tmp / "spool")
    spool.open()
    recorder = PredictionRecorder(PredictionRepository(database), 0.5, 10**9, max_buffer_bytes=2**40, spool=spool)
    model = ServedModel("v20261201T000000Z-000000", {}, StubModel(), compiled=False)

    class Models:
        current = model

    batchers = {"off": InferenceBatcher(128, measure=False), "on": InferenceBatcher(128, measure=True)}
    predictors = {
        "off": Predictor(Models(), batchers["off"], None),  # type: ignore[arg-type]
        "on": Predictor(Models(), batchers["on"], recorder),  # type: ignore[arg-type]
    }

    async def start() -> None:
        for batcher in batchers.values():
            batcher.start()

    loop.run_until_complete(start())

    def predict(mode: str, concurrency: int) -> Callable[[], Awaitable[object]]:
        predictor = predictors[mode]
        return lambda: asyncio.gather(*(predictor.predict([TEXT]) for _ in range(concurrency)))

    requests = max(n // 4, 64)
    predictor_us: dict[str, float] = {}
    for _ in range(rounds):  # the flush between rounds keeps the buffer (and the spool segment) small
        for c in (1, k):
            once = interleaved(
                {f"{mode}, {c} per call": predict(mode, c) for mode in ("off", "on")},
                requests // c,
                1,
                per={f"{mode}, {c} per call": c for mode in ("off", "on")},
            )
            for name, value in once.items():
                predictor_us[name] = min(predictor_us.get(name, float("inf")), value)
        loop.run_until_complete(recorder.flush())
    result["predictor_us"] = predictor_us

    # The pieces of one request's recording.
    row = ("0" * 32, time.time(), TEXT, len(TEXT), "positive", 0.8, 0.8, model.version, 1.5)  # LOG_COLUMNS
    unspooled = PredictionRecorder(PredictionRepository(database), 0.5, 10**9, max_buffer_bytes=2**40)
    result["recording_pieces_us"] = interleaved(
        {
            "buffer enqueue (record, no spool)": lambda: unspooled.record([row]),
            "spool append (marshal + os.write)": lambda: spool.append(LOG_COLUMNS, [row]),
        },
        n,
        rounds,
    )
    loop.run_until_complete(recorder.flush())

    # The flush: CPU (this process, the recorder's threads included) per row written to the database, in
    # flushes of 1,000 rows (a worker's half second at 2,000 req/s).
    per_row = []
    for _ in range(max(rounds // 4, 3)):
        recorder.record([(os.urandom(16).hex(), *row[1:]) for _ in range(1000)])
        cpu = time.process_time()
        loop.run_until_complete(recorder.flush())
        per_row.append((time.process_time() - cpu) / 1000 * 1e6)

    async def stop() -> None:
        for batcher in batchers.values():
            await batcher.stop()

    loop.run_until_complete(stop())
    spool.close()
    database.dispose()
    loop.close()
    logging.getLogger().handlers.clear()  # part 2 logs (httpx) to this process's own stdout again
    structlog.reset_defaults()

    mid = result["middleware_us"]
    rec = result["predictor_us"]
    result["us"] = {
        "request id (middleware: header, uuid4, context)": mid["request id"],
        "access log line (structlog render + write)": mid["log line"],
        "access log middleware (timing, route, status)": mid["access off"] - mid["log line"],
        "other middleware (errors, body deadline, cap, UTF-8)": sum(
            mid[name] for name in ("errors", "deadline", "cap", "utf8")
        ),
        "request metrics (in-progress gauge, latency histogram)": mid["access on"] - mid["access off"],
        "prediction recording, alone (metrics, row, buffer, spool)": rec["on, 1 per call"] - rec["off, 1 per call"],
        f"prediction recording, {k} per model call": rec[f"on, {k} per call"] - rec[f"off, {k} per call"],
        "log flush to the database, per row (recorder threads)": min(per_row),
    }
    result["on_only"] = [
        "request metrics (in-progress gauge, latency histogram)",
        "prediction recording, alone (metrics, row, buffer, spool)",
        f"prediction recording, {k} per model call",
        "log flush to the database, per row (recorder threads)",
    ]
    result["loadavg_after"] = loadavg()
    return result


def monitored_app(state: Path, monitoring: bool) -> Any:
    """The real app (``create_app``) with its prediction log migrated under ``state``, monitoring on or off."""
    from app.main import create_app
    from app.migrations import upgrade
    from app.settings import Settings

    upgrade(f"sqlite:///{state / 'predictions.db'}")
    settings = Settings(state_dir=state, monitoring_enabled=monitoring, webhook_token="w" * 32, feedback_token="f" * 32)
    return create_app(settings)


async def send_requests(app: Any, bodies: list[bytes], first: int, count: int, concurrency: int) -> int:
    """POST ``bodies[first:]`` (round robin) to the predict route through ``app``'s ASGI interface, ``concurrency``
    at a time, whole groups only; returns how many were sent. Raises on a status other than 200."""

    async def one(body: bytes) -> None:
        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start" and message["status"] != 200:
                raise RuntimeError(f"status {message['status']}")

        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await app({**http_scope(headers), "state": {}}, receive, send)

    sent = count - count % concurrency
    for start in range(first, first + sent, concurrency):
        await asyncio.gather(*(one(bodies[(start + j) % len(bodies)]) for j in range(concurrency)))
    return sent


def whole_app(args: argparse.Namespace, tmp: Path, texts: list[str]) -> dict[str, Any]:
    """The real app (``create_app``, its lifespan: model, batcher, recorder and spool, database flushes on its
    threads) in this process, driven through ASGI ``--concurrency`` requests at a time: CPU of the process
    (threads included) and time in the garbage collector, per request, monitoring off and on; then again
    after :func:`app.gunicorn_worker.freeze_startup_heap`, as a gunicorn worker runs (skipped if absent)."""
    import gc
    import logging.config

    import structlog
    import uvloop

    from app import gunicorn_worker
    from app.logs import configure_structlog, dict_config
    from app.process_memory import skip_unused_optional_imports

    skip_unused_optional_imports()  # as gunicorn_conf does for the workers
    configure_structlog()
    logging.config.dictConfig(dict_config("info"))
    bodies = [json.dumps({"text": text}).encode() for text in texts]
    k, n = args.concurrency, args.app_requests
    collecting: dict[str, float] = {}
    gc_seconds = [0.0]

    def on_gc(phase: str, _info: dict[str, Any]) -> None:
        if phase == "start":
            collecting["at"] = time.perf_counter()
        else:
            gc_seconds[0] += time.perf_counter() - collecting["at"]

    async def measure(monitoring: bool, index: int) -> dict[str, float]:
        app = monitored_app(tmp / f"app-{index}", monitoring)
        async with app.router.lifespan_context(app):
            await send_requests(app, bodies, 0, 200, 1)  # warm: first requests, first flushes
            await asyncio.sleep(1)
            gc_seconds[0] = 0.0
            gc.callbacks.append(on_gc)
            cpu = time.process_time()
            done = await send_requests(app, bodies, 0, n, k)
            cpu = time.process_time() - cpu
            gc.callbacks.remove(on_gc)
        return {"cpu_us_per_request": cpu / done * 1e6, "gc_us_per_request": gc_seconds[0] / done * 1e6}

    result: dict[str, Any] = {"loadavg_before": loadavg(), "requests": n, "concurrency": k}
    runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    variants = [("off", False), ("on", True)]
    for index, (name, monitoring) in enumerate(variants):
        result[name] = runner.run(measure(monitoring, index))
    freeze = getattr(gunicorn_worker, "freeze_startup_heap", None)
    if freeze is not None:
        threshold = gc.get_threshold()
        freeze()
        for index, (name, monitoring) in enumerate(variants, start=len(variants)):
            result[f"{name}, start-up heap frozen"] = runner.run(measure(monitoring, index))
        gc.unfreeze()
        gc.set_threshold(*threshold)
    runner.close()
    logging.getLogger().handlers.clear()
    structlog.reset_defaults()
    result["loadavg_after"] = loadavg()
    return result


# -- part 2: the real service under wrk ------------------------------------------------------------------------


def cpu_ticks(pid: int) -> int:
    """utime + stime of ``pid`` in clock ticks (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def _not_started(frame: str) -> bool:
    """Whether a sampled frame stands on its ``def`` line: a coroutine its caller has created but not run yet,
    so the sample belongs to the caller (py-spy shows such frames under Python 3.11)."""
    path, _, line = frame.rpartition(" (")[2].rstrip(")").rpartition(":")
    return line.isdigit() and linecache.getline(path, int(line)).lstrip().startswith(("def ", "async def "))


def classify(stack: str) -> str | None:
    """The component of one py-spy sample (``frame;frame;...`` root first, each ``function (file:line)``);
    None for a thread that waits."""
    frames = stack.split(";")
    function, _, where = frames[-1].rpartition(" (")
    if any(path in where and function == name for path, name in IDLE_LEAVES):
        return None
    while len(frames) > 1 and _not_started(frames[-1]):
        frames.pop()
    for frame in reversed(frames):
        function, _, where = frame.rpartition(" (")
        for path, prefix, component in RULES:
            if path in where and function.startswith(prefix):
                return component
    return UNMATCHED


def profile_shares(raw: Path) -> tuple[dict[str, float], int]:
    """Share of a worker's busy samples per component, and the sample count."""
    counts: Counter[str] = Counter()
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if stack and (component := classify(stack)) is not None:
            counts[component] += int(n)
    total = sum(counts.values())
    return {name: count / total for name, count in counts.most_common()}, total


def metric_total(url: str, name: str) -> float:
    import httpx

    total = 0.0
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def service_run(mode: str, seconds: int, tmp: Path, texts: Path, store: Any, *, keep: Path | None) -> dict[str, Any]:
    """wrk against the service with monitoring ``mode`` ("on"/"off"); py-spy on one worker meanwhile."""
    from bench.monitoring import wait_for_monitor, warm_up
    from bench.serving import CONNECTIONS, wrk
    from tests.integration.services import start_service

    if mode == "on":
        service = start_service(store, tmp / f"{mode}.log", supervised=True)
        wait_for_monitor(service)
    else:
        service = start_service(store, tmp / f"{mode}.log", SENTIMENT_MONITORING_ENABLED="false")
    try:
        warm_up(service, texts_env(texts))  # steady state, as bench/monitoring.py measures it
        workers = service.worker_pids()
        processes = {service.process.pid: "supervisor" if mode == "on" else "gunicorn master"}
        for pid, (_, command) in service.descendants().items():
            if pid in workers:
                processes[pid] = "web worker"
            elif "app.monitoring.monitor" in command:
                processes[pid] = "drift monitor"
            elif "gunicorn" in command:
                processes[pid] = "gunicorn master"
            else:
                processes[pid] = command.split()[-1][:40]
        inference_before = (
            metric_total(service.url, "sentiment_inference_duration_seconds_count") if mode == "on" else 0
        )
        raw = tmp / f"py-spy-{mode}.txt"
        load_before = loadavg()
        ticks_before = {pid: cpu_ticks(pid) for pid in processes}
        outcome: dict[str, Any] = {}
        load = threading.Thread(
            target=lambda: outcome.update(wrk(service.url, "bench/predict.lua", seconds, CONNECTIONS, texts_env(texts)))
        )
        started = time.perf_counter()
        load.start()
        time.sleep(1)  # connections up, batches forming
        spy = subprocess.run(
            [
                str(Path(sys.executable).parent / "py-spy"),
                "record",
                "--pid",
                str(workers[0]),
                "--duration",
                str(max(seconds - 2, 1)),
                "--rate",
                str(SAMPLE_RATE),
                "--format",
                "raw",
                "--full-filenames",
                "--output",
                str(raw),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        load.join()
        elapsed = time.perf_counter() - started
        ticks = {pid: cpu_ticks(pid) - before for pid, before in ticks_before.items()}
        load_after = loadavg()
        if spy.returncode != 0:
            raise RuntimeError(f"py-spy failed: {spy.stderr[-2000:]}")
        requests = outcome["requests_per_s"] * seconds
        batches = (
            metric_total(service.url, "sentiment_inference_duration_seconds_count") - inference_before
            if mode == "on"
            else None
        )
    finally:
        service.stop()
    hz = os.sysconf("SC_CLK_TCK")
    cpu_seconds: Counter[str] = Counter()
    for pid, name in processes.items():
        cpu_seconds[name] += ticks[pid] / hz
    shares, samples = profile_shares(raw)
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        (keep / raw.name).write_text(raw.read_text())
    worker_us = cpu_seconds["web worker"] / requests * 1e6
    return {
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "wrk": outcome,
        "seconds": round(elapsed, 1),
        "cpu_seconds": {name: round(value, 2) for name, value in cpu_seconds.items()},
        "worker_cpu_us_per_request": worker_us,
        "all_processes_cpu_us_per_request": sum(cpu_seconds.values()) / requests * 1e6,
        "texts_per_model_call": requests / batches if batches else None,
        "monitor_cpu_seconds_per_minute": cpu_seconds["drift monitor"] / elapsed * 60 if mode == "on" else None,
        "profiled_worker": {
            "samples": samples,
            "shares": shares,
            "us_per_request": {name: share * worker_us for name, share in shares.items()},
        },
    }


def texts_env(texts: Path) -> dict[str, str]:
    return {"BENCH_TEXTS": str(texts), "PATH": "/usr/bin:/bin"}


# -- report ------------------------------------------------------------------------------------------------------


def print_components(part: dict[str, Any]) -> None:
    print(
        f"\n1. components in one process (best of {part['rounds']} interleaved rounds; load "
        f"{part['loadavg_before']} -> {part['loadavg_after']})"
    )
    print(f"   {'component':62s} {'us/request':>10s}  with")
    for name, value in part["us"].items():
        print(f"   {name:62s} {value:10.2f}  {'on only' if name in part['on_only'] else 'on and off'}")
    mid = part["middleware_us"]
    print(f"   middleware stack: off {mid['stack off']:.1f} us, on {mid['stack on']:.1f} us per request")
    print("   predictor (stub model): " + ", ".join(f"{k} {v:.1f}" for k, v in part["predictor_us"].items()))
    print("   metric primitives: " + ", ".join(f"{k} {v:.2f}" for k, v in part["metric_primitives_us"].items()))
    print("   recording pieces:  " + ", ".join(f"{k} {v:.2f}" for k, v in part["recording_pieces_us"].items()))


def print_whole_app(part: dict[str, Any]) -> None:
    print(
        f"\n   the whole app in this process ({part['requests']} requests, {part['concurrency']} at a time; load "
        f"{part['loadavg_before']} -> {part['loadavg_after']}):"
    )
    for name, run in part.items():
        if isinstance(run, dict):
            print(
                f"   {name:30s} CPU {run['cpu_us_per_request']:6.1f} us/request, of which garbage collection "
                f"{run['gc_us_per_request']:5.1f}"
            )


def print_service(runs: dict[str, Any]) -> None:
    print("\n2. the service under wrk (-t2 -c32), py-spy on one worker")
    for mode, run in runs.items():
        print(
            f"   {mode:3s}: {run['wrk']['requests_per_s']:7.0f} req/s, worker CPU "
            f"{run['worker_cpu_us_per_request']:6.1f} us/request, all processes "
            f"{run['all_processes_cpu_us_per_request']:6.1f} us/request, CPU s "
            f"{run['cpu_seconds']}; load {run['loadavg_before']} -> {run['loadavg_after']}"
        )
    on, off = runs.get("on"), runs.get("off")
    if on and off:
        print(f"   on/off throughput {on['wrk']['requests_per_s'] / off['wrk']['requests_per_s']:.3f}")
        if on["texts_per_model_call"]:
            print(f"   texts per model call (on): {on['texts_per_model_call']:.1f}")
        print(f"   drift monitor: {on['monitor_cpu_seconds_per_minute']:.1f} CPU s per minute at saturation")
    names = list(dict.fromkeys(name for run in runs.values() for name in run["profiled_worker"]["shares"]))
    header = "".join(f"{mode + ' us':>9s} {mode + ' share':>9s}" for mode in runs)
    print(f"   {'component (one worker)':44s}{header}")
    for name in names:
        cells = "".join(
            f"{run['profiled_worker']['us_per_request'].get(name, 0.0):9.1f} "
            f"{run['profiled_worker']['shares'].get(name, 0.0):9.1%}"
            for run in runs.values()
        )
        print(f"   {name:44s}{cells}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=15, help="wrk duration per mode (part 2)")
    parser.add_argument("--number", type=int, default=2000, help="calls per variant and round (part 1)")
    parser.add_argument("--rounds", type=int, default=20, help="interleaved rounds (part 1), best kept")
    parser.add_argument("--concurrency", type=int, default=14, help="requests per model call (part 1)")
    parser.add_argument("--app-requests", type=int, default=12_000, help="requests per variant, whole app (part 1)")
    parser.add_argument("--skip-service", action="store_true", help="part 1 only")
    parser.add_argument("--output", type=Path, default=RESULTS / "request_profile.json")
    parser.add_argument("--profiles", type=Path, help="keep py-spy's raw samples (py-spy-on.txt, -off.txt) here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="request-profile-") as tmp_dir:
        tmp = Path(tmp_dir)
        # Before anything imports prometheus_client: this process writes its metrics as a worker does.
        (tmp / "metrics").mkdir()
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(tmp / "metrics")
        from bench.monitoring import current_model

        store, version, texts = current_model()
        results: dict[str, Any] = {
            "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "command": " ".join([".venv/bin/python -m bench.request_profile", *sys.argv[1:]]),
            "machine": {"cpus": len(os.sched_getaffinity(0)), "python": platform.python_version()},
            "model_version": version,
        }
        # Log lines go to a file, as a worker's go to its stdout.
        with (tmp / "worker-stdout.log").open("w") as log_file, contextlib.redirect_stdout(log_file):
            part1 = components(args, tmp)
            app_part = whole_app(args, tmp, texts)
        results["components"] = part1
        results["whole_app"] = app_part
        print_components(part1)
        print_whole_app(app_part)
        if not args.skip_service:
            text_file = tmp / "texts.txt"
            text_file.write_text("\n".join(texts) + "\n")
            runs = {
                mode: service_run(mode, args.seconds, tmp, text_file, store, keep=args.profiles)
                for mode in ("off", "on")
            }
            results["service"] = runs
            print_service(runs)
    args.output.parent.mkdir(exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
