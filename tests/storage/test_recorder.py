"""The write-behind recorder: background and shutdown flushes, a failing database, refused rows, the memory
bound, and the spool a killed worker leaves."""

from __future__ import annotations

import asyncio
import json
import marshal
import random
import signal
import sqlite3
import struct
import subprocess
import sys
import time
import tracemalloc
import uuid
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from app.migrations import upgrade
from app.monitoring.spool import PredictionSpool
from app.storage.database import Database
from app.storage.predictions import LOG_COLUMNS, PredictionRepository
from app.storage.recorder import PredictionRecorder
from tests.postgres import postgres, postgres_url  # noqa: F401  fixtures
from tests.storage.test_predictions import log_row, row

REPO = Path(__file__).resolve().parents[2]


def errors(reason: str) -> float:
    return REGISTRY.get_sample_value("sentiment_prediction_log_errors_total", {"reason": reason}) or 0.0


def dropped(reason: str) -> float:
    return REGISTRY.get_sample_value("sentiment_prediction_log_dropped_total", {"reason": reason}) or 0.0


def test_recorder_flushes_in_the_background_and_on_close(predictions: PredictionRepository) -> None:
    async def scenario() -> tuple[int, int]:
        recorder = PredictionRecorder(predictions, flush_interval=0.05, max_buffer=100)
        recorder.start()
        recorder.record([log_row(i) for i in range(5)])
        await asyncio.sleep(0.2)
        flushed = predictions.count_predictions()
        recorder.record([log_row(i) for i in range(5, 8)])
        await recorder.close()
        return flushed, predictions.count_predictions()

    assert asyncio.run(scenario()) == (5, 8)


def test_recorder_survives_a_failing_database_and_counts_it(tmp_path: Path) -> None:
    broken = PredictionRepository(
        Database(f"sqlite:///{tmp_path / 'log.db'}")
    )  # tables never created: every insert fails
    before_failed, before_dropped = errors("write_failed"), dropped("buffer_full")

    async def scenario() -> int:
        recorder = PredictionRecorder(broken, flush_interval=10, max_buffer=5)
        recorder.record([log_row(i) for i in range(3)])
        await recorder.flush()
        pending_after_failure = recorder.pending
        assert REGISTRY.get_sample_value("sentiment_prediction_log_pending_rows") == 3  # the gauge says so too
        recorder.record([log_row(i) for i in range(3, 6)])
        return pending_after_failure

    assert asyncio.run(scenario()) == 3  # kept for the next attempt
    assert errors("write_failed") == before_failed + 1
    assert dropped("buffer_full") == before_dropped + 1  # 6 rows, room for 5


# -- never lost without a trace -----------------------------------------------------------------------


def test_a_refused_row_is_set_aside_and_the_flush_task_keeps_writing(predictions: PredictionRepository) -> None:
    """A lone surrogate (UnicodeEncodeError in the driver) and a NOT NULL violation cost only their rows."""
    bad_text = log_row(3, text="caf\ud800")
    bad_null = log_row(6, sentiment=None)
    before = dropped("rejected_row")

    async def scenario() -> tuple[bool, int]:
        recorder = PredictionRecorder(predictions, flush_interval=0.02, max_buffer=100)
        recorder.start()
        recorder.record([log_row(i) for i in range(3)] + [bad_text] + [log_row(4), log_row(5), bad_null, log_row(7)])
        await asyncio.sleep(0.3)
        recorder.record([log_row(8), log_row(9)])  # the task is still running after the bad rows
        await asyncio.sleep(0.3)
        alive = recorder._task is not None and not recorder._task.done()
        pending = recorder.pending
        await recorder.close()
        return alive, pending

    with capture_logs() as logs:
        assert asyncio.run(scenario()) == (True, 0)
    assert predictions.count_predictions() == 8
    assert predictions.get_prediction("p00003") is None and predictions.get_prediction("p00007") is not None
    assert dropped("rejected_row") == before + 2
    rejected = [e for e in logs if e["event"] == "prediction_log_row_rejected"]
    assert {e["prediction_id"]: e["reason"] for e in rejected} == {
        "p00003": "UnicodeEncodeError",
        "p00006": "IntegrityError",
    }
    assert not any("text number" in repr(e) or "caf" in repr(e) for e in logs)  # ids, never texts


