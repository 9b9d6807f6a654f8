"""The per-worker write-behind buffer in front of the predictions table, crash-safe through the worker's spool.

What a crash can lose. Each prediction is in its worker's spool (:mod:`app.monitoring.spool`, kernel page
cache) before its response is sent, so a worker killed by SIGKILL or the OOM killer loses none of the
predictions it answered: a surviving worker (within one flush interval) or the killed one's replacement
(when it starts) writes them. ``tests/integration/test_worker_kill.py`` SIGKILLs a worker under load and
requires at least 98 % of the ids answered 2xx in the log; it finds all of them. What can still be lost:
on an OS crash or power loss, spool writes not yet on disk and (SQLite ``synchronous=NORMAL``) the last
committed transactions; without a usable spool folder (``prediction_spool_unavailable``, or a failed
append, ``prediction_spool_write_failed``), the rows of the last flush interval
(0.5 s of a worker's traffic). Every row that never reaches the log is counted in
``sentiment_prediction_log_dropped_total{reason}`` (``buffer_full``, ``rejected_row``, ``shutdown``); a
row written twice is not duplicated (inserts skip existing ids).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import sys
from collections import deque
from collections.abc import Sequence

import structlog
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, SQLAlchemyError, StatementError

from app.monitoring.metrics import PREDICTION_LOG_DROPPED, PREDICTION_LOG_ERRORS, PREDICTION_LOG_PENDING
from app.monitoring.spool import NOT_SPOOLED, PredictionSpool
from app.settings import Settings
from app.storage.predictions import LOG_COLUMNS, LogRow, PredictionRepository

log = structlog.get_logger(__name__)


_ROW_BYTES = 420
"""Memory of one buffered row besides its text: its tuple, id, floats and the buffer's tuple (about
390 bytes measured, CPython 3.11; ``tests/storage/test_recorder.py`` checks the bound)."""

_TEXT = LOG_COLUMNS.index("text")

FLUSH_CHUNK_ROWS = 2000
"""Most rows one insert writes: a flush after an outage drains the buffer in chunks."""

_REJECTED, _COMMITTED = 2, 1


def _row_specific(exc: Exception) -> bool:
    """Whether a failed insert may be the fault of a row rather than of the database.

    Constraint and data errors (a NUL character on PostgreSQL, a value too long) and anything not from
    SQLAlchemy (``UnicodeEncodeError`` for a lone surrogate, raised by the driver) depend on the rows.
    Every other database error (connection lost, timeout, locked, missing table, permissions) would fail
    any row: those rows are kept and retried, never set aside.
    """
    if isinstance(exc, IntegrityError | DataError):
        return True
    if isinstance(exc, DBAPIError):
        return False
    if isinstance(exc, StatementError):  # a parameter SQLAlchemy could not bind, before the database saw it
        return True
    return not isinstance(exc, SQLAlchemyError)


def insert_setting_aside(
    predictions: PredictionRepository, rows: Sequence[LogRow], settled: bytearray
) -> list[tuple[int, str]]:
    """Insert ``rows``; return the (index, error type) of each row the database refused on its own.

    A batch refused for a reason that may be a row's (:func:`_row_specific`) is split in halves until each
    refused row is alone: one bad row among 2,000 costs about 22 inserts. ``settled[i]`` becomes
    _COMMITTED or _REJECTED as it happens, so when a database error ends the call (it raises), the rows
    still 0 are exactly the ones to keep. Blocking: run it on the database's threads.
    """
    rejected: list[tuple[int, str]] = []
    ranges = [(0, len(rows))]
    while ranges:
        low, high = ranges.pop()
        try:
            predictions.insert_rows(LOG_COLUMNS, rows[low:high])
        except Exception as exc:
            if not _row_specific(exc):
                raise
            if high - low == 1:
                settled[low] = _REJECTED
                rejected.append((low, type(exc).__name__))
            else:
                middle = (low + high) // 2
                ranges += [(middle, high), (low, middle)]  # the first half is tried first
            continue
        settled[low:high] = bytes([_COMMITTED]) * (high - low)
    return rejected


_Buffered = tuple[int, int, LogRow]  # (spool segment, bytes in memory, row)


class PredictionRecorder:
    """Per-worker write-behind buffer in front of the predictions table.

    Requests only append (:meth:`record`): to an in-memory deque and, when there is a spool, to the
    worker's spool file (see :mod:`app.monitoring.spool`). A background task writes the deque out every
    ``flush_interval`` seconds on the database's threads, so database latency never reaches a request and a
    failing database never fails a prediction.

    - A flush that fails for the database's sake (connection lost, timeout, locked) counts
      ``errors_total{reason="write_failed"}`` and keeps its rows for the next attempt.
    - A row the database refuses on its own is set aside without holding up the others (see
      :func:`insert_setting_aside`), counted ``dropped_total{reason="rejected_row"}`` and logged
      without its text.
    - Memory is bounded: at most ``max_buffer`` rows and ``max_buffer_bytes`` bytes (texts included)
      are held, rows being written included; beyond that the oldest buffered rows are dropped and
      counted ``dropped_total{reason="buffer_full"}`` (their spool copy goes too).
    - The task never dies: any error is logged and the next interval tries again.
    - ``close`` (graceful shutdown) writes what it can within ``shutdown_timeout`` seconds; what is
      left stays in the spool for the next worker, and rows without a spool copy are counted
      ``dropped_total{reason="shutdown"}``.
    - It adopts the spools of dead workers (while the database is healthy).
    """

    def __init__(
        self,
        predictions: PredictionRepository,
        flush_interval: float,
        max_buffer: int,
        *,
        max_buffer_bytes: int = 64 * 2**20,
        spool: PredictionSpool | None = None,
        shutdown_timeout: float = 10.0,
    ) -> None:
        self.predictions = predictions
        self.flush_interval = flush_interval
        self.max_buffer = max_buffer
        self.max_buffer_bytes = max_buffer_bytes
        self.spool = spool
        self.shutdown_timeout = shutdown_timeout
        self._buffer: deque[_Buffered] = deque()
        self._in_flight: Sequence[_Buffered] = ()
        self._bytes = 0  # of the buffered and in-flight rows
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._failing = False
        self._dropping = False

    @classmethod
    def from_settings(cls, predictions: PredictionRepository, settings: Settings) -> PredictionRecorder:
        """The recorder the service runs, with a spool under the settings' folder (one per database URL)."""
        root = settings.prediction_log_spool_dir or settings.state_dir / "prediction-spool"
        spool = PredictionSpool(root / hashlib.sha256(predictions.database.url.encode()).hexdigest()[:16])
        try:
            spool.open()
        except OSError as exc:  # a read-only or full disk: run without crash safety rather than not at all
            log.error("prediction_spool_unavailable", reason=type(exc).__name__, directory=str(root))
        return cls(
            predictions,
            settings.prediction_log_flush_seconds,
            settings.prediction_log_max_buffer,
            max_buffer_bytes=settings.prediction_log_max_buffer_bytes,
            spool=spool if spool.is_open else None,
            # Leave gunicorn's graceful timeout room for the requests in flight before the lifespan ends.
            shutdown_timeout=settings.graceful_timeout_seconds / 2,
        )

    def record(self, rows: Sequence[LogRow]) -> None:
        """Buffer rows (tuples of :data:`LOG_COLUMNS`) and spool them: on the request path, so cheap and never
        raising."""
        segment = self.spool.append(LOG_COLUMNS, rows) if self.spool is not None else NOT_SPOOLED
        self._add([(segment, _ROW_BYTES + sys.getsizeof(row[_TEXT]), row) for row in rows])

    def _add(self, items: list[_Buffered]) -> None:
        self._buffer.extend(items)
        self._bytes += sum(size for _, size, _ in items)
        self._enforce_bounds()

    def _enforce_bounds(self) -> None:
        dropped: list[int] = []
        while self._buffer and (
            len(self._buffer) + len(self._in_flight) > self.max_buffer or self._bytes > self.max_buffer_bytes
        ):
            segment, size, _ = self._buffer.popleft()
            self._bytes -= size
            dropped.append(segment)
        if dropped:
            if self.spool is not None:
                self.spool.release(dropped)
            PREDICTION_LOG_DROPPED.labels(reason="buffer_full").inc(len(dropped))
            if not self._dropping:  # one line per episode
                log.error("prediction_log_buffer_full", dropped=len(dropped), rows=self.pending, bytes=self._bytes)
            self._dropping = True

    @property
    def pending(self) -> int:
        """Rows not written yet: buffered, or being written."""
        return len(self._buffer) + len(self._in_flight)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="prediction-log-flush")

    async def _run(self) -> None:
        while True:
            try:
                await self.adopt_orphans()
                # Set here, not per request (a gauge write costs about as much as buffering a row):
                # stale by at most one flush interval, or one write while the database hangs.
                PREDICTION_LOG_PENDING.set(self.pending)
                await self.flush()
            except Exception as exc:  # a bug here must not stop the log for the rest of the worker's life
                log.error("prediction_log_flush_failed", reason=type(exc).__name__)
            await asyncio.sleep(self.flush_interval)

    async def adopt_orphans(self) -> int:
        """Buffer the spooled rows of dead workers (not while the database fails: they wait on disk)."""
        if self.spool is None or (self._failing and self._buffer):
            return 0
        claimed = await asyncio.to_thread(self.spool.claim_orphans, LOG_COLUMNS)
        for segment, rows in claimed:
            self.spool.adopted(segment, len(rows))
            self._add([(segment, _ROW_BYTES + sys.getsizeof(row[_TEXT]), row) for row in rows])
        return sum(len(rows) for _, rows in claimed)

    async def flush(self) -> None:
        """Write out everything buffered so far (serialised: one flush at a time per worker)."""
        async with self._lock:
            if self.spool is not None:
                self.spool.rotate()  # rows buffered from now on go to a new segment
            todo = len(self._buffer)
            while todo > 0 and self._buffer:
                chunk = self._take(min(todo, FLUSH_CHUNK_ROWS))
                todo -= len(chunk)
                if not await self._write(chunk):
                    break
            PREDICTION_LOG_PENDING.set(self.pending)

    def _take(self, rows: int) -> list[_Buffered]:
        chunk: list[_Buffered] = []
        size = 0
        while self._buffer and len(chunk) < rows and size < self.max_buffer_bytes // 8:
            chunk.append(self._buffer.popleft())
            size += chunk[-1][1]
        self._in_flight = chunk
        return chunk

    async def _write(self, chunk: list[_Buffered]) -> bool:
        """Write one chunk; False when the database failed (the unwritten rows are back in the buffer)."""
        rows = [row for _, _, row in chunk]
        settled = bytearray(len(rows))
        try:
            rejected = await self.predictions.call(insert_setting_aside, self.predictions, rows, settled)
        except Exception as exc:
            self._settle(chunk, settled)
            PREDICTION_LOG_ERRORS.labels(reason="write_failed").inc()
            if not self._failing:  # one line per outage, not one per flush
                log.error("prediction_log_write_failed", rows=len(rows), reason=type(exc).__name__)
            self._failing = True
            return False
        except BaseException:  # cancelled (close's deadline): the thread may still commit them; idempotent
            self._settle(chunk, settled)
            raise
        self._settle(chunk, settled)
        for index, reason in rejected:
            row = dict(zip(LOG_COLUMNS, rows[index], strict=False))
            log.error(
                "prediction_log_row_rejected",
                prediction_id=row.get("id"),
                reason=reason,
                text_length=row.get("text_length"),
                model_version=row.get("model_version"),
            )
        if rejected:
            PREDICTION_LOG_DROPPED.labels(reason="rejected_row").inc(len(rejected))
        if self._failing:
            log.info("prediction_log_recovered", rows=len(rows))
        self._failing = self._dropping = False
        return True

    def _settle(self, chunk: list[_Buffered], settled: bytearray) -> None:
        """Forget the written and rejected rows of ``chunk``; put the others back in front of the buffer."""
        self._in_flight = ()
        done = [item for item, state in zip(chunk, settled, strict=True) if state]
        if len(done) < len(chunk):
            self._buffer.extendleft(reversed([item for item, state in zip(chunk, settled, strict=True) if not state]))
        self._bytes -= sum(size for _, size, _ in done)
        if self.spool is not None:
            self.spool.release(segment for segment, _, _ in done)
        self._enforce_bounds()

    async def close(self) -> None:
        """Stop the task and write what is buffered, for at most ``shutdown_timeout`` seconds."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        try:
            await asyncio.wait_for(self.flush(), self.shutdown_timeout)
        except TimeoutError:
            log.error("prediction_log_shutdown_flush_timed_out", seconds=self.shutdown_timeout)
        left = [*self._in_flight, *self._buffer]
        lost = sum(1 for segment, _, _ in left if segment == NOT_SPOOLED)
        if lost:
            PREDICTION_LOG_DROPPED.labels(reason="shutdown").inc(lost)
            log.error("prediction_log_rows_lost", rows=lost)
        if len(left) > lost:
            log.warning("prediction_log_rows_left_in_spool", rows=len(left) - lost)
        if self.spool is not None:
            self.spool.close()
        PREDICTION_LOG_PENDING.set(0)
