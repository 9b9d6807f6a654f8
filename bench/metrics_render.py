"""What dead processes' metric files cost one ``/metrics`` render, before and after compaction.

Forks ``--processes`` (300) short-lived processes from one that imported ``app.monitoring.metrics`` in
multiprocess mode, as gunicorn's workers, the drift monitor and retrains are: most serve a few dozen
predictions (request, inference, confidence and length histograms; prediction, feedback and initialised
counters) with the model version advancing every 50 processes, one in ten runs drift checks, one in ten a
retrain. Each exits and is reaped and marked dead (gunicorn's ``child_exit`` before compaction); four stay alive.
Then it times, in CPU seconds of this process (median of ``--repeats``):

1. one render as ``/metrics`` did before compaction existed (a fresh ``MultiProcessCollector`` over every file);
2. one compaction of the dead processes' files (``app.monitoring.exposition.compact``);
3. one render as ``/metrics`` does now (``app.monitoring.metrics.render``), after the compaction;

and checks that both renders parse to the same samples (counts exactly; float ``_sum`` to 1e-12).

Usage: ``.venv/bin/python -m bench.metrics_render [--processes 300]``; writes
``bench/results/metrics_render.json``.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.output import write_results

LIVE = 4
ROUTES = ("/v1/predict", "/v1/predict", "/v1/predict", "/v1/predict/batch", "/v1/feedback", "/healthz", "/metrics")
STATUSES = ("200", "200", "200", "200", "422", "503")
DRIFT_TESTS = ("mmd", "length", "length_tail", "confidence", "label_mix")


def workload(index: int) -> None:
    """What one process of the service writes in its life (run in a forked child)."""
    import numpy as np

    from app.monitoring import metrics as m
    from app.monitoring.metric_writes import WRITES

    rng = np.random.default_rng(index)
    version = f"v{index // 50 + 1}"
    kind = index % 10
    if kind == 8:  # the drift monitor
        for _ in range(int(rng.integers(1, 6))):
            m.DRIFT_CHECKS.labels(outcome=str(rng.choice(m.DRIFT_CHECK_OUTCOMES))).inc()
            m.DRIFT_CHECK_DURATION.observe(float(rng.uniform(0.05, 3)))
        for test in DRIFT_TESTS:
            m.DRIFT_TEST_P_VALUE.labels(test=test).set(float(rng.uniform()))
        for gauge in (m.DRIFT_SCORE, m.DRIFT_P_VALUE, m.DRIFT_THRESHOLD, m.CONFIDENCE_MEAN, m.DRIFT_WINDOW_SIZE):
            gauge.set(float(rng.uniform()))
        m.DRIFT_DETECTED.set(0)
        m.DRIFT_LAST_CHECK.set(time.time())
        return
    if kind == 9:  # a retrain
        m.RETRAIN_TOTAL.labels(trigger="alertmanager", outcome=str(rng.choice(m.RETRAIN_OUTCOMES))).inc()
        m.RETRAIN_DURATION.observe(float(rng.uniform(10, 300)))
        return
    m.initialise_counters()  # a web worker (gunicorn's post_worker_init)
    m.MODEL_INFO.labels(version=version).set(1)
    for _ in range(int(rng.integers(20, 60))):
        m.REQUESTS_IN_PROGRESS.inc()
        route, status = str(rng.choice(ROUTES)), str(rng.choice(STATUSES))
        m.REQUEST_DURATION.labels(
            method="GET" if route in ("/healthz", "/metrics") else "POST", route=route, status=status
        ).observe(float(rng.lognormal(-6, 1)))
        if route.startswith("/v1/predict") and status == "200":
            texts = 1 if route == "/v1/predict" else int(rng.integers(2, 32))
            m.INFERENCE_DURATION.labels(model_version=version).observe(float(rng.lognormal(-7, 1)))
            confidence = rng.uniform(0.5, 1.0, texts)
            for sentiment in ("negative", "positive"):
                picked = confidence[rng.uniform(size=texts) < 0.5].tolist()
                if picked:
                    m.PREDICTIONS.labels(model_version=version, sentiment=sentiment).inc(len(picked))
                    confidences = m.PREDICTION_CONFIDENCE.labels(model_version=version, sentiment=sentiment)
                    WRITES.observe_many(confidences, picked)
            WRITES.observe_many(m.TEXT_LENGTH, rng.integers(5, 2000, texts).tolist())
        if route == "/v1/feedback" and status == "200":
            m.FEEDBACK.labels(sentiment=str(rng.choice(("negative", "positive")))).inc()
        m.REQUESTS_IN_PROGRESS.dec()
    m.PREDICTION_LOG_PENDING.set(0)


def fork(index: int, *, stay: bool = False) -> int:
    pid = os.fork()
    if pid:
        return pid
    code = 0
    try:
        workload(index)
        if stay:
            signal.pause()
    except BaseException:
        code = 1
    os._exit(code)


def cpu_seconds(action: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    times, result = [], None
    for _ in range(repeats):
        started = time.process_time()
        result = action()
        times.append(time.process_time() - started)
    return statistics.median(times), result


def parse(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text.decode())
        for s in family.samples
    }


def same(before: dict[Any, float], after: dict[Any, float]) -> tuple[bool, float]:
    """Whether the samples match (exactly, or to 1e-12 for float sums); the largest relative difference."""
    worst = 0.0
    if before.keys() != after.keys():
        return False, math.inf
    for key, value in before.items():
        if value != after[key]:
            if not key[0].endswith("_sum") or not math.isclose(value, after[key], rel_tol=1e-12):
                return False, math.inf
            worst = max(worst, abs(value - after[key]) / abs(value))
    return True, worst


def directory_stats(directory: Path) -> dict[str, int]:
    files = [p for p in directory.iterdir() if p.name.endswith(".db") and not p.name.startswith(".")]
    return {"files": len(files), "bytes": sum(p.stat().st_size for p in files)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=300, help="dead processes to leave files behind")
    parser.add_argument("--repeats", type=int, default=5, help="renders timed per measurement (median)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="metrics-render-") as tmp:
        directory = Path(tmp)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tmp  # before prometheus_client is imported
        from prometheus_client import CollectorRegistry, generate_latest
        from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

        from app.monitoring import exposition, metrics

        live = [fork(10_000 + n, stay=True) for n in range(LIVE)]
        started = time.perf_counter()
        for index in range(args.processes):
            pid = fork(index)
            _, status = os.waitpid(pid, 0)
            if os.waitstatus_to_exitcode(status) != 0:
                sys.exit(f"process {index} failed")
            mark_process_dead(pid, tmp)  # type: ignore[no-untyped-call]
        setup_seconds = time.perf_counter() - started

        def stock_render() -> bytes:
            registry = CollectorRegistry()
            MultiProcessCollector(registry, path=tmp)  # type: ignore[no-untyped-call]
            return generate_latest(registry)

        def render() -> bytes:
            return metrics.render()[0]

        files_before = directory_stats(directory)
        before_cpu, before_text = cpu_seconds(stock_render, args.repeats)
        dead_files = len(exposition.dead_files(directory))
        compact_started = time.perf_counter()
        compact_cpu, compaction = cpu_seconds(lambda: exposition.compact(directory), 1)
        compact_wall = time.perf_counter() - compact_started
        files_after = directory_stats(directory)
        after_cpu, after_text = cpu_seconds(render, args.repeats)
        identical, worst = same(parse(before_text), parse(after_text))
        for pid in live:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)

    results = {
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join([".venv/bin/python -m bench.metrics_render", *sys.argv[1:]]),
        "dead_processes": args.processes,
        "live_processes": LIVE + 1,  # the forked ones and this one
        "setup_seconds": round(setup_seconds, 1),
        "before": {
            **files_before,
            "dead_files": dead_files,
            "render_cpu_seconds": round(before_cpu, 4),
            "exposition_bytes": len(before_text),
        },
        "compaction": {
            "merged_files": compaction.merged_files,
            "cpu_seconds": round(compact_cpu, 4),
            "wall_seconds": round(compact_wall, 4),
        },
        "after": {**files_after, "render_cpu_seconds": round(after_cpu, 4), "exposition_bytes": len(after_text)},
        "render_speedup": round(before_cpu / after_cpu, 1),
        "identical_samples": identical,
        "max_relative_difference_of_float_sums": worst,
        "repeats": args.repeats,
    }
    write_results("metrics_render", results)
    print(
        f"{args.processes} dead processes, {files_before['files']} files ({files_before['bytes'] / 1e6:.1f} MB): "
        f"render {before_cpu:.3f} s CPU -> compaction {compact_cpu:.3f} s CPU ({compaction.merged_files} files "
        f"merged) -> {files_after['files']} files: render {after_cpu:.4f} s CPU "
        f"({results['render_speedup']}x); samples identical: {identical} (float sums within {worst:.1e})"
    )


if __name__ == "__main__":
    main()
