"""What the queries of labelled rows and the inserts cost on a full prediction log: the code's (labels known by
their time, ``labelled_at IS NOT NULL``, on the partial index of labelled rows: revision 5e8b3d1f6a20) against
the release before (``label IS NOT NULL`` on a full index: revision a9e3f27c4d15), in one run on one SQLite file.

The drift monitor reads the live accuracy (the latest ``SENTIMENT_LIVE_ACCURACY_WINDOW`` = 500 labels) once a
second, every feedback request reads it too, and the monitor enforces retention every five minutes; the log
holds up to ``SENTIMENT_RETENTION_MAX_ROWS`` (1,000,000) unlabelled predictions. Each repository method runs
with the code's condition and with the one before (``app.storage.predictions.LABELLED`` swapped), with fewer
labels than the live window (a new service, sparse feedback) and with more, best of ``--repeat``; the inserts
write ``--insert-rows`` rows in 500-row statements on each index.

Usage: ``.venv/bin/python -m bench.log_queries [--rows 1000000]``; writes ``bench/results/log_queries.json``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from app import migrations
from app.migrations import upgrade
from app.storage import predictions as prediction_storage
from app.storage.database import LABELLED, Database, predictions
from app.storage.predictions import PredictionRepository
from bench.flush_contention import rows as prediction_rows
from bench.output import write_results

PARTIAL_INDEX_REVISION, FULL_INDEX_REVISION = "5e8b3d1f6a20", "a9e3f27c4d15"
CHUNK = 2000
LIVE_WINDOW = 500
LABEL_COUNTS = (200, 2000)  # below and above the live window
BEFORE = predictions.c.label.is_not(None)  # the release before: a label known by its value


def chunks(rows: int, start: float) -> Iterator[list[dict[str, Any]]]:
    """``rows`` unlabelled predictions a second apart from ``start``, in the recorder's chunks."""
    for low in range(0, rows, CHUNK):
        yield prediction_rows(min(CHUNK, rows - low), start=start + low)


def fill(repository: PredictionRepository, rows: int, start: float) -> None:
    for chunk in chunks(rows, start):
        repository.insert_predictions(chunk)


def label(repository: PredictionRepository, count: int) -> None:
    """Label ``count`` more predictions, spread over the log, each at its prediction's time."""
    with repository.engine.begin() as conn:
        rows = conn.exec_driver_sql("SELECT count(*) FROM predictions").scalar_one()
        conn.exec_driver_sql(
            "UPDATE predictions SET label = 'negative', labelled_at = created_at, label_source = 'web' WHERE rowid IN "
            f"(SELECT rowid FROM predictions WHERE labelled_at IS NULL AND rowid % {rows // count} = 0 LIMIT {count})"
        )


def best(call: Callable[[], object], repeat: int) -> float:
    """Least wall time of ``repeat`` calls, in milliseconds."""
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return min(times) * 1e3


def insert_us_per_row(repository: PredictionRepository, rows: int, start: float) -> float:
    """CPU microseconds per row (this process, SQLite's work included) of inserting ``rows`` more, in the
    recorder's chunks; the rows are built before the clock starts."""
    built = list(chunks(rows, start))
    started = time.process_time()
    for chunk in built:
        repository.insert_predictions(chunk)
    return (time.process_time() - started) / rows * 1e6


def queries(repository: PredictionRepository, now: float, repeat: int) -> dict[str, float]:
    """Milliseconds per call, best of ``repeat``, of each periodic query of labelled rows."""
    calls: dict[str, Callable[[], object]] = {
        "live accuracy (monitor: every second; each feedback request)": lambda: repository.live_accuracy(LIVE_WINDOW),
        "retention (monitor: every 5 minutes; 1,000,000 unlabelled and 500,000 labelled rows kept)": (
            lambda: repository.enforce_retention(10**6, 10**12, now, max_labelled_rows=500_000)
        ),
        "labels per feedback token (label-sources command)": repository.label_sources,
    }
    return {name: best(call, repeat) for name, call in calls.items()}


def at_revision(url: str, revision: str) -> float:
    """Move the database to ``revision`` (up or down); return the seconds it took."""
    started = time.perf_counter()
    if revision == PARTIAL_INDEX_REVISION:
        upgrade(url, revision)
    else:
        migrations.downgrade(url, revision)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="unlabelled predictions in the log")
    parser.add_argument("--insert-rows", type=int, default=20_000, help="rows inserted on each index per round")
    parser.add_argument("--rounds", type=int, default=3, help="insert rounds on each index, alternating")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    forms = {"code": (PARTIAL_INDEX_REVISION, LABELLED), "before": (FULL_INDEX_REVISION, BEFORE)}
    measured: dict[str, dict[str, float]] = {}
    inserts: dict[str, list[float]] = {name: [] for name in forms}
    migration_seconds: list[float] = []  # revision 5e8b3d1f6a20 on the full log
    with tempfile.TemporaryDirectory() as folder:
        url = f"sqlite:///{Path(folder) / 'predictions.db'}"
        upgrade(url)
        database = Database(url)
        fill(PredictionRepository(database), args.rows, start=1.7e9)
        database.dispose()
        now = 1.7e9 + args.rows
        for round_number in range(args.rounds):
            for name, (revision, _) in forms.items():
                seconds = at_revision(url, revision)
                if round_number and revision == PARTIAL_INDEX_REVISION:
                    migration_seconds.append(seconds)
                database = Database(url)
                start = now + len(inserts["code"] + inserts["before"]) * args.insert_rows
                inserts[name].append(insert_us_per_row(PredictionRepository(database), args.insert_rows, start))
                database.dispose()
        size_mb = (Path(folder) / "predictions.db").stat().st_size / 1e6
        labelled = 0
        for count in LABEL_COUNTS:
            database = Database(url)
            label(PredictionRepository(database), count - labelled)
            database.dispose()
            labelled = count
            for name, (revision, condition) in forms.items():
                at_revision(url, revision)
                database = Database(url)
                prediction_storage.LABELLED = condition
                try:
                    for query, ms in queries(PredictionRepository(database), now, args.repeat).items():
                        measured.setdefault(f"{query}, {labelled:,} labelled", {})[name] = ms
                finally:
                    prediction_storage.LABELLED = LABELLED
                    database.dispose()
    results: dict[str, Any] = {
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "rows": args.rows,
        "database_mb": round(size_mb),
        "query_ms_best_of": args.repeat,
        "query_ms": measured,
        "insert_cpu_us_per_row": inserts,
        "insert_cpu_us_per_row_best": {name: min(values) for name, values in inserts.items()},
        "partial_index_migration_seconds": migration_seconds,
        "load_average": os.getloadavg(),
    }
    print(f"SQLite log of {args.rows:,} unlabelled predictions ({size_mb:.0f} MB): ms per call, code / release before")
    for query, ms in measured.items():
        print(f"  {query}: {ms['code']:.2f} / {ms['before']:.2f} ({ms['before'] / ms['code']:.0f}x)")
    print(
        f"insert CPU per row (500-row statements, best of {args.rounds}): code {min(inserts['code']):.1f} us, "
        f"before {min(inserts['before']):.1f} us"
    )
    print(f"revision {PARTIAL_INDEX_REVISION} on the full log: {', '.join(f'{s:.2f}' for s in migration_seconds)} s")
    write_results("log_queries", results)
    print("wrote bench/results/log_queries.json")


if __name__ == "__main__":
    main()