def test_the_buffer_is_bounded_in_bytes_and_drops_the_oldest(tmp_path: Path) -> None:
    """50 rows of 10,000 characters do not fit in 200 kB: the oldest go, counted, and memory stays bounded."""
    broken = PredictionRepository(Database(f"sqlite:///{tmp_path / 'log.db'}"))
    before = dropped("buffer_full")

    async def scenario() -> PredictionRecorder:
        recorder = PredictionRecorder(broken, flush_interval=10, max_buffer=1000, max_buffer_bytes=200_000)
        for i in range(50):
            recorder.record([log_row(i, text="x" * 10_000)])
        await recorder.flush()  # fails: the rows stay, within the bound
        return recorder

    recorder = asyncio.run(scenario())
    kept = [r[0] for _, _, r in recorder._buffer]
    assert recorder._bytes <= 200_000 and len(kept) == 19  # 10,469 bytes each
    assert kept == [f"p{i:05d}" for i in range(31, 50)]
    assert dropped("buffer_full") == before + 31


def test_the_byte_estimate_covers_what_buffered_rows_really_take(tmp_path: Path) -> None:
    """The bound counts at least the memory the buffered rows hold, as the predictor builds them."""
    recorder = PredictionRecorder(PredictionRepository(Database(f"sqlite:///{tmp_path / 'log.db'}")), 10, 100_000)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(2000):
            text = "".join(random.Random(i).choices("abcdef ", k=i % 300))
            recorder.record(
                [
                    (
                        uuid.uuid4().hex,
                        time.time(),
                        text,
                        len(text),
                        "positive",
                        random.random(),
                        random.random(),
                        "v1",
                        random.random(),
                    )
                ]
            )
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert held <= recorder._bytes <= 1.3 * held, (held, recorder._bytes)


def test_graceful_close_gives_up_at_its_deadline_and_counts_what_it_could_not_write(tmp_path: Path) -> None:
    """A database locked by another writer: close returns within its timeout; unspooled rows count as lost."""
    path = tmp_path / "log.db"
    upgrade(f"sqlite:///{path}")
    locked = PredictionRepository(Database(f"sqlite:///{path}"))
    blocker = sqlite3.connect(path, timeout=0)
    blocker.execute("BEGIN EXCLUSIVE")
    before = dropped("shutdown")

    async def scenario() -> float:
        recorder = PredictionRecorder(locked, 10, 100, shutdown_timeout=0.3)
        recorder.record([log_row(i) for i in range(4)])
        started = time.monotonic()
        await recorder.close()
        return time.monotonic() - started

    try:
        assert asyncio.run(scenario()) < 1.5  # sqlite would wait 5 s for the lock
    finally:
        blocker.rollback()
        blocker.close()
        locked.database.dispose()
    assert dropped("shutdown") == before + 4


# -- the spool: what a killed worker had not written ------------------------------------------------------

_KILLED_WORKER = """
import os, signal, sys
from pathlib import Path
from app.monitoring.spool import PredictionSpool
from app.storage.predictions import LOG_COLUMNS
from tests.storage.test_predictions import log_row
spool = PredictionSpool(Path(sys.argv[1]))
spool.open()
for i in range(0, 30, 3):
    spool.append(LOG_COLUMNS, [log_row(i), log_row(i + 1), log_row(i + 2)])
spool.rotate()
spool.append(LOG_COLUMNS, [log_row(30, text="caf\\ud800")])
os.kill(os.getpid(), signal.SIGKILL)
"""


async def _adopt_and_write(directory: Path, predictions: PredictionRepository) -> int:
    """A new worker's recorder on ``directory``: adopt the dead owners' spools, write them, close; rows adopted."""
    spool = PredictionSpool(directory)
    spool.open()
    recorder = PredictionRecorder(predictions, 10, 100, spool=spool)
    adopted = await recorder.adopt_orphans()
    await recorder.flush()
    await recorder.close()
    return adopted


def test_a_killed_workers_spooled_rows_reach_the_log_through_a_survivor(
    tmp_path: Path, predictions: PredictionRepository
) -> None:
    """SIGKILL after appending: every appended row is on disk, and another worker writes it (bad row aside)."""
    directory = tmp_path / "spool"
    killed = subprocess.run([sys.executable, "-c", _KILLED_WORKER, str(directory)], cwd=REPO, check=False)
    assert killed.returncode == -signal.SIGKILL
    assert len(list(directory.glob("*.spool"))) == 2

    assert asyncio.run(_adopt_and_write(directory, predictions)) == 31
    assert predictions.count_predictions() == 30  # the lone surrogate was rejected again, by the database
    assert list(directory.iterdir()) == []  # everything written: segments and locks gone


