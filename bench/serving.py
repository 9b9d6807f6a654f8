"""Serving benchmark: floor vs single predictions vs batches vs the in-process limit, and worker memory.

Everything runs in one go on this machine so the ratios compare like with like:

1. the floor: ``bench/floor_app.py`` (fixed JSON) under the same gunicorn configuration;
2. ``POST /v1/predict`` with one text per request, wrk with 32 connections: req/s, p50, p99;
3. ``POST /v1/predict/batch`` (64 texts per request) in texts/s, against the in-process limit: the same
   texts through the loaded model in one process, no HTTP (both the scikit-learn pipeline and the
   compiled path the service uses);
4. resident memory of each web worker after the load.

Usage: ``.venv/bin/python -m bench.serving [--seconds 15]``. Prints a table and writes
``bench/results/serving.json``.
"""

from __future__ import annotations

import argparse
import platform
import random
import re
import subprocess
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from app.ml.registry import REFERENCE_ARTIFACT, ModelRegistry
from app.serving.models import prepare
from app.settings import Settings
from bench.output import write_results
from tests.integration.services import REPO, Service, start_service

CONNECTIONS = 32
BATCH = 64


def _duration_ms(value: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", value).groups()  # type: ignore[union-attr]
    return float(number) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def wrk(url: str, script: str, seconds: int, connections: int, env: dict[str, str]) -> dict[str, Any]:
    """Run wrk and return requests/s, p50/p99 latency (ms), and non-2xx/socket error counts."""
    out = subprocess.run(
        ["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", script, url],
        capture_output=True,
        text=True,
        check=True,
        env=env,
        cwd=REPO,
    ).stdout
    latency = dict(re.findall(r"^\s+(50|75|90|99)%\s+(\S+)$", out, re.MULTILINE))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: (.*)$", out, re.MULTILINE)
    return {
        "requests_per_s": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
        "p50_ms": _duration_ms(latency["50"]),
        "p99_ms": _duration_ms(latency["99"]),
        "non_2xx": int(errors.group(1)) if errors else 0,
        "socket_errors": socket_errors.group(1) if socket_errors else "",
    }


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def in_process(store: ModelRegistry, texts: list[str], seconds: float) -> dict[str, float]:
    """Texts/s of the current model on one core, in batches of BATCH, no HTTP."""
    model = store.load_current()
    assert model is not None
    served = prepare(model)
    result = {}
    for name, predict in (("pipeline", model.model.predict_proba), ("compiled", served.predict_proba)):
        predict(texts[:BATCH])
        done, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            for start in range(0, len(texts), BATCH):
                done += len(predict(texts[start : start + BATCH]))
        result[f"{name}_texts_per_s"] = done / (time.perf_counter() - started)
    return result


def spread(service: Service, route: str) -> dict[int, int]:
    """How many requests each worker answered (from the access log)."""
    counts = Counter(e["pid"] for e in service.logs() if e.get("event") == "request" and e.get("route") == route)
    return {int(pid): n for pid, n in counts.items()}  # type: ignore[call-overload]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=15)
    args = parser.parse_args()
    settings = Settings()
    store = ModelRegistry(settings.model_store)
    model = store.load_current()
    if model is None:
        raise SystemExit("no current model: run `python -m app.cli train` first")
    texts = [t.replace("\n", " ") for t in model.read_json(REFERENCE_ARTIFACT)["texts"]]
    random.Random(0).shuffle(texts)

    with tempfile.TemporaryDirectory() as tmp:
        text_file = Path(tmp) / "texts.txt"
        text_file.write_text("\n".join(texts) + "\n")
        env = {"BENCH_TEXTS": str(text_file), "BENCH_BATCH": str(BATCH), "PATH": "/usr/bin:/bin"}
        floor = start_service(None, Path(tmp) / "floor.log", app="bench.floor_app:create_app()")
        try:
            floor_run = wrk(floor.url, "bench/predict.lua", args.seconds, CONNECTIONS, env)
        finally:
            floor.stop()
        service = start_service(store, Path(tmp) / "service.log")
        try:
            single = wrk(service.url, "bench/predict.lua", args.seconds, CONNECTIONS, env)
            single["requests_per_worker"] = spread(service, "/v1/predict")
            batch = wrk(service.url, "bench/batch.lua", args.seconds, 8, env)
            batch["texts_per_s"] = batch["requests_per_s"] * BATCH
            workers = {pid: round(rss_mb(pid), 1) for pid in service.worker_pids()}
        finally:
            service.stop()
    limit = in_process(store, texts, args.seconds / 3)

    results = {
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": len(__import__("os").sched_getaffinity(0)), "python": platform.python_version()},
        "model_version": model.version,
        "wrk": f"-t2 -c{CONNECTIONS} -d{args.seconds}s (batch: -c8, {BATCH} texts per request)",
        "floor": floor_run,
        "single": single,
        "single_vs_floor": single["requests_per_s"] / floor_run["requests_per_s"],
        "batch": batch,
        "in_process": limit,
        # The service has two workers on two cores; the in-process limit runs on one core.
        "batch_vs_in_process_per_worker": batch["texts_per_s"] / len(workers) / limit["compiled_texts_per_s"],
        "batch_vs_in_process_pipeline": batch["texts_per_s"] / limit["pipeline_texts_per_s"],
        "worker_rss_mb": workers,
    }
    write_results("serving", results)
    print(
        f"floor            {floor_run['requests_per_s']:9.0f} req/s  p50 {floor_run['p50_ms']:6.2f} ms  "
        f"p99 {floor_run['p99_ms']:6.2f} ms"
    )
    print(
        f"/v1/predict      {single['requests_per_s']:9.0f} req/s  p50 {single['p50_ms']:6.2f} ms  "
        f"p99 {single['p99_ms']:6.2f} ms  = {results['single_vs_floor']:.1%} of floor; "
        f"per worker {single['requests_per_worker']}"
    )
    print(f"/v1/predict/batch {batch['texts_per_s']:8.0f} texts/s (p99 {batch['p99_ms']:.1f} ms per request)")
    print(
        f"in process       {limit['compiled_texts_per_s']:9.0f} texts/s compiled, "
        f"{limit['pipeline_texts_per_s']:.0f} scikit-learn pipeline (one core)"
    )
    print(
        f"batch per worker / in-process limit (compiled, one core): {results['batch_vs_in_process_per_worker']:.1%}; "
        f"batch / pipeline limit (one core): {results['batch_vs_in_process_pipeline']:.1%}"
    )
    print(f"worker RSS MB    {workers}")
    print(f"non-2xx: single {single['non_2xx']}, batch {batch['non_2xx']}")


if __name__ == "__main__":
    main()
