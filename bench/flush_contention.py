"""How fast a web worker's flush thread writes prediction rows while the event loop's thread keeps the GIL busy.

The recorder writes on the database's threads; under saturation the worker's event loop runs Python almost
without pause. A database driver releases the GIL around each statement it runs and must take it back after:
with one statement per row (``executemany``) the flush waits for a GIL hand-over per row. This measures
``PredictionRepository.insert_predictions`` with 1 row per statement (``executemany``'s shape) and with
500 rows per statement (``STATEMENT_ROWS``), alone and beside a thread that spins in Python, on SQLite and, with
``--postgres``, on a real PostgreSQL (started by the test helpers).

Usage: ``.venv/bin/python -m bench.flush_contention [--rows 20000] [--postgres]``; writes
``bench/results/flush_contention.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from app.migrations import upgrade
from app.serving.predictor import prediction_ids
from app.storage import predictions as prediction_storage
from app.storage.database import Database
from app.storage.predictions import PredictionRepository
from bench.output import write_results


def random_ids(n: int) -> list[str]:
    """uuid4-like ids: 128 random bits (what prediction ids were before they were time-ordered)."""
    return [os.urandom(16).hex() for _ in range(n)]


ID_SCHEMES: dict[str, Callable[[int], list[str]]] = {
    "random (uuid4)": random_ids,
    "time-ordered (UUIDv7)": prediction_ids,
}


def rows(n: int, ids: Callable[[int], list[str]] = prediction_ids, start: float | None = None) -> list[dict[str, Any]]:
    """Prediction rows with a 96-character text, as a typical review: all made now, or a second apart from
    ``start``."""
    now = time.time()
    return [
        {
            "id": prediction_id,
            "created_at": now if start is None else start + i,
            "text": "a film with more heart than sense, and a plot that never quite holds together, sadly",
            "text_length": 96,
            "sentiment": "positive",
            "confidence": 0.83,
            "p_positive": 0.83,
            "model_version": "v20261201T000000Z-000000",
            "latency_ms": 4.2,
        }
        for i, prediction_id in enumerate(ids(n))
    ]


@contextlib.contextmanager
def busy_interpreter(busy: bool) -> Iterator[None]:
    """A thread running Python without pause, as a saturated worker's event loop does."""
    stop = threading.Event()

    def spin() -> None:
        count = 0
        while not stop.is_set():
            count += 1

    thread = threading.Thread(target=spin, daemon=True)
    if busy:
        thread.start()
    try:
        yield
    finally:
        stop.set()
        if busy:
            thread.join()


def measure(url: str, n: int, per_statement: int, busy: bool) -> float:
    """Wall-clock µs per row to insert ``n`` fresh rows, ``per_statement`` rows per driver statement."""
    database = Database(url)
    repository = PredictionRepository(database)
    saved = prediction_storage.STATEMENT_ROWS
    prediction_storage.STATEMENT_ROWS = (per_statement,)
    try:
        batch = rows(n)
        repository.insert_predictions(rows(10))  # connect first
        with busy_interpreter(busy):
            started = time.perf_counter()
            for start in range(0, n, 2000):  # the recorder's flush chunk
                repository.insert_predictions(batch[start : start + 2000])
            return (time.perf_counter() - started) * 1e6 / n
    finally:
        prediction_storage.STATEMENT_ROWS = saved
        database.dispose()


def run(name: str, url: str, n: int) -> dict[str, float]:
    results: dict[str, float] = {}
    for per_statement in (1, prediction_storage.STATEMENT_ROWS[0]):
        for busy in (False, True):
            key = f"{per_statement} per statement, {'event loop busy' if busy else 'alone'}"
            count = n // 10 if busy and per_statement == 1 else n
            results[key] = round(measure(url, count, per_statement, busy), 2)
            print(f"{name:10} {key:42} {results[key]:9.1f} µs per row", flush=True)
    return results


def measure_ids(fresh_database: Callable[[str], str], prefill: int, n: int) -> dict[str, float]:
    """CPU µs per row of this process (SQLite writes in it; PostgreSQL's server work is not counted) and wall
    µs per row to insert ``n`` rows into a log already holding ``prefill`` rows, per id scheme, each in a new
    migrated database (``fresh_database(name)`` returns its URL): the primary key's index holds ``prefill``
    ids of that scheme first."""
    results: dict[str, float] = {}
    for number, (scheme, ids) in enumerate(ID_SCHEMES.items()):
        database = Database(fresh_database(f"ids{number}"))
        repository = PredictionRepository(database)
        try:
            for start in range(0, prefill, 2000):
                repository.insert_predictions(rows(min(2000, prefill - start), ids))
            batch = rows(n, ids)
            cpu, wall = time.process_time(), time.perf_counter()
            for start in range(0, n, 2000):
                repository.insert_predictions(batch[start : start + 2000])
            results[f"{scheme}: CPU"] = round((time.process_time() - cpu) * 1e6 / n, 2)
            results[f"{scheme}: wall"] = round((time.perf_counter() - wall) * 1e6 / n, 2)
        finally:
            database.dispose()
        print(
            f"{scheme:22} after {prefill:,} rows: {results[f'{scheme}: CPU']:6.1f} µs CPU, "
            f"{results[f'{scheme}: wall']:6.1f} µs wall per row",
            flush=True,
        )
    return results


def sqlite_databases(folder: Path) -> Callable[[str], str]:
    def fresh(name: str) -> str:
        url = f"sqlite:///{folder / name}.db"
        upgrade(url)
        return url

    return fresh


def on_postgres(n: int, prefill: int) -> dict[str, Any]:
    """:func:`run` on a real PostgreSQL with its default durability (``bench/backing.py``)."""
    import shutil

    from bench.backing import DurablePostgres
    from tests.postgres import _bin_dir

    bin_dir = _bin_dir()
    if bin_dir is None:
        raise SystemExit("needs Debian's postgresql (scripts/system-deps)")
    root = Path(tempfile.mkdtemp(prefix="bench-pg-"))  # not under a root-only folder: the server runs as postgres
    cluster = DurablePostgres(root, bin_dir)
    try:
        cluster.init()
        cluster.start()
        url = cluster.create_database("flush")
        upgrade(url)

        def fresh(name: str) -> str:
            created = cluster.create_database(name)
            upgrade(created)
            return created

        return {**run("postgresql", url, n), "ids": measure_ids(fresh, prefill, n)}
    finally:
        if cluster.running:
            cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--postgres", action="store_true", help="also on a real PostgreSQL (tests/postgres.py)")
    parser.add_argument("--prefill", type=int, default=200_000, help="rows in the log before the id comparison")
    args = parser.parse_args()
    result: dict[str, Any] = {
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "rows": args.rows,
        "rows_per_statement": prediction_storage.STATEMENT_ROWS[0],
        "prefill": args.prefill,
        "note": "1 row per statement, event loop busy: a tenth of the rows (each costs a GIL hand-over)",
    }
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{Path(tmp) / 'predictions.db'}"
        upgrade(url)
        ids = measure_ids(sqlite_databases(Path(tmp)), args.prefill, args.rows)
        result["sqlite"] = {**run("sqlite", url, args.rows), "ids": ids}
    if args.postgres:
        result["postgresql"] = on_postgres(args.rows, args.prefill)
    print(f"wrote {write_results('flush_contention', result)}")


if __name__ == "__main__":
    main()