def test_a_live_workers_spool_is_left_alone_and_a_closed_one_is_adopted(
    tmp_path: Path, predictions: PredictionRepository
) -> None:
    """Only a free lock (a dead or departed owner) lets a spool be adopted; rows left at close are kept."""
    directory = tmp_path / "spool"
    broken = PredictionRepository(
        Database(f"sqlite:///{tmp_path / 'broken.db'}")
    )  # no tables: the first worker cannot write

    async def scenario() -> tuple[int, int, int]:
        first, second = PredictionSpool(directory), PredictionSpool(directory)
        first.open()
        second.open()
        writer = PredictionRecorder(broken, 10, 100, spool=first)
        survivor = PredictionRecorder(predictions, 10, 100, spool=second)
        writer.record([log_row(i) for i in range(5)])
        while_alive = await survivor.adopt_orphans()
        await writer.close()  # the database fails: the rows stay in its spool, not counted as lost
        after_close = await survivor.adopt_orphans()
        await survivor.flush()
        await survivor.close()
        return while_alive, after_close, predictions.count_predictions()

    before = dropped("shutdown")
    assert asyncio.run(scenario()) == (0, 5, 5)
    assert dropped("shutdown") == before


def _dead_owner(directory: Path, segments: dict[str, bytes]) -> None:
    """Files a killed worker would leave: a free lock and its segments (name suffix -> content)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "deadbeef.lock").touch()
    for name, content in segments.items():
        (directory / f"deadbeef.{name}").write_bytes(content)


def _record(columns: tuple[str, ...], rows: list[tuple[Any, ...]]) -> bytes:
    payload = marshal.dumps((columns, rows), 4)
    return struct.pack("<I", len(payload)) + payload


def test_damaged_spool_records_are_skipped_and_logged_and_the_others_adopted(tmp_path: Path) -> None:
    """A record that does not decode, one of the wrong shape and a torn last one cost only themselves."""
    good = [log_row(i) for i in range(3)]
    reordered = tuple(reversed(LOG_COLUMNS))
    _dead_owner(
        tmp_path,
        {
            "00000001.spool": _record(LOG_COLUMNS, good[:2])
            + struct.pack("<I", 3)
            + b"\xff\xfe\xfd"  # not marshal
            + _record(("id",), [("a", "b")])  # a row longer than its columns
            + _record(reordered, [tuple(reversed(good[2]))])  # another column order: read by name
            + _record(LOG_COLUMNS, [log_row(9)])[:-5],  # torn by a full disk
        },
    )
    spool = PredictionSpool(tmp_path)
    spool.open()
    with capture_logs() as logs:
        ((_, rows),) = spool.claim_orphans(LOG_COLUMNS)
    assert rows == good
    skipped = [e for e in logs if e["event"] == "prediction_spool_records_skipped"]
    assert [e["records"] for e in skipped] == [3]


def test_segments_of_the_earlier_json_lines_format_are_adopted_and_then_deleted(
    tmp_path: Path, predictions: PredictionRepository
) -> None:
    """A spool left by a version that wrote JSON lines (rows as objects, by name) still reaches the log."""
    directory = tmp_path / "spool"
    rows = [row(i) for i in range(5)]
    reversed_keys = dict(reversed(rows[3].items()))
    incomplete = {k: v for k, v in rows[4].items() if k != "latency_ms"}  # refused by the database: NOT NULL
    _dead_owner(
        directory,
        {
            "00000001.jsonl": (json.dumps(rows[:3]) + "\n" + "[{torn").encode(),
            "00000002.jsonl": (json.dumps([reversed_keys, incomplete]) + "\n").encode(),
        },
    )
    before = dropped("rejected_row")

    with capture_logs() as logs:
        assert asyncio.run(_adopt_and_write(directory, predictions)) == 5
    assert predictions.count_predictions() == 4
    stored = predictions.get_prediction("p00003")
    assert stored is not None and stored.text == "text number 3" and stored.latency_ms == 1.0
    assert dropped("rejected_row") == before + 1
    assert [e["records"] for e in logs if e["event"] == "prediction_spool_records_skipped"] == [1]
    assert list(directory.iterdir()) == []


@pytest.mark.integration
def test_a_nul_character_is_refused_by_postgresql_and_set_aside_alone(postgres_url: str) -> None:  # noqa: F811
    """PostgreSQL text cannot hold NUL: that row is rejected and counted, its batch is written."""
    upgrade(postgres_url)
    prediction_db = PredictionRepository(Database(postgres_url))
    before = dropped("rejected_row")

    async def scenario() -> None:
        recorder = PredictionRecorder(prediction_db, 10, 100)
        recorder.record([log_row(i) for i in range(5)] + [log_row(5, text="bad\x00text")] + [log_row(6), log_row(6)])
        await recorder.flush()
        await recorder.close()

    try:
        asyncio.run(scenario())
        assert prediction_db.count_predictions() == 6  # 0-4 and 6 (once)
        assert prediction_db.get_prediction("p00005") is None
    finally:
        prediction_db.database.dispose()
    assert dropped("rejected_row") == before + 1
